"""The ``copytune`` command line. Commands are thin: they call the library and print; errors exit 1 in one line."""

from __future__ import annotations

import logging
import os

import click
import torch

import copytune
from copytune import log


@click.group()
@click.version_option(copytune.__version__, prog_name="copytune")
@click.option("-v", "--verbose", count=True, help="Log more: -v each tuned key and start-up step, -vv debug.")
@click.option("-q", "--quiet", is_flag=True, help="Log errors only (no warnings).")
def main(verbose: int, quiet: bool) -> None:
    """Autotuned dispatch of batched small GPU copies.

    Logging: -v/-q here, or COPYTUNE_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR) for any process using copytune.
    """
    if quiet or verbose:
        log.configure(logging.ERROR if quiet else logging.INFO if verbose == 1 else logging.DEBUG, own_handler=True)


@main.command()
@click.option("--device", default=None, help="Device to report on (default: cuda if present, else cpu).")
def info(device: str | None) -> None:
    """Show the device, library versions and every strategy's availability (with the reason when not).

    Example: copytune info --device cuda:1
    """
    dev = _device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    click.echo(f"device   {dev} ({name})")
    click.echo(f"torch    {torch.__version__} (CUDA {torch.version.cuda or '-'})")
    click.echo(f"triton   {_triton_version()}")
    click.echo(f"copytune {copytune.__version__}")
    click.echo("strategies:")
    for strategy_name, strategy in copytune.strategies().items():
        reason = strategy.available(dev)
        click.echo(f"  {strategy_name:<18} {'available' if reason is None else 'unavailable: ' + reason}")


@main.command()
@click.option("--device", default="cuda", show_default=True, help="CUDA device whose architecture to build for.")
@click.option("--verbose", is_flag=True, help="Show the compiler's output.")
def build(device: str, verbose: bool) -> None:
    """Compile the cuda_ext strategy ahead of use (cached on disk per source hash, GPU arch and versions).

    Example: copytune build --device cuda:0
    """
    import torch  # noqa: PLC0415

    from copytune.kernels import cuda_ext  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise click.ClickException("no CUDA device visible to torch: nothing to build for")
    try:
        lib, seconds = cuda_ext.build(device, verbose=verbose)
    except cuda_ext.BuildError as exc:
        raise click.ClickException(f"build failed: {exc}") from None
    click.echo(f"cuda_ext ready: {lib}" + (f" (built in {seconds:.1f} s)" if seconds else " (already built)"))


cache_option = click.option(
    "--cache", "cache_path", type=click.Path(dir_okay=False), default=None, envvar="COPYTUNE_CACHE",
    help="SQLite cache file (default: $COPYTUNE_CACHE or ~/.cache/copytune/cache.db).")


def _open_store(cache_path):
    """The cache as read-only commands (and ``clear``) see it: a file that does not exist reads as empty and is
    not created."""
    from copytune.cache.store import Store

    store = Store(cache_path, create=False)
    rows = store.rows()
    if store.disabled:
        raise click.ClickException(f"cannot read the cache: {store.disabled}")
    return store, rows


def _this_device_fingerprint() -> dict:
    import torch

    from copytune.signature import device_fingerprint

    return device_fingerprint("cuda" if torch.cuda.is_available() else "cpu")


@main.command()
@cache_option
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def show(cache_path: str | None, as_json: bool) -> None:
    """Table of cached winners: signature in words, mode, winner, its time, per-copy torch time, speedup.

    Example: copytune show --cache ./fleet.db
    """
    import json

    from copytune.signature import describe_signature

    store, rows = _open_store(cache_path)
    if as_json:
        click.echo(json.dumps(rows, indent=1, sort_keys=True))
        return
    if not rows:
        click.echo(f"no tuned entries in {store.path}")
        return
    header = f"{'device':<24} {'signature':<52} {'mode':<6} {'winner':<18} {'µs':>8} {'torch µs':>9} {'speedup':>8}"
    click.echo(header)
    click.echo("-" * len(header))
    for r in sorted(rows, key=lambda r: (r["device"].get("name", r["device"].get("kind", "")), r["mode"],
                                        describe_signature(r["signature"]))):
        device = str(r["device"].get("name") or r["device"].get("kind"))[:24]
        click.echo(f"{device:<24} {describe_signature(r['signature'])[:52]:<52} {r['mode']:<6} {r['strategy']:<18} "
                   f"{_times(r)}")


@main.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--all-devices", is_flag=True, help="Export every device's entries, not only this machine's GPU.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (path, entries) instead of a line.")
@cache_option
def export_cmd(file: str, all_devices: bool, as_json: bool, cache_path: str | None) -> None:
    """Write the tuned winners to a versioned JSON bundle (data only) for other machines (FILE '-' = stdout).

    Example: copytune export h100.json && scp h100.json node7: && ssh node7 copytune import h100.json
    """
    import json

    from copytune.cache.bundle import export_rows, make_bundle

    store, _ = _open_store(cache_path)
    rows = export_rows(store, None if all_devices else _this_device_fingerprint())
    text = json.dumps(make_bundle(rows), indent=1, sort_keys=True)
    if file == "-":
        click.echo(text)
        return
    try:
        with open(file, "w") as f:
            f.write(text + "\n")
    except OSError as exc:
        raise click.ClickException(f"cannot write {file}: {exc.strerror or exc}") from None
    click.echo(json.dumps({"path": file, "entries": len(rows)}) if as_json
               else f"exported {len(rows)} entries to {file}")


@main.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--replace", is_flag=True, help="Overwrite existing entries even when they are faster.")
@click.option("--dry-run", is_flag=True, help="Validate and say what would change; write nothing.")
@cache_option
def import_cmd(file: str, replace: bool, dry_run: bool, cache_path: str | None) -> None:
    """Merge a bundle into the cache: validated completely first, written in one transaction; per key the
    faster entry is kept unless --replace. Entries of other devices are stored but never used here.

    Example: copytune import h100.json --dry-run
    """
    from copytune.cache.bundle import BundleError, import_file
    from copytune.cache.store import Store

    try:
        plan = import_file(file, Store(cache_path, create=not dry_run), replace=replace, dry_run=dry_run)
    except BundleError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    click.echo(("would import: " if dry_run else "imported: ") + plan.summary())


@main.command()
@click.option("--device-only", is_flag=True, help="Remove only the entries tuned on this machine's device.")
@cache_option
def clear(device_only: bool, cache_path: str | None) -> None:
    """Delete tuned entries from the cache (all of them, or this device's).

    Example: copytune clear --device-only
    """
    store, rows = _open_store(cache_path)
    if device_only:
        fp = _this_device_fingerprint()
        removed = store.delete([r["key"] for r in rows if r["device"] == fp])
    else:
        removed = store.delete()
    click.echo(f"removed {removed} entries from {store.path}")


@main.command()
@click.option("--model", default="nsa", show_default=True, help="Model profile whose batches to time.")
@click.option("--batch-sizes", "--bs", "batch_sizes", default="1,8,32,128,256,512", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--max-lens", "--max-len", "max_lens", default="1024,2048", show_default=True,
              help="Comma-separated context lengths.")
@click.option("--forward-mode", type=click.Choice(["decode", "target_verify", "draft_extend"]), default="decode",
              show_default=True, help="Which replay step's copies.")
@click.option("--large", "large_mib", default="64,256", show_default=True,
              help="Comma-separated sizes (MiB) of the large-copy batches; 'none' skips them.")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Include the engine-style fused kernel (compiled on first use, CUDA only).")
@click.option("--engine", "engine_version", default="0.5.23", show_default=True,
              help="Also time the real engine's own refresh (sglang wheel of this release, its JIT kernel; CUDA "
                   "only, needs apache-tvm-ffi and msgspec) against copytune's patched seam; 'none' skips it.")
@click.option("--backends", default="2,3,4,6", show_default=True,
              help="Draft-backend counts for the engine's multi-step replay (with --engine).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of µs per call against bs here (needs matplotlib).")
@click.option("--device", default=None, help="Device (default: cuda if present, else cpu).")
def bench(model, batch_sizes, max_lens, forward_mode, large_mib, reference, engine_version, backends, json_path,
          plot_path, device) -> None:
    """Every strategy, the engine's copy_ sequence, copytune's call site through the dispatcher and the engine-style
    fused kernel, side by side for the model's sweep, eager and graph, as ratios to per-copy torch from the same
    run; then large copies against torch's bandwidth. Nothing is stored in the cache. Ctrl-C stops the run and keeps
    the points measured so far (the JSON says "interrupted": true; exit status 130).

    Example: copytune bench --model nsa --bs 1,32,256,512 --max-len 1024,2048 --json out.json --plot out.png
    """
    import json

    from copytune import benchmark
    from copytune.models import get_profile

    try:
        profile = get_profile(model)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    sizes, lens = _int_list(batch_sizes), _int_list(max_lens)
    big = [] if large_mib.strip().lower() == "none" else _int_list(large_mib)
    _check_output_folder("--json", json_path)
    _check_output_folder("--plot", plot_path)
    if plot_path:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
    dev = _device(device)
    modes = benchmark.modes_for(dev)

    def collect(into: list, measured, bandwidth=False):
        for point in measured:
            into.append(point)
            click.echo("\n".join(benchmark.format_point(point, modes, bandwidth)) + "\n")

    points, large_points, engine, interrupted = [], [], None, False
    try:  # a sweep takes minutes: Ctrl-C keeps what was measured instead of losing it all
        ref = _bench_setup(dev, reference)
        collect(points, benchmark.sweep(profile, sizes, lens, forward_mode, dev, ref))
        collect(large_points, benchmark.large(big, dev), bandwidth=True)
        if engine_version.strip().lower() != "none":
            engine = _engine_rows(engine_version, sizes, lens, _int_list(backends), dev)
    except KeyboardInterrupt:
        interrupted = True
    results = benchmark.as_json(points, large_points, dev, forward_mode, interrupted=interrupted)
    results["engine"] = engine
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump(results, f, indent=1)
        except OSError as exc:
            raise click.ClickException(f"cannot write {json_path}: {exc.strerror or exc}") from None
        click.echo(f"wrote {json_path}")
    if plot_path and points:
        try:
            benchmark.plot(results, plot_path)
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
        click.echo(f"wrote {plot_path}")
    if interrupted:
        total = len(sizes) * len(lens) + 2 * len(big)
        click.echo(f"bench interrupted after {len(points) + len(large_points)} of {total} points: the results above "
                   "are partial", err=True)
        click.get_current_context().exit(130)  # the shell's status for a run stopped by SIGINT


def _check_output_folder(option: str, path: str | None) -> None:
    """One line, before anything is measured, when ``path`` could not be written: a bench run takes minutes and
    would otherwise lose its results at the end."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise click.ClickException(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise click.ClickException(f"{option} {path}: folder {folder} is not writable")


def _bench_setup(dev, reference: bool):
    """On CUDA: cuda_ext built and, with ``reference``, the engine-style kernel compiled (returned); else None."""
    if dev.type != "cuda":
        return None
    _build_quietly(dev)
    if not reference:
        return None
    from copytune import reference as reference_module  # noqa: PLC0415

    click.echo("compiling the engine-style reference kernel (first use on this machine)...", err=True)
    return reference_module.load()


def _engine_rows(version: str, sizes, lens, backends, dev) -> dict | None:
    """The real engine against copytune's patched seam (copytune.engine_bench); one line and None where it cannot
    run here."""
    if dev.type != "cuda":
        click.echo("engine comparison skipped: it needs a CUDA device", err=True)
        return None
    from copytune import engine_bench, sglang_oracle

    click.echo(f"the real engine, sglang {version} (its JIT kernel through its own wrapper):")
    try:
        return engine_bench.run(version, sizes, lens, backends, dev, progress=click.echo)
    except sglang_oracle.EngineUnavailable as exc:
        click.echo(f"engine comparison skipped: {exc}", err=True)
        return None


def _device(name: str | None):
    """``--device`` as a torch device that exists here (default: cuda if present, else cpu); one line if not."""
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise click.ClickException(f"--device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"--device {name}: no CUDA device is visible to torch {torch.__version__}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise click.ClickException(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cuda", "cpu"):
        raise click.ClickException(f"--device {name}: copytune runs on cuda or cpu")
    return dev


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


@main.command()
@click.option("--model", default="nsa", show_default=True, help="Model profile whose copy batches to tune.")
@click.option("--batch-sizes", default=None, help="Comma-separated batch sizes (default: the engine's CUDA-graph "
              "sizes 1,2,4,...,256).")
@click.option("--max-len", "max_lens", default=None, help="Comma-separated context lengths (default: 1024,8192).")
@click.option("--mode", type=click.Choice(["eager", "graph", "both"]), default="both", show_default=True,
              help="Launch mode to tune: eager (CPU launch cost counts) or graph (captured, GPU time).")
@click.option("--forward-mode", type=click.Choice(["decode", "target_verify", "draft_extend"]), default="decode",
              show_default=True, help="Which replay step's copies.")
@click.option("--device", default=None, help="Device (default: cuda if present, else cpu).")
@click.option("--retune", is_flag=True, help="Time every key again and replace the stored winners.")
@cache_option
def tune(model, batch_sizes, max_lens, mode, forward_mode, device, retune, cache_path) -> None:
    """Pre-tune a machine: time every strategy on a model's copy batches and store the winners.

    Idempotent: entries already in the cache are reused, so a second run takes seconds.

    Example: copytune tune --model nsa --batch-sizes 1,8,64 --max-len 4096 --mode eager
    """
    import time  # noqa: PLC0415

    from copytune import CopyPlan, Dispatcher  # noqa: PLC0415
    from copytune.models import get_profile  # noqa: PLC0415

    try:
        profile = get_profile(model)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    sizes = _int_list(batch_sizes) if batch_sizes else list(profile.batch_sizes)
    lens = _int_list(max_lens) if max_lens else list(profile.max_lens)
    dev = _device(device)
    if dev.type == "cuda":
        _build_quietly(dev)
    modes = ["eager", "graph"] if mode == "both" else [mode]
    if dev.type != "cuda":
        click.echo("tuning on the CPU: these timings are stored under this CPU's own fingerprint and never "
                   "applied to a GPU", err=True)
        if "graph" in modes:
            if mode == "graph":
                raise click.ClickException("--mode graph needs a CUDA device (CUDA-graph capture)")
            click.echo("graph mode skipped: CUDA graphs need a CUDA device", err=True)
            modes = ["eager"]
    items = [(m, ml, bs) for m in modes for ml in lens for bs in sizes]
    from copytune.cache.store import Store  # noqa: PLC0415

    # a command may wait for another process's write (the serving default would skip the row instead)
    dispatchers = {m: Dispatcher(cache_path, mode=m, store=Store(cache_path)) for m in modes}
    rows, t0, retuned = [], time.perf_counter(), set()
    with click.progressbar(items, label=f"tuning {model} ({forward_mode})", file=click.get_text_stream("stderr"),
                           item_show_func=lambda it: it and f"{it[0]} max_len={it[1]} bs={it[2]}") as bar:
        for m, ml, bs in bar:
            d = dispatchers[m]
            plan = CopyPlan.from_pairs(profile.example_pairs(bs, ml, forward_mode, dev))
            key = d.key(plan)
            choice = d.choose(plan, retune=retune and key not in retuned)
            retuned.add(key)
            rows.append((m, ml, bs, choice, d.store.get(key), key))
    click.echo(f"\n{'mode':<6} {'max_len':>7} {'bs':>4} {'winner':<18} {'µs':>8} {'torch µs':>9} {'speedup':>8} origin")
    for m, ml, bs, choice, row, _ in rows:
        t = _times(row) if row else f"{'-':>8} {'-':>9} {'-':>8}"
        click.echo(f"{m:<6} {ml:>7} {bs:>4} {choice.strategy:<18} {t} {choice.origin}")
    keys = len({r[-1] for r in rows})
    store = dispatchers[modes[0]].store
    click.echo(f"{len(items)} batches, {keys} keys, {time.perf_counter() - t0:.1f} s; cache: {store.path}")
    unsaved = [key for *_, row, key in rows if row is None]
    if store.disabled or unsaved:  # a provisioning script must not believe this node is tuned
        raise click.ClickException(f"the winners were not saved to {store.path}: "
                                   f"{store.disabled or f'{len(set(unsaved))} keys missing from the cache'}")


def _build_quietly(device) -> None:
    from copytune.kernels import cuda_ext  # noqa: PLC0415

    try:
        cuda_ext.build(device)
    except cuda_ext.BuildError as exc:
        click.echo(f"cuda_ext not built ({exc}); tuning without it", err=True)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@cache_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(cache_path, command: tuple[str, ...]) -> None:
    """Run COMMAND with copytune serving the serving engine's metadata copies: no change to the engine or the
    launch script. Every Python process it starts patches sglang's DSA/NSA backend when the engine imports it
    and prints one line saying so.

    Example: copytune run -- python -m sglang.launch_server --model-path deepseek-ai/DeepSeek-V3.2 --tp 8
    """
    import os  # noqa: PLC0415

    from copytune.autoload import autoload_env  # noqa: PLC0415

    env = autoload_env(os.environ, cache_path)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise click.ClickException(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None


def _times(row: dict) -> str:
    """'µs torch-µs speedup×' of a row; '-' where the baseline failed when it was tuned (unknown)."""
    base = row["baseline_us"]
    if base is None:
        return f"{row['time_us']:8.2f} {'-':>9} {'-':>8}"
    speedup = base / row["time_us"] if row["time_us"] > 0 else float("inf")
    return f"{row['time_us']:8.2f} {base:9.2f} {speedup:7.2f}×"
