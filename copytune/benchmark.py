"""The measurements behind ``copytune bench``: in one run on one device, for each (max_len, bs) of a model
profile, every strategy (its fastest bit-exact parameter set, through the tuner), the engine's own ``copy_``
sequence, the public call site through a dispatcher, and the engine-style fused kernel (``copytune.reference``),
eager and CUDA-graph-replayed; then large copies against torch's bandwidth. Every ratio is against
``torch_per_copy`` timed in the same run (bound views: the strongest form of the per-copy baseline).

eager   wall µs per call of back-to-back calls on rotating sources, one synchronize (CPU launch cost counts)
graph   GPU µs per call: 20 calls captured in one CUDA graph, replayed
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from copytune import tuner
from copytune.dispatch import Dispatcher
from copytune.kernels.registry import get_strategy
from copytune.models import ModelProfile
from copytune.plan import CopyPlan
from copytune.reference import raise_if

BASELINE = tuner.BASELINE
STEPS = 8  # rotating inputs per call site (the page table grows a column per step, as in decoding)
ENGINE, REFERENCE = "engine copy_ sequence", "engine-style fused kernel"
NOTES = {ENGINE: "views built per call, as the engine does", REFERENCE: "copytune.reference, views prebuilt"}


@dataclass
class Row:
    name: str
    eager_us: float | None = None
    graph_us: float | None = None
    note: str = ""  # the winning parameters, or why there is no time


@dataclass
class Point:
    title: str
    bs: int
    max_len: int
    nbytes: int
    rows: list[Row] = field(default_factory=list)

    def ratio(self, row: Row, mode: str) -> float | None:
        mine, base = getattr(row, f"{mode}_us"), getattr(self.rows[0], f"{mode}_us")
        return mine / base if mine is not None and base else None


def modes_for(device: torch.device) -> list[str]:
    return ["eager", "graph"] if device.type == "cuda" else ["eager"]


Step = Callable[[int], None]


def interleaved(steps: dict[str, Step], mode: str, device: torch.device, repeats: int | None = None) -> dict:
    """Median µs per call of each step, timed round-robin (one timer pass of each per round), so slow phases of
    a shared host fall on every row alike instead of skewing whichever row ran during them."""
    repeats = repeats or (7 if mode == "eager" else 5)
    calls = 400 if mode == "eager" else 1000
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(tuner.default_timer(step, mode, device, calls=calls, repeats=1))
    return {name: statistics.median(ts) for name, ts in times.items()}


def strategy_steps(plan: CopyPlan, device: torch.device, mode: str) -> tuple[dict[str, Step], dict[str, str]]:
    """Each strategy's fastest bit-exact candidate for ``mode`` (through the tuner, which checks every one), bound
    to scratch copies of ``plan`` with rotating sources; the baseline first. Also a note per strategy: its
    parameters, or why it has no time."""
    notes: dict[str, str] = {}
    best: dict[str, tuner.Timing] = {}
    try:
        timings = tuner.tune(plan, mode, pool=tuner.default_pool(device)).timings
    except tuner.NoisyTiming as exc:  # nothing is stored from a bench: its own round-robin times every one again
        timings = exc.timings
    for t in timings:
        if t.time_us is None or t.reason is not None:  # no time, or not exact
            notes.setdefault(t.strategy, t.reason or "no time")
        elif t.strategy not in best or t.time_us < best[t.strategy].time_us:
            best[t.strategy] = t
            notes[t.strategy] = ",".join(f"{k}={v}" for k, v in t.params.items())
    scratch = tuner.Scratch(plan, sets=3)
    steps = {}
    for name in sorted(best, key=lambda n: n != BASELINE):  # the baseline first
        launch = get_strategy(name).bind(scratch.plan, best[name].params)
        steps[name] = lambda i, launch=launch: launch(scratch.srcs[i % scratch.sets])
    return steps, notes


def strategy_steps_by_mode(plan: CopyPlan, device: torch.device) -> tuple[dict[str, dict[str, Step]], dict]:
    """``strategy_steps`` for every mode of ``device``; the notes of the first mode (eager) win."""
    steps, notes = {}, {}
    for mode in modes_for(device):
        steps[mode], mode_notes = strategy_steps(plan, device, mode)
        notes.update({k: v for k, v in mode_notes.items() if k not in notes})
    return steps, notes


def call_site_steps(profile: ModelProfile, bs: int, max_len: int, forward_mode: str, device: torch.device,
                    mode: str, cache: Path, reference=None) -> dict[str, Step]:
    """The engine's ``copy_`` sequence, the public call through a dispatcher of ``mode`` (tuned on first use into
    ``cache``) and the engine-style fused kernel; each checked bit-exact before it is timed."""
    site = profile.call_site(bs, max_len, forward_mode, device, STEPS)
    inputs = site.inputs
    steps = {ENGINE: lambda i: site.engine(inputs[i % STEPS])}
    d = Dispatcher(cache, mode=mode)
    site.check(lambda x: site.run(x, d))  # binds and tunes outside the clock
    steps[f"copytune {site.name}"] = lambda i: site.run(inputs[i % STEPS], d)
    if reference is not None:
        views = [site.pairs(x) for x in inputs]
        srcs = [[s for s, _ in v] for v in views]
        dsts = [[t for _, t in v] for v in views]
        site.check(lambda x: raise_if(reference.launch(*map(list, zip(*site.pairs(x))))))
        steps[REFERENCE] = lambda i: reference.launch(srcs[i % STEPS], dsts[i % STEPS])
    return steps


def measure(steps_by_mode: dict[str, dict[str, Step]], notes: dict[str, str], device) -> list[Row]:
    rows: dict[str, Row] = {}
    for mode, steps in steps_by_mode.items():
        for name, us in interleaved(steps, mode, device).items():
            row = rows.setdefault(name, Row(name, note=notes.get(name, NOTES.get(name, ""))))
            setattr(row, f"{mode}_us", us)
    for name, note in notes.items():  # strategies without a time: say why (unavailable, declined, failed)
        rows.setdefault(name, Row(name, note=note))
    return list(rows.values())


def sweep(profile: ModelProfile, batch_sizes: Sequence[int], max_lens: Sequence[int], forward_mode: str,
          device: torch.device, reference=None) -> Iterator[Point]:
    """Each (max_len, bs) point as soon as it is measured: a generator, so a caller interrupted mid-sweep still holds
    every point measured before it."""
    with tempfile.TemporaryDirectory() as tmp:
        for max_len in max_lens:
            for bs in batch_sizes:
                plan = CopyPlan.from_pairs(profile.example_pairs(bs, max_len, forward_mode, device))
                point = Point(f"{profile.name} {forward_mode} bs={bs} max_len={max_len}: {len(plan)} copies, "
                              f"{plan.nbytes} bytes", bs, max_len, plan.nbytes)
                steps, notes = strategy_steps_by_mode(plan, device)
                for mode in steps:
                    steps[mode].update(call_site_steps(profile, bs, max_len, forward_mode, device, mode,
                                                       Path(tmp) / f"{mode}.db", reference))
                point.rows = measure(steps, notes, device)
                yield point


def large_pairs(mib: int, layout: str, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``mib`` MiB of int32: one contiguous copy, or a [4096, cols] source into the left half of a wider buffer."""
    n = mib * (1 << 20) // 4
    if layout == "contiguous":
        return [(torch.empty(n, dtype=torch.int32, device=device), torch.empty(n, dtype=torch.int32, device=device))]
    rows = 4096
    cols = n // rows
    dst = torch.empty(rows, 2 * cols, dtype=torch.int32, device=device)[:, :cols]
    return [(torch.empty(rows, cols, dtype=torch.int32, device=device), dst)]


def large(sizes_mib: Sequence[int], device: torch.device) -> Iterator[Point]:
    """Large copies: every strategy's time and bandwidth against torch's ``copy_`` (the target is >= 0.95x); each
    point as soon as it is measured, as ``sweep`` does."""
    for mib in sizes_mib:
        for layout in ("contiguous", "2-D strided"):
            plan = CopyPlan.from_pairs(large_pairs(mib, layout, device))
            steps, notes = strategy_steps_by_mode(plan, device)
            yield Point(f"large: {mib} MiB, {layout}", 0, 0, plan.nbytes, measure(steps, notes, device))


def format_point(point: Point, modes: Sequence[str], bandwidth: bool = False) -> list[str]:
    head = f"{'':<28} {'note':<30} " + " ".join(f"{m + ' µs':>10} {'ratio':>6}" for m in modes)
    if bandwidth:
        head += f" {'GB/s':>7} {'of torch':>8}"
    lines = [point.title, head]
    for row in point.rows:
        cells = []
        for m in modes:
            us, r = getattr(row, f"{m}_us"), point.ratio(row, m)
            cells.append(f"{us:10.2f} {r:6.2f}" if us is not None else f"{'-':>10} {'-':>6}")
        line = f"{row.name:<28} {row.note[:30]:<30} " + " ".join(cells)
        if bandwidth:
            us = row.graph_us if row.graph_us is not None else row.eager_us
            base = point.rows[0].graph_us if point.rows[0].graph_us is not None else point.rows[0].eager_us
            line += f" {2 * point.nbytes / us / 1e3:7.0f} {base / us:7.2f}×" if us else ""
        lines.append(line)
    return lines


def as_json(points: list[Point], large_points: list[Point], device: torch.device, forward_mode: str,
            interrupted: bool = False) -> dict:
    """The run as JSON; ``interrupted``: the points are those measured before the run was stopped (Ctrl-C)."""
    import triton  # noqa: PLC0415

    import copytune  # noqa: PLC0415

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "copytune": copytune.__version__, "forward_mode": forward_mode, "interrupted": interrupted,
            "points": [asdict(p) for p in points], "large": [asdict(p) for p in large_points]}


def plot(results: dict, path: str | Path) -> None:
    """µs per call against bs, eager and graph, one panel per max_len (needs matplotlib)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    points = results["points"]
    max_lens = sorted({p["max_len"] for p in points})
    modes = [m for m in ("eager", "graph") if any(r[f"{m}_us"] is not None for p in points for r in p["rows"])]
    fig, axes = plt.subplots(len(modes), len(max_lens), figsize=(6 * len(max_lens), 4.5 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, max_len in enumerate(max_lens):
            ax = axes[i][j]
            mine = [p for p in points if p["max_len"] == max_len]
            names = [r["name"] for r in mine[0]["rows"]]
            for name in names:
                xs, ys = [], []
                for p in mine:
                    row = next(r for r in p["rows"] if r["name"] == name)
                    if row[f"{mode}_us"] is not None:
                        xs.append(p["bs"])
                        ys.append(row[f"{mode}_us"])
                if xs:
                    ax.plot(xs, ys, marker="o", label=name, linewidth=2.5 if name.startswith("copytune") else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("bs")
            ax.set_ylabel(f"{mode} µs per call")
            ax.set_title(f"{mode}, max_len {max_len}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['card']} | torch {results['torch']} | triton {results['triton']} | "
                 f"{results['forward_mode']} metadata refresh")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
