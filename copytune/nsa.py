"""The NSA (native sparse attention) backend's CUDA-graph metadata refresh, as one tuned launch.

Before every decode replay the serving engine's NSA backend copies freshly computed metadata into graph-static
buffers with 6–8 ``.copy_()`` calls (``init_forward_metadata_replay_cuda_graph_from_precomputed``).
``batched_copy_metadata`` performs exactly those copies, with the same bytes, through one launch of the tuned
strategy. The first call per (buffers, sizes, mode) validates and binds; later calls read the new sources'
addresses from their base tensors (no slice views: each costs ~3.5 µs on an H100) and launch.

Names, shapes and the copy list follow the engine's ``NSAMetadata`` / ``PrecomputedMetadata`` (all int32).
``bs`` is the batch, ``D`` the draft tokens per request, ``n`` = bs in decode and bs·D in target-verify.
"""

from __future__ import annotations

import math
import operator
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from copytune.dispatch import Dispatcher, default_dispatcher

FORWARD_MODES = ("decode", "target_verify", "draft_extend")
NSA_TOPK = 2048  # DeepSeek-V3.2's index top-k: NSA sequence lengths are clamped to it
BINDINGS_PER_METADATA = 64  # bound sizes kept per metadata set (oldest dropped first)


@dataclass(eq=False)
class NSAMetadata:
    """Graph-static buffers of one backend for one captured batch size (views of ``max_num_tokens`` buffers)."""

    cache_seqlens_int32: torch.Tensor  # [bs]
    cu_seqlens_k: torch.Tensor  # [bs + 1], written at [1:]
    page_table_1: torch.Tensor  # [n, max_context_len], written at [:rows, :max_len]
    nsa_cache_seqlens_int32: torch.Tensor  # [n]
    nsa_cu_seqlens_k: torch.Tensor  # [n + 1], written at [1:1 + size]
    nsa_seqlens_expanded: torch.Tensor  # [n] (target-verify, draft-extend)
    real_page_table: torch.Tensor | None = None  # [n, ceil(max_context_len / page_size)] when page_size > 1
    flashmla_metadata: torch.Tensor | None = None  # FlashMLA scheduler metadata, written at [:size + 1]


@dataclass(eq=False)
class PrecomputedMetadata:
    """The freshly computed values of one step (the engine computes them once for all draft-step backends)."""

    cache_seqlens: torch.Tensor  # [bs]
    cu_seqlens_k: torch.Tensor  # [bs + 1]
    page_indices: torch.Tensor  # [rows, max_len]
    real_page_table: torch.Tensor | None  # [rows, ceil(max_len / page_size)]
    seqlens_expanded: torch.Tensor  # [size]
    nsa_cache_seqlens: torch.Tensor  # [size]
    nsa_cu_seqlens_k: torch.Tensor  # [size + 1]
    seqlens_expanded_size: int
    max_len: int  # page-table columns in decode
    max_seqlen_k: int  # page-table columns in target-verify and draft-extend
    flashmla_metadata: torch.Tensor | None = None


def forward_mode_name(forward_mode) -> str:
    """``"decode"``, ``"target_verify"`` or ``"draft_extend"`` from a string or the engine's ``ForwardMode``."""
    if isinstance(forward_mode, str):
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        return forward_mode
    if forward_mode.is_decode_or_idle():
        return "decode"
    if forward_mode.is_target_verify():
        return "target_verify"
    if forward_mode.is_draft_extend():
        return "draft_extend"
    raise ValueError(f"unsupported forward mode {forward_mode}")


def _copies(md: NSAMetadata, pre: PrecomputedMetadata, mode: str) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """(source view, base attribute of ``pre``, destination view) in the engine's order."""
    size = pre.seqlens_expanded_size
    out = [(pre.cache_seqlens, "cache_seqlens", md.cache_seqlens_int32),
           (pre.cu_seqlens_k[1:], "cu_seqlens_k", md.cu_seqlens_k[1:])]
    if mode == "decode":
        out += [(pre.page_indices, "page_indices", md.page_table_1[:, :pre.max_len]),
                (pre.nsa_cache_seqlens, "nsa_cache_seqlens", md.nsa_cache_seqlens_int32)]
    elif mode == "target_verify":
        out += [(pre.page_indices, "page_indices", md.page_table_1[:, :pre.max_seqlen_k]),
                (pre.seqlens_expanded, "seqlens_expanded", md.nsa_seqlens_expanded),
                (pre.nsa_cache_seqlens, "nsa_cache_seqlens", md.nsa_cache_seqlens_int32)]
    else:
        rows = pre.page_indices.shape[0]
        out += [(pre.page_indices, "page_indices", md.page_table_1[:rows, :pre.max_seqlen_k]),
                (pre.seqlens_expanded, "seqlens_expanded", md.nsa_seqlens_expanded[:size]),
                (pre.nsa_cache_seqlens, "nsa_cache_seqlens", md.nsa_cache_seqlens_int32[:size])]
    out.append((pre.nsa_cu_seqlens_k[1:1 + size], "nsa_cu_seqlens_k", md.nsa_cu_seqlens_k[1:1 + size]))
    if pre.real_page_table is not None:
        rows, cols = pre.real_page_table.shape
        out.append((pre.real_page_table, "real_page_table", md.real_page_table[:rows, :cols]))
    if pre.flashmla_metadata is not None:
        out.append((pre.flashmla_metadata, "flashmla_metadata", md.flashmla_metadata[:size + 1]))
    return out


def copy_pairs(metadata: NSAMetadata, precomputed: PrecomputedMetadata, forward_mode="decode"):
    """The exact (src, dst) list the backend's replay step copies, in its order, as views."""
    return [(s, d) for s, _, d in _copies(metadata, precomputed, forward_mode_name(forward_mode))]


def reference_copy(metadata: NSAMetadata, precomputed: PrecomputedMetadata, forward_mode="decode") -> None:
    """The engine's original sequence of ``.copy_()`` calls (for tests and benchmarks)."""
    for src, dst in copy_pairs(metadata, precomputed, forward_mode):
        dst.copy_(src)


# -- the hot path ---------------------------------------------------------------------------------------------
class _Binding:
    """A bound refresh for one structure (mode, sizes). The page tables' column counts change every decode step
    (the longest sequence grows), so they are followed in place instead of being part of the key."""

    __slots__ = ("attrs", "bound", "from_object", "get_sources", "launch", "mode", "resizable", "shapes", "widths")

    def __init__(self, metadatas, pre: PrecomputedMetadata, mode: str, dispatcher: Dispatcher):
        self.mode = mode
        triples = [t for md in metadatas for t in _copies(md, pre, mode)]
        self.attrs = tuple(a for _, a, _ in triples)
        self.bound = dispatcher.bind([(s, d) for s, _, d in triples], checked=False,
                                     bases=[getattr(pre, a) for a in self.attrs])
        # copies whose columns follow the step's longest sequence: index -> (attr, widest the buffer takes)
        self.widths = {i: (a, _base_width(d)) for i, (_, a, d) in enumerate(triples)
                       if a in ("page_indices", "real_page_table")}
        self.shapes = {i: triples[i][0].shape for i in self.widths}
        self.resizable = not self.bound.strategy.startswith("torch")
        self.get_sources = operator.attrgetter(*self.attrs) if len(self.attrs) > 1 else \
            (lambda pre, a=self.attrs[0]: (getattr(pre, a),))
        # where the kernel reads the page tables' widths from the sources itself, a step is one C++ call
        if all(self.bound.follow_source_shape(i, width * 4) for i, (_, width) in self.widths.items()):
            self.widths = {}
        self.launch = self.bound.sources_launcher()
        # cheapest of all: the kernel reads the sources off ``pre`` itself (one C++ call per step)
        self.from_object = None if self.widths else self.bound.attribute_launcher(self.attrs)

    def run(self, pre: PrecomputedMetadata, metadatas: Sequence[NSAMetadata] | None = None) -> bool:
        """Launch for ``pre``; False when a page table's shape changed and could not be followed in place.

        A torch winner cannot follow a new width (its views are fixed): given ``metadatas``, such a step runs the
        engine's own copies instead (exact by definition, and no slower than the engine), never a rebind per step.
        """
        if not self.widths:
            err = self.from_object(pre) if self.from_object is not None else self.launch(self.get_sources(pre))
            if err:
                raise _launch_error(err)
            return True
        for i, (attr, width) in self.widths.items():
            src = getattr(pre, attr)
            if src.shape != self.shapes[i]:
                rows, cols = src.shape
                if cols > width:
                    raise ValueError(f"{attr} has {cols} columns; the metadata buffer holds {width}")
                if rows != self.shapes[i][0]:
                    return False  # the caller binds anew, which validates (and refuses a mismatch)
                if not self.resizable:
                    if metadatas is None:
                        return False
                    for md in metadatas:
                        reference_copy(md, pre, self.mode)
                    return True
                if not self.bound.resize_copy(i, rows, cols * 4, src.stride(0) * 4):
                    return False
                self.shapes[i] = src.shape
        err = self.launch(self.get_sources(pre))
        if err:
            raise RuntimeError(err)
        return True


def _launch_error(err: str) -> Exception:
    """The kernel refused a step before launching: a page table of the wrong rows or too many columns is the
    caller's input (ValueError); anything else is the launch's (RuntimeError)."""
    return (ValueError if err.startswith("cuda_ext: source") else RuntimeError)(err)


def _base_width(dst_view: torch.Tensor) -> int:
    """Columns available to a ``buffer[:rows, :cols]`` destination: the buffer's row stride."""
    return dst_view.stride(0) if dst_view.dim() == 2 else dst_view.numel()


# Bindings by (owner, forward_mode, size, real_page_table is None, FlashMLA shape, dispatcher): everything the
# copy list depends on besides the buffers (the owner: id(metadata), or a tuple of ids for several backends) and
# the page tables' sizes, which the binding follows or checks itself. The forward mode is keyed as given (a
# string or the engine's enum), so a call costs one tuple, one dict lookup and the launch; page_indices' row
# count is not in the key (it equals the size in every mode, and the launch checks it).
_bindings: dict[tuple, _Binding] = {}
_owned: dict[object, list[tuple]] = {}  # owner -> its keys, oldest first
_pinned: dict[object, list] = {}  # metadata objects that cannot be weakly referenced, kept alive while bound


def _key(owner, pre: PrecomputedMetadata, forward_mode, dispatcher) -> tuple:
    fm = pre.flashmla_metadata
    return (owner, forward_mode, pre.seqlens_expanded_size, pre.real_page_table is None,
            fm if fm is None else fm.shape, dispatcher)


def _forget(owner) -> None:
    for key in _owned.pop(owner, ()):
        _bindings.pop(key, None)
    _pinned.pop(owner, None)


def _rebind(metadatas: Sequence[NSAMetadata], owner, pre: PrecomputedMetadata, forward_mode,
            dispatcher: Dispatcher | None) -> None:
    """The cold path: a step the bound copy could not take alone (see ``_Binding.run``), else validate, bind
    (tuning if the signature is new) and run, replacing a stale binding."""
    mode = forward_mode_name(forward_mode)
    key = _key(owner, pre, forward_mode, dispatcher)
    entry = _bindings.get(key)
    if entry is not None and entry.run(pre, metadatas):
        return
    keys = _owned.get(owner)
    if keys is None:
        keys = _owned[owner] = []
        for md in metadatas:  # forget the bindings when any of these buffer sets is freed
            try:
                weakref.finalize(md, _forget, owner)
            except TypeError:  # not weak-referenceable: hold it, so its id cannot be reused by another object
                _pinned.setdefault(owner, []).append(md)
    entry = _Binding(metadatas, pre, mode, dispatcher or default_dispatcher("eager"))
    if key in _bindings:
        keys.remove(key)
    elif len(keys) >= BINDINGS_PER_METADATA:
        _bindings.pop(keys.pop(0), None)
    _bindings[key] = entry
    keys.append(key)
    if not entry.run(pre):
        raise RuntimeError("copytune.nsa: a fresh binding could not run the step it was bound for")


def batched_copy_metadata(metadata: NSAMetadata, precomputed: PrecomputedMetadata, forward_mode="decode", *,
                          dispatcher: Dispatcher | None = None) -> None:
    """Refresh ``metadata`` from ``precomputed`` exactly as the backend's ``.copy_()`` sequence does, in one
    tuned launch. The first call per structure validates and binds (and tunes, if this signature is new)."""
    fm = precomputed.flashmla_metadata  # _key inlined: the engine's call, every decode step
    binding = _bindings.get((id(metadata), forward_mode, precomputed.seqlens_expanded_size,
                             precomputed.real_page_table is None, fm if fm is None else fm.shape, dispatcher))
    if binding is not None and binding.from_object is not None:  # the whole step is one C++ call
        err = binding.from_object(precomputed)
        if err:
            raise _launch_error(err)
    elif binding is None or not binding.run(precomputed):
        _rebind((metadata,), id(metadata), precomputed, forward_mode, dispatcher)


def batched_copy_metadata_multi(metadatas: Sequence[NSAMetadata], precomputed: PrecomputedMetadata,
                                forward_mode="decode", *, dispatcher: Dispatcher | None = None) -> None:
    """Refresh several backends' buffers (one per draft step in speculative decoding) from one precomputed set,
    all in one batch; the engine's own fused kernel hard-codes 3 backends, this takes any number."""
    owner = tuple(map(id, metadatas))
    binding = _bindings.get(_key(owner, precomputed, forward_mode, dispatcher))
    if binding is None or not binding.run(precomputed):
        _rebind(metadatas, owner, precomputed, forward_mode, dispatcher)


# -- examples -------------------------------------------------------------------------------------------------
def _rand(shape, device, generator, low=1, high=1 << 30) -> torch.Tensor:
    return torch.randint(low, high, shape, dtype=torch.int32, device="cpu", generator=generator).to(device)


def _cu(seqlens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))


def make_example(bs: int, max_len: int, max_context_len: int | None = None, *, page_size: int = 64,
                 forward_mode="decode", draft_tokens: int = 4, topk: int = NSA_TOPK, flashmla: bool = False,
                 device="cpu", seed: int = 0) -> tuple[NSAMetadata, PrecomputedMetadata]:
    """Realistic metadata buffers (poisoned with random non-zero values) and one step's precomputed values.

    ``max_len`` is the longest sequence of the step; ``max_context_len`` the buffers' width (default 2·max_len).
    """
    mode = forward_mode_name(forward_mode)
    g = torch.Generator().manual_seed(seed)
    width = max_context_len or max(2 * max_len, 128)
    n_max = bs if mode == "decode" else bs * draft_tokens
    seqlens = _rand((bs,), "cpu", g, 1, max_len + 1)
    seqlens[int(torch.randint(0, bs, (1,), generator=g))] = max_len  # the step's longest sequence
    if mode == "decode":
        qo = torch.ones(bs, dtype=torch.int32)
        kv = seqlens
    elif mode == "target_verify":
        qo = torch.full((bs,), draft_tokens, dtype=torch.int32)
        kv = seqlens + draft_tokens
    else:
        qo = _rand((bs,), "cpu", g, 1, draft_tokens + 1)
        kv = torch.maximum(seqlens, qo)
    cols = int(kv.max()) if mode != "decode" else max_len
    rows_per_req = _rand((bs, cols), "cpu", g)
    page_indices = torch.repeat_interleave(rows_per_req, qo.long(), dim=0) if mode != "decode" else rows_per_req
    expanded = kv if mode == "decode" else torch.cat(
        [torch.arange(k - q + 1, k + 1, dtype=torch.int32) for q, k in zip(qo.tolist(), kv.tolist())])
    nsa = expanded.clamp(max=topk)
    real = None
    if page_size > 1:
        real = (page_indices[:, ::page_size] // page_size).contiguous()
    size = expanded.numel()
    flash = _rand((size + 1, 8), "cpu", g) if flashmla else None
    pre = PrecomputedMetadata(
        cache_seqlens=kv.to(device), cu_seqlens_k=_cu(kv).to(device), page_indices=page_indices.to(device),
        real_page_table=None if real is None else real.to(device), seqlens_expanded=expanded.to(device),
        nsa_cache_seqlens=nsa.to(device), nsa_cu_seqlens_k=_cu(nsa).to(device), seqlens_expanded_size=size,
        max_len=max_len if mode == "decode" else -1, max_seqlen_k=cols, flashmla_metadata=None if flash is None
        else flash.to(device))
    max_tokens = n_max + 7  # graph buffers are views of larger [max_num_tokens, ...] allocations
    md = NSAMetadata(
        cache_seqlens_int32=_rand((max_tokens,), device, g)[:bs],
        cu_seqlens_k=_rand((max_tokens + 1,), device, g)[:bs + 1],
        page_table_1=_rand((max_tokens, width), device, g)[:n_max],
        nsa_cache_seqlens_int32=_rand((max_tokens,), device, g)[:n_max],
        nsa_cu_seqlens_k=_rand((max_tokens + 1,), device, g)[:n_max + 1],
        nsa_seqlens_expanded=_rand((max_tokens,), device, g)[:n_max],
        real_page_table=_rand((max_tokens, math.ceil(width / page_size)), device, g)[:n_max] if page_size > 1
        else None,
        flashmla_metadata=_rand((max_tokens + 1, 8), device, g)[:n_max + 1] if flashmla else None)
    return md, pre


# -- the engine hook ------------------------------------------------------------------------------------------
REPLAY_METHOD = "init_forward_metadata_replay_cuda_graph_from_precomputed"
ENGINE_BACKENDS = ("sglang.srt.layers.attention.nsa_backend:NativeSparseAttnBackend",
                   "sglang.srt.layers.attention.dsa.dsa_backend:NativeSparseAttnBackend")


def install(backend_cls: type | None = None) -> bool:
    """Route ``backend_cls.init_forward_metadata_replay_cuda_graph_from_precomputed`` through
    ``batched_copy_metadata``. Without an argument, patches the serving engine's NSA backend if it is installed;
    returns False (with a warning saying why) when there is nothing to patch. Idempotent.

    Calls the patch does not understand (extra arguments, a FlashMLA metadata object that is not a tensor) go to
    the original method unchanged.
    """
    if backend_cls is None:
        backend_cls = _engine_backend()
        if backend_cls is None:
            warnings.warn("copytune.nsa.install: the serving engine's NSA backend is not installed; nothing patched",
                          RuntimeWarning, stacklevel=2)
            return False
    original = getattr(backend_cls, REPLAY_METHOD, None)
    if original is None:
        warnings.warn(f"copytune.nsa.install: {backend_cls.__name__} has no {REPLAY_METHOD}; nothing patched",
                      RuntimeWarning, stacklevel=2)
        return False
    if getattr(original, "__copytune__", False):
        return True

    def replay(self, bs, precomputed, forward_mode, *args, **kwargs):
        flash = getattr(precomputed, "flashmla_metadata", None)
        if args or kwargs or (flash is not None and not isinstance(flash, torch.Tensor)):
            return original(self, bs, precomputed, forward_mode, *args, **kwargs)
        if hasattr(self, "set_nsa_prefill_impl"):
            self.set_nsa_prefill_impl(forward_batch=None)
        metadata = self.decode_cuda_graph_metadata[bs]
        batched_copy_metadata(metadata, precomputed, forward_mode)
        self.forward_metadata = metadata

    replay.__copytune__ = True
    replay.__wrapped__ = original
    replay.__doc__ = original.__doc__
    setattr(backend_cls, REPLAY_METHOD, replay)
    return True


def uninstall(backend_cls: type) -> None:
    """Undo ``install`` on ``backend_cls``."""
    method = getattr(backend_cls, REPLAY_METHOD, None)
    if getattr(method, "__copytune__", False):
        setattr(backend_cls, REPLAY_METHOD, method.__wrapped__)


def _engine_backend() -> type | None:
    import importlib  # noqa: PLC0415

    for path in ENGINE_BACKENDS:
        module, _, name = path.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None
