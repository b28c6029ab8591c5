"""``torch._foreach_copy_``: one multi-tensor-apply launch for dense pairs of one dtype and matching strides;
torch itself falls back to one copy per pair for the rest."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from copytune.kernels.base import Params, as_plan
from copytune.plan import CopyPlan


class TorchForeach:
    name = "torch_foreach"

    def available(self, device) -> str | None:
        return None if hasattr(torch, "_foreach_copy_") else f"torch {torch.__version__} has no _foreach_copy_"

    def supports(self, plan: CopyPlan) -> bool:
        return True

    def candidates(self, plan: CopyPlan) -> list[Params]:
        return [{}]

    def bind(self, plan: CopyPlan, params: Params | None = None):
        dsts = [d for _, d in plan.pairs]
        bound = [s for s, _ in plan.pairs]

        def launch(srcs: Sequence[torch.Tensor] | None = None) -> None:
            if dsts:
                torch._foreach_copy_(dsts, bound if srcs is None else list(srcs))

        return launch

    def runner(self, plan: CopyPlan, params: Params | None = None):
        return foreach_copy

    def copy(self, plan_or_pairs, params: Params | None = None) -> None:
        foreach_copy(as_plan(plan_or_pairs).pairs)


def foreach_copy(pairs) -> None:
    if pairs:
        torch._foreach_copy_([d for _, d in pairs], [s for s, _ in pairs])


STRATEGY = TorchForeach()
