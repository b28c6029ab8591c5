import pytest
import torch

from copytune import CopyPlan
from copytune.signature import bucket, describe_signature, device_fingerprint, make_key, shape_signature


def key_of(pairs, mode="eager"):
    plan = CopyPlan.from_pairs(pairs)
    return make_key(device_fingerprint("cpu"), shape_signature(plan), mode)


def batch(bs, dtype=torch.int32, max_len=40):
    buf = torch.zeros(256, 64, dtype=dtype)
    return [(torch.ones(bs, dtype=dtype), torch.zeros(bs, dtype=dtype)),
            (torch.ones(bs, max_len, dtype=dtype), buf[:bs, :max_len])]


@pytest.mark.parametrize("n, want", [(0, 0), (1, 1), (2, 2), (3, 4), (100, 128), (128, 128), (129, 256)])
def test_bucket_rounds_up_to_a_power_of_two(n, want):
    assert bucket(n) == want


def test_same_bucket_shares_a_key():
    assert key_of(batch(100)) == key_of(batch(120))


def test_other_bucket_dtype_layout_or_mode_do_not():
    base = key_of(batch(100))
    assert key_of(batch(200)) != base
    assert key_of(batch(100, torch.int64)) != base
    assert key_of(batch(100, torch.float16)) != base
    assert key_of(batch(100), mode="graph") != base
    flat = [(s, d.contiguous()) for s, d in batch(100)]
    assert key_of(flat) != base


def test_dtypes_of_one_width_share_a_key():
    """Copies move raw bytes, so int32 and float32 batches run the same kernel and share a tuned entry."""
    assert key_of(batch(100, torch.float32)) == key_of(batch(100))


def test_signature_reads_well():
    sig = shape_signature(CopyPlan.from_pairs(batch(100)))
    assert sig[1][:4] == [4, "2d", 128, 64]
    assert describe_signature(sig) == "2 copies: 1d[≤128]×4B, 2d[≤128×64]×4B"


def test_fingerprint_is_cpu_specific_here():
    fp = device_fingerprint("cpu")
    assert fp["kind"] == "cpu" and fp["torch"] == torch.__version__ and "copytune" in fp


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        make_key({}, [], "lazy")
