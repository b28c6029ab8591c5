"""Checks every Triton strategy must pass; each strategy's test module runs them under its own name."""

import pytest
import torch

from copytune import CopyPlan, get_strategy
from copytune.kernels import UnsupportedPlan
from tests.cases import DTYPES, LAYOUTS, Case, check_bound_sources, check_strategy, random_case, random_fill

ROWWISE = LAYOUTS  # every generated layout reduces to rows of contiguous bytes


def run_random(name, seed, device):
    check_strategy(get_strategy(name), random_case(seed, device, layouts=ROWWISE))


def run_dtype_layout(name, dtype, layout, device):
    import random

    rng = random.Random(hash((str(dtype), layout)) & 0xFFFF)
    case = random_case(rng.randint(0, 10**6), device, max_copies=3, max_elems=5000, layouts=[layout])
    for i, (s, d) in enumerate(case.pairs):  # force the dtype under test on every pair
        if s.dtype != dtype:
            buf = random_fill(torch.empty(case.dst_bufs[i].shape, dtype=dtype, device=device))
            view = buf.as_strided(d.shape, d.stride(), buf.storage_offset() + d.storage_offset()
                                  - case.dst_bufs[i].storage_offset())
            case.pairs[i] = (random_fill(torch.empty(s.shape, dtype=dtype, device=device)), view)
            case.dst_bufs[i] = buf
    check_strategy(get_strategy(name), case)


def run_many_copies_chunked(name, device):
    """More copies than one launch's slots: chunked launches, every copy exact."""
    case = random_case(7, device, max_copies=1, max_elems=50)
    extra = random_case(8, device, max_copies=1, max_elems=50)
    for seed in range(9, 40):
        more = random_case(seed, device, max_copies=1, max_elems=300)
        case.pairs += more.pairs
        case.dst_bufs += more.dst_bufs
    case.pairs += extra.pairs
    case.dst_bufs += extra.dst_bufs
    assert len(case.pairs) > 17
    check_strategy(get_strategy(name), case)


def run_page_table_slice(name, device):
    """The NSA shape: page_table[:, :max_len] written into a wider graph-static buffer, cu_seqlens[1:] too."""
    bs, max_len, max_pages = 5, 37, 64
    buf = random_fill(torch.empty(bs, max_pages, dtype=torch.int32, device=device))
    cu = random_fill(torch.empty(bs + 1, dtype=torch.int32, device=device))
    src_pt = random_fill(torch.empty(bs, max_len, dtype=torch.int32, device=device))
    src_cu = random_fill(torch.empty(bs, dtype=torch.int32, device=device))
    check_strategy(get_strategy(name), Case([(src_pt, buf[:, :max_len]), (src_cu, cu[1:])], [buf, cu]))


def run_interleaved_destinations(name, device):
    """Column slices of one buffer: extents overlap, bytes do not; both copies must land."""
    buf = random_fill(torch.empty(6, 10, dtype=torch.int16, device=device))
    a, b = (random_fill(torch.empty(6, 4, dtype=torch.int16, device=device)) for _ in range(2))
    case = Case([(a, buf[:, :4]), (b, buf[:, 4:8])], [buf, buf])
    expected = case.expected()
    ref = expected[0].clone()
    ref[:, 4:8] = b
    get_strategy(name).copy(case.pairs)
    if buf.is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(buf.view(torch.uint8), ref.view(torch.uint8))


def run_unsupported_layout(name, device):
    """A transposing copy has no contiguous inner dim on both sides: declined, and copy() says why."""
    src = torch.randn(4, 6, device=device)
    dst = torch.empty(6, 4, device=device).t()
    plan = CopyPlan.from_pairs([(src, dst)])
    strategy = get_strategy(name)
    assert not strategy.supports(plan)
    with pytest.raises(UnsupportedPlan, match="pair 0"):
        strategy.copy(plan)


def run_candidates_exact(name, device):
    """Every tunable parameter set the tuner may pick copies exactly."""
    strategy = get_strategy(name)
    case = random_case(99, device, max_copies=9, max_elems=20_000, layouts=ROWWISE)
    plan = CopyPlan.from_pairs(case.pairs)
    for params in strategy.candidates(plan):
        for _, buf in zip(case.pairs, case.dst_bufs):
            random_fill(buf)
        expected = case.expected()
        strategy.copy(plan, params)
        if buf.is_cuda:
            torch.cuda.synchronize()
        case.check(expected)


def run_misaligned_new_source(name, device):
    """Bound on 16-byte-aligned int32s (copied in 8-byte units), rerun on a source only 4-byte aligned: the bound
    launch must notice and describe the batch anew instead of issuing misaligned 8-byte loads."""
    src = random_fill(torch.empty(256, dtype=torch.int32, device=device))
    dst = random_fill(torch.empty(256, dtype=torch.int32, device=device))
    plan = CopyPlan.from_pairs([(src, dst)])
    assert plan.descs[0].align >= 8
    launch = get_strategy(name).bind(plan)
    fresh = random_fill(torch.empty(257, dtype=torch.int32, device=device))[1:]
    assert fresh.data_ptr() % 8 == 4
    launch([fresh])
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst, fresh)


def run_all_dtypes(name, device):
    for dtype in DTYPES + [torch.float64, torch.int8, torch.int16]:
        src = random_fill(torch.empty(1001, dtype=dtype, device=device))[1:]
        buf = random_fill(torch.empty(1002, dtype=dtype, device=device))
        check_strategy(get_strategy(name), Case([(src, buf[2:])], [buf]))


def run_bound_sources(name, seed, device):
    check_bound_sources(get_strategy(name), random_case(seed, device, max_copies=10, max_elems=5000), seed)

