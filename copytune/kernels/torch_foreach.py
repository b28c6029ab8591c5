"""``torch._foreach_copy_``: one multi-tensor-apply launch for dense pairs of one dtype and matching strides;
torch itself falls back to one copy per pair for the rest.

Not a byte copy for 16-bit floats: on an H100 (torch 2.11) the multi-tensor kernel goes through float and
rewrites NaN payloads of float16/bfloat16, where ``copy_`` keeps them. So it declines batches with dtypes outside
``BIT_EXACT_DTYPES``."""

from __future__ import annotations

import torch

from copytune.kernels.base import Config, Params, TensorLaunch, UnsupportedPlan, as_plan
from copytune.plan import CopyPlan


class TorchForeach:
    name = "torch_foreach"
    serves_cpu = True

    def available(self, device) -> str | None:
        return None if hasattr(torch, "_foreach_copy_") else f"torch {torch.__version__} has no _foreach_copy_"

    def supports(self, plan: CopyPlan) -> bool:
        return all(d.dtype in BIT_EXACT_DTYPES for _, d in plan.pairs)

    def candidates(self, plan: CopyPlan) -> list[Config]:
        return [Config()]

    def validate_params(self, params: Params) -> str | None:
        return None if params == {} else f"{self.name} takes no parameters, got {sorted(params)}"

    def bind(self, plan: CopyPlan, params: Params | None = None) -> BoundForeach:
        _check(self, plan)
        return BoundForeach(plan)

    def runner(self, plan: CopyPlan, params: Params | None = None):
        _check(self, plan)
        return foreach_copy

    def copy(self, plan_or_pairs, params: Params | None = None) -> None:
        plan = as_plan(plan_or_pairs)
        _check(self, plan)
        foreach_copy(plan.pairs)


BIT_EXACT_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                              torch.float32, torch.float64})


def _check(strategy: TorchForeach, plan: CopyPlan) -> None:
    if not strategy.supports(plan):
        bad = next(i for i, (_, d) in enumerate(plan.pairs) if d.dtype not in BIT_EXACT_DTYPES)
        raise UnsupportedPlan(f"torch_foreach is not bit-exact for {plan.pairs[bad][1].dtype} (pair {bad})")


class BoundForeach(TensorLaunch):
    """One ``_foreach_copy_``."""

    strategy = "torch_foreach"

    def copy_pairs(self, srcs: list, dsts: list) -> None:
        if dsts:
            torch._foreach_copy_(dsts, srcs)


def foreach_copy(pairs) -> None:
    if pairs:
        torch._foreach_copy_([d for _, d in pairs], [s for s, _ in pairs])


STRATEGY = TorchForeach()
