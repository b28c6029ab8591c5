"""triton_persistent: exact on CPU under TRITON_INTERPRET=1 (CI), and through the compiled launcher on a GPU."""

import pytest

from tests.kernels.exact_suite import *  # noqa: F403 - the shared exactness suite, for this strategy
from tests.kernels.triton_suite import *  # noqa: F403 - and the Triton-only checks


@pytest.fixture
def strategy_name():
    return "triton_persistent"
