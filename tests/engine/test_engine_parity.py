"""copytune inside the real engine: the patched replay leaves exactly the state the engine's own code leaves.

The engine's files are downloaded at test time (``sglang_oracle.load``); the unpatched replay runs the engine's own
code — its JIT kernel where the toolchain and a GPU exist, else its ``.copy_()`` fallback — and the patched replay
the same code with copytune at the copy seams. Every destination buffer is compared whole, with the backend's
state, over several steps whose page tables grow, repeat and shrink.
"""

import itertools
import sys
import types

import pytest
import torch

from copytune import Dispatcher, nsa, sglang_oracle

STEPS = (40, 41, 41, 77, 12)  # the step's longest sequence: columns grow, repeat, jump and shrink
MODES = ("decode", "idle", "target_verify", "draft_extend", "draft_extend_v2")
LAYOUTS = [  # page size, FlashMLA, real_page_table present (the engine's precompute builds it at page size > 1)
    (1, False, False), (1, True, False), (64, False, True), (64, True, True), (64, False, False)]


@pytest.fixture(params=sglang_oracle.VERSIONS)
def engine(request):
    """The release under test, loaded into ``sys.modules`` (cached per process; a switch costs ~1 ms)."""
    try:
        return sglang_oracle.load(request.param)
    except sglang_oracle.EngineUnavailable as exc:
        pytest.skip(f"the engine's wheel cannot be had here: {exc}")


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def patched(engine, tmp_path, monkeypatch):
    """A function running ``fn`` with copytune installed on the engine's classes (tuned into a scratch cache)."""
    monkeypatch.setenv("COPYTUNE_CACHE", str(tmp_path / "cache.db"))
    monkeypatch.setattr("copytune.dispatch._default", {"eager": Dispatcher(tmp_path / "cache.db")})

    def run(fn, kernel_module=None):
        assert nsa.install(engine.Backend, engine.MultiStepBackend, kernel_module)
        try:
            return fn()
        finally:
            nsa.uninstall()
    return run


def _mode_applies(engine, mode: str) -> bool:
    return not (mode == "draft_extend_v2" and engine.layout == "dsa")  # 0.5.23's draft_extend *is* DRAFT_EXTEND_V2


def _assert_same_state(got: dict, want: dict, skip=()) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        if name in skip:
            continue
        g = got[name]
        if isinstance(w, torch.Tensor):
            assert torch.equal(g.cpu(), w.cpu()), f"{name} differs from the engine's result"
        else:
            assert g == w, f"{name}: {g!r}, the engine leaves {w!r}"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.mark.parametrize("page_size, flashmla, real", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_replay_equals_the_engine(engine, patched, device, mode, page_size, flashmla, real, capfd):
    if not _mode_applies(engine, mode):
        pytest.skip("0.5.23 has one draft-extend mode")
    bs = 3
    kw = dict(page_size=page_size, flashmla=flashmla, device=device)
    ours = engine.make_backend([bs], mode=mode, seed=7, **kw)
    theirs = engine.make_backend([bs], mode=mode, seed=7, **kw)
    _assert_same_state(engine.snapshot(ours), engine.snapshot(theirs))
    fm = engine.forward_mode(mode)
    served = nsa.stats().served
    for step, max_len in enumerate(STEPS):
        pre = engine.make_precomputed(bs, mode, max_len, seed=step, **kw)
        if not real:
            pre.real_page_table = None
        capfd.readouterr()
        theirs.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=bs, precomputed=pre, forward_mode=fm)
        if _engine_kernel_runs(engine, device, mode):  # the oracle is the engine's JIT kernel, not its fallback
            assert "falling back" not in capfd.readouterr().out
        patched(lambda: ours.init_forward_metadata_replay_cuda_graph_from_precomputed(
            bs=bs, precomputed=pre, forward_mode=fm))
        _sync()
        _assert_same_state(engine.snapshot(ours), engine.snapshot(theirs))
    assert nsa.stats().served - served == len(STEPS), nsa.stats().line()


def _engine_kernel_runs(engine, device, mode: str) -> bool:
    """Whether the engine's own path runs its JIT kernel here (a GPU, the toolchain, a mode the kernel takes)."""
    modes = {"decode", "idle", "target_verify"} | ({"draft_extend"} if engine.layout == "nsa" else set())
    return device.type == "cuda" and engine.jit_available and mode in modes


@pytest.fixture
def kernel_stand_in(engine, monkeypatch):
    """The multi-backend kernel's module, importable under the engine's name, whose kernel must never run: the
    patched replay is to take every backend's copies itself. (The unpatched replay sees no such module and runs
    the engine's loop, unless the real JIT module is importable here.)"""
    name = "sglang.kernels.ops.attention.dsa.fused_metadata_copy" if engine.layout == "dsa" \
        else "sglang.jit_kernel.fused_metadata_copy"
    try:
        real = engine.module(name)
    except Exception:  # noqa: BLE001 - no JIT toolchain here
        real = None
    if real is not None and hasattr(real, nsa.MULTI_KERNEL):
        return real

    module = types.ModuleType(name)
    module.__file__ = None
    module.calls = []  # the engine would swallow an exception raised here (and loop): record instead

    def never(*args, **kwargs):
        module.calls.append(args)
        raise RuntimeError("the engine's multi-backend kernel ran under copytune")
    module.fused_metadata_copy_multi_cuda = never
    return module


@pytest.mark.parametrize("n_backends", [1, 2, 3, 4])
@pytest.mark.parametrize("page_size, flashmla, real", [(64, False, True), (1, True, False), (64, True, True)])
def test_multistep_replay_equals_the_engine(engine, patched, kernel_stand_in, device, monkeypatch, n_backends,
                                            page_size, flashmla, real):
    bs = 4
    kw = dict(page_size=page_size, flashmla=flashmla, device=device)
    ours = engine.make_multistep(n_backends, [bs], seed=3, **kw)
    theirs = engine.make_multistep(n_backends, [bs], seed=3, **kw)
    launches = []
    handed = sum(nsa.stats().handed.values())
    for step, max_len in enumerate(STEPS):
        pre = engine.make_precomputed(bs, "decode", max_len, seed=step, **kw)
        if not real:
            pre.real_page_table = None
        engine.run_multistep(theirs, bs, pre)

        def ours_step():
            with monkeypatch.context() as m:
                m.setitem(sys.modules, kernel_stand_in.__name__, kernel_stand_in)
                before = _launch_count(m)
                engine.run_multistep(ours, bs, pre)
                launches.append(len(before))
        patched(ours_step, kernel_stand_in)
        _sync()
        for k, (a, b) in enumerate(zip(ours.attn_backends, theirs.attn_backends)):
            # 0.5.10's 3-backend kernel path leaves forward_metadata of backends 0-2 as it was, its fallback loop
            # sets it: copytune keeps the kernel path, and without the JIT kernel the reference is the loop
            loop_only = engine.layout == "nsa" and n_backends >= 3 and k < 3 and kernel_stand_in.__file__ is None
            _assert_same_state(engine.snapshot(a), engine.snapshot(b), ("forward_metadata",) if loop_only else ())
    assert launches == [1] * len(STEPS), "every draft backend's copies in one launch"
    assert sum(nsa.stats().handed.values()) == handed, nsa.stats().line()
    assert not getattr(kernel_stand_in, "calls", None), "the engine's multi-backend kernel ran under copytune"


def _launch_count(m) -> list:
    """Records each refresh copytune launches inside a multi-step replay: one call of a call site's refresh (the
    seam's step declines while a replay is in flight)."""
    calls = []
    for site in (nsa._SITE, nsa._MULTI_SITE):
        refresh = site.refresh
        m.setattr(site, "refresh", lambda *a, _r=refresh, **k: calls.append(1) or _r(*a, **k))
    return calls


def test_steps_the_copies_cannot_take_go_to_the_engine(engine, patched, device):
    """A page table wider than the engine's buffer: copytune refuses before launching and the engine's own code
    runs (and fails, or writes, exactly as it does without copytune); counted, with the reason."""
    bs = 2
    ours = engine.make_backend([bs], max_context_len=64, device=device)
    theirs = engine.make_backend([bs], max_context_len=64, device=device)
    assert ours.decode_cuda_graph_metadata[bs].page_table_1.shape[1] < 100
    pre = engine.make_precomputed(bs, "decode", 100, max_context_len=128, device=device)
    fm = engine.forward_mode("decode")

    def outcome(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - whatever the engine does, copytune must do the same
            return type(exc)
        return None
    want = outcome(lambda: theirs.init_forward_metadata_replay_cuda_graph_from_precomputed(
        bs=bs, precomputed=pre, forward_mode=fm))
    handed = sum(nsa.stats().handed.values())
    got = outcome(lambda: patched(lambda: ours.init_forward_metadata_replay_cuda_graph_from_precomputed(
        bs=bs, precomputed=pre, forward_mode=fm)))
    _sync()
    assert got is want
    assert sum(nsa.stats().handed.values()) == handed + 1
    if not _engine_kernel_runs(engine, device, "decode"):
        # the engine's JIT kernel has no width check: its rows overrun into each other from racing threads, so
        # two runs of the engine itself need not agree; its .copy_() fallback is deterministic and raises
        _assert_same_state(engine.snapshot(ours), engine.snapshot(theirs))


def test_install_finds_the_engine_by_itself(engine):
    """``install()`` with no argument patches the loaded engine's classes (whichever naming it uses)."""
    try:
        assert nsa.install()
        names = nsa.installed()
        assert f"{engine.Backend.__module__}.{engine.Backend.__qualname__}." \
               f"{'_copy_base_replay_buffers' if engine.layout == 'dsa' else nsa.REPLAY_METHOD}" in names
        assert any(n.startswith(f"{engine.MultiStepBackend.__module__}.{engine.MultiStepBackend.__qualname__}.")
                   for n in names)
    finally:
        nsa.uninstall()
    assert not nsa.installed()


def test_forward_modes_as_the_engine_branches(engine):
    names = {m: nsa.forward_mode_name(engine.forward_mode(m)) for m in MODES}
    assert names["decode"] == names["idle"] == "decode" and names["target_verify"] == "target_verify"
    assert names["draft_extend_v2"] == "draft_extend_v2"
    assert names["draft_extend"] == ("draft_extend" if engine.layout == "nsa" else "draft_extend_v2")


@pytest.mark.parametrize("bs", [1, 5])
def test_copy_list_matches_the_engine_for_every_structure(engine, device, bs, tmp_path):
    """Exhaustive over the structure flags at one size: the bound copy list writes what the engine writes."""
    for mode, (page_size, flashmla, real) in itertools.product(("decode", "target_verify"), LAYOUTS):
        kw = dict(page_size=page_size, flashmla=flashmla, device=device)
        theirs = engine.make_backend([bs], mode=mode, seed=1, **kw)
        ours = engine.make_backend([bs], mode=mode, seed=1, **kw)
        pre = engine.make_precomputed(bs, mode, 33, seed=2, **kw)
        if not real:
            pre.real_page_table = None
        fm = engine.forward_mode(mode)
        theirs.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=bs, precomputed=pre, forward_mode=fm)
        ours_md = ours.decode_cuda_graph_metadata[bs]
        nsa.batched_copy_metadata(ours_md, pre, fm, dispatcher=Dispatcher(tmp_path / "c.db", tune=False))
        _sync()
        want = engine.snapshot(theirs)
        got = engine.snapshot(ours)
        for name in want:
            if isinstance(want[name], torch.Tensor):
                assert torch.equal(got[name].cpu(), want[name].cpu()), f"{mode} {page_size} {flashmla}: {name}"


def test_a_source_aliasing_its_destination_is_served_and_never_refused(engine, patched, device):
    """sglang 0.5.10 pads a replay by handing its graph buffer back as the source (``cache_seqlens`` *is*
    ``cache_seqlens_int32``): copytune serves that step (a copy onto itself changes nothing) and every later
    unaliased step, exactly as the engine does."""
    bs = 3
    ours = engine.make_backend([bs], device=device, seed=4)
    theirs = engine.make_backend([bs], device=device, seed=4)
    fm = engine.forward_mode("decode")
    handed = sum(nsa.stats().handed.values())
    for step in range(4):
        pres = {}
        for name, backend in (("theirs", theirs), ("ours", ours)):
            p = engine.make_precomputed(bs, "decode", 30 + step, device=device, seed=step)
            if step == 0:
                p.cache_seqlens = backend.decode_cuda_graph_metadata[bs].cache_seqlens_int32
            pres[name] = p
        theirs.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=bs, precomputed=pres["theirs"],
                                                                         forward_mode=fm)
        patched(lambda: ours.init_forward_metadata_replay_cuda_graph_from_precomputed(
            bs=bs, precomputed=pres["ours"], forward_mode=fm))
        _sync()
        _assert_same_state(engine.snapshot(ours), engine.snapshot(theirs))
    assert sum(nsa.stats().handed.values()) == handed, nsa.stats().line()


def test_full_width_page_tables_as_the_engine_precomputes_them(engine, patched, device):
    """0.5.23's precompute copies the page table's whole width every step (its max_len is the buffer's width);
    exact, and on a GPU served by the one-call path."""
    bs = 4
    ours = engine.make_backend([bs], device=device, seed=6)
    theirs = engine.make_backend([bs], device=device, seed=6)
    width = ours.decode_cuda_graph_metadata[bs].page_table_1.shape[1]
    fm = engine.forward_mode("decode")
    for step in range(3):
        pre = engine.make_precomputed(bs, "decode", width, device=device, seed=step)
        theirs.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=bs, precomputed=pre, forward_mode=fm)
        patched(lambda: ours.init_forward_metadata_replay_cuda_graph_from_precomputed(
            bs=bs, precomputed=pre, forward_mode=fm))
        _sync()
        _assert_same_state(engine.snapshot(ours), engine.snapshot(theirs))
    binding = nsa._SITE.binding(id(ours.decode_cuda_graph_metadata[bs]))
    if binding.bound.strategy == "cuda_ext":
        assert binding.from_object is not None, "the full-width page table is followed in C++"
