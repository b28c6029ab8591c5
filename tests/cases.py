"""Random copy batches with poisoned destinations and guard bands, and the bit-exact check against ``copy_``."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from copytune.tuner import random_fill  # noqa: F401 - re-exported for the tests

DTYPES = [torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.uint8, torch.bool]
LAYOUTS = ["contiguous", "slice", "strided", "rows_dst", "rows_src", "rows_both", "empty", "single"]


def _view(buf_shape, layout: str, side: str, size: int, rows: int, dtype, device, rng: random.Random):
    """A buffer (poisoned) and a view of it of the requested logical shape for one side of a copy."""
    if layout in ("rows_dst", "rows_src", "rows_both") and (layout == "rows_both" or layout.endswith(side)):
        cols = max(size // rows, 1)
        extra, r0 = rng.randint(1, 9), rng.randint(0, 2)
        buf = random_fill(torch.empty(rows + r0, cols + extra, dtype=dtype, device=device))
        c0 = rng.randint(0, extra)
        return buf, buf[r0:r0 + rows, c0:c0 + cols]
    if layout.startswith("rows"):
        cols = max(size // rows, 1)
        buf = random_fill(torch.empty(rows, cols, dtype=dtype, device=device))
        return buf, buf
    if layout == "slice":
        lo = rng.randint(1, 5)
        buf = random_fill(torch.empty(size + lo + rng.randint(0, 5), dtype=dtype, device=device))
        return buf, buf[lo:lo + size]
    if layout == "strided":
        step = rng.randint(2, 4)
        buf = random_fill(torch.empty(size * step + 1, dtype=dtype, device=device))
        return buf, buf[1::step][:size]
    n = {"empty": 0, "single": 1}.get(layout, size)
    buf = random_fill(torch.empty(n + 3, dtype=dtype, device=device))
    return buf, buf[:n]


@dataclass
class Case:
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    dst_bufs: list[torch.Tensor]

    def expected(self) -> list[torch.Tensor]:
        """Each destination buffer as ``dst.copy_(src)`` leaves it (computed on clones)."""
        out = []
        for (src, dst), buf in zip(self.pairs, self.dst_bufs):
            ref = buf.clone()
            offset = dst.storage_offset() - buf.storage_offset()
            ref.as_strided(dst.shape, dst.stride(), ref.storage_offset() + offset).copy_(src)
            out.append(ref)
        return out

    def check(self, expected: list[torch.Tensor]) -> None:
        for i, (buf, ref) in enumerate(zip(self.dst_bufs, expected)):
            got, want = buf.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)
            assert torch.equal(got, want), f"pair {i}: {int((got != want).sum())} bytes differ"


def random_case(seed: int, device, max_copies: int = 20, max_elems: int = 100_000, layouts=LAYOUTS) -> Case:
    rng = random.Random(seed)
    pairs, bufs = [], []
    for _ in range(rng.randint(1, max_copies)):
        dtype, layout = rng.choice(DTYPES), rng.choice(layouts)
        size = int(rng.choice([rng.randint(1, 300), rng.randint(1, 4000), rng.randint(1, max_elems)]))
        rows = rng.randint(1, 48)
        _, src = _view(None, layout, "src", size, rows, dtype, device, rng)
        dbuf, dst = _view(None, layout, "dst", size, rows, dtype, device, rng)
        if src.shape != dst.shape:  # row layouts round cols; make both sides the same logical shape
            src = random_fill(torch.empty(dst.shape, dtype=dtype, device=device))
        pairs.append((src, dst))
        bufs.append(dbuf)
    return Case(pairs, bufs)


def check_strategy(strategy, case: Case) -> None:
    """Run ``strategy`` on ``case`` and compare every destination buffer byte for byte with ``copy_``."""
    skip_if_declined(strategy, case)
    expected = case.expected()
    strategy.copy(case.pairs)
    if case.pairs and case.pairs[0][0].is_cuda:
        torch.cuda.synchronize()
    case.check(expected)


def skip_if_declined(strategy, case: Case) -> None:
    """Strategies may decline batches they cannot copy exactly (torch_foreach and 16-bit floats)."""
    import pytest

    from copytune import CopyPlan

    if not strategy.supports(CopyPlan.from_pairs(case.pairs)):
        pytest.skip(f"{strategy.name} declines this batch")


def check_bound_sources(strategy, case: Case, seed: int) -> None:
    """Bind once, then relaunch on fresh sources of the same geometry: each run must match ``copy_``. Then the
    launch contract every strategy shares: ``launch()`` copies the sources given at bind, never the last call's."""
    skip_if_declined(strategy, case)
    bound = list(case.pairs)
    launch = strategy.bind(__import__("copytune").CopyPlan.from_pairs(bound))
    for _ in range(2):
        fresh = [random_fill(torch.empty_strided(s.shape, s.stride(), dtype=s.dtype, device=s.device))
                 for s, _ in bound]
        case.pairs = [(f, d) for f, (_, d) in zip(fresh, bound)]
        expected = case.expected()
        launch(fresh)
        _sync(fresh)
        case.check(expected)
    for buf in case.dst_bufs:
        random_fill(buf)
    case.pairs = bound
    expected = case.expected()
    launch()
    _sync([s for s, _ in bound])
    case.check(expected)


def _sync(tensors) -> None:
    if tensors and tensors[0].is_cuda:
        torch.cuda.synchronize()
