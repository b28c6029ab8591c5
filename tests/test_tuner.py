"""Tuner logic on CPU with fake strategies and a scripted timer."""

import math

import pytest
import torch

from copytune import CopyPlan, get_strategy
from copytune.tuner import tune

LAST: list[str] = []


class Fake:
    """Copies like torch (or not), records itself as last launched so the scripted timer knows who ran."""

    def __init__(self, name, *, wrong=False, raises=None, supported=True, available=None):
        self.name, self.wrong, self.raises, self.supported, self.reason = name, wrong, raises, supported, available

    def available(self, device):
        return self.reason

    def supports(self, plan):
        return self.supported

    def candidates(self, plan):
        return [{"v": 1}]

    def bind(self, plan, params=None):
        if self.raises == "bind":
            raise RuntimeError("compile failed")
        dsts = [d for _, d in plan.pairs]

        def launch(srcs=None):
            LAST.append(self.name)
            if self.raises == "launch":
                raise RuntimeError("launch failed")
            for s, d in zip(srcs or [s for s, _ in plan.pairs], dsts):
                d.copy_(s)
                if self.wrong and d.numel():
                    d[(-1,) * d.dim()] += 1  # one element off
        return launch

    def copy(self, plan, params=None):
        self.bind(CopyPlan.from_pairs(plan))()


def scripted(times):
    def timer(step, mode, device):
        LAST.clear()
        step(0)
        return times[LAST[-1] if LAST else "torch_per_copy"]  # the real baseline does not record itself
    return timer


@pytest.fixture
def plan():
    buf = torch.zeros(8, 16, dtype=torch.int32)
    return CopyPlan.from_pairs([(torch.arange(5, dtype=torch.int32), torch.zeros(5, dtype=torch.int32)),
                                (torch.ones(8, 9, dtype=torch.int32), buf[:, :9])])


def test_fastest_exact_candidate_wins_and_baseline_is_recorded(plan):
    pool = {"slow": Fake("slow"), "fast": Fake("fast"), "torch_per_copy": get_strategy("torch_per_copy")}
    times = {"slow": 9.0, "fast": 2.0, "torch_per_copy": 10.0}
    result = tune(plan, "eager", pool=pool, timer=scripted(times))
    assert (result.strategy, result.time_us, result.baseline_us) == ("fast", 2.0, 10.0)
    assert {t.strategy: t.time_us for t in result.timings} == times


def scripted_by_mode(eager, graph):
    def timer(step, mode, device):
        LAST.clear()
        step(0)
        return (eager if mode == "eager" else graph)[LAST[-1] if LAST else "torch_per_copy"]
    return timer


def test_eager_ties_go_to_the_least_gpu_time(plan):
    """Wall times within EAGER_TIE are launch noise: the GPU time decides among them, never beyond them."""
    pool = {"a": Fake("a"), "b": Fake("b"), "c": Fake("c"), "torch_per_copy": get_strategy("torch_per_copy")}
    eager = {"a": 5.0, "b": 5.2, "c": 6.0, "torch_per_copy": 50.0}
    graph = {"a": 3.5, "b": 2.3, "c": 1.0, "torch_per_copy": 9.0}
    result = tune(plan, "eager", pool=pool, timer=scripted_by_mode(eager, graph), gpu_tie_break=True)
    assert (result.strategy, result.time_us) == ("b", 5.2)
    gpu = {t.strategy: t.gpu_us for t in result.timings}
    assert gpu == {"a": 3.5, "b": 2.3, "c": None, "torch_per_copy": None}  # only the close ones are re-timed
    assert tune(plan, "eager", pool=pool, timer=scripted_by_mode(eager, graph)).strategy == "a"  # CPU: off


class Tiles(Fake):
    """One strategy, several parameter sets (as cuda_ext's unrolls): the timer sees ``name:v``."""

    def candidates(self, plan):
        return [{"v": v} for v in (1, 2, 4)]

    def bind(self, plan, params=None):
        inner = super().bind(plan, params)

        def launch(srcs=None):
            inner(srcs)
            LAST[-1] = f"{self.name}:{params['v']}"
        return launch


def test_one_strategys_parameter_sets_are_decided_by_gpu_time_beyond_the_tie_band(plan):
    """Parameter sets of one strategy share its CPU path: wall times 30% apart (noise) do not hide the one of
    least GPU time; another strategy as far behind is not re-timed."""
    pool = {"tiles": Tiles("tiles"), "other": Fake("other"), "torch_per_copy": get_strategy("torch_per_copy")}
    eager = {"tiles:1": 6.5, "tiles:2": 5.6, "tiles:4": 5.0, "other": 6.5, "torch_per_copy": 50.0}
    graph = {"tiles:1": 2.0, "tiles:2": 2.4, "tiles:4": 3.5, "other": 1.0, "torch_per_copy": 9.0}
    result = tune(plan, "eager", pool=pool, timer=scripted_by_mode(eager, graph), gpu_tie_break=True)
    assert (result.strategy, result.params) == ("tiles", {"v": 1})
    gpu = {(t.strategy, t.params.get("v")): t.gpu_us for t in result.timings}
    assert gpu[("other", 1)] is None and gpu[("tiles", 4)] == 3.5


@pytest.mark.parametrize("fake, reason", [
    (Fake("bad", wrong=True), "wrong bytes in pair"),
    (Fake("bad", raises="bind"), "compile failed"),
    (Fake("bad", raises="launch"), "launch failed"),
])
def test_broken_candidates_never_win_and_are_recorded(logged, plan, fake, reason):
    pool = {"bad": fake, "torch_per_copy": get_strategy("torch_per_copy")}
    with logged("bad .* excluded"):
        result = tune(plan, "eager", pool=pool, timer=scripted({"bad": 0.1, "torch_per_copy": 5.0}))
    assert result.strategy == "torch_per_copy"
    bad = next(t for t in result.timings if t.strategy == "bad")
    assert bad.time_us is None and reason in bad.reason


def test_unavailable_and_unsupported_are_skipped_with_reason(plan):
    pool = {"gone": Fake("gone", available="no GPU"), "narrow": Fake("narrow", supported=False)}
    result = tune(plan, "graph", pool=pool, timer=scripted({"torch_per_copy": 3.0}))
    reasons = {t.strategy: t.reason for t in result.timings}
    assert reasons["gone"] == "no GPU" and reasons["narrow"] == "does not support this batch"
    assert result.strategy == "torch_per_copy"


def test_callers_tensors_are_never_written(plan):
    before = [d.clone() for _, d in plan.pairs]
    tune(plan, "eager", pool={"torch_foreach": get_strategy("torch_foreach")})
    assert all(torch.equal(b, d) for b, (_, d) in zip(before, plan.pairs))


def test_real_timer_on_cpu_gives_finite_times(plan):
    result = tune(plan, "eager", pool={"torch_foreach": get_strategy("torch_foreach")})
    assert {t.strategy for t in result.timings} == {"torch_foreach", "torch_per_copy"}
    assert all(math.isfinite(t.time_us) and t.time_us > 0 for t in result.timings)


def test_every_registered_strategy_through_the_tuner(plan):
    """The real pool (Triton strategies interpreted on CPU) with a short real timer: all exact, all timed."""
    from copytune.tuner import default_timer

    result = tune(plan, "eager", timer=lambda step, mode, dev: default_timer(step, mode, dev, calls=10))
    usable = {n for n, s in __import__("copytune").strategies().items() if s.available("cpu") is None}
    timed = {t.strategy for t in result.timings if t.time_us is not None}
    assert timed == usable and not [t for t in result.timings if t.strategy in usable and t.reason]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_gpu_tuning_times_every_strategy(mode):
    """On a GPU: every strategy compiles, passes the exactness check and gets a time, in both modes."""
    from copytune.kernels import cuda_ext

    cuda_ext.build("cuda")
    buf = torch.zeros(64, 512, dtype=torch.int32, device="cuda")
    cu = torch.zeros(65, dtype=torch.int32, device="cuda")
    plan = CopyPlan.from_pairs([(torch.ones(32, 300, dtype=torch.int32, device="cuda"), buf[:32, :300]),
                                (torch.ones(32, dtype=torch.int32, device="cuda"), cu[1:33])])
    result = tune(plan, mode)
    assert not [t.reason for t in result.timings if t.reason], result.timings
    assert result.time_us <= result.baseline_us


class Raising(Fake):
    def __init__(self, name, where):
        super().__init__(name)
        self.where = where

    def available(self, device):
        if self.where == "available":
            raise RuntimeError("driver probe failed")
        return None

    def supports(self, plan):
        if self.where == "supports":
            raise KeyError("layout")
        return True

    def candidates(self, plan):
        if self.where == "candidates":
            raise ValueError("no tile shape fits")
        return super().candidates(plan)


@pytest.mark.parametrize("where", ["available", "supports", "candidates"])
def test_a_strategy_that_raises_while_asked_is_excluded_not_fatal(plan, where):
    pool = {"broken": Raising("broken", where), "torch_per_copy": get_strategy("torch_per_copy")}
    result = tune(plan, "eager", pool=pool, timer=scripted({"broken": 0.1, "torch_per_copy": 5.0}))
    assert result.strategy == "torch_per_copy"
    assert "broken" not in {t.strategy for t in result.timings if t.time_us is not None}
    assert next(t for t in result.timings if t.strategy == "broken").reason


@pytest.mark.parametrize("bad", [math.nan, -1.0, 0.0, math.inf])
def test_a_time_that_is_no_measurement_never_wins(plan, bad):
    pool = {"odd": Fake("odd"), "torch_per_copy": get_strategy("torch_per_copy")}
    assert tune(plan, "eager", pool=pool, timer=scripted({"odd": bad, "torch_per_copy": 5.0})).strategy == \
        "torch_per_copy"


def test_when_nothing_runs_the_error_says_why(logged, plan):
    pool = {"bad": Fake("bad", raises="launch"), "torch_per_copy": Fake("torch_per_copy", wrong=True)}
    with logged("."), pytest.raises(RuntimeError, match="no candidate ran exactly: .*launch failed"):
        tune(plan, "eager", pool=pool, timer=scripted({"bad": 1.0, "torch_per_copy": 2.0}))


class Flaky(Fake):
    """Copies exactly except on some calls (every ``every``-th, or every call from the ``after``-th on), or writes
    into its source."""

    def __init__(self, name, *, every=0, after=0, scribbles=False):
        super().__init__(name)
        self.every, self.after, self.scribbles, self.calls = every, after, scribbles, 0

    def bind(self, plan, params=None):
        dsts = [d for _, d in plan.pairs]

        def launch(srcs=None):
            self.calls += 1
            LAST.append(self.name)
            for s, d in zip(srcs, dsts):
                d.copy_(s)
            wrong = (self.every and self.calls % self.every == 0) or (self.after and self.calls > self.after)
            if wrong and dsts[0].numel():
                dsts[0].view(-1)[0] += 1
            if self.scribbles:
                srcs[0].view(-1)[0] += 1
        return launch


@pytest.mark.parametrize("fake, why", [
    (Flaky("flaky", every=4), "wrong bytes"),
    (Flaky("flaky", after=3), "wrong bytes"),
    (Flaky("flaky", scribbles=True), "source of pair 0 was written"),
])
def test_a_candidate_wrong_now_and_then_or_writing_its_source_never_wins(logged, plan, fake, why):
    pool = {"flaky": fake, "torch_per_copy": get_strategy("torch_per_copy")}
    with logged("flaky .* excluded"):
        result = tune(plan, "eager", pool=pool, timer=scripted({"flaky": 0.1, "torch_per_copy": 5.0}))
    assert result.strategy == "torch_per_copy"
    assert why in next(t for t in result.timings if t.strategy == "flaky").reason


def test_a_candidate_that_goes_wrong_during_timing_is_caught_after_it(logged, plan):
    fake = Flaky("late", after=9)  # exact through the 8 checks before timing, wrong from the timed calls on
    pool = {"late": fake, "torch_per_copy": get_strategy("torch_per_copy")}

    def timer(step, mode, device):
        LAST.clear()
        for i in range(5):
            step(i)
        return {"late": 0.1}.get(LAST[-1], 5.0) if LAST else 5.0
    with logged("late .* excluded"):
        assert tune(plan, "eager", pool=pool, timer=timer).strategy == "torch_per_copy"


def sampled(samples):
    """A timer giving each strategy its next scripted sample (its last one from then on), counting calls."""
    calls: dict[str, int] = {}

    def timer(step, mode, device):
        LAST.clear()
        step(0)
        name = LAST[-1] if LAST else "torch_per_copy"
        k = calls[name] = calls.get(name, 0) + 1
        seq = samples[name]
        return seq[min(k, len(seq)) - 1]
    timer.calls = calls
    return timer


def test_one_noisy_round_does_not_move_a_time(plan):
    """Under load one round of the baseline took 7759.90 µs against 9.90: the median of the rounds keeps 9.90."""
    pool = {"fast": Fake("fast"), "torch_per_copy": get_strategy("torch_per_copy")}
    result = tune(plan, "eager", pool=pool, timer=sampled({"fast": [2.0], "torch_per_copy": [7759.9, 9.9]}))
    assert (result.strategy, result.time_us, result.baseline_us) == ("fast", 2.0, 9.9)


def test_samples_that_spread_wide_are_timed_again(plan):
    from copytune.tuner import ROUNDS

    pool = {"jumpy": Fake("jumpy"), "torch_per_copy": get_strategy("torch_per_copy")}
    timer = sampled({"jumpy": [1.0, 2.0, 3.0, 4.0, 5.0] * 8, "torch_per_copy": [9.0]})
    result = tune(plan, "eager", pool=pool, timer=timer)
    jumpy = next(t for t in result.timings if t.strategy == "jumpy")
    # its first ROUNDS spread wide, so ROUNDS more; then the finalists' re-measure (wide again: ROUNDS more)
    assert timer.calls["jumpy"] == 4 * ROUNDS and jumpy.as_json()["rounds"] == 4 * ROUNDS
    assert timer.calls["torch_per_copy"] == 2 * ROUNDS


def test_a_baseline_that_disagrees_with_its_remeasure_is_timed_again_with_the_field(plan):
    """A whole slow first pass of the baseline (a noisy neighbour) is caught by the final re-measure: every
    candidate is timed again and the repeatable times are kept."""
    from copytune.tuner import ROUNDS

    pool = {"fast": Fake("fast"), "torch_per_copy": get_strategy("torch_per_copy")}
    result = tune(plan, "eager", pool=pool,
                  timer=sampled({"fast": [2.0], "torch_per_copy": [7759.9] * ROUNDS + [9.9]}))
    assert (result.strategy, result.baseline_us) == ("fast", 9.9)


def test_timings_that_never_repeat_store_nothing(logged, plan, tmp_path):
    from copytune import Dispatcher
    from copytune.cache.store import Store
    from copytune.tuner import ROUNDS, NoisyTiming

    pool = {"fast": Fake("fast"), "torch_per_copy": get_strategy("torch_per_copy")}
    seesaw = ([500.0] * ROUNDS + [5.0] * ROUNDS) * 4
    with pytest.raises(NoisyTiming, match=r"torch_per_copy 500.00 µs, then 5.00 µs.*nothing stored") as raised:
        tune(plan, "eager", pool=pool, timer=sampled({"fast": [2.0], "torch_per_copy": seesaw}))
    assert {t.strategy for t in raised.value.timings} == {"fast", "torch_per_copy"}  # for a bench to time again
    d = Dispatcher(tmp_path / "c.db", pool=pool, timer=sampled({"fast": [2.0], "torch_per_copy": seesaw}))
    with logged("tuning failed .*NoisyTiming"):
        assert d.choose(plan).origin == "default"
    assert Store(tmp_path / "c.db").get(d.key(plan)) is None


class Hanging(Fake):
    """Blocks in ``bind`` or in its launch until released: a hung compile or a launch that never returns."""

    def __init__(self, name, where):
        super().__init__(name)
        self.where, self.release = where, __import__("threading").Event()

    def bind(self, plan, params=None):
        if self.where == "bind":
            self.release.wait()
        inner = super().bind(plan, params)

        def launch(srcs=None):
            if self.where == "launch" and LAST and LAST.count(self.name) >= 1:
                self.release.wait()
            inner(srcs)
        return launch


@pytest.mark.parametrize("where", ["bind", "timing"])
def test_a_hanging_candidate_is_excluded_at_its_time_limit(logged, plan, where):
    import time

    fake = Hanging("stuck", where)
    pool = {"stuck": fake, "torch_per_copy": get_strategy("torch_per_copy")}

    def timer(step, mode, device):
        if where == "timing" and getattr(step.launch, "__qualname__", "").startswith("Hanging"):
            fake.release.wait()
        return 5.0
    t0 = time.perf_counter()
    try:
        with logged("stuck .* excluded: TimeLimit: no result within its 0.5 s"):
            result = tune(plan, "eager", pool=pool, timer=timer, time_limit_s=0.5)
    finally:
        fake.release.set()
    assert time.perf_counter() - t0 < 10
    assert result.strategy == "torch_per_copy"
    assert "TimeLimit" in next(t for t in result.timings if t.strategy == "stuck").reason


def test_a_candidate_clearly_behind_is_timed_fewer_rounds(plan):
    """After CLEAR_AFTER rounds, a candidate whose best sample is CLEAR_MARGIN times the leader's worst stops
    being timed; close ones keep every round."""
    from copytune.tuner import CLEAR_AFTER, ROUNDS

    pool = {"fast": Fake("fast"), "close": Fake("close"), "slow": Fake("slow"),
            "torch_per_copy": get_strategy("torch_per_copy")}
    timer = sampled({"fast": [2.0], "close": [2.2], "slow": [3.5], "torch_per_copy": [9.0]})
    result = tune(plan, "eager", pool=pool, timer=timer)
    assert result.strategy == "fast" and result.baseline_us == 9.0
    assert timer.calls["slow"] == CLEAR_AFTER and timer.calls["close"] == ROUNDS  # within the margin: every round
    assert timer.calls["torch_per_copy"] == 2 * ROUNDS  # the yardstick: every round, and the final re-measure


class Scribbler(Fake):
    """Binds past its time limit, then keeps writing garbage into the buffers it was bound on for a while: an
    abandoned candidate whose thread lives on."""

    def bind(self, plan, params=None):
        import time

        time.sleep(0.6)
        end = time.perf_counter() + 1.5
        while time.perf_counter() < end:
            for _, d in plan.pairs:
                d.fill_(7) if d.dtype != torch.bool else d.fill_(True)
        return super().bind(plan, params)


def test_the_others_never_share_buffers_with_an_abandoned_candidate(plan, logged):
    pool = {"scribbler": Scribbler("scribbler"), "torch_per_copy": get_strategy("torch_per_copy"),
            "torch_foreach": get_strategy("torch_foreach")}
    with logged("scribbler .* excluded: TimeLimit"):
        result = tune(plan, "eager", pool=pool, timer=scripted({"torch_foreach": 1.0, "torch_per_copy": 5.0}),
                      time_limit_s=0.3)
    reasons = {t.strategy: t.reason for t in result.timings}
    assert reasons["torch_per_copy"] is None and reasons["torch_foreach"] is None, reasons
    import threading

    for thread in threading.enumerate():  # let the abandoned thread end before the interpreter does
        if thread.name == "copytune-tune-scribbler":
            thread.join(10)
