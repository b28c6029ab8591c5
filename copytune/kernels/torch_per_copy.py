"""The baseline: one ``dst.copy_(src)`` per pair. Always available, supports every layout and dtype."""

from __future__ import annotations

from copytune.kernels.base import Config, Params, TensorLaunch, as_plan
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


class BoundPerCopy(TensorLaunch):
    """One ``copy_`` per pair."""

    strategy = "torch_per_copy"

    def copy_pairs(self, srcs: list, dsts: list) -> None:
        for s, d in zip(srcs, dsts):
            d.copy_(s)


def copy_each(pairs) -> None:
    for s, d in pairs:
        d.copy_(s)


STRATEGY = TorchPerCopy()
