"""The ``copytune`` command line. Commands are thin: they call the library and print; errors exit 1 in one line."""

from __future__ import annotations

import click
import torch

import copytune


@click.group()
@click.version_option(copytune.__version__, prog_name="copytune")
def main() -> None:
    """Autotuned dispatch of batched small GPU copies."""


@main.command()
@click.option("--device", default=None, help="Device to report on (default: cuda if present, else cpu).")
def info(device: str | None) -> None:
    """Show the device, library versions and every strategy's availability (with the reason when not).

    Example: copytune info --device cuda:1
    """
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
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


@main.command()
@cache_option
def show(cache_path: str | None) -> None:
    """Table of cached winners: signature in words, mode, winner, its time, per-copy torch time, speedup.

    Example: copytune show --cache ./fleet.db
    """
    from copytune.cache.store import Store
    from copytune.signature import describe_signature

    store = Store(cache_path)
    rows = store.rows()
    if store.disabled:
        raise click.ClickException(f"cannot read the cache: {store.disabled}")
    if not rows:
        click.echo(f"no tuned entries in {store.path}")
        return
    header = f"{'device':<24} {'signature':<52} {'mode':<6} {'winner':<18} {'µs':>8} {'torch µs':>9} {'speedup':>8}"
    click.echo(header)
    click.echo("-" * len(header))
    for r in sorted(rows, key=lambda r: (r["device"].get("name", r["device"].get("kind", "")), r["mode"],
                                        describe_signature(r["signature"]))):
        device = str(r["device"].get("name") or r["device"].get("kind"))[:24]
        speedup = r["baseline_us"] / r["time_us"] if r["time_us"] > 0 else float("inf")
        click.echo(f"{device:<24} {describe_signature(r['signature'])[:52]:<52} {r['mode']:<6} {r['strategy']:<18} "
                   f"{r['time_us']:8.2f} {r['baseline_us']:9.2f} {speedup:7.2f}×")


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__
