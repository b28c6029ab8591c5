import pytest

from copytune import get_strategy
from tests.kernels.exact_suite import *  # noqa: F403 - the shared exactness suite, for this strategy


@pytest.fixture
def strategy_name():
    return "torch_foreach"


def test_available_everywhere():
    assert get_strategy("torch_foreach").available("cpu") is None
