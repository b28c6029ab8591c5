"""Timing every usable strategy on a batch the way its call site runs, and picking the fastest exact one.

Candidates run on scratch buffers with the batch's geometry and address alignment (the caller's tensors are never
written), on several rotating source sets so caches do not flatter. Each is checked bit-exact against
``dst.copy_(src)`` on poisoned destinations with guard bytes around them, then timed:

- ``eager``: wall time per call over N back-to-back calls and one synchronize (CPU launch cost counts);
- ``graph``: K calls captured in a CUDA graph, replayed, timed with CUDA events (GPU time only).

A candidate that raises or copies wrong bytes scores infinity and is recorded with its reason, never fatal.
The timer is an argument, so the logic is tested on CPU with scripted timings.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from copytune.kernels import Strategy, get_strategy, strategies
from copytune.plan import MAX_ALIGN, CopyPlan, span_bytes

BASELINE = "torch_per_copy"
# Eager candidates within 5% of the fastest wall time differ by launch noise (±0.3 µs of a 5–7 µs launch on the
# H100/H200 hosts), while their GPU time can differ by 1.5× (cuda_ext unroll 1 vs 8 on a 512 KiB page table:
# 3.49 vs 2.34 µs, H200). The copies run just before the graph replays, so their GPU time is on the step's
# critical path: among those close candidates, the least GPU time wins.
EAGER_TIE = 0.05
# Checked launches before timing (rotating over the source sets, destinations poisoned each time), plus one round
# after it: a candidate wrong 1 call in 4 won 4-5 of 12 tunes with 3 checks, one wrong from its 4th call on won
# and then copied wrong bytes every call.
CHECKED_RUNS = 8
Timer = Callable[[Callable[[int], None], str, torch.device], float]  # (step(i), mode, device) -> µs per step


@dataclass
class Timing:
    strategy: str
    params: dict
    time_us: float | None = None
    reason: str | None = None  # why it was skipped or excluded
    gpu_us: float | None = None  # eager candidates close to the fastest: GPU time per call (graph replay)

    def as_json(self) -> dict:
        return {"strategy": self.strategy, "params": self.params, "time_us": self.time_us, "reason": self.reason,
                "gpu_us": self.gpu_us}


@dataclass
class TuneResult:
    strategy: str
    params: dict
    time_us: float
    baseline_us: float
    timings: list[Timing] = field(default_factory=list)


def tune(plan: CopyPlan, mode: str = "eager", *, pool: Mapping[str, Strategy] | None = None,
         timer: Timer | None = None, sets: int = 3, gpu_tie_break: bool | None = None) -> TuneResult:
    """Time each available candidate on ``plan``'s geometry and return the fastest bit-exact one.

    ``pool`` is the strategies to try (default: every registered one); the baseline ``torch_per_copy`` is always
    timed too, as the reference for the speedup. ``gpu_tie_break`` (default: on a GPU, in eager mode): candidates
    within EAGER_TIE of the fastest wall time are timed again in ``graph`` mode and the least GPU time wins.
    """
    device = plan.device or torch.device("cpu")
    timer = timer or default_timer
    pool = dict(pool if pool is not None else strategies())
    pool.setdefault(BASELINE, get_strategy(BASELINE))
    scratch = Scratch(plan, sets)
    timings: list[Timing] = []
    steps: dict[int, Callable[[int], None]] = {}
    for name, strategy in pool.items():
        try:
            reason = strategy.available(device) or (None if strategy.supports(plan) else "does not support this batch")
            candidates = [] if reason else strategy.candidates(plan)
        except Exception as exc:  # noqa: BLE001 - a broken strategy is excluded with its reason, never fatal
            reason = f"{type(exc).__name__}: {exc}"
        if reason:
            timings.append(Timing(name, {}, reason=reason))
            continue
        for params in candidates:
            timing, step = _measure(strategy, params, scratch, mode, timer, device)
            timings.append(timing)
            steps[id(timing)] = step
    ok = [t for t in timings if t.time_us is not None and math.isfinite(t.time_us) and t.time_us > 0]
    if not ok:  # a NaN, infinite or non-positive time is no measurement
        raise RuntimeError("no candidate ran exactly: " + "; ".join(
            f"{t.strategy}: {t.reason or f'time {t.time_us}'}" for t in timings))
    best = min(ok, key=lambda t: t.time_us)
    if mode == "eager" and (gpu_tie_break if gpu_tie_break is not None else device.type == "cuda"):
        best = _least_gpu_time(best, ok, steps, timer, device)
    base = next((t.time_us for t in ok if t.strategy == BASELINE), math.nan)
    return TuneResult(best.strategy, best.params, best.time_us, base, timings)


def default_pool(device: torch.device) -> dict[str, Strategy]:
    """Strategies worth timing on ``device``: all of them on CUDA; on a CPU only the torch ones (Triton's CPU
    interpreter is a test tool, never a serving candidate)."""
    table = strategies()
    return dict(table) if device.type == "cuda" else {n: s for n, s in table.items() if n.startswith("torch")}


def _least_gpu_time(best: Timing, ok: list[Timing], steps: dict, timer: Timer, device) -> Timing:
    """Among the candidates whose wall time is within EAGER_TIE of ``best``'s, the one of least GPU time."""
    close = [t for t in ok if t.time_us <= best.time_us * (1 + EAGER_TIE)]
    if len(close) < 2:
        return best
    for t in close:
        try:
            t.gpu_us = float(timer(steps[id(t)], "graph", device))
        except Exception as exc:  # noqa: BLE001 - e.g. a launch that cannot be captured: wall time decides
            warnings.warn(f"copytune: {t.strategy} {t.params}: no GPU time ({type(exc).__name__}: {exc})",
                          RuntimeWarning, stacklevel=3)
    timed = [t for t in close if t.gpu_us is not None and not math.isnan(t.gpu_us)]
    return min(timed, key=lambda t: (t.gpu_us, t.time_us)) if timed else best


def _measure(strategy, params: dict, scratch: Scratch, mode: str, timer: Timer, device):
    """The candidate's Timing, and the step that timed it (None when it failed)."""
    try:
        launch = strategy.bind(scratch.plan, params)  # compiles here
        scratch.check(launch, CHECKED_RUNS, device)
        def step(i: int) -> None:
            launch(scratch.srcs[i % scratch.sets])
        time_us = float(timer(step, mode, device))
        scratch.check(launch, scratch.sets, device)  # still exact after the timed calls, sources untouched
        return Timing(strategy.name, params, time_us=time_us), step
    except Exception as exc:  # noqa: BLE001 - any failure excludes the candidate
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"copytune: {strategy.name} {params} excluded: {reason}", RuntimeWarning, stacklevel=3)
        return Timing(strategy.name, params, reason=reason), None


class Scratch:
    """Buffers shaped like the plan's (same strides, same address alignment mod 16) with guard bytes around
    them, and ``sets`` random source sets. The caller's tensors are only read for their geometry."""

    GUARD = 64

    def __init__(self, plan: CopyPlan, sets: int):
        self.sets = sets
        bufs_views = [self._alloc_like(d) for _, d in plan.pairs]
        self.dst_bufs = [b for b, _ in bufs_views]
        self.dsts = [v for _, v in bufs_views]
        allocated = [[self._alloc_like(s) for s, _ in plan.pairs] for _ in range(sets)]
        self.srcs = [[random_fill(v) for _, v in bufs] for bufs in allocated]
        self.src_bufs = [[b for b, _ in bufs] for bufs in allocated]
        self.src_copies = [[b.clone() for b in bufs] for bufs in self.src_bufs]  # raw bytes: writes into a source
        self.plan = CopyPlan.from_pairs(list(zip(self.srcs[0], self.dsts)))

    def _alloc_like(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        span = span_bytes(t)
        raw = torch.empty(span + 2 * self.GUARD + MAX_ALIGN, dtype=torch.uint8, device=t.device)
        start = self.GUARD + (t.data_ptr() - raw.data_ptr() - self.GUARD) % MAX_ALIGN
        typed = raw[start:start + span].view(t.dtype)
        return raw, torch.as_strided(typed, tuple(t.shape), tuple(t.stride()))

    def poison(self, i: int) -> list[torch.Tensor]:
        """Fill every destination buffer with random bytes; return each as ``copy_`` from set ``i`` leaves it."""
        expected = []
        for buf, d, s in zip(self.dst_bufs, self.dsts, self.srcs[i]):
            random_fill(buf)
            ref = buf.clone()
            start = d.data_ptr() - buf.data_ptr()
            typed = ref[start:start + span_bytes(d)].view(d.dtype)
            torch.as_strided(typed, tuple(d.shape), tuple(d.stride())).copy_(s)
            expected.append(ref)
        return expected

    def check(self, launch, runs: int, device) -> None:
        """``runs`` launches on the rotating source sets, each into freshly poisoned destinations: every byte as
        ``copy_`` leaves it (guard bytes included), and no source byte changed. AssertionError otherwise."""
        for r in range(runs):
            i = r % self.sets
            expected = self.poison(i)
            launch(self.srcs[i])
            _sync(device)
            bad = self.mismatch(expected)
            if bad is not None:
                raise AssertionError(f"wrong bytes in pair {bad}")
            changed = next((j for j, (b, c) in enumerate(zip(self.src_bufs[i], self.src_copies[i]))
                            if not torch.equal(b, c)), None)
            if changed is not None:
                for bufs, copies in zip(self.src_bufs, self.src_copies):  # the next candidate gets them intact
                    for b, c in zip(bufs, copies):
                        b.copy_(c)
                raise AssertionError(f"the source of pair {changed} was written")

    def mismatch(self, expected: list[torch.Tensor]) -> int | None:
        return next((j for j, (b, e) in enumerate(zip(self.dst_bufs, expected)) if not torch.equal(b, e)), None)


def random_fill(t: torch.Tensor) -> torch.Tensor:
    """Random bytes (NaN payloads included for floats); bool gets valid 0/1 values. Never zeros only."""
    if t.numel() == 0:
        return t
    if t.dtype == torch.bool:
        return t.copy_(torch.randint(0, 2, t.shape, device=t.device).bool())
    raw = torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, device=t.device)
    return t.copy_(raw.view(t.dtype).view(t.shape))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_timer(step: Callable[[int], None], mode: str, device: torch.device, calls: int = 100,
                  repeats: int = 5) -> float:
    """Median µs per step: CUDA-graph replay for ``graph`` on a GPU, else wall time incl. CPU launch cost."""
    if mode == "graph" and device.type == "cuda":
        return _graph_time(step, device, calls, repeats)
    for i in range(3):
        step(i)
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for i in range(calls):
            step(i)
        _sync(device)
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(out)


def _graph_time(step, device, calls: int, repeats: int, per_graph: int = 20) -> float:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(3):
            step(i)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread-local: tuning may run inside a serving process whose other threads keep launching work
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for i in range(per_graph):
            step(i)
    graph.replay()
    replays = max(1, calls // per_graph)
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / (replays * per_graph))
    return statistics.median(out)
