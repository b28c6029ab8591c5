"""Deferred tuning: a serving call never waits for a tune. It is served at once (nearest tuned bucket, else the
default), the key tunes on a background thread, and the winner is adopted for later calls and call sites."""

import threading

import pytest
import torch

from copytune import CopyPlan, Dispatcher, dispatch, get_strategy, nsa
from copytune.cache.store import Store
from tests.test_dispatch import pairs_of


def torch_pool():
    return {n: get_strategy(n) for n in ("torch_per_copy", "torch_foreach")}


class Gate:
    """A timer that blocks until the test opens it (at most 60 s, then it records that it gave up): a tune that
    ran on the calling thread would hold the call until then."""

    def __init__(self, winner="torch_per_copy"):
        self.open, self.gave_up, self.winner = threading.Event(), False, winner
        self.threads: set[str] = set()

    def __call__(self, step, mode, device):
        self.threads.add(threading.current_thread().name)
        if not self.open.wait(60):
            self.gave_up = True
        return 1.0 if step.launch.strategy == self.winner else 5.0


def test_a_call_is_served_at_once_while_its_key_tunes_in_the_background(tmp_path):
    gate = Gate()
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=gate)
    pairs = pairs_of(4)
    for _, dst in pairs:
        dst.fill_(-7)
    d.copy(pairs)  # returns although the tuner is blocked
    assert not gate.open.is_set() and all(torch.equal(s, t) for s, t in pairs)
    plan = CopyPlan.from_pairs(pairs)
    assert d.choose(plan).origin == "interim"
    gate.open.set()
    assert d.wait_tuned(60) and not gate.gave_up
    assert gate.threads and threading.current_thread().name not in gate.threads  # never the caller's thread
    assert (d.choose(plan).strategy, d.choose(plan).origin) == ("torch_per_copy", "tuned")
    assert Store(tmp_path / "c.db").get(d.key(plan))["strategy"] == "torch_per_copy"
    for _, dst in pairs:
        dst.fill_(-7)
    d.copy(pairs)  # the runner of the interim choice is gone: the winner runs
    assert all(torch.equal(s, t) for s, t in pairs)


def test_the_interim_choice_is_the_nearest_tuned_bucket(tmp_path):
    """bs 64 was never tuned; bs 4 was (torch_per_copy, not the default torch_foreach): bs 64 starts from it."""
    inline = Dispatcher(tmp_path / "c.db", pool=torch_pool(), timer=Gate())
    inline._timer.open.set()
    small = CopyPlan.from_pairs(pairs_of(4))
    assert inline.choose(small).strategy == "torch_per_copy"
    gate = Gate(winner="torch_foreach")
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=gate)
    big = CopyPlan.from_pairs(pairs_of(64))
    assert dispatch.default_strategy(big) == "torch_foreach"
    assert (d.choose(big).strategy, d.choose(big).origin) == ("torch_per_copy", "interim")  # from the cache
    gate.open.set()
    assert d.wait_tuned(60)
    assert (d.choose(big).strategy, d.choose(big).origin) == ("torch_foreach", "tuned")


def test_prepare_tunes_now_even_when_deferred(tmp_path):
    gate = Gate()
    gate.open.set()
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=gate)
    plan = CopyPlan.from_pairs(pairs_of(4))
    assert d.prepare(plan).origin == "tuned" and d.choose(plan).origin == "tuned"
    assert d.wait_tuned(0) and d._background is None  # nothing was handed to the background
    assert d.prepare(plan).origin == "tuned"  # a resolved key is a lookup
    never = Dispatcher(tmp_path / "other.db", pool=torch_pool(), tuning="never", timer=gate)
    assert never.prepare(plan).origin == "default"


def test_a_call_site_binds_the_winner_once_it_is_adopted(tmp_path):
    """The engine's refresh: served by the interim binding while the key tunes, then dropped and bound to the
    winner on the next step; every step exact."""
    gate = Gate()
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=gate)
    md, _ = nsa.make_example(8, 64, seed=1)
    owner = id(md)

    def step(seed):
        _, pre = nsa.make_example(8, 64 + 4 * seed, seed=seed)  # one bucket, one alignment: one key
        nsa.batched_copy_metadata(md, pre, dispatcher=d)
        for src, dst in nsa.copy_pairs(md, pre):
            assert torch.equal(src, dst)

    step(1)
    first = nsa._SITE.binding(owner)
    assert first.bound.choice.origin == "interim"
    gate.open.set()
    assert d.wait_tuned(60)
    assert nsa._SITE.binding(owner) is None or nsa._SITE.binding(owner) is not first
    step(2)
    assert nsa._SITE.binding(owner).bound.choice == dispatch.Choice("torch_per_copy", {}, "tuned")
    step(3)


@pytest.mark.parametrize("value, expected", [("never", "never"), ("inline", "inline"), ("", "deferred"),
                                             ("sometimes", "deferred")])
def test_the_process_wide_setting(monkeypatch, logged, value, expected):
    monkeypatch.setenv("COPYTUNE_TUNING", value)
    monkeypatch.setattr(dispatch, "_default", {})
    if value == "sometimes":
        with logged("COPYTUNE_TUNING='sometimes' is not one of"):
            assert dispatch.default_dispatcher().tuning == expected
    else:
        assert dispatch.default_dispatcher().tuning == expected


@pytest.mark.cuda
def test_background_tuning_runs_on_a_stream_of_its_own(tmp_path):
    streams = []

    def timer(step, mode, device):
        streams.append(torch.cuda.current_stream(device))
        step(0)
        return 1.0
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=timer)
    src = torch.arange(64, dtype=torch.int32, device="cuda")
    dst = torch.zeros(64, dtype=torch.int32, device="cuda")
    d.copy([(src, dst)])
    assert d.wait_tuned(120) and streams
    assert all(s != torch.cuda.current_stream() for s in streams)
    torch.cuda.synchronize()
    assert torch.equal(src, dst)


def _fast_timer(step, mode, device):
    return 1.0 if step.launch.strategy == "torch_per_copy" else 5.0


def test_a_runner_built_while_a_winner_is_adopted_is_not_kept(tmp_path, monkeypatch):
    """copy() builds a runner from the interim choice; if the winner is adopted meanwhile, that runner must not
    be cached (it would serve the interim strategy for good)."""
    from copytune.kernels import torch_foreach

    gate = Gate()
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=gate)
    d.copy(pairs_of(4))  # interim torch_foreach; the key waits in the background
    real = torch_foreach.STRATEGY.runner

    def runner(plan, params=None):  # the serving thread loses the GIL right here
        if threading.current_thread() is threading.main_thread() and not gate.open.is_set():
            gate.open.set()
            assert d.wait_tuned(30)
        return real(plan, params)
    monkeypatch.setattr(torch_foreach.STRATEGY, "runner", runner)
    other = pairs_of(4)  # same key, other addresses: a runner-cache miss
    d.copy(other)
    monkeypatch.setattr(torch_foreach.STRATEGY, "runner", real)
    ran = []
    monkeypatch.setattr(torch_foreach, "foreach_copy", lambda pairs: ran.append(pairs))
    d.copy(other)
    assert ran == [] and all(torch.equal(s, t) for s, t in other)  # the winner (torch_per_copy) ran


def test_a_binding_built_while_a_winner_is_adopted_is_rebuilt(tmp_path, monkeypatch):
    from copytune.kernels import torch_foreach

    gate = Gate()
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=gate)
    md, _ = nsa.make_example(8, 64, seed=1)
    real = torch_foreach.STRATEGY.bind

    def bind(plan, params=None):  # a cold bind (compiling) while the tune ends
        if threading.current_thread() is threading.main_thread() and not gate.open.is_set():
            gate.open.set()
            assert d.wait_tuned(30)
        return real(plan, params)
    monkeypatch.setattr(torch_foreach.STRATEGY, "bind", bind)
    for seed in (1, 2):
        _, pre = nsa.make_example(8, 64 + 4 * seed, seed=seed)
        nsa.batched_copy_metadata(md, pre, dispatcher=d)
        assert all(torch.equal(s, t) for s, t in nsa.copy_pairs(md, pre))
    assert nsa._SITE.binding(id(md)).bound.choice == dispatch.Choice("torch_per_copy", {}, "tuned")


def test_a_retune_reaches_call_sites_and_hooks_run_outside_the_key_lock(tmp_path):
    gate = Gate()
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=gate)
    md, _ = nsa.make_example(8, 64, seed=1)
    _, pre = nsa.make_example(8, 68, seed=1)
    nsa.batched_copy_metadata(md, pre, dispatcher=d)
    plan = CopyPlan.from_pairs(nsa.copy_pairs(md, pre))
    seen = []
    d.on_adopt(lambda key: seen.append(d.choose(plan)))  # a hook may look the key up again: no deadlock
    gate.open.set()
    assert d.choose(plan, retune=True).origin == "tuned" and d.wait_tuned(30)
    assert seen and seen[0].origin == "tuned"
    assert nsa._SITE.binding(id(md)) is None or nsa._SITE.binding(id(md)).bound.choice.origin == "tuned"
    nsa.batched_copy_metadata(md, pre, dispatcher=d)
    assert nsa._SITE.binding(id(md)).bound.choice.origin == "tuned"


@pytest.mark.parametrize("signature", [[[4, ["1d"], 8, 8, 4]], [[4, "1d", 8.0, 8, 4]], [[4, "1d", 8, 8]]])
def test_a_malformed_stored_signature_is_no_neighbour_and_breaks_nothing(tmp_path, logged, signature):
    store = Store(tmp_path / "c.db")
    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=_fast_timer)
    from copytune.signature import device_fingerprint

    store.put({"key": "hand-edited", "device": device_fingerprint("cpu"), "signature": signature, "mode": "eager",
               "strategy": "torch_per_copy", "params": {}, "time_us": 1.0, "baseline_us": 1.0, "timings": [],
               "tuned_at": "", "copytune_version": "0"})
    pairs = pairs_of(4)
    with logged("no neighbour can be read from"):
        d.copy(pairs)
    assert all(torch.equal(s, t) for s, t in pairs) and d.wait_tuned(30)


def test_the_tuner_thread_holds_neither_the_steps_tensors_nor_its_dispatcher(tmp_path):
    import gc
    import weakref

    from copytune import background

    d = Dispatcher(tmp_path / "c.db", pool=torch_pool(), tuning="deferred", timer=_fast_timer)
    src, dst = torch.arange(1 << 16, dtype=torch.int32), torch.zeros(1 << 16, dtype=torch.int32)
    d.copy([(src, dst)])
    assert d.wait_tuned(30)
    tuner = d._background
    refs = weakref.ref(src), weakref.ref(dst), weakref.ref(d)
    del src, dst, d
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    thread = tuner._thread
    background._stop(weakref.ref(tuner))  # what atexit does: an idle worker leaves at once
    if thread is not None:
        thread.join(5)
        assert not thread.is_alive()
