import pytest

from copytune import get_strategy
from tests.kernels.exact_suite import *  # noqa: F403 - the shared exactness suite, for this strategy


@pytest.fixture
def strategy_name():
    return "torch_per_copy"


def test_available_everywhere():
    assert get_strategy("torch_per_copy").available("cpu") is None
