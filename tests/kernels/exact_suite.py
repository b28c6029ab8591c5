"""The exactness suite every strategy runs: each ``tests/kernels/test_<strategy>.py`` star-imports these tests and
defines the ``strategy_name`` fixture (and skips itself where the strategy cannot run)."""

import pytest

from tests.cases import DTYPES, LAYOUTS
from tests.kernels import triton_checks as checks


@pytest.mark.parametrize("seed", range(30))
def test_random_batches_bit_exact(seed, strategy_name, device):
    checks.run_random(strategy_name, seed, device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_dtype_and_layout(dtype, layout, strategy_name, device):
    checks.run_dtype_layout(strategy_name, dtype, layout, device)


@pytest.mark.parametrize("seed", range(4))
def test_bound_launch_takes_new_sources(seed, strategy_name, device):
    checks.run_bound_sources(strategy_name, seed, device)


@pytest.mark.parametrize(
    "check",
    [checks.run_many_copies_chunked, checks.run_page_table_slice, checks.run_interleaved_destinations,
     checks.run_misaligned_new_source, checks.run_all_dtypes],
    ids=lambda f: f.__name__[4:],
)
def test_layouts_and_edges(check, strategy_name, device):
    check(strategy_name, device)
