"""The one place that lists the strategies. A module that fails to import (no Triton, say) is registered as
unavailable with the import error as its reason, so callers skip it instead of crashing."""

from __future__ import annotations

import importlib

from copytune.kernels.base import Strategy, UnsupportedPlan

# One line per strategy: its module (which defines STRATEGY). Listing order only (the baseline first); what runs when
# nothing is tuned is dispatch.DEFAULT_ORDER.
STRATEGY_MODULES = ("torch_per_copy", "torch_foreach", "triton_unified", "triton_persistent", "cuda_ext")

_registry: dict[str, Strategy] | None = None


class Unavailable:
    """Stands in for a strategy whose module could not be imported."""

    serves_cpu = False

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def available(self, device) -> str | None:
        return self.reason

    def supports(self, plan) -> bool:
        return False

    def candidates(self, plan):
        return []

    def validate_params(self, params) -> str | None:
        return None  # its schema lives in the module that did not import; rows are checked again where it does

    def bind(self, plan, params=None):
        raise UnsupportedPlan(f"{self.name} is unavailable: {self.reason}")

    copy = runner = bind


def strategies() -> dict[str, Strategy]:
    """Every registered strategy by name, available or not (ask ``available(device)``)."""
    global _registry
    if _registry is None:
        found: dict[str, Strategy] = {}
        for mod in STRATEGY_MODULES:
            try:
                found[mod] = importlib.import_module(f"copytune.kernels.{mod}").STRATEGY
            except Exception as exc:  # noqa: BLE001 - any import failure makes the strategy unavailable
                found[mod] = Unavailable(mod, f"import failed: {type(exc).__name__}: {exc}")
        _registry = found
    return _registry


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; ``ValueError`` listing the known names otherwise."""
    table = strategies()
    if name not in table:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(table)}")
    return table[name]

