import pytest

from copytune import get_strategy
from tests.cases import check_bound_sources, check_strategy, random_case

NAME = "torch_per_copy"


@pytest.mark.parametrize("seed", range(10))
def test_random_batches_bit_exact(seed, device):
    check_strategy(get_strategy(NAME), random_case(seed, device))


@pytest.mark.parametrize("seed", range(3))
def test_bound_launch_takes_new_sources(seed, device):
    check_bound_sources(get_strategy(NAME), random_case(seed, device, max_copies=6), seed)


def test_available_everywhere():
    assert get_strategy(NAME).available("cpu") is None
