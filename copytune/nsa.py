"""The serving engine's sparse-attention metadata refresh (sglang's DSA backend, NSA before 0.5.16) as one launch.

Before every CUDA-graph replay the backend copies one step's precomputed values into its graph-static buffers:
``DSAMetadataManagementMixin._copy_base_replay_buffers(self, bs, metadata, precomputed, forward_mode)`` in sglang
0.5.16+ (its JIT kernel, else 6–9 ``.copy_()`` calls), the body of
``init_forward_metadata_replay_cuda_graph_from_precomputed`` in 0.5.10. Speculative decoding repeats it for every
draft backend (the engine fuses the first three, ``fused_metadata_copy_multi_cuda``, and loops over the rest).

This module is the engine-specific data — names, the copy list, the seams — over ``copytune.callsite``'s generic
bindings. It reads the engine's own objects (``DSAMetadata``/``NSAMetadata``, ``PrecomputedMetadata``,
``DSAFlashMLAMetadata``, ``ForwardMode``), telling the two naming schemes apart by attribute, never by version.
``install()`` takes over the copy seams only: every other step of the engine's replay (prefill-impl choice, the
DeepGEMM schedule refresh, top-k plans, KPool metadata) stays the engine's code. A call it does not understand
goes to the engine's original code unchanged, and is counted (``stats()``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import math
import operator
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from copytune.callsite import CallSite, Copy, Structure, Unsupported, distinct_copies
from copytune.dispatch import Dispatcher, default_dispatcher
from copytune.log import logger as log
from copytune.log import warn_once
from copytune.plan import CopyPlan

FORWARD_MODES = ("decode", "target_verify", "draft_extend", "draft_extend_v2")
TOPK = 2048  # DeepSeek-V3.2's index top-k: the dsa_* sequence lengths are clamped to it


# -- the engine's objects, mirrored for examples, tuning and benchmarks (the engine's own objects work as they are)
@dataclass(frozen=True, eq=False)
class FlashMLAMetadata:
    """``DSAFlashMLAMetadata``: FlashMLA's tile-scheduler metadata (copied whole) and ``num_splits`` (``[:size+1]``)."""

    flashmla_metadata: torch.Tensor
    num_splits: torch.Tensor


@dataclass(frozen=True, eq=False)
class DSAMetadata:
    """Graph-static buffers of one backend for one captured batch size: views of ``max_num_tokens`` buffers."""

    cache_seqlens_int32: torch.Tensor  # [bs]
    cu_seqlens_k: torch.Tensor  # [bs + 1], written at [1:]
    page_table_1: torch.Tensor  # [n, max_context_len], written at [:rows, :max_len]
    real_page_table: torch.Tensor  # [n, ceil(max_context_len / page_size)]; page_table_1 itself at page size 1
    dsa_cache_seqlens_int32: torch.Tensor  # [n]
    dsa_cu_seqlens_k: torch.Tensor  # [n + 1], written at [1:1 + size]
    dsa_seqlens_expanded: torch.Tensor  # [n] (target-verify, draft-extend)
    flashmla_metadata: FlashMLAMetadata | None = None


@dataclass(eq=False)
class PrecomputedMetadata:
    """One step's freshly computed values (the engine computes them once for all draft-step backends)."""

    cache_seqlens: torch.Tensor  # [bs]
    cu_seqlens_k: torch.Tensor  # [bs + 1]
    req_pool_indices: torch.Tensor  # [bs] int64 (never copied)
    page_indices: torch.Tensor  # [rows, cols]
    real_page_table: torch.Tensor | None  # [rows, ceil(cols / page_size)], None at page size 1
    seqlens_expanded: torch.Tensor  # [size]
    dsa_cache_seqlens: torch.Tensor  # [size]
    dsa_cu_seqlens_k: torch.Tensor  # [size + 1]
    seqlens_expanded_size: int
    max_len: int  # page-table columns in decode
    max_seqlen_k: int  # page-table columns in target-verify and draft-extend
    flashmla_metadata: FlashMLAMetadata | None = None


# -- the copy list --------------------------------------------------------------------------------------------
def forward_mode_name(forward_mode) -> str:
    """The copy list a forward mode selects, from one of FORWARD_MODES or the engine's ``ForwardMode``.

    As the engine's copy code branches: decode (and idle), target-verify, draft-extend where the enum has
    ``is_draft_extend()`` (0.5.10's ``DRAFT_EXTEND``); every other mode — ``DRAFT_EXTEND_V2`` in all releases —
    copies only the common part, which is what the engine does for it (its fused kernel refuses such a mode and
    its ``.copy_()`` fallback skips the mode-specific copies).
    """
    if isinstance(forward_mode, str):
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        return forward_mode
    if forward_mode.is_decode_or_idle():
        return "decode"
    if forward_mode.is_target_verify():
        return "target_verify"
    is_draft_extend = getattr(forward_mode, "is_draft_extend", None)
    return "draft_extend" if is_draft_extend is not None and is_draft_extend() else "draft_extend_v2"


def _prefix(obj) -> str:
    """``dsa`` (sglang 0.5.16+) or ``nsa`` (earlier): the engine renamed its fields with the backend."""
    return "dsa" if hasattr(obj, "dsa_cu_seqlens_k") else "nsa"


def _copy_list(md, get, mode: str, size: int, max_len: int, max_seqlen_k: int, rows: int) -> list[Copy]:
    """One backend's copies in the engine's order. ``get(name)``, ``name`` as 0.5.16+ spells it: (the source's
    base tensor or None, where the step's source object holds it)."""
    p = _prefix(md)
    if md.page_table_1 is None:  # 0.5.23's dsa_drop_wide_page_table: the engine's own copies would fail too
        raise Unsupported("page_table_1 is None")

    def copy(name, dst, view=None) -> Copy:
        base, path = get(name)
        return Copy(base if view is None else view(base), path, dst if view is None else view(dst))

    tail = operator.itemgetter(slice(1, None))
    width = md.page_table_1.shape[1]
    out = [copy("cache_seqlens", md.cache_seqlens_int32), copy("cu_seqlens_k", md.cu_seqlens_k, tail)]
    if mode == "decode":
        out += [Copy(*get("page_indices"), md.page_table_1[:, :max_len], width),
                copy("dsa_cache_seqlens", getattr(md, f"{p}_cache_seqlens_int32"))]
    elif mode == "target_verify":
        out += [Copy(*get("page_indices"), md.page_table_1[:, :max_seqlen_k], width),
                copy("seqlens_expanded", getattr(md, f"{p}_seqlens_expanded")),
                copy("dsa_cache_seqlens", getattr(md, f"{p}_cache_seqlens_int32"))]
    elif mode == "draft_extend":
        out += [Copy(*get("page_indices"), md.page_table_1[:rows, :max_seqlen_k], width),
                copy("seqlens_expanded", getattr(md, f"{p}_seqlens_expanded")[:size]),
                copy("dsa_cache_seqlens", getattr(md, f"{p}_cache_seqlens_int32")[:size])]
    out.append(copy("dsa_cu_seqlens_k", getattr(md, f"{p}_cu_seqlens_k"), operator.itemgetter(slice(1, 1 + size))))
    real, _ = get("real_page_table")
    if real is not None:
        r, c = real.shape
        out.append(Copy(*get("real_page_table"), md.real_page_table[:r, :c], md.real_page_table.shape[1]))
    splits, _ = get("flashmla_metadata.num_splits")
    if splits is not None:
        out += [copy("flashmla_metadata.num_splits", md.flashmla_metadata.num_splits[:size + 1]),
                copy("flashmla_metadata.flashmla_metadata", md.flashmla_metadata.flashmla_metadata)]
    return out


def _from_precomputed(metadatas: Sequence, pre, forward_mode) -> list[Copy]:
    """The copies from a ``PrecomputedMetadata`` (sources read as its attributes)."""
    p = _prefix(pre)

    def get(name):
        path = name.replace("dsa_", f"{p}_", 1)
        if name.startswith("flashmla_metadata.") and pre.flashmla_metadata is None:
            return None, path
        return operator.attrgetter(path)(pre), path

    mode = forward_mode_name(forward_mode)
    return [c for md in metadatas for c in _copy_list(md, get, mode, pre.seqlens_expanded_size, pre.max_len,
                                                      pre.max_seqlen_k, pre.page_indices.shape[0])]


# What the copy list depends on besides the buffers: (seqlens_expanded_size, real_page_table is None,
# flashmla_metadata is None). Shapes are not keyed: every launch checks each source's geometry against the bound one
# (in C++ for cuda_ext, in Python otherwise), and the sizes follow from them.
PRECOMPUTED_STRUCTURE = Structure(values=("seqlens_expanded_size",), present=("real_page_table", "flashmla_metadata"))


# The engine's multi-backend kernel takes 8 sources, 3 × 8 destinations, then bs, max_len, seqlens_expanded_size.
MULTI_SOURCES = ("cache_seqlens", "cu_seqlens_k", "page_indices", "dsa_cache_seqlens", "dsa_cu_seqlens_k",
                 "real_page_table", "flashmla_metadata.num_splits", "flashmla_metadata.flashmla_metadata")
MULTI_ARGS = 8 * 4 + 3


def _from_multi_args(metadatas: Sequence, args: tuple, forward_mode) -> list[Copy]:
    """The decode copies from the engine's multi-backend kernel's arguments (sources read by position)."""
    def get(name):
        i = MULTI_SOURCES.index(name)
        return args[i], i

    size, max_len = args[MULTI_ARGS - 1], args[MULTI_ARGS - 2]
    return [c for md in metadatas for c in _copy_list(md, get, "decode", size, max_len, -1, args[2].shape[0])]


def _multi_structure(args: tuple) -> tuple:
    return args[MULTI_ARGS - 1], args[5] is None, args[7] is None


# a multi-step replay in flight (see _Step): the seam's step then goes to _serve
_step: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("copytune_dsa_step", default=None)
_SITE = CallSite("metadata refresh", _from_precomputed, PRECOMPUTED_STRUCTURE, step_var=_step)
_MULTI_SITE = CallSite("multi-backend metadata refresh", _from_multi_args, _multi_structure)


def copy_pairs(metadata, precomputed, forward_mode="decode") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The exact (src, dst) views the engine's copy code copies for one backend, in its order."""
    return [(c.src, c.dst) for c in _from_precomputed((metadata,), precomputed, forward_mode)]


def reference_copy(metadata, precomputed, forward_mode="decode") -> None:
    """The engine's ``.copy_()`` sequence, one copy at a time (tests, benchmarks, torch fallbacks)."""
    _SITE.run_copies((metadata,), precomputed, forward_mode)


def batched_copy_metadata(metadata, precomputed, forward_mode="decode", *,
                          dispatcher: Dispatcher | None = None) -> None:
    """Refresh ``metadata`` from ``precomputed`` exactly as the engine's copy code does, in one tuned launch.

    ``metadata``/``precomputed``: the engine's own objects (either naming scheme) or this module's mirrors.
    The first call per structure validates and binds (and tunes, if the signature is new); later calls read the
    sources off ``precomputed`` and launch. Raises ValueError before launching on input the copies cannot take.
    """
    _SITE.refresh((metadata,), id(metadata), precomputed, forward_mode, dispatcher)


def batched_copy_metadata_multi(metadatas: Sequence, precomputed, forward_mode="decode", *,
                                dispatcher: Dispatcher | None = None) -> None:
    """Refresh several backends' buffers (one per draft step) from one precomputed set in one launch, each
    source read once for all of them; the engine's own fused kernel takes three backends and loops over the rest.
    """
    # bound, outside an engine's multi-step replay: one C call (cuda_ext); inside one (_serve) the step declines
    if dispatcher is None and _SITE.step(metadatas, precomputed, forward_mode):
        return
    _SITE.refresh(metadatas, tuple(map(id, metadatas)), precomputed, forward_mode, dispatcher)


# -- examples -------------------------------------------------------------------------------------------------
def _rand(shape, device, generator, low=1, high=1 << 30) -> torch.Tensor:
    return torch.randint(low, high, shape, dtype=torch.int32, device="cpu", generator=generator).to(device)


def _cu(seqlens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))


FLASHMLA_SCHEDULER_SHAPE = (132, 8)  # FlashMLA's tile-scheduler metadata: [num_sm_parts, 8] int32


def make_example(bs: int, max_len: int, max_context_len: int | None = None, *, page_size: int = 64,
                 forward_mode="decode", draft_tokens: int = 4, topk: int = TOPK, flashmla: bool = False,
                 device="cpu", seed: int = 0) -> tuple[DSAMetadata, PrecomputedMetadata]:
    """Realistic metadata buffers (poisoned with random non-zero values) and one step's precomputed values.

    ``max_len`` is the longest sequence of the step; ``max_context_len`` the buffers' width (default 2·max_len).
    """
    mode = forward_mode_name(forward_mode)
    pre = example_precomputed(bs, max_len, page_size=page_size, forward_mode=mode, draft_tokens=draft_tokens,
                              topk=topk, flashmla=flashmla, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    width = max_context_len or max(2 * max_len, 128)
    n_max = bs if mode == "decode" else bs * draft_tokens
    max_tokens = n_max + 7  # graph buffers are views of larger [max_num_tokens, ...] allocations
    page_table_1 = _rand((max_tokens, width), device, g)[:n_max]
    md = DSAMetadata(
        cache_seqlens_int32=_rand((max_tokens,), device, g)[:bs],
        cu_seqlens_k=_rand((max_tokens + 1,), device, g)[:bs + 1],
        page_table_1=page_table_1,
        real_page_table=_rand((max_tokens, math.ceil(width / page_size)), device, g)[:n_max] if page_size > 1
        else page_table_1,
        dsa_cache_seqlens_int32=_rand((max_tokens,), device, g)[:n_max],
        dsa_cu_seqlens_k=_rand((max_tokens + 1,), device, g)[:n_max + 1],
        dsa_seqlens_expanded=_rand((max_tokens,), device, g)[:n_max],
        flashmla_metadata=FlashMLAMetadata(_rand(FLASHMLA_SCHEDULER_SHAPE, device, g),
                                           _rand((max_tokens + 1,), device, g)[:n_max + 1]) if flashmla else None)
    return md, pre


def example_precomputed(bs: int, max_len: int, *, page_size: int = 64, forward_mode="decode", draft_tokens: int = 4,
                        topk: int = TOPK, flashmla: bool = False, device="cpu", seed: int = 0) -> PrecomputedMetadata:
    """One step's precomputed values as the engine computes them: fresh tensors, ``[bs, max_len]`` page indices
    (``[bs·draft_tokens, max_seqlen_k]`` in target-verify and draft-extend), random values."""
    mode = forward_mode_name(forward_mode)
    g = torch.Generator().manual_seed(seed)
    seqlens = _rand((bs,), "cpu", g, 1, max_len + 1)
    seqlens[int(torch.randint(0, bs, (1,), generator=g))] = max_len  # the step's longest sequence
    if mode == "decode":
        qo, kv = torch.ones(bs, dtype=torch.int32), seqlens
    elif mode == "target_verify":
        qo, kv = torch.full((bs,), draft_tokens, dtype=torch.int32), seqlens + draft_tokens
    else:
        qo = _rand((bs,), "cpu", g, 1, draft_tokens + 1)
        kv = torch.maximum(seqlens, qo)
    cols = int(kv.max()) if mode != "decode" else max_len
    rows_per_req = _rand((bs, cols), "cpu", g)
    page_indices = torch.repeat_interleave(rows_per_req, qo.long(), dim=0) if mode != "decode" else rows_per_req
    expanded = kv if mode == "decode" else torch.cat(
        [torch.arange(k - q + 1, k + 1, dtype=torch.int32) for q, k in zip(qo.tolist(), kv.tolist())])
    clamped = expanded.clamp(max=topk)
    real = (page_indices[:, ::page_size] // page_size).contiguous() if page_size > 1 else None
    size = expanded.numel()
    flash = FlashMLAMetadata(_rand(FLASHMLA_SCHEDULER_SHAPE, device, g), _rand((size + 1,), device, g)) \
        if flashmla else None
    return PrecomputedMetadata(
        cache_seqlens=kv.to(device), cu_seqlens_k=_cu(kv).to(device),
        req_pool_indices=torch.arange(bs, dtype=torch.int64, device=device), page_indices=page_indices.to(device),
        real_page_table=None if real is None else real.to(device), seqlens_expanded=expanded.to(device),
        dsa_cache_seqlens=clamped.to(device), dsa_cu_seqlens_k=_cu(clamped).to(device), seqlens_expanded_size=size,
        max_len=max_len if mode == "decode" else -1, max_seqlen_k=cols, flashmla_metadata=flash)


# -- the engine seams -----------------------------------------------------------------------------------------
@dataclass
class Stats:
    """Per-process counters: refreshes copytune served (``batched``: covered by an earlier launch of the same
    multi-backend step), and refreshes handed to the engine's own code, by reason."""

    served_in_python: int = 0
    batched: int = 0
    handed: Counter = field(default_factory=Counter)

    @property
    def served(self) -> int:
        """Refreshes served: by the Python paths, and by the seams' C methods installed now (an uninstalled one's
        count is folded into ``served_in_python``)."""
        return self.served_in_python + sum(m.served for m in _SEAM_METHODS)

    def line(self) -> str:
        handed = ", ".join(f"{n} {why}" for why, n in self.handed.most_common()) or "none"
        return f"copytune: {self.served} refreshes served, {self.batched} batched, handed to the engine: {handed}"


_SEAM_METHODS: list = []  # the C seam methods installed now (SeamTable.seam_method): their counts are served
_PATCH_LOCK = threading.RLock()  # a seam's switch to its C method against uninstall on another thread
STATS = Stats()


def stats() -> Stats:
    """This process's counters (``stats().line()`` is one log line)."""
    return STATS


class _Step:
    """One multi-step replay in flight: its backends, and which metadata one launch already refreshed."""

    __slots__ = ("backends", "done", "source")

    def __init__(self, backends):
        self.backends, self.done, self.source = backends, (), None

    def metadatas(self, bs: int) -> list | None:
        try:
            return [b.decode_cuda_graph_metadata[bs] for b in self.backends]
        except (AttributeError, KeyError, TypeError):
            return None

    def mark(self, source_tensor, metadatas) -> None:
        self.source, self.done = source_tensor, tuple(map(id, metadatas))


def _hand(reason: str, exc: BaseException | None = None) -> None:
    if not STATS.handed[reason]:
        log.warning("copytune: handing %s to the engine's own copies (%s)", "refreshes" if exc is None else
                    f"a refresh ({type(exc).__name__}: {exc})", reason)
    STATS.handed[reason] += 1


def _serve(metadata, bs, precomputed, forward_mode) -> bool:
    """The seam's work: refresh ``metadata`` (with every draft backend of a multi-step replay in flight, in one
    launch); False when it must go to the engine instead (nothing of it was launched)."""
    step = _step.get()
    if step is not None and step.source is precomputed.cache_seqlens and id(metadata) in step.done:
        STATS.batched += 1
        return True
    try:
        targets = step.metadatas(bs) if step is not None else None
        if targets is not None and any(t is metadata for t in targets) and len(targets) > 1:
            batched_copy_metadata_multi(targets, precomputed, forward_mode)
            step.mark(precomputed.cache_seqlens, targets)
        else:
            batched_copy_metadata(metadata, precomputed, forward_mode)
    except Exception as exc:  # noqa: BLE001 - the engine's own code takes what copytune cannot
        _hand(str(exc).split("\n")[0] if isinstance(exc, Unsupported) else type(exc).__name__, exc)
        return False
    if not STATS.served:
        log.info("copytune: first metadata refresh served (%s, %s)", type(metadata).__name__,
                 forward_mode_name(forward_mode))
    STATS.served_in_python += 1
    return True


SEAM_PARAMETERS = ("self", "bs", "metadata", "precomputed", "forward_mode")


def _patch_seam(cls, original):
    """0.5.16+: ``_copy_base_replay_buffers`` is the copies alone. The common call — no multi-step replay in
    flight, structure bound before — is one lookup and one C++ call; anything else takes ``_serve``. Once the seam
    table exists (cuda_ext), the method itself becomes the table's C method (no Python frame on a served step),
    falling back to this Python method."""
    if tuple(inspect.signature(original).parameters) != SEAM_PARAMETERS:
        raise Unsupported(f"{cls.__name__}.{SEAM_METHOD}{inspect.signature(original)} is not the known seam")
    site = _SITE

    def _copy_base_replay_buffers(self, bs, metadata, precomputed, forward_mode):
        if site.step(metadata, precomputed, forward_mode):  # one C call where the winner is cuda_ext
            STATS.served_in_python += 1
            return None
        if not _serve(metadata, bs, precomputed, forward_mode):
            return original(self, bs, metadata, precomputed, forward_mode)
        return None

    def in_c(table) -> None:
        make = getattr(table, "seam_method", None)  # cuda_ext's table has one; it falls back to this method
        method = None if make is None else make(_copy_base_replay_buffers, original)
        if method is None:
            return
        with _PATCH_LOCK:  # only over this very patch: not after an uninstall, nor over a later install's
            if cls.__dict__.get(SEAM_METHOD) is _copy_base_replay_buffers:
                _SEAM_METHODS.append(method)
                setattr(cls, SEAM_METHOD, method)

    _copy_base_replay_buffers.copytune_in_c = in_c  # install() registers it once this method is in place
    return _copy_base_replay_buffers


def _patch_replay(cls, original):
    """0.5.10: the replay method is the prefill-impl reset, the copies and ``forward_metadata``; the copies are
    replaced in place, the rest kept in the engine's order."""
    def init_forward_metadata_replay_cuda_graph_from_precomputed(self, bs, precomputed, forward_mode, *args,
                                                                 **kwargs):
        reset = getattr(self, "set_nsa_prefill_impl", None)
        if args or kwargs or reset is None:
            _hand("unknown replay signature")
            return original(self, bs, precomputed, forward_mode, *args, **kwargs)
        reset(forward_batch=None)
        metadata = self.decode_cuda_graph_metadata[bs]
        if not _serve(metadata, bs, precomputed, forward_mode):
            return original(self, bs, precomputed, forward_mode)
        self.forward_metadata = metadata
        return None
    return init_forward_metadata_replay_cuda_graph_from_precomputed


def _patch_multistep(cls, original):
    """Brackets the multi-step replay: the first copy seam reached inside it refreshes every draft backend."""
    def bracket(self, *args, **kwargs):
        if _step.get() is not None:
            return original(self, *args, **kwargs)
        token = _step.set(_Step(getattr(self, "attn_backends", ())))
        try:
            return original(self, *args, **kwargs)
        finally:
            _step.reset(token)
    return bracket


def _patch_multi_kernel(_module, original):
    """The engine's 3-backend kernel: inside a multi-step replay, every draft backend in one launch."""
    def fused_metadata_copy_multi_cuda(*args, **kwargs):
        step = _step.get()
        targets = step.metadatas(args[MULTI_ARGS - 3]) if step is not None and len(args) == MULTI_ARGS and \
            not kwargs else None
        if targets is None or len(targets) < 3 or args[8] is not targets[0].cache_seqlens_int32 or \
                args[16] is not targets[1].cache_seqlens_int32 or args[24] is not targets[2].cache_seqlens_int32:
            _hand("multi-backend kernel called outside a multi-step replay")
            return original(*args, **kwargs)
        try:
            _MULTI_SITE.refresh(targets, tuple(map(id, targets)), args, "decode")
        except Exception as exc:  # noqa: BLE001
            _hand(str(exc).split("\n")[0] if isinstance(exc, Unsupported) else type(exc).__name__, exc)
            return original(*args, **kwargs)
        step.mark(args[0], targets)
        STATS.served_in_python += 1
        return None
    return fused_metadata_copy_multi_cuda


def prepare(backend, bs: int, forward_mode, *, max_lens: Sequence[int] | None = None,
            dispatcher: Dispatcher | None = None) -> int:
    """Tune the refresh of ``backend``'s graph buffers for batch size ``bs`` now, so that no serving step meets it
    untuned: what the integration does while the engine captures its CUDA graphs. For each of ``max_lens`` (page-table
    columns; default ``startup_max_lens()``, capped to the buffers' width) the copy list is built against the
    backend's real buffers from a step's worth of example sources, and its key resolved (cache, else tuned here).
    Keys of other widths and alignments are then served by their nearest tuned neighbour while they tune off the
    step. Returns how many keys were tuned (not found in memory or the cache)."""
    metadata = backend.decode_cuda_graph_metadata[bs]
    mode = forward_mode_name(forward_mode)
    if mode == "draft_extend" or metadata.page_table_1 is None:
        return 0  # 0.5.10's draft-extend copies a size that changes every step; nothing fixed to tune
    d = dispatcher or default_dispatcher("eager")
    page_size = getattr(backend, "physical_page_size", None) or getattr(backend, "real_page_size", 1)
    draft = getattr(backend, "speculative_num_draft_tokens", None) or 1
    width = metadata.page_table_1.shape[1]
    tuned = 0
    for max_len in max_lens or startup_max_lens():
        cols = max(1, min(max_len, width - (draft if mode != "decode" else 0)))
        pre = example_precomputed(bs, cols, page_size=page_size, forward_mode=mode, draft_tokens=draft,
                                  flashmla=metadata.flashmla_metadata is not None,
                                  device=metadata.cache_seqlens_int32.device)
        copies = distinct_copies(_from_precomputed((metadata,), pre, mode))
        tuned += d.prepare(CopyPlan.from_pairs([(c.src, c.dst) for c in copies])).origin == "tuned"
    return tuned


STARTUP_MAX_LENS_ENV = "COPYTUNE_STARTUP_MAX_LENS"
STARTUP_MAX_LENS = (4096,)  # one width per captured batch size: other widths start from this one's winner


def startup_max_lens() -> tuple[int, ...]:
    """``$COPYTUNE_STARTUP_MAX_LENS`` ("1024,8192"; "0" or "none" turns start-up tuning off), else STARTUP_MAX_LENS."""
    raw = os.environ.get(STARTUP_MAX_LENS_ENV, "").strip().lower()
    if not raw:
        return STARTUP_MAX_LENS
    if raw in ("0", "none", "off"):
        return ()
    try:
        return tuple(int(x) for x in raw.split(",") if int(x) > 0)
    except ValueError:
        warn_once(f"startup-env:{raw}", "copytune: %s=%r is not a list of integers; using %s", STARTUP_MAX_LENS_ENV,
                  raw, STARTUP_MAX_LENS)
        return STARTUP_MAX_LENS


def _patch_capture(cls, original):
    """The engine builds a batch size's graph buffers while it captures its CUDA graphs (0.5.23
    ``_build_forward_metadata_cuda_graph``, 0.5.10 ``init_forward_metadata_capture_cuda_graph``): right after,
    the refresh of those buffers is tuned (``prepare``), off any capture, on a stream of its own. A failure is
    logged once and never reaches the engine's start-up."""
    signature = inspect.signature(original)
    if not {"bs", "forward_mode"} <= set(signature.parameters):
        raise Unsupported(f"{cls.__name__}.{original.__name__}{signature} takes no bs and forward_mode")

    def capture(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not startup_max_lens():
            return out
        try:
            call = signature.bind(self, *args, **kwargs).arguments
            device = self.decode_cuda_graph_metadata[call["bs"]].cache_seqlens_int32.device
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return out  # never inside a capture: the first step's key tunes off the step instead
            t0 = time.perf_counter()
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                tuned = prepare(self, call["bs"], call["forward_mode"])
            if stream is not None:
                stream.synchronize()
            seconds = time.perf_counter() - t0
            log.info("copytune: start-up tuning, bs %d %s: %d key(s) tuned in %.2f s", call["bs"],
                     forward_mode_name(call["forward_mode"]), tuned, seconds)
        except Exception as exc:  # noqa: BLE001 - the engine's start-up must go on
            warn_once(f"startup:{type(exc).__name__}", "copytune: start-up tuning skipped (%s: %s); keys tune off "
                      "the serving steps instead", type(exc).__name__, exc)
        return out
    return capture


REPLAY_METHOD = "init_forward_metadata_replay_cuda_graph_from_precomputed"
CAPTURE_METHODS = ("_build_forward_metadata_cuda_graph", "init_forward_metadata_capture_cuda_graph")
SEAM_METHOD = "_copy_base_replay_buffers"
MULTISTEP_METHODS = ("init_forward_metadata_out_graph", "init_forward_metadata_replay_cuda_graph")
# (module, backend class, multi-step class, module of the multi-backend kernel): newest layout first
ENGINE_LAYOUTS = (
    ("sglang.srt.layers.attention.dsa_backend", "DeepseekSparseAttnBackend", "DeepseekSparseAttnMultiStepBackend",
     "sglang.kernels.ops.attention.dsa.fused_metadata_copy"),
    ("sglang.srt.layers.attention.nsa_backend", "NativeSparseAttnBackend", "NativeSparseAttnMultiStepBackend",
     "sglang.jit_kernel.fused_metadata_copy"),
)
MULTI_KERNEL = "fused_metadata_copy_multi_cuda"
_installed: dict[tuple[object, str], object] = {}  # (owner, name) -> the original


def _set(owner, name: str, make) -> None:
    original = getattr(owner, name)
    if getattr(original, "__copytune__", False):
        return
    try:
        patched = make(owner, original)
    except Unsupported as exc:  # a seam of another shape than this module knows: the engine keeps its own
        log.warning("copytune.nsa.install: %s; not patched", exc)
        return
    patched.__copytune__, patched.__wrapped__ = True, original
    patched.__doc__ = original.__doc__
    setattr(owner, name, patched)
    _installed[(owner, name)] = original


def install(backend_cls: type | None = None, multistep_cls: type | None = None, kernel_module=None) -> bool:
    """Route the engine's metadata copies through copytune; True if anything is patched. Idempotent.

    Without arguments: the installed engine's backend (DSA, else NSA), its multi-step backend and its
    multi-backend kernel's module. With arguments: those (a backend class with ``_copy_base_replay_buffers``, or
    with the older all-copies replay method; a multi-step class; the module holding
    ``fused_metadata_copy_multi_cuda``). Logs one line naming what it patched.
    """
    kernel = kernel_module
    if backend_cls is None and multistep_cls is None and kernel_module is None:
        found = _engine_classes()
        if found is None:
            log.warning("copytune.nsa.install: sglang's DSA/NSA backend is not importable; nothing patched")
            return False
        backend_cls, multistep_cls, kernel = found
    if backend_cls is not None:
        capture = next((name for name in CAPTURE_METHODS if hasattr(backend_cls, name)), None)
        if capture is not None:
            _set(backend_cls, capture, _patch_capture)
        if hasattr(backend_cls, SEAM_METHOD):
            _set(backend_cls, SEAM_METHOD, _patch_seam)
            in_c = getattr(backend_cls.__dict__.get(SEAM_METHOD), "copytune_in_c", None)
            if in_c is not None:  # now or once the seam table exists: the method in C
                _SITE.when_table((backend_cls, SEAM_METHOD), in_c)
        elif hasattr(backend_cls, REPLAY_METHOD):
            _set(backend_cls, REPLAY_METHOD, _patch_replay)
        else:
            log.warning("copytune.nsa.install: %s has neither %s nor %s; not patched", backend_cls.__name__,
                        SEAM_METHOD, REPLAY_METHOD)
    if multistep_cls is not None:
        for name in MULTISTEP_METHODS:  # every one present: the precompute may sit in either (nesting is a no-op)
            if hasattr(multistep_cls, name):
                _set(multistep_cls, name, _patch_multistep)
    if kernel is not None and hasattr(kernel, MULTI_KERNEL):
        _set(kernel, MULTI_KERNEL, _patch_multi_kernel)
    if _installed:
        store = default_dispatcher("eager").store
        log.info("copytune: serving %s's metadata copies (tuning %s); patched %s; cache %s (%d keys)",
                 _engine_version(), default_dispatcher("eager").tuning, ", ".join(installed()), store.path,
                 len(store.rows()))
    return bool(_installed)


def _engine_version() -> str:
    """'sglang 0.5.23' as installed, else as its loaded package says; 'sglang' when neither tells."""
    from importlib import metadata  # noqa: PLC0415

    try:
        return f"sglang {metadata.version('sglang')}"
    except metadata.PackageNotFoundError:
        version = getattr(sys.modules.get("sglang"), "__version__", None)
        return f"sglang {version}" if version else "sglang"


def installed() -> list[str]:
    """What ``install`` patched, as ``module.Class.method`` (or ``module.function``) names."""
    return [f"{o.__module__}.{o.__qualname__}.{n}" if isinstance(o, type) else f"{o.__name__}.{n}"
            for o, n in _installed]


def uninstall(owner_to_undo=None) -> None:
    """Undo ``install`` (on one class or module only, if given). A seam's C method goes too; its count stays."""
    with _PATCH_LOCK:
        for (owner, name), original in list(_installed.items()):
            if owner_to_undo is None or owner is owner_to_undo:
                current = owner.__dict__.get(name) if isinstance(owner, type) else None
                for k, method in enumerate(_SEAM_METHODS):
                    if method is current:
                        STATS.served_in_python += method.served
                        del _SEAM_METHODS[k]
                        break
                setattr(owner, name, original)
                del _installed[(owner, name)]
                _SITE.forget_table_listener((owner, name))


def _engine_classes():
    for module, backend, multistep, kernel in ENGINE_LAYOUTS:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        try:
            kernel_module = importlib.import_module(kernel)
        except Exception:  # noqa: BLE001 - no JIT toolchain: the engine falls back to its loop, our seam serves it
            kernel_module = None
        return getattr(mod, backend, None), getattr(mod, multistep, None), kernel_module
    return None
