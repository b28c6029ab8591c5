"""Model profiles for ``copytune tune --model``: which batches a serving engine's call site copies, per batch size
and context length, so a machine can be tuned before it serves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The serving engine's default CUDA-graph batch sizes.
CUDA_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class ModelProfile:
    name: str
    description: str
    batch_sizes: tuple[int, ...]
    max_lens: tuple[int, ...]
    example_pairs: Callable[[int, int, str, torch.device], list]  # (bs, max_len, forward_mode, device) -> pairs


def _nsa_pairs(bs: int, max_len: int, forward_mode: str, device: torch.device) -> list:
    from copytune import nsa  # noqa: PLC0415

    md, pre = nsa.make_example(bs, max_len, forward_mode=forward_mode, device=device)
    return nsa.copy_pairs(md, pre, forward_mode)


PROFILES = {
    "nsa": ModelProfile("nsa", "NSA backend metadata refresh (DeepSeek-V3.2 style), page size 64",
                        CUDA_GRAPH_BATCH_SIZES, (1024, 8192), _nsa_pairs),
}


def get_profile(name: str) -> ModelProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]
