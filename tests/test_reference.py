"""The engine-style yardstick kernel (``copytune.reference``): exact, and a bad call is a returned message — never a
write past its 8 slots, never a c10::Error thrown across pybind11 (that crashed the GPU hosts' processes)."""

import pytest
import torch

from tests.cases import random_fill

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def ref():
    from copytune import reference

    return reference.load()


def test_copies_rows_exactly(ref):
    dev = torch.device("cuda")
    buf = random_fill(torch.empty(9, 40, dtype=torch.int32, device=dev))
    srcs = [random_fill(torch.empty(7, dtype=torch.int32, device=dev)),
            random_fill(torch.empty(9, 33, dtype=torch.int32, device=dev))]
    dsts = [torch.empty(7, dtype=torch.int32, device=dev), buf[:, :33]]
    want = buf.clone()
    want[:, :33] = srcs[1]
    assert ref.launch(srcs, dsts) == ""
    torch.cuda.synchronize()
    assert torch.equal(dsts[0], srcs[0]) and torch.equal(buf, want)


def test_bad_calls_are_messages_and_write_nothing(ref):
    dev = torch.device("cuda")
    srcs = [random_fill(torch.empty(5, dtype=torch.int32, device=dev)) for _ in range(9)]
    dsts = [random_fill(torch.empty(5, dtype=torch.int32, device=dev)) for _ in range(9)]
    before = [d.clone() for d in dsts]
    cases = {
        "at most 8 copies, got 9": (srcs, dsts),
        "1 sources for 2 destinations": (srcs[:1], dsts[:2]),
        "copy 0 is not an int32 CUDA copy": ([srcs[0].long()], dsts[:1]),
        "copy 1 is not an int32 CUDA copy": (srcs[:2], [dsts[0], dsts[1].cpu()]),
    }
    for message, args in cases.items():
        err = ref.launch(*args)
        assert err.startswith("reference: ") and message in err and "\n" not in err, err
    torch.cuda.synchronize()
    assert all(torch.equal(d, b) for d, b in zip(dsts, before))
    from copytune.reference import raise_if

    with pytest.raises(RuntimeError, match="at most 8 copies"):
        raise_if(ref.launch(srcs, dsts))
