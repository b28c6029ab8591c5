"""triton_unified: exact on CPU under TRITON_INTERPRET=1 (CI), and through the compiled launcher on a GPU."""

import pytest
import torch

from tests.cases import DTYPES, LAYOUTS
from tests.kernels import triton_checks as checks

NAME = "triton_unified"


@pytest.mark.parametrize("seed", range(40))
def test_random_batches_bit_exact(seed, device):
    checks.run_random(NAME, seed, device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_dtype_and_layout(dtype, layout, device):
    checks.run_dtype_layout(NAME, dtype, layout, device)


@pytest.mark.parametrize("seed", range(4))
def test_bound_launch_takes_new_sources(seed, device):
    checks.run_bound_sources(NAME, seed, device)


@pytest.mark.parametrize(
    "check",
    [checks.run_many_copies_chunked, checks.run_page_table_slice, checks.run_interleaved_destinations,
     checks.run_unsupported_layout, checks.run_candidates_exact, checks.run_misaligned_new_source,
     checks.run_all_dtypes],
    ids=lambda f: f.__name__[4:],
)
def test_layouts_and_edges(check, device):
    check(NAME, device)


@pytest.mark.cuda
def test_direct_launcher_in_use():
    """On a GPU the compiled launcher must be found; the normal path is only a fallback."""
    from copytune.kernels import triton_launch

    assert triton_launch._probe_direct(torch.device("cuda")) >= 0
