"""Choosing and launching a strategy for a batch.

Until a batch's winner is tuned, the default is ``triton_unified`` on CUDA (one launch; measured 0.14× of
7 × ``copy_`` through its compiled launcher on an H100), else ``torch_foreach``; strided layouts the kernels
cannot take go to ``torch_per_copy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from copytune.kernels import get_strategy
from copytune.plan import CopyPlan

DEFAULT_ORDER = ("triton_unified", "torch_foreach", "torch_per_copy")


def default_strategy(plan: CopyPlan) -> str:
    """The untuned choice for ``plan``: the first of DEFAULT_ORDER that is usable here and supports it."""
    device = plan.device
    if device is None:
        return "torch_per_copy"
    for name in DEFAULT_ORDER:
        s = get_strategy(name)
        if device.type == "cuda" or name.startswith("torch"):  # the CPU interpreter is for tests, never default
            if s.available(device) is None and s.supports(plan):
                return name
    return "torch_per_copy"


def batched_copy(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] | CopyPlan, *, mode: str = "eager") -> None:
    """Perform ``dst.copy_(src)`` for every pair, with the same result, in as few launches as the chosen strategy
    needs. Raises ``ValueError`` before any launch on bad input (see ``CopyPlan.from_pairs``)."""
    plan = CopyPlan.from_pairs(pairs)
    if plan.pairs:
        get_strategy(default_strategy(plan)).copy(plan)
