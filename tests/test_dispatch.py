import pytest
import torch

from copytune import CopyPlan, batched_copy, default_strategy, get_strategy, strategies
from tests.cases import random_case


def test_registry_lists_the_designed_strategies():
    assert set(strategies()) >= {"torch_per_copy", "torch_foreach", "triton_unified", "triton_persistent"}
    with pytest.raises(ValueError, match="unknown strategy 'nope'; known: torch_per_copy"):
        get_strategy("nope")


@pytest.mark.parametrize("seed", range(5))
def test_batched_copy_matches_copy(seed, device):
    case = random_case(seed, device, max_copies=8, max_elems=3000)
    expected = case.expected()
    batched_copy(case.pairs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    case.check(expected)


def test_default_on_cpu_is_a_torch_strategy():
    plan = CopyPlan.from_pairs([(torch.ones(3), torch.zeros(3))])
    assert default_strategy(plan) in ("torch_foreach", "torch_per_copy")


@pytest.mark.cuda
def test_default_on_cuda_is_the_fused_kernel():
    plan = CopyPlan.from_pairs([(torch.ones(3, device="cuda"), torch.zeros(3, device="cuda"))])
    assert default_strategy(plan) == "triton_unified"
