import subprocess
import sys
import textwrap

import pytest
import torch

from copytune import CopyPlan, Dispatcher, batched_copy, default_strategy, get_strategy, strategies
from copytune.cache.store import Store
from copytune.kernels import UnsupportedPlan
from tests.cases import random_case, random_fill


def test_registry_lists_the_designed_strategies():
    assert set(strategies()) >= {"torch_per_copy", "torch_foreach", "triton_unified", "triton_persistent"}
    with pytest.raises(ValueError, match="unknown strategy 'nope'; known: torch_per_copy"):
        get_strategy("nope")


def torch_only_pool():
    return {n: get_strategy(n) for n in ("torch_per_copy", "torch_foreach")}


def make_dispatcher(tmp_path, **kw):
    kw.setdefault("pool", torch_only_pool())
    return Dispatcher(tmp_path / "cache.db", **kw)


@pytest.mark.parametrize("seed", range(4))
def test_copy_matches_copy_(seed, device, tmp_path):
    case = random_case(seed, device, max_copies=8, max_elems=3000)
    expected = case.expected()
    make_dispatcher(tmp_path).copy(case.pairs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    case.check(expected)


def pairs_of(bs):
    return [(torch.arange(bs, dtype=torch.int32), torch.zeros(bs, dtype=torch.int32)),
            (torch.ones(bs, 7, dtype=torch.int32), torch.zeros(bs, 16, dtype=torch.int32)[:, :7])]


def test_tunes_once_then_memory_then_cache(tmp_path, monkeypatch):
    from copytune import tuner

    calls = []
    real = tuner.tune
    monkeypatch.setattr(tuner, "tune", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = make_dispatcher(tmp_path)
    d.copy(pairs_of(100))
    d.copy(pairs_of(120))  # same bucket: memory
    assert len(calls) == 1
    plan = CopyPlan.from_pairs(pairs_of(100))
    assert d.choose(plan).origin == "tuned"
    fresh = make_dispatcher(tmp_path)  # new process, same file: read, not re-tuned
    assert fresh.choose(plan).origin == "cache" and len(calls) == 1
    row = Store(tmp_path / "cache.db").get(d.key(plan))
    assert row["strategy"] == d.winner(pairs_of(100)) and row["baseline_us"] > 0
    assert {t["strategy"] for t in row["timings"]} == {"torch_per_copy", "torch_foreach"}


def test_tune_false_uses_the_default(tmp_path):
    d = make_dispatcher(tmp_path, tune=False)
    plan = CopyPlan.from_pairs(pairs_of(4))
    assert d.choose(plan) .origin == "default" and d.winner(plan) == default_strategy(plan)
    assert Store(tmp_path / "cache.db").rows() == []


def test_unusable_cached_winner_is_ignored(logged, tmp_path):
    d = make_dispatcher(tmp_path)
    plan = CopyPlan.from_pairs(pairs_of(4))
    d.copy(plan)
    store = Store(tmp_path / "cache.db")
    row = store.get(d.key(plan))
    store.put({**row, "strategy": "retired_strategy"})
    with logged("retired_strategy"):
        assert make_dispatcher(tmp_path, tune=False).choose(plan).origin == "default"


@pytest.mark.parametrize("params", [{"block": -1024, "num_warps": 4}, {"block": 3, "num_warps": 4}, "1024", None])
def test_a_cached_winner_with_parameters_it_cannot_run_is_a_miss_and_the_copy_is_exact(logged, tmp_path, params):
    """A hand-edited row (a block that copies nothing, one that does not compile, not an object) never breaks or
    silences a copy: one warning, the default strategy, exact bytes."""
    d = make_dispatcher(tmp_path)
    pairs = pairs_of(4)
    plan = CopyPlan.from_pairs(pairs)
    d.copy(plan)
    store = Store(tmp_path / "cache.db")
    store.put({**store.get(d.key(plan)), "strategy": "triton_unified", "params": params})
    fresh = make_dispatcher(tmp_path, tune=False)
    for _, dst in pairs:
        dst.fill_(-7)
    with logged("cannot run|ignored|ignoring it"):
        fresh.copy(pairs)
    assert fresh.choose(plan).origin == "default"
    assert all(torch.equal(s, d_) for s, d_ in pairs)


def test_corrupt_cache_still_copies_and_keeps_the_file(logged, tmp_path):
    path = tmp_path / "cache.db"
    path.write_bytes(b"\x00garbage" * 100)
    d = Dispatcher(path, pool=torch_only_pool())
    src, dst = torch.arange(10), torch.zeros(10, dtype=torch.int64)
    with logged("cache disabled"):
        d.copy([(src, dst)])
    assert torch.equal(src, dst) and path.read_bytes() == b"\x00garbage" * 100


def test_unwritable_cache_works_in_memory(logged):
    d = Dispatcher("/proc/copytune-test/cache.db", pool=torch_only_pool())
    src, dst = torch.arange(10), torch.zeros(10, dtype=torch.int64)
    with logged("cache disabled"):
        d.copy([(src, dst)])
    assert torch.equal(src, dst) and d.choose(CopyPlan.from_pairs([(src, dst)])).origin == "tuned"


def test_bound_copy_runs_on_new_sources_and_checks_them(tmp_path, device):
    buf = random_fill(torch.empty(8, 16, dtype=torch.int32, device=device))
    cu = random_fill(torch.empty(9, dtype=torch.int32, device=device))
    pairs = [(random_fill(torch.empty(8, 7, dtype=torch.int32, device=device)), buf[:, :7]),
             (random_fill(torch.empty(8, dtype=torch.int32, device=device)), cu[1:])]
    bound = make_dispatcher(tmp_path).bind(pairs)
    bound.run()
    new = [random_fill(torch.empty_like(s)) for s, _ in pairs]
    bound.run(new)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(buf[:, :7], new[0]) and torch.equal(cu[1:], new[1])
    with pytest.raises(ValueError, match="pair 1: source .* does not match"):
        bound.run([new[0], new[1][:4]])
    with pytest.raises(ValueError, match="pair 1: source overlaps the destination of pair 1"):
        bound.run([new[0], cu[:8]])
    with pytest.raises(ValueError, match="expected 2 sources"):
        bound.run(new[:1])


def test_batched_copy_uses_the_process_dispatcher(monkeypatch, tmp_path):
    monkeypatch.setenv("COPYTUNE_CACHE", str(tmp_path / "default.db"))
    from copytune import dispatch

    monkeypatch.setattr(dispatch, "_default", {})
    src, dst = torch.arange(6), torch.zeros(6, dtype=torch.int64)
    batched_copy([(src, dst)])
    assert torch.equal(src, dst)
    assert dispatch.default_dispatcher().store.path == tmp_path / "default.db"


def test_default_on_cpu_is_a_torch_strategy():
    plan = CopyPlan.from_pairs([(torch.ones(3), torch.zeros(3))])
    assert default_strategy(plan) in ("torch_foreach", "torch_per_copy")


def test_strategy_failure_falls_back_to_torch(tmp_path, monkeypatch):
    d = make_dispatcher(tmp_path, tune=False)
    src, dst = torch.arange(5), torch.zeros(5, dtype=torch.int64)
    strategy = get_strategy(d.winner([(src, dst)]))
    assert strategy.name == "torch_foreach"

    def refuse(*a, **k):
        raise UnsupportedPlan("no")
    monkeypatch.setattr(strategy, "copy", refuse)
    src2 = torch.arange(5) * 3
    d.copy([(src2, dst)])
    assert torch.equal(dst, src2)


@pytest.mark.cuda
def test_default_on_cuda_is_the_fused_kernel():
    plan = CopyPlan.from_pairs([(torch.ones(3, device="cuda"), torch.zeros(3, device="cuda"))])
    assert default_strategy(plan) == "triton_unified"


CONCURRENT = textwrap.dedent("""
    import sys, warnings, torch
    from copytune import Dispatcher, get_strategy
    pool = {n: get_strategy(n) for n in ("torch_per_copy", "torch_foreach")}
    d = Dispatcher(sys.argv[1], pool=pool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a locked database would surface as a warning: fail loudly instead
        for bs in (3, 40, 700):
            src = torch.arange(bs, dtype=torch.int32)
            dst = torch.zeros(bs, dtype=torch.int32)
            d.copy([(src, dst), (src.clone(), torch.zeros(bs, dtype=torch.int32))])
            assert torch.equal(src, dst)
    print("ok")
""")


def test_eight_processes_tuning_the_same_keys(tmp_path):
    path = tmp_path / "shared.db"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err
        assert "locked" not in err
    rows = Store(path).rows()
    assert len(rows) == 3 and len({r["key"] for r in rows}) == 3


def test_repeated_batch_skips_validation_and_keeps_no_tensors_alive(tmp_path, monkeypatch, device):
    import gc
    import weakref

    from copytune import plan as plan_module

    pool = {n: get_strategy(n) for n in ("torch_per_copy", "triton_unified")}
    fastest = {"triton_unified": 1.0}
    d = Dispatcher(tmp_path / "c.db", pool=pool,
                   timer=lambda step, mode, dev: step(0) or fastest.get(_last_name(step), 9.0))
    src = torch.arange(40, dtype=torch.int32, device=device)
    dst = torch.zeros(50, dtype=torch.int32, device=device)
    d.copy([(src, dst[5:45])])
    assert d.winner([(src, dst[5:45])]) == "triton_unified"  # a runner of integers, not of tensors
    validated = []
    real = plan_module.CopyPlan.from_pairs.__func__
    monkeypatch.setattr(plan_module.CopyPlan, "from_pairs", classmethod(lambda cls, p: validated.append(1)
                                                                        or real(cls, p)))
    src.mul_(3)
    d.copy([(src, dst[5:45])])
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst[5:45], src) and not validated
    refs = [weakref.ref(src), weakref.ref(dst)]
    del src, dst
    gc.collect()
    assert all(r() is None for r in refs)


def _last_name(step):
    """Which strategy a tuner step runs (closure introspection keeps the scripted timer honest)."""
    cells = dict(zip(step.__code__.co_freevars, (c.cell_contents for c in step.__closure__ or ())))
    return getattr(cells.get("launch"), "strategy", "torch_per_copy")


def test_invalid_batches_are_rejected_every_time(tmp_path):
    d = make_dispatcher(tmp_path)
    buf = torch.zeros(10, dtype=torch.int32)
    for _ in range(2):
        with pytest.raises(ValueError, match="pair 1: destination overlaps"):
            d.copy([(torch.ones(4, dtype=torch.int32), buf[:4]), (torch.ones(4, dtype=torch.int32), buf[2:6])])


def test_bound_check_allows_a_source_interleaved_with_destinations(tmp_path):
    """Extents meet but bytes do not: the column block between two destination slices is a valid source."""
    buf, other = torch.zeros(6, 12, dtype=torch.int32), torch.arange(72, dtype=torch.int32).reshape(6, 12)
    bound = make_dispatcher(tmp_path, tune=False).bind([(other[:, 4:8], buf[:, :4]), (other[:, :4], buf[:, 8:])])
    buf[:, 4:8] = 7
    bound.run([buf[:, 4:8], other[:, :4]])
    assert (buf[:, :4] == 7).all() and torch.equal(buf[:, 8:], other[:, :4])
    with pytest.raises(ValueError, match="pair 0: source overlaps the destination of pair 1"):
        bound.run([buf[:, 7:11], other[:, :4]])


@pytest.mark.parametrize("strategy", ["torch_per_copy", "triton_unified", "cuda_ext"])
def test_bound_on_base_tensors_adds_the_view_offsets(tmp_path, device, strategy):
    """Call sites pass the base tensor (``cu``) and the bound copy reads the view (``cu[1:]``) itself."""
    if get_strategy(strategy).available(device) is not None:
        pytest.skip(get_strategy(strategy).available(device))
    buf = random_fill(torch.empty(8, 16, dtype=torch.int32, device=device))
    cu_dst = random_fill(torch.empty(9, dtype=torch.int32, device=device))
    pt = random_fill(torch.empty(8, 7, dtype=torch.int32, device=device))
    cu = random_fill(torch.empty(9, dtype=torch.int32, device=device))
    d = Dispatcher(tmp_path / "c.db", strategy=strategy)
    bound = d.bind([(pt, buf[:, :7]), (cu[1:], cu_dst[1:])], bases=[pt, cu])
    assert bound.strategy == strategy
    for _ in range(2):
        new_pt, new_cu = random_fill(torch.empty_like(pt)), random_fill(torch.empty_like(cu))
        bound.run([new_pt, new_cu])
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert torch.equal(buf[:, :7], new_pt) and torch.equal(cu_dst[1:], new_cu[1:])
    with pytest.raises(ValueError, match="pair 1: source .* does not match"):
        bound.run([new_pt, new_cu[1:]])
    with pytest.raises(ValueError, match="pair 0: source is not a view inside the given base"):
        d.bind([(pt, buf[:, :7])], bases=[cu])


def test_pinned_strategy_is_used_without_tuning(tmp_path):
    d = Dispatcher(tmp_path / "c.db", strategy="torch_foreach")
    src, dst = torch.arange(5), torch.zeros(5, dtype=torch.int64)
    assert d.winner([(src, dst)]) == "torch_foreach"
    assert Store(tmp_path / "c.db").rows() == []


def test_any_iterable_of_pairs_is_copied(tmp_path):
    """A generator or zip() of pairs is copied like a list (the exact-geometry probe must not consume it)."""
    d = Dispatcher(tmp_path / "c.db", tune=False)
    srcs = [torch.arange(5, dtype=torch.int32) + k for k in range(3)]
    for make in (lambda dsts: zip(srcs, dsts), lambda dsts: ((s, t) for s, t in zip(srcs, dsts))):
        dsts = [torch.full((5,), -1, dtype=torch.int32) for _ in range(3)]
        d.copy(make(dsts))
        assert all(torch.equal(s, t) for s, t in zip(srcs, dsts))


def test_a_single_pair_not_in_a_list_is_refused_before_writing(tmp_path):
    """`copy((src, dst))` with 2-row tensors would read src's rows as a pair and write into the caller's source."""
    d = Dispatcher(tmp_path / "c.db", tune=False)
    src, dst = torch.arange(8, dtype=torch.int32).view(2, 4), torch.zeros(2, 4, dtype=torch.int32)
    before = src.clone()
    with pytest.raises(ValueError, match="pair 0 is a tensor, not a \\(src, dst\\) pair"):
        d.copy((src, dst))
    with pytest.raises(ValueError, match="expected a sequence of \\(src, dst\\) pairs, got Tensor"):
        d.copy(src)
    assert torch.equal(src, before) and not dst.any()


def test_every_candidate_a_strategy_offers_passes_its_own_validation():
    """The tuner stores candidates; the cache and bundles accept only what validates: the two must agree."""
    plan = CopyPlan.from_pairs(pairs_of(4))
    for name, strategy in strategies().items():
        for params in strategy.candidates(plan):
            assert strategy.validate_params(params) is None, (name, params)


def test_tuning_one_key_never_blocks_another_keys_choice(tmp_path, monkeypatch):
    """A slow tune of one signature holds only that signature: another thread's new signature is chosen (and
    tuned) meanwhile, not after it."""
    import threading

    from copytune import tuner

    release, order = threading.Event(), []
    real_tune = tuner.tune

    def tune(plan, mode, **kw):
        if len(plan.pairs) == 2:  # the slow key: waits until the other key was served
            assert release.wait(30)
            order.append("slow")
        return real_tune(plan, mode, **kw)
    monkeypatch.setattr(tuner, "tune", tune)
    d = Dispatcher(tmp_path / "c.db", pool=torch_only_pool())
    slow = threading.Thread(target=lambda: d.choose(CopyPlan.from_pairs(pairs_of(4))))
    slow.start()
    d.choose(CopyPlan.from_pairs(pairs_of(4)[:1]))  # a different signature, tuned while the slow one waits
    order.append("other")
    release.set()
    slow.join(30)
    assert order == ["other", "slow"]


def test_retune_replaces_the_stored_winner(tmp_path):
    """``choose(plan, retune=True)`` times the candidates again and overwrites memory and the cache; without it
    the stored winner stands."""
    pool = {"torch_foreach": get_strategy("torch_foreach"), "torch_per_copy": get_strategy("torch_per_copy")}

    def timer(foreach_us, per_copy_us):
        return lambda step, mode, device: \
            foreach_us if step.launch.strategy == "torch_foreach" else per_copy_us
    plan = CopyPlan.from_pairs(pairs_of(4)[:1])
    first = Dispatcher(tmp_path / "c.db", pool=pool, timer=timer(1.0, 5.0))
    assert first.choose(plan).strategy == "torch_foreach"
    again = Dispatcher(tmp_path / "c.db", pool=pool, timer=timer(5.0, 1.0))
    assert again.choose(plan).strategy == "torch_foreach"  # the cache
    retuned = again.choose(plan, retune=True)
    assert (retuned.strategy, retuned.origin) == ("torch_per_copy", "tuned")
    assert Store(tmp_path / "c.db").get(again.key(plan))["strategy"] == "torch_per_copy"
    assert Dispatcher(tmp_path / "c.db", tune=False).choose(plan).strategy == "torch_per_copy"


def test_the_serving_path_never_waits_long_on_a_locked_cache(logged, tmp_path):
    """Another process holds the cache's write lock: a serving call's tune still copies exactly, its row is
    skipped with one warning after SERVING_BUSY_TIMEOUT_S (not the commands' 10 s)."""
    import sqlite3

    from copytune.cache.store import BUSY_TIMEOUT_S, SERVING_BUSY_TIMEOUT_S

    path = tmp_path / "cache.db"
    Store(path).put({"key": "x", "device": {"kind": "cpu"},
                     "signature": [[4, "1d", 1, 4, 16]], "mode": "eager", "strategy": "torch_foreach", "params": {},
                     "time_us": 1.0, "baseline_us": 2.0, "timings": [], "tuned_at": "t", "copytune_version": "0"})
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a writer in another process, mid-transaction
    try:
        d = Dispatcher(path, pool=torch_only_pool())
        assert d.store.busy_timeout_s == SERVING_BUSY_TIMEOUT_S < BUSY_TIMEOUT_S
        pairs = pairs_of(4)
        with logged("stayed locked"):
            d.copy(pairs)
        assert all(torch.equal(s, t) for s, t in pairs)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


class _BrokenBaseline:
    """torch_per_copy whose bind fails (the baseline itself cannot run here)."""

    def __init__(self):
        self._real = get_strategy("torch_per_copy")
        self.name = "torch_per_copy"

    def __getattr__(self, name):
        return getattr(self._real, name)

    def bind(self, plan, params=None):
        raise RuntimeError("baseline broken")


def test_a_winner_whose_baseline_failed_is_stored_and_served_from_the_cache(tmp_path):
    """The baseline is only the yardstick: when it fails, the exact winner is still stored (speedup unknown) and a
    later process serves it from the cache instead of ignoring the row forever."""
    from click.testing import CliRunner

    from copytune.cli import main

    pool = {"torch_foreach": get_strategy("torch_foreach"), "torch_per_copy": _BrokenBaseline()}
    plan = CopyPlan.from_pairs(pairs_of(4)[:1])
    first = Dispatcher(tmp_path / "c.db", pool=pool, timer=lambda step, mode, dev: 1.0)
    assert first.choose(plan).strategy == "torch_foreach"
    row = Store(tmp_path / "c.db").get(first.key(plan))
    assert row is not None and row["baseline_us"] is None
    again = Dispatcher(tmp_path / "c.db", tune=False)
    assert (again.choose(plan).strategy, again.choose(plan).origin) == ("torch_foreach", "cache")
    out = CliRunner().invoke(main, ["show", "--cache", str(tmp_path / "c.db")])
    assert out.exit_code == 0 and "torch_foreach" in out.output, out.output


def test_copy_hands_cpp_batches_to_the_exact_address_cache_and_adoption_empties_it(tmp_path, monkeypatch):
    """The dispatcher's side of the C++ fast path, with the module stood in: a runner that is a C++ batch goes to
    the exact-address cache; the next call with the same pairs is the cache's (no Python runner); adopting a new
    winner empties it. (The C++ cache itself: tests/kernels/test_cuda_ext.py, on a GPU.)"""
    from copytune.dispatch import Choice, _exact_key
    from copytune.kernels.base import BatchRunner
    from copytune.signature import shape_signature

    class Batch:
        def __init__(self):
            self.runs = 0

        def run(self):
            self.runs += 1
            return ""

    class Cache:
        def __init__(self, capacity):
            self.map = {}

        def put(self, pairs, batch):
            self.map[_exact_key(pairs)] = batch
            return ""

        def clear(self):
            self.map.clear()

        def size(self):
            return len(self.map)

        def fast_run(self):
            def run(pairs):
                batch = self.map.get(_exact_key(pairs)) if isinstance(pairs, (list, tuple)) else None
                return False if batch is None else (batch.run() or None)
            return run

    module = type("Module", (), {"ExactCache": Cache})
    batch = Batch()
    built = []
    d = Dispatcher(tmp_path / "c.db", pool=torch_only_pool())
    monkeypatch.setattr(d, "_runner", lambda plan: built.append(plan) or BatchRunner(batch, module))
    pairs = pairs_of(4)
    d.copy(pairs)
    assert (len(built), batch.runs, d._exact.size()) == (1, 1, 1)
    d.copy(pairs)
    d.copy(pairs)
    assert (len(built), batch.runs) == (1, 3)  # the cache launched them
    plan = CopyPlan.from_pairs(pairs)
    d._adopt(d.key(plan), shape_signature(plan), Choice("torch_foreach", {}, "tuned"))
    assert d._exact.size() == 0
    d.copy(pairs)
    assert len(built) == 2


def test_a_checked_run_trusts_a_cpp_check_and_keeps_the_python_verdicts(monkeypatch):
    """BoundCopy.run with a launch that checks in C++ (stood in here): its None launches; its "extents meet" is
    decided byte by byte (launched when they do not share a byte); anything it refuses is raised in the Python
    check's words."""
    from copytune.dispatch import BoundCopy, Choice
    from copytune.kernels.base import BoundLaunch

    class CppChecked(BoundLaunch):
        strategy, maybe_overlap = "cpp", "extents meet"

        def __init__(self):
            self.answers, self.launched = [], []

        def expect_sources(self, samples):
            return True

        def checked_launcher(self):
            return lambda srcs: self.answers.pop(0)

        def __call__(self, srcs=None):
            self.launched.append(srcs)

    buf = torch.zeros(64, dtype=torch.int32)
    pairs = [(torch.arange(32, dtype=torch.int32)[::2], buf[0:32:2])]  # strided sources, strided destination
    launch = CppChecked()
    bound = BoundCopy(CopyPlan.from_pairs(pairs), Choice("cpp", {}, "pinned"), launch)
    launch.answers = [None]
    bound.run([torch.ones(32, dtype=torch.int32)[::2]])
    assert launch.launched == []  # C++ launched it
    launch.answers = ["extents meet"]
    interleaved = buf[1:33:2]
    bound.run([interleaved])
    assert len(launch.launched) == 1 and launch.launched[0][0] is interleaved
    launch.answers = ["extents meet"]
    with pytest.raises(ValueError, match="pair 0: source overlaps the destination of pair 0"):
        bound.run([buf[0:32:2]])
    launch.answers = ["cpp: source 0 has shape [15]"]
    with pytest.raises(ValueError, match="pair 0: source .* does not match the bound"):
        bound.run([torch.ones(30, dtype=torch.int32)[::2]])
    launch.answers = ["cpp: launch failed: out of resources"]
    with pytest.raises(RuntimeError, match="launch failed"):
        bound.run([torch.ones(32, dtype=torch.int32)[::2]])
    assert len(launch.launched) == 1
