"""Model profiles for ``copytune tune --model``: which batches a serving engine's call site copies, per batch size
and context length, so a machine can be tuned before it serves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The serving engine's default CUDA-graph batch sizes.
CUDA_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class CallSite:
    """A model's real call site, for benchmarks: ``run(x, dispatcher)`` is copytune's call for one step's input
    ``x``, ``engine(x)`` the engine's own copies, ``pairs(x)`` that step's (src, dst) views; ``check(fn)`` raises
    AssertionError unless ``fn(x)`` writes exactly what ``engine(x)`` writes (destinations poisoned first)."""

    name: str
    inputs: list
    run: Callable[[object, object], None]
    engine: Callable[[object], None]
    pairs: Callable[[object], list]
    check: Callable[[Callable[[object], None]], None]


@dataclass(frozen=True)
class ModelProfile:
    name: str
    description: str
    batch_sizes: tuple[int, ...]
    max_lens: tuple[int, ...]
    example_pairs: Callable[[int, int, str, torch.device], list]  # (bs, max_len, forward_mode, device) -> pairs
    call_site: Callable[[int, int, str, torch.device, int], CallSite]  # (..., steps) -> CallSite


def _nsa_pairs(bs: int, max_len: int, forward_mode: str, device: torch.device) -> list:
    from copytune import nsa  # noqa: PLC0415

    md, pre = nsa.make_example(bs, max_len, forward_mode=forward_mode, device=device)
    return nsa.copy_pairs(md, pre, forward_mode)


def _nsa_call_site(bs: int, max_len: int, forward_mode: str, device: torch.device, steps: int) -> CallSite:
    """``batched_copy_metadata`` on one backend's buffers; the longest sequence grows by one each step."""
    from copytune import nsa  # noqa: PLC0415

    width = 2 * max_len + steps
    md = nsa.make_example(bs, max_len, width, forward_mode=forward_mode, device=device, seed=1)[0]
    inputs = [nsa.make_example(bs, max_len + k, width, forward_mode=forward_mode, device=device, seed=100)[1]
              for k in range(steps)]
    views = [dst for _, dst in nsa.copy_pairs(md, inputs[0], forward_mode)]
    bases = list({id(b): b for b in (v if v._base is None else v._base for v in views)}.values())

    def check(fn) -> None:
        for x in (inputs[0], inputs[-1]):
            for b in bases:
                b.random_(1, 1 << 30)
            poisoned = [b.clone() for b in bases]
            nsa.reference_copy(md, x, forward_mode)
            want = [b.clone() for b in bases]
            for b, p in zip(bases, poisoned):
                b.copy_(p)
            fn(x)
            if not all(torch.equal(b, w) for b, w in zip(bases, want)):
                raise AssertionError("the refresh wrote other bytes than the engine's copies")

    return CallSite("batched_copy_metadata", inputs,
                    run=lambda x, d: nsa.batched_copy_metadata(md, x, forward_mode, dispatcher=d),
                    engine=lambda x: nsa.reference_copy(md, x, forward_mode),
                    pairs=lambda x: nsa.copy_pairs(md, x, forward_mode), check=check)


PROFILES = {
    "nsa": ModelProfile("nsa", "NSA backend metadata refresh (DeepSeek-V3.2 style), page size 64",
                        CUDA_GRAPH_BATCH_SIZES, (1024, 8192), _nsa_pairs, _nsa_call_site),
}


def get_profile(name: str) -> ModelProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]
