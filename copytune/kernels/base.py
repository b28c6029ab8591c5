"""The strategy contract every copy strategy implements, and the bound launch it hands the dispatcher."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from copytune.plan import CopyPlan

Params = dict[str, Any]  # self-describing tunables ({"block": 1024, "num_warps": 4}), never an index


class UnsupportedPlan(ValueError):
    """The strategy cannot run this batch (too many dims, a strided inner dim, a device it does not serve)."""


@runtime_checkable
class Launch(Protocol):
    """A batch bound to one strategy: ``launch()`` repeats it on the same addresses, ``launch(srcs)`` on new
    source tensors of the bound geometry. Per-call work is a few operations per copy."""

    def __call__(self, srcs: Sequence[torch.Tensor] | None = None) -> None: ...


@runtime_checkable
class Strategy(Protocol):
    name: str

    def available(self, device: torch.device | str) -> str | None:
        """None when usable on ``device``; otherwise a human reason."""

    def supports(self, plan: CopyPlan) -> bool:
        """Whether ``copy``/``bind`` accept this plan."""

    def candidates(self, plan: CopyPlan) -> list[Params]:
        """Parameter sets worth timing for this plan; the first is the default."""

    def validate_params(self, params: Params) -> str | None:
        """None when ``bind`` runs ``params`` exactly (a cache row or an imported bundle); else why not."""

    def bind(self, plan: CopyPlan, params: Params | None = None) -> Launch:
        """Prepare a reusable launch of ``plan`` (compiles here, never on the bound call)."""

    def runner(self, plan: CopyPlan, params: Params | None = None) -> Callable[[Sequence], None]:
        """A launch for batches with exactly ``plan``'s addresses and geometry, called with that call's pairs.

        It holds no tensor references (kernel strategies keep integers, torch strategies use the pairs given), so
        a cache of runners keyed by addresses never keeps freed memory alive.
        """

    def copy(self, plan_or_pairs, params: Params | None = None) -> None:
        """Launch the batch once, without synchronizing."""


def int_in(value: Any, allowed) -> bool:
    """An int (never a bool) among ``allowed``: JSON gives back 4.0, true and "4" as readily as 4."""
    return isinstance(value, int) and not isinstance(value, bool) and value in allowed


def as_plan(plan_or_pairs) -> CopyPlan:
    return CopyPlan.from_pairs(plan_or_pairs)


def as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)
