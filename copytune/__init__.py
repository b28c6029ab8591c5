"""copytune: autotuned dispatch of batched small GPU copies (one tuned launch instead of many ``copy_`` calls)."""

__version__ = "0.1.0"  # before the imports: signature.py reads it

from copytune import log, nsa
from copytune.dispatch import BoundCopy, Dispatcher, batched_copy, default_strategy
from copytune.fleet import sync
from copytune.kernels import Strategy, get_strategy, strategies
from copytune.plan import CopyPlan

log.configure_from_env()

__all__ = [
    "BoundCopy", "CopyPlan", "Dispatcher", "Strategy", "batched_copy", "default_strategy", "get_strategy", "strategies",
    "nsa", "sync",
]
