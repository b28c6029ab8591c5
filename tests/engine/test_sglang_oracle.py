"""The engine loader is real: the wheel's own replay code runs and writes exactly the engine's ``.copy_()`` results,
the multi-step entry drives every draft backend, versions switch cleanly, and a failed download is a clean skip."""

import importlib
import inspect
import sys

import pytest
import torch

from copytune import sglang_oracle
from copytune.sglang_oracle import EngineUnavailable, snapshot_diff


@pytest.fixture(params=sglang_oracle.VERSIONS)
def engine(request):
    try:
        return sglang_oracle.load(request.param)
    except EngineUnavailable as exc:
        pytest.skip(str(exc))


def _expect_replay(engine, backend, bs: int, pre, mode: str) -> None:
    """The replay's effect as the engine's source reads (its ``.copy_()`` fallback), written by hand on a twin
    backend: only these regions change. 0.5.23 copies nothing mode-specific for its draft extend (V2)."""
    p = engine.layout
    md = backend.decode_cuda_graph_metadata[bs]
    size = pre.seqlens_expanded_size
    md.cache_seqlens_int32[:] = pre.cache_seqlens
    md.cu_seqlens_k[1:] = pre.cu_seqlens_k[1:]
    if mode in ("decode", "target_verify") or (mode == "draft_extend" and p == "nsa"):
        rows, cols = pre.page_indices.shape
        md.page_table_1[:rows, :cols] = pre.page_indices
        getattr(md, f"{p}_cache_seqlens_int32")[:size] = getattr(pre, f"{p}_cache_seqlens")
        if mode != "decode":  # decode's seqlens_expanded *is* cache_seqlens_int32
            getattr(md, f"{p}_seqlens_expanded")[:size] = pre.seqlens_expanded
    getattr(md, f"{p}_cu_seqlens_k")[1 : 1 + size] = getattr(pre, f"{p}_cu_seqlens_k")[1 : 1 + size]
    if pre.real_page_table is not None:
        rows, cols = pre.real_page_table.shape
        md.real_page_table[:rows, :cols] = pre.real_page_table
    if pre.flashmla_metadata is not None:
        md.flashmla_metadata.flashmla_metadata[:] = pre.flashmla_metadata.flashmla_metadata
        md.flashmla_metadata.num_splits[: size + 1] = pre.flashmla_metadata.num_splits
    setattr(backend, f"{p}_prefill_impl", "flashmla_kv")  # the prefill-impl reset: auto-select on an fp8 KV cache
    backend.forward_metadata = md


def test_the_code_is_the_wheels(engine):
    source = inspect.getsourcefile(engine.Backend)
    assert source.startswith(str(sglang_oracle.cache_dir() / engine.version)), source
    for name in (engine.Backend.__module__, engine.Precomputed.__module__, engine.ForwardMode.__module__):
        assert getattr(sys.modules[name], "__file__", None), f"{name} should run from the wheel"
    utils = engine.module("sglang.srt.utils")
    assert isinstance(utils, sglang_oracle._StubModule) and utils.is_cuda() is False and utils.is_hip() is False
    other = "nsa_backend" if engine.layout == "dsa" else "dsa_backend"
    with pytest.raises(ModuleNotFoundError):  # what the wheel lacks does not exist, as in a real install
        importlib.import_module(f"sglang.srt.layers.attention.{other}")


def test_capture_shares_tensors_as_the_engine(engine):
    """Bases sliced per bs, decode's seqlens_expanded *is* cache_seqlens_int32, page size 1's real table *is*
    page_table_1, 0.5.10's draft backends share the runner's seq_lens; verify captures bs * draft_tokens rows."""
    ms = engine.make_multistep(2, [2, 4], page_size=1)
    first, second = (backend.decode_cuda_graph_metadata for backend in ms.attn_backends)
    md = first[4]
    assert getattr(md, f"{engine.layout}_seqlens_expanded") is md.cache_seqlens_int32
    assert md.real_page_table is md.page_table_1 and md.page_table_1._base is first["page_table"]
    assert first[2].page_table_1.data_ptr() == md.page_table_1.data_ptr()
    assert (second[4].cache_seqlens_int32 is md.cache_seqlens_int32) == (engine.layout == "nsa")
    verify = engine.make_backend([4], mode="target_verify").decode_cuda_graph_metadata[4]
    assert verify.page_table_1.shape[0] == 16 and verify.cache_seqlens_int32.shape == (4,)


@pytest.mark.parametrize("page_size, flashmla", [(1, True), (64, False)])
@pytest.mark.parametrize("mode", ["decode", "target_verify", "draft_extend"])
def test_replay_writes_exactly_the_engine_copies(engine, device, mode, page_size, flashmla):
    bs, max_len = 3, 57
    kw = dict(page_size=page_size, flashmla=flashmla, device=device)
    ran, want = (engine.make_backend([1, bs, 5], mode=mode, seed=11, **kw) for _ in range(2))
    before = engine.snapshot(ran)
    pre = engine.make_precomputed(bs, mode, max_len, seed=5, **kw)
    ran.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=bs, precomputed=pre,
                                                                 forward_mode=engine.forward_mode(mode))
    _expect_replay(engine, want, bs, pre, mode)
    after = engine.snapshot(ran)
    assert snapshot_diff(after, engine.snapshot(want)) == []
    copies_pages = engine.layout == "nsa" or mode != "draft_extend"  # 0.5.23's draft extend copies no page table
    assert after["forward_metadata"] == bs
    assert ("page_table: tensors differ" in snapshot_diff(before, after)) == copies_pages
    if mode == "decode":
        rows = bs
        assert torch.equal(after["page_table"][:rows, :max_len], pre.page_indices)
    else:
        rows = bs * 4 if mode == "target_verify" or engine.layout == "dsa" else pre.seqlens_expanded_size
    untouched = torch.ones_like(before["page_table"], dtype=torch.bool)
    if copies_pages:
        untouched[:rows, :max_len] = False
    assert torch.equal(after["page_table"][untouched], before["page_table"][untouched])


@pytest.mark.parametrize("n_backends", [1, 2, 3, 4])
def test_run_multistep_refreshes_every_draft_backend(engine, device, capsys, n_backends):
    bs = 4
    kw = dict(page_size=64, flashmla=True, device=device)
    ran, want = (engine.make_multistep(n_backends, [2, bs], seed=3, **kw) for _ in range(2))
    pre = engine.make_precomputed(bs, "decode", 90, seed=8, **kw)
    engine.run_multistep(ran, bs, pre)
    out = capsys.readouterr().out
    fell_back = "Multi-backend fused metadata copy kernel" in out  # the engine's 3-backend path, then its loop
    if n_backends < 3:
        assert not fell_back, out
    elif not engine.jit_available:
        assert fell_back, out  # speculative_num_steps > 3 reaches the 3-backend path, which has no kernel here
    fused = n_backends >= 3 and not fell_back  # the engine's JIT kernel ran (tvm_ffi, its toolchain, a GPU)
    for i, backend in enumerate(want.attn_backends):
        _expect_replay(engine, backend, bs, pre, "decode")
        if fused and engine.layout == "nsa" and i < 3:
            del backend.forward_metadata  # 0.5.10's 3-backend kernel path leaves forward_metadata as it was
    for got, expected in zip(ran.attn_backends, want.attn_backends):
        assert snapshot_diff(engine.snapshot(got), engine.snapshot(expected)) == []
        assert "_precompute_replay_metadata" not in vars(got)


def test_held_engines_survive_a_version_switch(device):
    try:
        old, new = (sglang_oracle.load(v) for v in sglang_oracle.VERSIONS)
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    backend, want = (old.make_backend([2], seed=1, device=device) for _ in range(2))
    pre = old.make_precomputed(2, "decode", 30, device=device)
    assert sglang_oracle.load(new.version) is new
    import sglang.srt.layers.attention.dsa_backend as dsa  # plain imports resolve in the active version

    assert dsa.DeepseekSparseAttnBackend is new.Backend
    backend.init_forward_metadata_replay_cuda_graph_from_precomputed(bs=2, precomputed=pre,
                                                                     forward_mode=old.forward_mode("decode"))
    _expect_replay(old, want, 2, pre, "decode")
    assert snapshot_diff(old.snapshot(backend), old.snapshot(want)) == []
    assert sglang_oracle.load(old.version) is old
    assert sys.modules[old.Backend.__module__].__dict__[old.Backend.__name__] is old.Backend
    with pytest.raises(ModuleNotFoundError):
        import sglang.srt.layers.attention.dsa_backend  # noqa: F401


def _failing_pip(message: str, code: int = 1):
    return lambda version, dest: [sys.executable, "-c", f"import sys; sys.stderr.write({message!r}); sys.exit({code})"]


@pytest.mark.parametrize("pip, reason", [
    (_failing_pip("ERROR: could not reach the registry"), "could not reach the registry"),
    (_failing_pip("", 0), "no wheel written"),
    (lambda version, dest: ["/nonexistent/python"], "did not complete"),
])
def test_a_failed_download_raises_engine_unavailable(tmp_path, monkeypatch, pip, reason):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("COPYTUNE_TEST_CACHE", str(cache))
    monkeypatch.setattr(sglang_oracle, "_pip_command", pip)
    monkeypatch.setattr(sglang_oracle, "_ENGINES", {})
    monkeypatch.setattr(sglang_oracle, "_UNAVAILABLE", {})
    with pytest.raises(EngineUnavailable, match=reason):
        sglang_oracle.load(sglang_oracle.VERSIONS[0])
    assert list(cache.iterdir()) == [], "nothing half-made is left in the cache"
    monkeypatch.setattr(sglang_oracle, "_pip_command", _failing_pip("must not run again"))
    with pytest.raises(EngineUnavailable, match=reason):  # the first failure stands for the process
        sglang_oracle.load(sglang_oracle.VERSIONS[0])


def test_a_concurrent_publisher_wins(tmp_path):
    target, tree = tmp_path / "0.5.23", tmp_path / "tree"
    for path, text in ((target, "first"), (tree, "second")):
        (path / "sglang").mkdir(parents=True)
        (path / sglang_oracle._MARKER).write_text(text)
    sglang_oracle._publish(tree, target)
    assert (target / sglang_oracle._MARKER).read_text() == "first"
