"""copytune: autotuned dispatch of batched small GPU copies (one tuned launch instead of many ``copy_`` calls)."""

from copytune.dispatch import batched_copy, default_strategy
from copytune.kernels import Strategy, get_strategy, strategies
from copytune.plan import CopyPlan

__version__ = "0.1.0"

__all__ = ["CopyPlan", "Strategy", "batched_copy", "default_strategy", "get_strategy", "strategies"]
