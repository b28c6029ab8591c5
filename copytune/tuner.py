"""Timing every usable strategy on a batch the way its call site runs, and picking the fastest exact one.

Candidates run on scratch buffers with the batch's geometry and address alignment (the caller's tensors are never
written), on several rotating source sets so caches do not flatter. Each is checked bit-exact against
``dst.copy_(src)`` on poisoned destinations with guard bytes around them, then timed:

- ``eager``: wall time per call over N back-to-back calls and one synchronize (CPU launch cost counts);
- ``graph``: K calls captured in a CUDA graph, replayed, timed with CUDA events (GPU time only).

Noise is not stored as truth (under load a CPU tune once recorded the baseline at 7759.90 µs against 9.90 µs):
candidates are timed in ROUNDS round-robin rounds and each keeps the median of its samples; one whose samples
spread wide is timed as many rounds again; and the winner and the baseline are timed once more at the end: if
either disagrees with its first time by AGREEMENT, the whole field is timed again, and if it still disagrees the
tune fails (``NoisyTiming``) and nothing is stored.

A candidate that raises, copies wrong bytes or runs past its time limit is excluded with its reason, never fatal:
each candidate's work runs on a worker thread with a deadline (a hung one is abandoned, daemon thread and all).
The timer is an argument, so the logic is tested on CPU with scripted timings.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from copytune.background import on_stream
from copytune.kernels import Strategy, get_strategy, strategies
from copytune.log import warn_once
from copytune.plan import MAX_ALIGN, CopyPlan, span_bytes

BASELINE = "torch_per_copy"
# Eager candidates within 10% of the fastest wall time differ by launch noise: on the H200 host the four cuda_ext
# unroll variants (one launch path) had round medians of 9.32-9.98 µs in one tune, while their GPU time can differ
# by 1.5x (3.45 vs 2.04 µs for a 128 KiB page table; unroll 1 vs 8 on 512 KiB: 3.49 vs 2.34 µs). The copies run
# just before the graph replays, so their GPU time is on the step's critical path: among those close candidates,
# the least GPU time wins. (A 5% band let the noise pick the unroll: 3.45 µs of GPU time where 2.04 was there.)
EAGER_TIE = 0.10
# ... and every parameter set of the eager winner's strategy up to this many times its wall time (one CPU path: their
# wall times differ by GPU time and noise; further off is a real cost, and a strategy with many sets tunes longer)
SIBLING_SPREAD = 1.5
# Checked launches before timing (rotating over the source sets, destinations poisoned each time), plus one round
# after it: a candidate wrong 1 call in 4 won 4-5 of 12 tunes with 3 checks, one wrong from its 4th call on won
# and then copied wrong bytes every call.
CHECKED_RUNS = 8
ROUNDS = 5  # round-robin timing rounds: every candidate is timed once per round, the median of its rounds counts
# After 3 rounds (a median that already rejects one outlier), a candidate 1.5x the leader's slowest sample at best is
# no longer timed; the baseline always is (its time is the yardstick stored with the winner)
CLEAR_AFTER, CLEAR_MARGIN = 3, 1.5
SPREAD_LIMIT = 0.25  # median absolute deviation over median past which a candidate is timed ROUNDS more
AGREEMENT = 2.0  # the winner's or the baseline's re-measure this many times off (either way): the timings are noise
TIME_LIMIT_S = 120.0  # per candidate, compile and checks included; a cold Triton compile takes a few seconds
Timer = Callable[[Callable[[int], None], str, torch.device], float]  # (step(i), mode, device) -> µs per step


class NoisyTiming(RuntimeError):
    """The timings did not repeat: nothing may be stored from them. ``timings``: every candidate as last timed
    (a benchmark that times the candidates again itself may still use their parameters)."""

    def __init__(self, message: str, timings: list | None = None):
        super().__init__(message)
        self.timings = timings or []


class TimeLimit(RuntimeError):
    """A candidate ran past its time limit."""


@dataclass
class Timing:
    strategy: str
    params: dict
    time_us: float | None = None
    reason: str | None = None  # why it was skipped or excluded
    gpu_us: float | None = None  # eager candidates close to the fastest: GPU time per call (graph replay)
    samples: list[float] = field(default_factory=list)  # one per round, this pass
    spent_s: float = 0.0  # of its time limit

    def as_json(self) -> dict:
        return {"strategy": self.strategy, "params": self.params, "time_us": self.time_us, "reason": self.reason,
                "gpu_us": self.gpu_us, "rounds": len(self.samples), "spread": _spread(self.samples)}


@dataclass
class TuneResult:
    strategy: str
    params: dict
    time_us: float
    baseline_us: float
    timings: list[Timing] = field(default_factory=list)


def tune(plan: CopyPlan, mode: str = "eager", *, pool: Mapping[str, Strategy] | None = None,
         timer: Timer | None = None, sets: int = 3, gpu_tie_break: bool | None = None,
         time_limit_s: float = TIME_LIMIT_S) -> TuneResult:
    """Time each available candidate on ``plan``'s geometry and return the fastest bit-exact one.

    ``pool`` is the strategies to try (default: every registered one); the baseline ``torch_per_copy`` is always
    timed too, as the reference for the speedup. ``gpu_tie_break`` (default: on a GPU, in eager mode): candidates
    within EAGER_TIE of the fastest wall time are timed again in ``graph`` mode and the least GPU time wins.
    ``time_limit_s`` bounds each candidate's bind, checks and timing together. Raises ``NoisyTiming`` when the
    timings do not repeat, RuntimeError when no candidate ran exactly.
    """
    device = plan.device or torch.device("cpu")
    timer = timer or default_timer
    pool = dict(pool if pool is not None else strategies())
    pool.setdefault(BASELINE, get_strategy(BASELINE))
    scratch = Scratch(plan, sets)
    run = _Limited(device, time_limit_s)
    timings: list[Timing] = []
    steps: dict[int, Callable[[int], None]] = {}
    owners: dict[int, Strategy] = {}

    def after_overrun() -> None:
        """A candidate past its limit is abandoned, not stopped: its thread may still write the scratch buffers.
        The others move to fresh ones (bound and checked again) and the old buffers are left to it."""
        nonlocal scratch
        while run.overran:
            run.overran = False
            scratch = Scratch(plan, sets)
            for t in [t for t in timings if id(t) in steps and t.reason is None]:
                step = run(t, lambda t=t: _prepare(owners[id(t)], t.params, scratch, device))
                if step is None:
                    steps.pop(id(t))
                else:
                    steps[id(t)] = step
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
            timing = Timing(name, params)
            step = run(timing, lambda s=strategy, p=params: _prepare(s, p, scratch, device))
            timings.append(timing)
            owners[id(timing)] = strategy
            if step is not None:
                steps[id(timing)] = step
            after_overrun()
    for _attempt in (1, 2):
        field_ = [t for t in timings if id(t) in steps]
        _time_rounds(field_, steps, run, timer, mode, device)
        after_overrun()
        ok = [t for t in field_ if t.reason is None and _measured(t.time_us)]
        if not ok:  # a NaN, infinite or non-positive time is no measurement
            raise RuntimeError("no candidate ran exactly: " + "; ".join(
                f"{t.strategy}: {t.reason or f'time {t.time_us}'}" for t in timings))
        best = min(ok, key=lambda t: t.time_us)
        if mode == "eager" and (gpu_tie_break if gpu_tie_break is not None else device.type == "cuda"):
            best = _least_gpu_time(best, ok, steps, run, timer, device)
        base = next((t for t in ok if t.strategy == BASELINE), None)
        finalists = list({id(t): t for t in (best, base) if t is not None}.values())
        doubt = _disagreement(finalists, steps, run, timer, mode, device)
        after_overrun()
        if doubt is None:
            for t in ok:  # still exact after every timed call, its sources untouched
                run(t, lambda t=t: scratch.check(_launch_of(steps[id(t)]), scratch.sets, device))
            if best.reason is None:
                return TuneResult(best.strategy, best.params, best.time_us,
                                  base.time_us if base is not None and base.reason is None else math.nan, timings)
            doubt = f"{best.strategy} failed its check after timing: {best.reason}"
            steps.pop(id(best))
    raise NoisyTiming(f"timings did not repeat ({doubt}); nothing stored", timings)


def _prepare(strategy, params: dict, scratch: Scratch, device) -> Callable[[int], None]:
    """Bind (compiling here) and check ``CHECKED_RUNS`` launches; the step the timer calls."""
    launch = strategy.bind(scratch.plan, params)
    scratch.check(launch, CHECKED_RUNS, device)

    def step(i: int) -> None:
        launch(scratch.srcs[i % scratch.sets])
    step.launch = launch
    return step


def _launch_of(step):
    return step.launch


def _measured(us) -> bool:
    return us is not None and math.isfinite(us) and us > 0


def _spread(samples: list[float]) -> float | None:
    """Median absolute deviation over the median: 0 for steady samples, past SPREAD_LIMIT for noise."""
    if not samples or not all(_measured(x) for x in samples):
        return None
    med = statistics.median(samples)
    return statistics.median(abs(x - med) for x in samples) / med


def _time_rounds(field_: list[Timing], steps: dict, run: _Limited, timer: Timer, mode: str, device) -> None:
    """ROUNDS round-robin rounds over ``field_`` (each round starting one candidate later, so none is always
    timed first), ROUNDS more for those whose samples spread past SPREAD_LIMIT; ``time_us`` is the median.
    From round CLEAR_AFTER on, a candidate whose fastest sample is CLEAR_MARGIN times the leader's slowest is
    out of the running and timed no more (start-up tuning times a dozen candidates per batch size), the baseline
    excepted."""
    for t in field_:
        t.samples = []
    for extra in (False, True):
        todo = [t for t in field_ if t.reason is None and (not extra or (_spread(t.samples) or 0) > SPREAD_LIMIT)]
        for r in range(ROUNDS if todo else 0):
            if r >= CLEAR_AFTER and not extra:
                todo = _still_running(todo)
            for t in todo[r % len(todo):] + todo[:r % len(todo)]:
                if t.reason is None:
                    sample = run(t, lambda t=t: float(timer(steps[id(t)], mode, device)))
                    if sample is not None:
                        t.samples.append(sample)
                    time.sleep(0)  # hand the GIL over between samples: a serving thread waits one sample at most
    for t in field_:
        t.time_us = statistics.median(t.samples) if t.reason is None and t.samples else None


def _still_running(todo: list[Timing]) -> list[Timing]:
    """``todo`` without the candidates clearly slower than the leader (every sample measured and positive)."""
    timed = [t for t in todo if t.reason is None and t.samples and all(_measured(x) for x in t.samples)]
    if len(timed) < 2:
        return todo
    leader = min(timed, key=lambda t: statistics.median(t.samples))
    bar = CLEAR_MARGIN * max(leader.samples)
    return [t for t in todo if t not in timed or t is leader or t.strategy == BASELINE or min(t.samples) <= bar]


def _disagreement(finalists: list[Timing], steps: dict, run: _Limited, timer: Timer, mode: str, device) -> str | None:
    """Time ``finalists`` (the winner, the baseline) ROUNDS rounds again: None when each median stays within
    AGREEMENT of its first; else what moved. Their time becomes the median of both passes."""
    first = {id(t): (t.time_us, list(t.samples)) for t in finalists}
    _time_rounds(finalists, steps, run, timer, mode, device)
    for t in finalists:
        before, samples = first[id(t)]
        again, t.samples = t.time_us, samples + t.samples
        t.time_us = statistics.median(t.samples) if t.reason is None else None
        if t.reason is not None:
            return f"{t.strategy}: {t.reason}"
        if not _measured(again) or max(again / before, before / again) > AGREEMENT:
            return f"{t.strategy} {before:.2f} µs, then {again:.2f} µs"
    return None


class _Limited:
    """Runs a candidate's work on a daemon thread under the caller's CUDA device and stream, within what is left
    of that candidate's time limit. A failure or an overrun marks the candidate (``reason``) and returns None;
    an overrun's thread is abandoned (Python cannot stop it; a daemon thread never holds up the exit)."""

    def __init__(self, device: torch.device, limit_s: float):
        self.limit_s, self.overran = limit_s, False
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def __call__(self, timing: Timing, work: Callable, failure: str | None = None):
        """``work()``'s value; None when it fails or overruns. A failure excludes the candidate, unless
        ``failure`` names what is merely missing then (a warning); an overrun always excludes it."""
        box: dict = {}

        def target() -> None:
            try:
                with on_stream(self.stream):
                    box["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - reported to the tuning thread
                box["error"] = exc

        left = self.limit_s - timing.spent_s
        t0 = time.perf_counter()
        worker = threading.Thread(target=target, name=f"copytune-tune-{timing.strategy}", daemon=True)
        worker.start()
        worker.join(max(left, 0.0))
        timing.spent_s += time.perf_counter() - t0
        if worker.is_alive():
            self.overran = True
            return self._exclude(timing, TimeLimit(f"no result within its {self.limit_s:g} s time limit"))
        if "error" in box:
            if failure is None:
                return self._exclude(timing, box["error"])
            exc = box["error"]
            why = f"{type(exc).__name__}: {exc}"
            warn_once(f"{failure}:{timing.strategy}:{why}", "copytune: %s %s: %s (%s)", timing.strategy,
                      timing.params, failure, why)
            return None
        return box["value"]

    @staticmethod
    def _exclude(timing: Timing, exc: BaseException) -> None:
        timing.reason = f"{type(exc).__name__}: {exc}"
        timing.time_us = None
        warn_once(f"excluded:{timing.strategy}:{timing.params}:{timing.reason}", "copytune: %s %s excluded: %s",
                  timing.strategy, timing.params, timing.reason)


def default_pool(device: torch.device) -> dict[str, Strategy]:
    """Strategies worth timing on ``device``: all of them on CUDA; on a CPU only the torch ones (Triton's CPU
    interpreter is a test tool, never a serving candidate)."""
    table = strategies()
    return dict(table) if device.type == "cuda" else {n: s for n, s in table.items() if s.serves_cpu}


def _least_gpu_time(best: Timing, ok: list[Timing], steps: dict, run: _Limited, timer: Timer, device) -> Timing:
    """Among the candidates whose wall time is within EAGER_TIE of ``best``'s, and the other parameter sets of
    ``best``'s strategy within SIBLING_SPREAD of it, the one of least GPU time. One strategy's parameter sets share
    its CPU path, so their wall times differ only by GPU time (where it shows) and noise: on an H100 the eager
    medians of cuda_ext's unrolls fell more than 10% apart by noise alone and left a target-verify refresh at
    3.51 µs of GPU time where its siblings took 2.0-2.4."""
    close = [t for t in ok if t.time_us <= best.time_us * (1 + EAGER_TIE) or
             (t.strategy == best.strategy and t.time_us <= best.time_us * SIBLING_SPREAD)]
    if len(close) < 2:
        return best
    for t in close:  # a launch that cannot be captured keeps no GPU time: wall time decides for it
        t.gpu_us = run(t, lambda t=t: float(timer(steps[id(t)], "graph", device)), "no GPU time")
    timed = [t for t in close if t.reason is None and t.gpu_us is not None and not math.isnan(t.gpu_us)]
    return min(timed, key=lambda t: (t.gpu_us, t.time_us)) if timed else best


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
                  repeats: int = 1) -> float:
    """µs per step, one round's sample (the tuner's rounds do the repeating): CUDA-graph replay for ``graph`` on
    a GPU, else wall time incl. CPU launch cost over ``calls`` back-to-back calls; the median of ``repeats``."""
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
    # thread-local, on this call's own stream: tuning may run on a background thread of a serving process whose
    # other threads keep launching work (torch.cuda.graph's default capture stream is one per process, shared)
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
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
