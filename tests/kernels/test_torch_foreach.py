import pytest

from copytune import get_strategy
from tests.kernels.exact_suite import *  # noqa: F403 - the shared exactness suite, for this strategy


@pytest.fixture
def strategy_name():
    return "torch_foreach"


def test_available_everywhere():
    assert get_strategy("torch_foreach").available("cpu") is None


def test_declines_16_bit_floats_whose_nan_payloads_it_would_rewrite():
    import torch

    from copytune import CopyPlan
    from copytune.kernels import UnsupportedPlan

    strategy = get_strategy("torch_foreach")
    for dtype in (torch.float16, torch.bfloat16):
        plan = CopyPlan.from_pairs([(torch.ones(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)),
                                    (torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype))])
        assert not strategy.supports(plan)
        with pytest.raises(UnsupportedPlan, match="pair 1"):
            strategy.copy(plan)
    assert strategy.supports(CopyPlan.from_pairs([(torch.ones(4), torch.zeros(4))]))
