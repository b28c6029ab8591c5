"""Copy strategies: one module each, listed in ``registry.STRATEGY_MODULES``."""

from copytune.kernels.base import BoundLaunch, Config, Launch, Params, Strategy, UnsupportedPlan
from copytune.kernels.registry import get_strategy, strategies

__all__ = ["BoundLaunch", "Config", "Launch", "Params", "Strategy", "UnsupportedPlan", "get_strategy", "strategies"]
