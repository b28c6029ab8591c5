"""The baseline: one ``dst.copy_(src)`` per pair. Always available, supports every layout and dtype."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from copytune.kernels.base import BoundLaunch, Config, Params, as_plan, check_count
from copytune.plan import CopyPlan


class TorchPerCopy:
    name = "torch_per_copy"
    serves_cpu = True

    def available(self, device) -> str | None:
        return None

    def supports(self, plan: CopyPlan) -> bool:
        return True

    def candidates(self, plan: CopyPlan) -> list[Config]:
        return [Config()]

    def validate_params(self, params: Params) -> str | None:
        return None if params == {} else f"{self.name} takes no parameters, got {sorted(params)}"

    def bind(self, plan: CopyPlan, params: Params | None = None) -> BoundPerCopy:
        return BoundPerCopy(plan)

    def runner(self, plan: CopyPlan, params: Params | None = None):
        return copy_each

    def copy(self, plan_or_pairs, params: Params | None = None) -> None:
        copy_each(as_plan(plan_or_pairs).pairs)


class BoundPerCopy(BoundLaunch):
    """One ``copy_`` per pair; the bound sources are read off the plan when needed (never pinned here)."""

    strategy = "torch_per_copy"
    __slots__ = ("dsts", "plan")

    def __init__(self, plan: CopyPlan):
        self.plan, self.dsts = plan, [d for _, d in plan.pairs]

    def __call__(self, srcs: Sequence[torch.Tensor] | None = None) -> None:
        if srcs is not None:
            check_count(srcs, len(self.dsts), self.strategy)
        for s, d in zip([s for s, _ in self.plan.pairs] if srcs is None else srcs, self.dsts):
            d.copy_(s)


def copy_each(pairs) -> None:
    for s, d in pairs:
        d.copy_(s)


STRATEGY = TorchPerCopy()
