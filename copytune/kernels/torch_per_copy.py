"""The baseline: one ``dst.copy_(src)`` per pair. Always available, supports every layout and dtype."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from copytune.kernels.base import Params, as_plan
from copytune.plan import CopyPlan


class TorchPerCopy:
    name = "torch_per_copy"

    def available(self, device) -> str | None:
        return None

    def supports(self, plan: CopyPlan) -> bool:
        return True

    def candidates(self, plan: CopyPlan) -> list[Params]:
        return [{}]

    def validate_params(self, params: Params) -> str | None:
        return None if params == {} else f"{self.name} takes no parameters, got {sorted(params)}"

    def bind(self, plan: CopyPlan, params: Params | None = None):
        dsts = [d for _, d in plan.pairs]  # the bound sources are read off the plan when needed: never pinned here

        def launch(srcs: Sequence[torch.Tensor] | None = None) -> None:
            for s, d in zip([s for s, _ in plan.pairs] if srcs is None else srcs, dsts):
                d.copy_(s)

        return launch

    def runner(self, plan: CopyPlan, params: Params | None = None):
        return copy_each

    def copy(self, plan_or_pairs, params: Params | None = None) -> None:
        copy_each(as_plan(plan_or_pairs).pairs)


def copy_each(pairs) -> None:
    for s, d in pairs:
        d.copy_(s)


STRATEGY = TorchPerCopy()
