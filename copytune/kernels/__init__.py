"""Copy strategies: one module each, listed in ``registry.STRATEGY_MODULES``."""

from copytune.kernels.base import BoundLaunch, Config, Params, Strategy, UnsupportedPlan
from copytune.kernels.registry import get_strategy, strategies

__all__ = ["BoundLaunch", "Config", "Params", "Strategy", "UnsupportedPlan", "get_strategy", "strategies"]
