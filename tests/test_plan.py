"""CopyPlan validation: every bad batch raises ValueError naming the pair, before anything is launched."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from copytune import CopyPlan, batched_copy
from copytune.plan import _byte_intervals


def t(*shape, dtype=torch.int32):
    return torch.arange(int(torch.tensor(shape).prod()) if shape else 1, dtype=dtype).reshape(shape)


def test_empty_batch_is_a_noop():
    plan = CopyPlan.from_pairs([])
    assert len(plan) == 0 and plan.device is None
    batched_copy([])


@pytest.mark.parametrize(
    "pairs, match",
    [
        ([(t(4), t(4)), "not a pair"], r"pair 1: expected a \(src, dst\) pair"),
        ([(t(4), t(4)), (t(4), [1, 2, 3, 4])], "pair 1: destination is a list"),
        ([(t(4), t(4)), ((1, 2), t(2))], "pair 1: source is a tuple"),
        ([(t(4), t(5))], r"pair 0: shape mismatch, source \(4,\) vs destination \(5,\)"),
        ([(t(4), t(4)), (t(4), t(4, dtype=torch.int64))], "pair 1: dtype mismatch"),
        ([(t(3, 4), t(4).expand(3, 4))], "pair 0: destination has overlapping elements"),
        ([(t(4), t(4).to("meta"))], "pair 0: source on cpu, destination on meta"),
        ([(t(4), t(4)), (t(4).to("meta"), t(4).to("meta"))], "pair 1: on meta, but pair 0 is on cpu"),
    ],
    ids=["not-a-pair", "dst-not-tensor", "src-not-tensor", "shape", "dtype", "dst-self-overlap", "src-dst-device",
         "pair-devices"],
)
def test_bad_input_names_the_pair(pairs, match):
    with pytest.raises(ValueError, match=match):
        CopyPlan.from_pairs(pairs)


def test_destination_overlapping_another_destination():
    buf = t(10)
    with pytest.raises(ValueError, match="pair 1: destination overlaps the destination of pair 0"):
        CopyPlan.from_pairs([(t(4), buf[:4]), (t(4), buf[3:7])])


def test_source_reading_an_earlier_destination():
    buf = t(10)
    with pytest.raises(ValueError, match="pair 1: source overlaps the destination of pair 0"):
        CopyPlan.from_pairs([(t(4), buf[:4]), (buf[2:6], t(4))])


def test_destination_over_an_earlier_source():
    buf = t(10)
    with pytest.raises(ValueError, match="pair 1: destination overlaps the source of pair 0"):
        CopyPlan.from_pairs([(buf[:4], t(4)), (t(4), buf[2:6])])


def test_partial_self_overlap_rejected_but_identity_allowed():
    buf = t(10)
    with pytest.raises(ValueError, match="pair 0: source and destination partially overlap"):
        CopyPlan.from_pairs([(buf[:4], buf[2:6])])
    CopyPlan.from_pairs([(buf[:4], buf[:4])])


def test_interleaved_column_slices_are_not_overlaps():
    buf = t(6, 10)
    plan = CopyPlan.from_pairs([(t(6, 4), buf[:, :4]), (t(6, 4), buf[:, 4:8]), (buf[:, 8:], t(6, 2))])
    assert len(plan) == 3


def test_errors_come_before_any_launch():
    dst = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="pair 1"):
        batched_copy([(t(4), dst), (t(3), t(4))])
    assert not dst.any()  # pair 0 was not copied either


def test_page_table_slice_geometry():
    buf = torch.empty(8, 64, dtype=torch.int32)
    d = CopyPlan.from_pairs([(t(8, 40), buf[:, :40])]).descs[0]
    assert (d.rows, d.row_bytes, d.src_row_stride, d.dst_row_stride, d.rowwise) == (8, 160, 160, 256, True)


def test_contiguous_views_merge_to_one_row():
    d = CopyPlan.from_pairs([(t(2, 3, 4), torch.empty(2, 3, 4, dtype=torch.int32))]).descs[0]
    assert (d.rows, d.row_bytes) == (1, 96)


def test_transpose_is_not_rowwise():
    plan = CopyPlan.from_pairs([(t(4, 6), torch.empty(6, 4, dtype=torch.int32).t())])
    assert plan.first_non_rowwise() == 0


@st.composite
def strided_views(draw):
    dtype = draw(st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.float64]))
    rows, cols = draw(st.integers(0, 6)), draw(st.integers(0, 7))
    views = []
    for _ in range(2):
        pad_r, pad_c, step = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 3))
        buf = torch.zeros(rows * step + pad_r + 1, cols * step + pad_c + 1, dtype=dtype)
        v = buf[pad_r:pad_r + rows * step:step, pad_c:pad_c + cols * step:step]
        views.append(v.t() if draw(st.booleans()) and rows == cols else v)
    return views


@settings(max_examples=200, deadline=None)
@given(strided_views())
def test_row_geometry_covers_exactly_the_destination_bytes(views):
    src, dst = views
    d = CopyPlan.from_pairs([(src, dst)]).descs[0]
    if not d.rowwise:
        return
    want = sorted(map(tuple, _byte_intervals(dst).tolist()))
    got = [(d.dst + r * d.dst_row_stride + b, d.dst + r * d.dst_row_stride + b + 1)
           for r in range(d.rows) for b in range(d.row_bytes)]
    assert sorted(got) == sorted((lo + k, lo + k + 1) for lo, hi in want for k in range(hi - lo))
    assert d.nbytes == dst.numel() * dst.element_size()


def test_many_interleaved_destinations_are_validated_in_one_sweep(monkeypatch):
    """1000 column slices of one buffer meet each other's extents: the exact check is one sweep over their
    elements (element intervals built once per tensor), not a test per pair of slices."""
    import copytune.plan as plan_module

    built = []
    real = plan_module._byte_intervals
    monkeypatch.setattr(plan_module, "_byte_intervals", lambda t: built.append(1) or real(t))
    buf = torch.zeros(8, 1000, dtype=torch.int32)
    pairs = [(torch.full((8,), k, dtype=torch.int32), buf[:, k]) for k in range(1000)]
    CopyPlan.from_pairs(pairs)
    assert len(built) <= 1000
    with pytest.raises(ValueError, match="pair 1000: destination overlaps the destination of pair 7"):
        CopyPlan.from_pairs(pairs + [(torch.ones(8, dtype=torch.int32), buf[:, 7])])


def test_overlap_verdicts_match_a_byte_by_byte_reference():
    """Random strided views into one small buffer as sources and destinations: the batch is refused exactly when
    some destination byte is also a byte of another pair's source or destination (or a pair partially overlaps
    itself), as a set-of-bytes reference says."""
    g = torch.Generator().manual_seed(7)
    buf = torch.zeros(4096, dtype=torch.uint8)

    def view():
        rows, cols = (int(x) for x in torch.randint(1, 5, (2,), generator=g))
        stride = int(torch.randint(cols, cols + 40, (1,), generator=g))
        off = int(torch.randint(0, 4096 - rows * stride, (1,), generator=g))
        return buf[off:].as_strided((rows, cols), (stride, 1)), rows, cols

    def bytes_of(t):
        return {t.data_ptr() + i * t.stride(0) + j for i in range(t.shape[0]) for j in range(t.shape[1])}

    refused = accepted = 0
    for _ in range(300):
        pairs = []
        for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
            d, rows, cols = view()
            s = torch.zeros(rows, cols, dtype=torch.uint8) if int(torch.randint(0, 2, (1,), generator=g)) \
                else buf[int(torch.randint(0, 2000, (1,), generator=g)):].as_strided((rows, cols), d.stride())
            pairs.append((s, d))
        conflict = any(
            bytes_of(pairs[i][1]) & bytes_of(pairs[j][r]) for i in range(len(pairs)) for j in range(len(pairs))
            for r in (0, 1) if i != j) or any(
            (bytes_of(s) & bytes_of(d)) and bytes_of(s) != bytes_of(d) for s, d in pairs)
        try:
            CopyPlan.from_pairs(pairs)
            accepted += 1
            assert not conflict
        except ValueError as exc:
            refused += 1
            assert conflict, exc
    assert refused and accepted  # both verdicts exercised
