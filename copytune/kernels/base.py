"""The strategy contract every copy strategy implements, and the bound launch it hands the dispatcher."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from copytune.plan import CopyPlan

Params = Mapping[str, Any]  # self-describing tunables ({"block": 1024, "num_warps": 4}), never an index; see Config


class UnsupportedPlan(ValueError):
    """The strategy cannot run this batch (too many dims, a strided inner dim, a device it does not serve)."""


class Config(dict):
    """A strategy's tunables (``{"block": 1024, "num_warps": 4}``): a small immutable, hashable mapping, as Triton's
    ``Config``; JSON-serializable as the dict it is; checked by the strategy that owns it (``validate_params``)."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _immutable(self, *args, **kwargs):
        raise TypeError("a Config is immutable: build a new one")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _immutable  # type: ignore[assignment]
    __ior__ = _immutable  # type: ignore[assignment]


class BoundLaunch:
    """What ``Strategy.bind`` returns: one batch's launch, and the launch contract, declared once.

    ``launch()`` copies the sources given at bind; ``launch(srcs)`` copies ``srcs`` (one per pair, the bound
    geometry) for that call only. Every capability below has its default here — "not supported" — and a strategy
    overrides what it can do; callers never probe with ``getattr`` or by a strategy's name.

    Errors, one convention: methods raise (ValueError: the caller's input; RuntimeError: the launch). The two
    per-step *fast launchers* instead return None on success and a one-line message on failure — they are the
    serving path's calls, which C++ answers without throwing (see csrc/binding.cpp) — and the Python ones follow
    suit, so a call site checks one return value whatever the strategy.
    """

    strategy = "?"  # the owning strategy's name
    checks_sources = False  # True once expect_sources() took: every new source is checked before its launch
    maybe_overlap: str | None = None  # what checked_launcher() returns when a source's extent meets a destination's

    def __call__(self, srcs: Sequence[torch.Tensor] | None = None) -> None:
        raise NotImplementedError

    def expect_sources(self, samples: Sequence[torch.Tensor]) -> bool:
        """Check every later source against its sample (device, dtype, shape, strides) before launching; True if
        this launch does (then ``checks_sources``), False if the caller must."""
        return False

    def set_source_offsets(self, offsets: Sequence[int]) -> bool:
        """Later ``(srcs)`` calls pass base tensors: copy i reads ``srcs[i].data_ptr() + offsets[i]``. False: the
        caller builds the views itself."""
        return False

    def set_shape(self, i: int, rows: int, row_bytes: int, src_stride: int, dst_stride: int) -> bool:
        """Copy ``i`` moves ``rows`` rows of ``row_bytes`` bytes, row strides in bytes, from now on. False: bind
        anew."""
        return False

    def follow_source_shape(self, i: int, max_row_bytes: int, itemsize: int) -> bool:
        """Copy ``i`` takes its columns and source row stride from each new 2-D source, at most ``max_row_bytes``
        a row (checked before each launch). False: the caller resizes (``set_shape``) or rebinds."""
        return False

    def sources_launcher(self) -> Callable[[Sequence[torch.Tensor]], str | None]:
        """The cheapest per-step call taking new sources: returns None, or the message of what it refused."""
        return returning_errors(self, self.strategy)

    def checked_launcher(self) -> Callable[[Sequence[torch.Tensor]], str | None] | None:
        """A per-step call that also checks each source against the destinations (a checked ``BoundCopy``):
        None when it launched; ``maybe_overlap`` when a source's extent meets a destination's (nothing launched:
        the caller decides byte by byte); else the message of what it refused. None where the caller checks."""
        return None

    def attribute_launcher(self, names: Sequence[str] | Sequence[int]) -> Callable[[object], str | None] | None:
        """A per-step call taking one object that holds the sources, one place per copy — dotted attribute
        ``names``, or indices into a tuple or list (an engine kernel's positional arguments) — read without
        Python frames; None where the strategy cannot (the caller reads them)."""
        return None

    def seam_table(self, step_var, values: Sequence[str], present: Sequence[str]):
        """A table of bound steps for one call site's engine seam, looked up and launched in one call of the
        strategy's own code (``CallSite`` documents it); None where the strategy has none."""
        return None


class Refusal(str):
    """A fast launcher's message that keeps the kind of error it stands for (``launch_error`` raises it)."""

    kind: type[Exception] = RuntimeError


class TensorLaunch(BoundLaunch):
    """A bound launch of a strategy that takes tensors (the torch ones): each call hands ``copy_pairs`` the sources
    (the bound ones, read off the plan when needed and never pinned here) and the destinations."""

    __slots__ = ("dsts", "plan")

    def __init__(self, plan: CopyPlan):
        self.plan, self.dsts = plan, [d for _, d in plan.pairs]

    def __call__(self, srcs: Sequence[torch.Tensor] | None = None) -> None:
        if srcs is not None:
            check_count(srcs, len(self.dsts), self.strategy)
        self.copy_pairs([s for s, _ in self.plan.pairs] if srcs is None else list(srcs), self.dsts)

    def copy_pairs(self, srcs: list, dsts: list) -> None:
        raise NotImplementedError


class BatchRunner:
    """What ``Strategy.runner`` returns where a batch is one C++ object: called with each call's pairs (the same
    addresses), and handed by the dispatcher to that module's exact-address cache, which then launches such calls
    without a Python frame (``Dispatcher.copy``)."""

    __slots__ = ("batch", "module")

    def __init__(self, batch, module):
        self.batch, self.module = batch, module

    def __call__(self, pairs=None) -> None:
        err = self.batch.run()
        if err:
            raise launch_error(err)

    def exact_cache(self, capacity: int):
        """A new exact-address cache of this module (``ExactCache``)."""
        return self.module.ExactCache(capacity)


def check_count(srcs: Sequence, expected: int, name: str) -> None:
    """One source per copy, before anything launches (a short list must never copy a prefix and stop)."""
    if len(srcs) != expected:
        raise ValueError(f"{name}: expected {expected} sources, got {len(srcs)}")


def launch_error(message: str) -> Exception:
    """A fast launcher's message as the exception the rest of the contract raises. C++ messages naming a refused
    source ("cuda_ext: source i ...") are the caller's input, ValueError; a Refusal keeps its kind; anything else
    is the launch's, RuntimeError."""
    kind = getattr(message, "kind", None) or \
        (ValueError if message.split(": ", 1)[-1].startswith("source") else RuntimeError)
    return kind(str(message))


def returning_errors(launch: Callable, name: str) -> Callable[[Sequence[torch.Tensor]], str | None]:
    """``launch`` as a fast launcher: what it raises comes back as a one-line Refusal of the same kind."""
    def run(srcs: Sequence[torch.Tensor]) -> str | None:
        try:
            launch(srcs)
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            refusal = Refusal(text if text.startswith(f"{name}: ") else f"{name}: {text}")
            refusal.kind = ValueError if isinstance(exc, (ValueError, TypeError, IndexError)) else RuntimeError
            return refusal
        return None
    return run


@runtime_checkable
class Strategy(Protocol):
    """A way of performing a batch of copies. Adding one touches its module and the registry line, nothing else:
    callers read what it can do from these attributes and from its BoundLaunch, never from its name."""

    name: str
    serves_cpu: bool  # a candidate (and a default) for batches on the CPU; False: GPU only, or a test-only interpreter

    def available(self, device: torch.device | str) -> str | None:
        """None when usable on ``device``; otherwise a human reason."""

    def supports(self, plan: CopyPlan) -> bool:
        """Whether ``copy``/``bind`` accept this plan."""

    def candidates(self, plan: CopyPlan) -> list[Params]:
        """Parameter sets worth timing for this plan; the first is the default."""

    def validate_params(self, params: Params) -> str | None:
        """None when ``bind`` runs ``params`` exactly (a cache row or an imported bundle); else why not."""

    def bind(self, plan: CopyPlan, params: Params | None = None) -> BoundLaunch:
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
