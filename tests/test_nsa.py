"""NSA metadata refresh: bit-exact with the engine's own .copy_() sequence, every mode, across steps."""


import pytest
import torch

from copytune import Dispatcher, callsite, get_strategy, nsa
from copytune.nsa import DSAMetadata, FlashMLAMetadata, batched_copy_metadata, batched_copy_metadata_multi, make_example


def _views(md) -> dict:
    """Every tensor of a metadata object by name (FlashMLA's pair included)."""
    out = {}
    for f in md.__dataclass_fields__:
        v = getattr(md, f)
        if isinstance(v, torch.Tensor):
            out[f] = v
        elif isinstance(v, FlashMLAMetadata):
            out[f + ".flashmla_metadata"], out[f + ".num_splits"] = v.flashmla_metadata, v.num_splits
    return out


def _base(t):
    return t._base if t._base is not None else t


def clone(md: DSAMetadata) -> DSAMetadata:
    """The same views over cloned base buffers (guard bands included; shared buffers stay shared)."""
    copies = {}

    def c(t):
        if t is None:
            return None
        if isinstance(t, FlashMLAMetadata):
            return FlashMLAMetadata(c(t.flashmla_metadata), c(t.num_splits))
        base = _base(t)
        copy = copies.setdefault(id(base), base.clone())
        return torch.as_strided(copy, t.shape, t.stride(), t.storage_offset())
    return DSAMetadata(**{f: c(getattr(md, f)) for f in md.__dataclass_fields__})


def assert_same(got: DSAMetadata, want: DSAMetadata):
    g, w = _views(got), _views(want)
    assert g.keys() == w.keys()
    for f in g:
        assert torch.equal(_base(g[f]), _base(w[f])), f"{f} differs"


def poison(md: DSAMetadata) -> None:
    for t in _views(md).values():
        _base(t).random_(1, 1 << 30)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


STRATEGIES = ["default", "triton_unified", "cuda_ext"]


def dispatcher_for(name, tmp_path, device):
    if name != "default" and get_strategy(name).available(device) is not None:
        pytest.skip(get_strategy(name).available(device))
    return Dispatcher(tmp_path / "c.db", tune=False, strategy=None if name == "default" else name)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", nsa.FORWARD_MODES)
@pytest.mark.parametrize("page_size, flashmla", [(64, False), (1, True)])
def test_refresh_matches_the_engine_copies_over_steps(strategy, mode, page_size, flashmla, tmp_path, device):
    d = dispatcher_for(strategy, tmp_path, device)
    md, _ = make_example(3, 40, 256, page_size=page_size, forward_mode=mode, flashmla=flashmla, device=device)
    for step, max_len in enumerate([40, 41, 41, 77, 12]):  # columns grow, repeat, jump and shrink
        _, pre = make_example(3, max_len, 256, page_size=page_size, forward_mode=mode, flashmla=flashmla,
                              device=device, seed=step + 1)
        want = clone(md)
        nsa.reference_copy(want, pre, mode)
        batched_copy_metadata(md, pre, mode, dispatcher=d)
        sync(device)
        assert_same(md, want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_three_backends_in_one_batch(strategy, tmp_path, device):
    d = dispatcher_for(strategy, tmp_path, device)
    mds = [make_example(4, 30, 128, device=device, seed=10 + k)[0] for k in range(3)]
    for step in range(3):
        _, pre = make_example(4, 30 + step, 128, device=device, seed=step)
        wants = [clone(md) for md in mds]
        for w in wants:
            nsa.reference_copy(w, pre, "decode")
        batched_copy_metadata_multi(mds, pre, "decode", dispatcher=d)
        sync(device)
        for md, w in zip(mds, wants):
            assert_same(md, w)


def test_copy_pairs_follow_the_engine_layout():
    md, pre = make_example(4, 50, 128, page_size=64)
    pairs = nsa.copy_pairs(md, pre, "decode")
    assert len(pairs) == 6
    (s1, d1), (_, d2) = pairs[1], pairs[2]
    assert d1.data_ptr() == md.cu_seqlens_k.data_ptr() + 4 and s1.shape == (4,)
    assert d2.shape == (4, 50) and d2.stride() == (128, 1)
    assert nsa.copy_pairs(md, pre, "decode")[5][1].shape == pre.real_page_table.shape


def test_example_contents_are_realistic():
    md, pre = make_example(8, 300, forward_mode="target_verify", draft_tokens=3)
    assert pre.page_indices.shape == (24, pre.max_seqlen_k) and pre.seqlens_expanded_size == 24
    assert int(pre.cache_seqlens.max()) == 303 and (pre.dsa_cache_seqlens <= nsa.TOPK).all()
    assert torch.equal(pre.cu_seqlens_k[1:], pre.cache_seqlens.cumsum(0).int())
    assert (md.page_table_1 != 0).all()  # poisoned, not zeros


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_page_table_wider_than_the_buffer_is_an_error(strategy, tmp_path, device):
    d = dispatcher_for(strategy, tmp_path, device)
    md, pre = make_example(2, 40, 64, device=device)
    batched_copy_metadata(md, pre, dispatcher=d)
    _, wide = make_example(2, 100, 128, device=device)
    before = md.page_table_1._base.clone()
    with pytest.raises(ValueError, match="100 columns; the (metadata buffer|destination rows) hold"):
        batched_copy_metadata(md, wide, dispatcher=d)
    sync(device)
    assert torch.equal(md.page_table_1._base, before)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_page_table_with_other_rows_is_an_error(strategy, tmp_path, device):
    """The binding key leaves page_indices' rows out (they equal the size in the engine): a page table that
    disagrees must still be refused before any launch, never copied with the bound row count."""
    d = dispatcher_for(strategy, tmp_path, device)
    md, pre = make_example(4, 40, 128, device=device)
    batched_copy_metadata(md, pre, dispatcher=d)
    _, other = make_example(4, 41, 128, device=device, seed=3)
    other.page_indices = other.page_indices[:3]
    before = md.page_table_1._base.clone()
    with pytest.raises(ValueError, match="rows|shape"):
        batched_copy_metadata(md, other, dispatcher=d)
    sync(device)
    assert torch.equal(md.page_table_1._base, before)


def test_alternating_modes_keep_their_bindings(tmp_path, device, monkeypatch):
    """Speculative decoding alternates target-verify and draft-extend on the same buffers: each structure binds
    once, then every step is a lookup."""
    built = []
    monkeypatch.setattr(callsite, "_Binding", lambda *a, _B=callsite._Binding: built.append(1) or _B(*a))
    d = Dispatcher(tmp_path / "c.db", tune=False)
    md, _ = make_example(3, 20, 128, forward_mode="target_verify", device=device)
    for step in range(6):
        mode = ("target_verify", "draft_extend")[step % 2]
        # one structure per mode (same seed: same draft lengths and columns); fresh destination bytes each step
        _, pre = make_example(3, 20, 128, forward_mode=mode, device=device, seed=step % 2)
        poison(md)
        want = clone(md)
        nsa.reference_copy(want, pre, mode)
        batched_copy_metadata(md, pre, mode, dispatcher=d)
        sync(device)
        assert_same(md, want)
    assert len(built) == 2


def test_torch_winner_follows_growing_page_tables_without_rebinding(tmp_path, device, monkeypatch):
    """A torch strategy cannot resize its views: steps with a new width run the engine's own copies, exactly,
    instead of validating and binding anew every decode step."""
    built = []
    monkeypatch.setattr(callsite, "_Binding", lambda *a, _B=callsite._Binding: built.append(1) or _B(*a))
    d = Dispatcher(tmp_path / "c.db", tune=False, strategy="torch_foreach")
    md, _ = make_example(3, 40, 256, device=device)
    for step in range(5):
        _, pre = make_example(3, 40 + step, 256, device=device, seed=step)
        want = clone(md)
        nsa.reference_copy(want, pre)
        batched_copy_metadata(md, pre, dispatcher=d)
        sync(device)
        assert_same(md, want)
    assert len(built) == 1


def test_unknown_forward_mode():
    with pytest.raises(ValueError, match="forward_mode must be one of"):
        nsa.forward_mode_name("prefill")


class StandInBackend:
    """The engine backend's shape: graph metadata per bs, and the replay method the hook replaces."""

    def __init__(self, metadata_by_bs):
        self.decode_cuda_graph_metadata = metadata_by_bs
        self.prefill_impl_calls = 0
        self.forward_metadata = None

    def set_nsa_prefill_impl(self, forward_batch=None):
        self.prefill_impl_calls += 1

    def init_forward_metadata_replay_cuda_graph_from_precomputed(self, bs, precomputed, forward_mode):
        self.set_nsa_prefill_impl(forward_batch=None)
        metadata = self.decode_cuda_graph_metadata[bs]
        nsa.reference_copy(metadata, precomputed, forward_mode)
        self.forward_metadata = metadata


def test_hook_routes_the_replay_through_copytune(device):
    md, pre = make_example(5, 64, 128, device=device)
    reference = StandInBackend({5: clone(md)})
    reference.init_forward_metadata_replay_cuda_graph_from_precomputed(5, pre, "decode")
    assert nsa.install(StandInBackend) and nsa.install(StandInBackend)  # idempotent
    try:
        method = StandInBackend.init_forward_metadata_replay_cuda_graph_from_precomputed
        assert method.__copytune__
        backend = StandInBackend({5: md})
        backend.init_forward_metadata_replay_cuda_graph_from_precomputed(5, pre, "decode")
        sync(device)
        assert backend.forward_metadata is md and backend.prefill_impl_calls == 1
        assert_same(md, reference.decode_cuda_graph_metadata[5])
    finally:
        nsa.uninstall(StandInBackend)
    assert not getattr(StandInBackend.init_forward_metadata_replay_cuda_graph_from_precomputed, "__copytune__", 0)


def test_install_without_the_engine_is_a_clear_noop(caplog, monkeypatch):
    monkeypatch.setattr(nsa, "ENGINE_LAYOUTS", (("copytune_tests.no_such_engine", "B", "M", "K"),))
    with caplog.at_level("WARNING", logger="copytune"):
        assert nsa.install() is False
    assert "not importable; nothing patched" in caplog.text


def test_metadata_without_weak_references_is_pinned_and_correct(tmp_path, device):
    """An engine object with __slots__ cannot be weakly referenced: its binding must keep it alive instead."""
    fields = tuple(DSAMetadata.__dataclass_fields__)
    Slotted = type("SlottedMetadata", (), {"__slots__": fields})
    md, pre = make_example(4, 30, 64, device=device)
    obj = Slotted()
    for f in fields:
        setattr(obj, f, getattr(md, f))
    want = clone(md)
    nsa.reference_copy(want, pre)
    batched_copy_metadata(obj, pre, dispatcher=Dispatcher(tmp_path / "c.db", tune=False))
    sync(device)
    assert_same(md, want)
    assert nsa._SITE._pinned[id(obj)] == [obj]


def test_seam_hot_path_is_one_lookup_and_the_key_matches_the_call_site(tmp_path, device, monkeypatch):
    """The patched seam's common step is CallSite.step: after the first step binds, later steps of the same
    structure never reach CallSite.refresh (which would mean step's key and refresh's key disagree). With cuda_ext
    the method becomes the seam table's C method once the table exists: a served step counts there, a call with
    keywords or one the copies refuse takes the Python body (the engine's own method for the refused one), and
    uninstall puts the engine's method back."""
    class Backend:
        def _copy_base_replay_buffers(self, bs, metadata, precomputed, forward_mode):
            raise AssertionError("the engine's own copies ran")

    monkeypatch.setattr("copytune.dispatch._default", {"eager": Dispatcher(tmp_path / "c.db", tune=False,
                                                                           strategy="cuda_ext"
                                                                           if device.type == "cuda" else None)})
    md, _ = make_example(4, 40, 256, device=device)
    original = Backend.__dict__["_copy_base_replay_buffers"]
    assert nsa.install(Backend)
    try:
        refreshes = []
        refresh = nsa._SITE.refresh
        monkeypatch.setattr(nsa._SITE, "refresh", lambda *a, **k: refreshes.append(1) or refresh(*a, **k))
        for step in range(4):
            _, pre = make_example(4, 40 + step, 256, device=device, seed=step)
            want = clone(md)
            nsa.reference_copy(want, pre)
            Backend()._copy_base_replay_buffers(4, md, pre, "decode")
            sync(device)
            assert_same(md, want)
        fast = nsa._SITE.binding(id(md)).from_object is not None
        assert len(refreshes) == (1 if fast else 4)
        method = Backend.__dict__["_copy_base_replay_buffers"]
        if device.type == "cuda":  # cuda_ext: the method in C
            assert type(method).__name__ == "SeamMethod" and method.__copytune__
            served, in_c = nsa.stats().served, method.served
            _, pre = make_example(4, 50, 256, device=device, seed=9)
            want = clone(md)
            nsa.reference_copy(want, pre)
            Backend()._copy_base_replay_buffers(4, md, pre, "decode")
            sync(device)
            assert_same(md, want)
            assert method.served == in_c + 1 and nsa.stats().served == served + 1
            Backend()._copy_base_replay_buffers(4, md, pre, forward_mode="decode")  # keywords: the Python body
            assert method.served == in_c + 1 and nsa.stats().served == served + 2
            with pytest.raises(AssertionError, match="the engine's own copies ran"):  # handed to the engine
                Backend()._copy_base_replay_buffers(4, md, pre, "no such mode")
    finally:
        nsa.uninstall()
    assert Backend.__dict__["_copy_base_replay_buffers"] is original


def test_a_seam_of_another_signature_is_left_to_the_engine(caplog):
    class Backend:
        def _copy_base_replay_buffers(self, bs, metadata, precomputed, forward_mode, extra):
            pass

    with caplog.at_level("WARNING", logger="copytune"):
        assert not nsa.install(Backend)
    assert "is not the known seam; not patched" in caplog.text


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_source_of_another_shape_is_refused_by_every_strategy(strategy, tmp_path, device):
    """Bindings are unchecked for speed, yet no strategy may read a source of another geometry than bound: the
    FlashMLA tile-scheduler table is not in the binding key, so a smaller one must raise, never be read past."""
    d = dispatcher_for(strategy, tmp_path, device)
    md, pre = make_example(3, 40, 128, flashmla=True, device=device)
    batched_copy_metadata(md, pre, dispatcher=d)
    _, other = make_example(3, 40, 128, flashmla=True, device=device, seed=5)
    half = other.flashmla_metadata.flashmla_metadata[:66]
    other.flashmla_metadata = FlashMLAMetadata(half, other.flashmla_metadata.num_splits)
    before = {k: _base(t).clone() for k, t in _views(md).items()}
    with pytest.raises(ValueError, match="shape|flashmla_metadata"):
        batched_copy_metadata(md, other, dispatcher=d)
    sync(device)
    assert all(torch.equal(_base(t), before[k]) for k, t in _views(md).items())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_full_width_page_tables_are_followed_not_copied_one_by_one(strategy, tmp_path, device, monkeypatch):
    """sglang 0.5.23 copies the page table's whole width every step (its precompute's max_len is the buffer's
    width), which describes as one merged row: the binding splits it back into rows and keeps serving it."""
    d = dispatcher_for(strategy, tmp_path, device)
    md, _ = make_example(4, 40, 96, device=device)
    fallbacks = []
    monkeypatch.setattr(nsa._SITE, "run_copies", lambda targets, *a: fallbacks.extend(
        t for t in targets if t is md) or callsite.CallSite.run_copies(nsa._SITE, targets, *a))
    for step, cols in enumerate([96, 96, 50, 96]):
        _, pre = make_example(4, cols, 96, device=device, seed=step)
        want = clone(md)
        nsa.reference_copy(want, pre)
        batched_copy_metadata(md, pre, dispatcher=d)
        sync(device)
        assert_same(md, want)
    winner = nsa._SITE.binding(id(md)).bound.strategy
    assert not fallbacks or winner.startswith("torch"), winner


def test_a_binding_holds_no_step_sources(tmp_path, device):
    """Every step's sources are freed once the caller drops them (a long-context page table per batch size
    would otherwise stay pinned on the GPU for the life of the metadata)."""
    import gc
    import weakref

    d = Dispatcher(tmp_path / "c.db", tune=False, strategy="cuda_ext" if device.type == "cuda" else None)
    md, pre = make_example(4, 40, 128, device=device)
    batched_copy_metadata(md, pre, dispatcher=d)
    gone = weakref.ref(pre.page_indices)
    del pre
    gc.collect()
    assert gone() is None


def test_a_page_table_view_is_never_written_past_its_columns(tmp_path, device):
    """The engine's buffer may be a column slice of a wider allocation: its capacity is its own width, not its
    row stride; a step wider than the view is refused before anything is written."""
    md, _ = make_example(2, 40, 128, device=device)
    narrow = DSAMetadata(**{**{f: getattr(md, f) for f in md.__dataclass_fields__},
                            "page_table_1": md.page_table_1[:, :64]})
    _, pre = make_example(2, 40, 64, device=device)
    d = Dispatcher(tmp_path / "c.db", tune=False)
    batched_copy_metadata(narrow, pre, dispatcher=d)
    _, wide = make_example(2, 100, 128, device=device, seed=1)
    before = md.page_table_1._base.clone()
    with pytest.raises(ValueError, match="100 columns; the (metadata buffer|destination rows) holds? 64"):
        batched_copy_metadata(narrow, wide, dispatcher=d)
    sync(device)
    assert torch.equal(md.page_table_1._base, before)


def test_the_multi_backend_kernel_is_taken_only_with_the_steps_own_buffers():
    """Inside a multi-step replay the engine's 3-backend kernel is replaced only when its destinations are the
    step's first three backends' (each checked): a call with another buffer in any slot goes to the engine."""
    from types import SimpleNamespace

    mds = [make_example(4, 40, 128, seed=k)[0] for k in range(3)]
    backends = [SimpleNamespace(decode_cuda_graph_metadata={4: md}) for md in mds]
    calls = []
    patched = nsa._patch_multi_kernel(None, lambda *a, **k: calls.append(a))
    reason = "multi-backend kernel called outside a multi-step replay"
    for slot in range(3):
        args = [None] * nsa.MULTI_ARGS
        for k in range(3):
            args[8 + 8 * k] = mds[k].cache_seqlens_int32 if k != slot else mds[k].cache_seqlens_int32.clone()
        args[nsa.MULTI_ARGS - 3] = 4
        handed = nsa.stats().handed[reason]
        token = nsa._step.set(nsa._Step(backends))
        try:
            patched(*args)
        finally:
            nsa._step.reset(token)
        assert len(calls) == slot + 1 and nsa.stats().handed[reason] == handed + 1, slot
