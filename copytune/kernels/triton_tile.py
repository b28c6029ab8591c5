"""Pieces both Triton strategies share: the descriptor layout they pass as scalar arguments, slot selection and
the copy of one tile.

A copy is described in *units* (1, 2, 4 or 8 bytes, the widest that divides every address, row length and row
stride of the launch): ``n`` units in rows of ``cols`` units, rows ``ss``/``ds`` units apart. Copying units instead
of elements makes every dtype (bf16, fp8, bool, int64, ...) a raw, bit-exact byte copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from copytune.kernels.base import BoundLaunch, Config, UnsupportedPlan, as_device, as_plan, check_count, int_in
from copytune.kernels.triton_launch import TritonLauncher, interpreting
from copytune.plan import CopyDesc, CopyPlan, as_view

SLOTS = 8  # copies per launch: 6 scalar args each; the published fused kernel's limit, chunked beyond it
FIELDS = 6  # src, dst, n, cols, ss, ds
UNIT_TYPES = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}


def unit_of(descs: list[CopyDesc]) -> int:
    return min(min(d.align for d in descs), 8)


def slot_fields(d: CopyDesc, unit: int) -> tuple[int, int, int, int, int, int]:
    cols = d.row_bytes // unit
    return d.src, d.dst, d.rows * cols, cols, d.src_row_stride // unit, d.dst_row_stride // unit


def chunks(plan: CopyPlan) -> Iterator[list[int]]:
    """Indices of non-empty copies, SLOTS at a time; empty copies need no launch at all."""
    live = [i for i, d in enumerate(plan.descs) if d.nbytes]
    for start in range(0, len(live), SLOTS):
        yield live[start:start + SLOTS]


def check_rowwise(name: str, plan: CopyPlan) -> None:
    bad = plan.first_non_rowwise()
    if bad is not None:
        src, dst = plan.pairs[bad]
        raise UnsupportedPlan(
            f"{name} needs copies that reduce to at most 2 dims with a contiguous inner dim; pair {bad} has shape "
            f"{tuple(dst.shape)}, source strides {src.stride()}, destination strides {dst.stride()}")


@triton.jit
def pick8(c, a0, a1, a2, a3, a4, a5, a6, a7):
    """Slot ``c``'s value among eight scalar arguments (a select chain: no descriptor table in memory)."""
    r = tl.where(c == 1, a1, a0)
    r = tl.where(c == 2, a2, r)
    r = tl.where(c == 3, a3, r)
    r = tl.where(c == 4, a4, r)
    r = tl.where(c == 5, a5, r)
    r = tl.where(c == 6, a6, r)
    r = tl.where(c == 7, a7, r)
    return r


@triton.jit
def copy_tile(src, dst, n, cols, ss, ds, start, UNIT: tl.constexpr, BLOCK: tl.constexpr):
    """Copy units [start, start + BLOCK) of one copy; 1-row copies skip the row/column division."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    if cols == n:
        s_off = offs
        d_off = offs
    else:
        row = offs // cols
        col = offs - row * cols
        s_off = row * ss + col
        d_off = row * ds + col
    vals = tl.load(src.to(tl.pointer_type(UNIT)) + s_off, mask=mask)
    tl.store(dst.to(tl.pointer_type(UNIT)) + d_off, vals, mask=mask)


# What a stored or imported parameter set may hold (validate_params): blocks and warps are powers of two.
PARAM_RANGES = {"block": tuple(2 ** k for k in range(4, 17)), "num_warps": (1, 2, 4, 8, 16, 32),
                "programs_per_sm": tuple(range(1, 65))}


class TritonStrategy:
    """Shared launch logic of the Triton strategies: chunking, unit choice, binding, rebinding to new sources.

    A subclass gives its ``kernel``, ``defaults`` and ``layout()``: the grid and scalar arguments of one chunk.
    """

    name = "triton"
    serves_cpu = False  # on a CPU it runs only under Triton's interpreter: a test tool, never a serving candidate
    kernel = None
    defaults: dict = {}
    search: list[dict] = []

    def __init__(self):
        self.launcher = TritonLauncher(self.kernel)

    def available(self, device) -> str | None:
        device = as_device(device)
        if interpreting(self.kernel):
            return None if device.type == "cpu" else "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only"
        if device.type != "cuda":
            return f"Triton needs a CUDA device or TRITON_INTERPRET=1 for {device.type} tensors"
        return None if torch.cuda.is_available() else "no CUDA device visible to torch"

    def supports(self, plan: CopyPlan) -> bool:
        return plan.first_non_rowwise() is None and (plan.device is None or self.available(plan.device) is None)

    def candidates(self, plan: CopyPlan) -> list[Config]:
        return [Config(self.defaults)] + [Config(p) for p in self.search if p != self.defaults]

    def validate_params(self, params: dict) -> str | None:
        """Exactly the keys of ``defaults``, each within what the kernel compiles and covers: a block that is not
        a power of two does not compile, and a block or program count below one copies nothing."""
        if set(params) != set(self.defaults):
            return f"{self.name} takes {sorted(self.defaults)}, got {sorted(params)}"
        for key, allowed in PARAM_RANGES.items():
            if key in params and not int_in(params[key], allowed):
                return f"{self.name}: {key} must be one of {allowed[0]}..{allowed[-1]}" + \
                    (" (powers of two)" if key != "programs_per_sm" else "") + f", got {params[key]!r}"
        return None

    def layout(self, descs: list[CopyDesc], unit: int, params: dict, device) -> tuple:
        """(grid, args, src_arg_positions) for one chunk of at most SLOTS copies."""
        raise NotImplementedError

    def bind(self, plan: CopyPlan, params: dict | None = None):
        check_rowwise(self.name, plan)
        params = {**self.defaults, **(params or {})}
        launches = []
        for idx in chunks(plan):
            descs = [plan.descs[i] for i in idx]
            unit = unit_of(descs)
            grid, args, src_pos = self.layout(descs, unit, params, plan.device)
            constexprs = {"UNIT": UNIT_TYPES[unit], "BLOCK": params["block"]}
            go = self.launcher.bind(plan.device, grid, constexprs, params["num_warps"], args)
            launches.append((go, tuple(args), tuple(zip(src_pos, idx)), unit - 1))
        return BoundTriton(self, plan, params, launches)

    def runner(self, plan: CopyPlan, params: dict | None = None):
        launches = [(go, args) for go, args, _, _ in self.bind(plan, params).launches]  # integers only

        def run(pairs=None) -> None:
            for go, args in launches:
                go(args)
        return run

    def copy(self, plan_or_pairs, params: dict | None = None) -> None:
        self.bind(as_plan(plan_or_pairs), params)()


class BoundTriton(BoundLaunch):
    """A plan bound to compiled launches; ``(srcs)`` swaps in new source addresses, nothing else per call."""

    __slots__ = ("launches", "offsets", "owner", "params", "plan", "resized", "strategy")

    def __init__(self, owner: TritonStrategy, plan: CopyPlan, params: dict, launches: list):
        self.owner, self.plan, self.params, self.launches = owner, plan, params, launches
        self.strategy = owner.name
        self.offsets = None
        self.resized = False

    def set_source_offsets(self, offsets: list[int]) -> bool:
        """Later ``(srcs)`` calls pass base tensors: copy i reads from ``srcs[i].data_ptr() + offsets[i]``."""
        self.offsets = list(offsets)
        return True

    def set_shape(self, i: int, rows: int, row_bytes: int, src_stride: int, dst_stride: int) -> bool:
        """Copy ``i`` now moves ``rows`` rows of ``row_bytes`` bytes with these row strides (bytes). False when
        the launch's unit does not divide them or the copy was empty when bound: the caller binds anew."""
        for k, (go, args, slots, mask) in enumerate(self.launches):
            if not any(j == i for _, j in slots):
                continue
            if (row_bytes | src_stride | dst_stride) & mask or rows == 0:
                return False
            idx = [j for _, j in slots]
            descs = [self.plan.descs[j] for j in idx]
            descs[idx.index(i)] = dataclasses.replace(descs[idx.index(i)], rows=rows, row_bytes=row_bytes,
                                                      src_row_stride=src_stride, dst_row_stride=dst_stride)
            grid, new_args, _ = self.owner.layout(descs, mask + 1, self.params, self.plan.device)
            constexprs = {"UNIT": UNIT_TYPES[mask + 1], "BLOCK": self.params["block"]}
            go = self.owner.launcher.bind(self.plan.device, grid, constexprs, self.params["num_warps"], new_args)
            src_pos = {j: pos for pos, j in slots}
            for pos, j in slots:  # keep the current source addresses
                new_args[pos] = args[src_pos[j]]
            self.launches[k] = (go, tuple(new_args), slots, mask)
            descs_all = list(self.plan.descs)
            descs_all[i] = descs[idx.index(i)]
            self.plan = dataclasses.replace(self.plan, descs=tuple(descs_all))
            self.resized = True
            return True
        return False

    def __call__(self, srcs=None) -> None:
        if srcs is None:
            for go, args, _, _ in self.launches:
                go(args)
            return
        check_count(srcs, len(self.plan.pairs), self.strategy)
        offsets = self.offsets
        for go, args, slots, mask in self.launches:
            args = list(args)
            for pos, i in slots:
                ptr = srcs[i].data_ptr() if offsets is None else srcs[i].data_ptr() + offsets[i]
                if ptr & mask:  # the kernel's unit no longer divides the address: describe the batch anew
                    return self._rebind(srcs)
                args[pos] = ptr
            go(args)

    def _rebind(self, srcs) -> None:
        if self.resized:  # the bound views no longer describe the copies: the caller must bind anew
            raise UnsupportedPlan("a new source breaks the launch's alignment after a resize; bind anew")
        if self.offsets is not None:
            srcs = [as_view(b, s, off) for b, (s, _), off in zip(srcs, self.plan.pairs, self.offsets)]
        pairs = [(s, d) for s, (_, d) in zip(srcs, self.plan.pairs)]
        self.owner.copy(pairs, self.params)
