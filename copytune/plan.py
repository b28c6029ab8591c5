"""Validated batches of ``dst.copy_(src)`` pairs, described as raw addresses and byte geometry.

Launchers read a plan's integers instead of building views or calling ``data_ptr()`` per launch: on an H100 a
slice view costs ~3.5 µs and a whole fused launch ~8 µs, so the description is made once and reused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

MAX_ALIGN = 16  # widest access any kernel issues (16-byte vectors)


@dataclass(frozen=True)
class CopyDesc:
    """One copy as ``rows`` rows of ``row_bytes`` contiguous bytes, rows ``*_row_stride`` bytes apart.

    ``rowwise`` is False when the layout cannot be written that way (after merging dimensions the copy still has
    more than two, or an inner dimension that is strided on one side); only the torch strategies take those.
    """

    src: int
    dst: int
    itemsize: int
    numel: int
    rows: int
    row_bytes: int
    src_row_stride: int
    dst_row_stride: int
    rowwise: bool
    align: int  # largest power of two <= MAX_ALIGN dividing every address, row length and row stride

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class CopyPlan:
    """A validated batch: the original pairs (for torch strategies) and one ``CopyDesc`` per pair."""

    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    descs: tuple[CopyDesc, ...]
    device: torch.device | None

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | CopyPlan) -> CopyPlan:
        """Validate ``pairs`` and describe each copy; raises ``ValueError`` naming the offending pair index.

        Rejected before any launch: non-tensor items, src/dst on different devices, pairs on different devices,
        shape or dtype mismatch, a destination with internal overlap, a source and destination of one pair that
        partially overlap, and any destination that overlaps another pair's destination or source.
        An empty list is a valid no-op batch.
        """
        if isinstance(pairs, CopyPlan):
            return pairs
        if isinstance(pairs, torch.Tensor) or not isinstance(pairs, Iterable):
            raise ValueError(f"expected a sequence of (src, dst) pairs, got {type(pairs).__name__}")
        checked, descs, extents = [], [], []
        device = None
        for i, pair in enumerate(pairs):
            src, dst = _check_pair(i, pair)
            if device is None:
                device = dst.device
            elif dst.device != device:
                raise ValueError(f"pair {i}: on {dst.device}, but pair 0 is on {device}; a batch runs on one device")
            checked.append((src, dst))
            descs.append(describe(src, dst))
            if dst.numel():
                extents.append((extent(src), extent(dst), i))
        _check_overlaps(checked, extents)
        return cls(tuple(checked), tuple(descs), device)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.descs)

    def first_non_rowwise(self) -> int | None:
        """Index of the first copy that kernels cannot express as rows of contiguous bytes, else None."""
        return next((i for i, d in enumerate(self.descs) if not d.rowwise), None)


def _check_pair(i: int, pair: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(pair, torch.Tensor):  # `batched_copy((src, dst))`: the rows of src would be read as a pair
        raise ValueError(f"pair {i} is a tensor, not a (src, dst) pair: pass a list of pairs, [(src, dst)]")
    try:
        src, dst = pair  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"pair {i}: expected a (src, dst) pair of tensors, got {type(pair).__name__}") from None
    for role, t in (("source", src), ("destination", dst)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"pair {i}: {role} is a {type(t).__name__}, not a torch.Tensor")
    if src.device != dst.device:
        raise ValueError(f"pair {i}: source on {src.device}, destination on {dst.device}")
    if src.shape != dst.shape:
        raise ValueError(f"pair {i}: shape mismatch, source {tuple(src.shape)} vs destination {tuple(dst.shape)}")
    if src.dtype != dst.dtype:
        raise ValueError(f"pair {i}: dtype mismatch, source {src.dtype} vs destination {dst.dtype}")
    if not dst.is_contiguous() and _has_internal_overlap(dst):
        raise ValueError(f"pair {i}: destination has overlapping elements (stride {tuple(dst.stride())})")
    return src, dst


def _coalesce(shape, sstride, dstride) -> list[tuple[int, int, int]]:
    """Merge adjacent dimensions that are contiguous with each other on both sides; drop size-1 dimensions."""
    dims: list[tuple[int, int, int]] = []
    for size, ss, ds in zip(shape, sstride, dstride):
        if size == 1:
            continue
        if dims:
            osize, oss, ods = dims[-1]
            if oss == size * ss and ods == size * ds:
                dims[-1] = (osize * size, ss, ds)
                continue
        dims.append((size, ss, ds))
    if len(dims) == 2 and (dims[1][1], dims[1][2]) != (1, 1) and (dims[0][1], dims[0][2]) == (1, 1):
        dims.reverse()  # a copy is elementwise, so dims may be reordered: put the contiguous one inside
    return dims


def describe(src: torch.Tensor, dst: torch.Tensor) -> CopyDesc:
    """Byte geometry of one validated pair."""
    isz = dst.element_size()
    numel = dst.numel()
    rows, row_bytes, srs, drs, rowwise = 0, 0, 0, 0, True
    if numel:
        dims = _coalesce(dst.shape, src.stride(), dst.stride())
        if not dims:
            rows, row_bytes = 1, isz
        elif len(dims) == 1:
            n, ss, ds = dims[0]
            if ss == 1 and ds == 1:
                rows, row_bytes = 1, n * isz
            else:
                rows, row_bytes, srs, drs = n, isz, ss * isz, ds * isz
        elif len(dims) == 2 and dims[1][1:] == (1, 1):
            rows, row_bytes, srs, drs = dims[0][0], dims[1][0] * isz, dims[0][1] * isz, dims[0][2] * isz
        else:
            rowwise = False
    sptr, dptr = src.data_ptr(), dst.data_ptr()
    align = pow2_align(sptr, dptr, row_bytes, srs, drs)
    return CopyDesc(sptr, dptr, isz, numel, rows, row_bytes, srs, drs, rowwise, align)


def pow2_align(*values: int) -> int:
    """The largest power of two <= MAX_ALIGN dividing every value."""
    align = MAX_ALIGN
    for v in values:
        while v % align:
            align //= 2
    return align


def _has_internal_overlap(t: torch.Tensor) -> bool:
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    reach = 0  # largest element offset reachable through the smaller-stride dimensions
    for st, sz in dims:
        if st <= reach:
            return True
        reach += (sz - 1) * st
    return False


def span_bytes(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to the end of its last (0 when empty)."""
    lo, hi = extent(t)
    return hi - lo if t.numel() else 0


def extent(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    span = sum((sz - 1) * st for sz, st in zip(t.shape, t.stride()))
    return lo, lo + (span + 1) * t.element_size()


def _check_overlaps(pairs, extents) -> None:
    """Sort the byte extents and sweep them into groups that meet (O(k log k)); exact byte sets only inside a
    group, which in a valid batch means interleaved slices of one buffer: one sweep over all of the group's
    element intervals, so k interleaved destinations cost O(n log n) in their elements, not k² tests."""
    spans = []
    for (se, de, i) in extents:
        s, d = pairs[i]
        same = _same_view(s, d)
        if extents_meet(se, de) and not same and bytes_meet(s, d):
            raise ValueError(f"pair {i}: source and destination partially overlap")
        spans.append((de[0], de[1], i, "destination"))
        if not same:  # an exact self-copy's source is its destination: checked as that
            spans.append((se[0], se[1], i, "source"))
    spans.sort()
    group: list[tuple] = []
    reach = -1
    for span in spans:
        if group and span[0] >= reach:
            _check_group(pairs, group)
            group = []
        reach = span[1] if not group else max(reach, span[1])
        group.append(span)
    _check_group(pairs, group)


def _check_group(pairs, group: list[tuple]) -> None:
    """Raise if any destination byte in ``group`` (spans whose extents meet) is also a byte of another span."""
    if len(group) < 2 or all(role == "source" for *_, role in group):
        return
    views = [pairs[i][role == "destination"] for _, _, i, role in group]
    intervals = [_byte_intervals(v) for v in views]
    iv = torch.cat(intervals)
    owner = torch.cat([torch.full((len(x),), n, dtype=torch.int64) for n, x in enumerate(intervals)])
    is_dst = torch.tensor([role == "destination" for *_, role in group])[owner]
    order = torch.argsort(iv[:, 0], stable=True)
    start, end, owner, is_dst = iv[order, 0], iv[order, 1], owner[order], is_dst[order]
    # each interval against the furthest-reaching earlier destination interval, then each destination interval
    # against the furthest-reaching earlier source interval: together every overlap that involves a destination
    for earlier_dst, check in ((True, torch.ones_like(is_dst)), (False, is_dst)):
        reach = torch.where(is_dst == earlier_dst, end, torch.full_like(end, -1))
        best, at = reach.cummax(0)
        best = torch.cat((torch.full((1,), -1, dtype=torch.int64), best[:-1]))
        at = torch.cat((torch.zeros(1, dtype=torch.int64), at[:-1]))
        hit = torch.nonzero(check & (start < best))
        if len(hit):
            k = int(hit[0])
            a, b = group[int(owner[at[k]])], group[int(owner[k])]
            (i1, r1), (j1, r2) = sorted([(a[2], a[3]), (b[2], b[3])])
            raise ValueError(f"pair {j1}: {r2} overlaps the {r1} of pair {i1}")


def extents_meet(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def _byte_intervals(t: torch.Tensor) -> torch.Tensor:
    """[n, 2] int64 tensor of the [start, end) byte ranges of ``t``'s elements (host-side, cold path only)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for sz, st in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(sz, dtype=torch.int64) * st
    starts = offsets.reshape(-1) * t.element_size() + t.data_ptr()
    return torch.stack((starts, starts + t.element_size()), dim=1)


def bytes_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact test whether any byte of ``a`` is a byte of ``b``: sweep both interval sets sorted by start."""
    ia, ib = _byte_intervals(a), _byte_intervals(b)
    iv = torch.cat((ia, ib))
    tag = torch.cat((torch.zeros(len(ia), dtype=torch.bool), torch.ones(len(ib), dtype=torch.bool)))
    order = torch.argsort(iv[:, 0], stable=True)
    start, end, tag = iv[order, 0], iv[order, 1], tag[order]
    for mine in (tag, ~tag):
        # furthest end reached so far by the *other* set, before each interval
        other_end = torch.where(mine, torch.full_like(end, -1), end).cummax(0).values
        before = torch.cat((torch.full((1,), -1, dtype=torch.int64), other_end[:-1]))
        if bool((mine & (start < before)).any()):
            return True
    return False


def as_view(base: torch.Tensor, like: torch.Tensor, offset: int) -> torch.Tensor:
    """The view of ``base`` with ``like``'s shape and strides starting ``offset`` bytes into it."""
    return torch.as_strided(base, like.shape, like.stride(), base.storage_offset() + offset // base.element_size())
