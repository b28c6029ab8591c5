"""Launching compiled Triton kernels without Triton's per-call specialisation path.

Triton's normal ``kernel[grid](...)`` path binds and hashes every argument on each call: 30–39 µs with 24–48
arguments on an H100 (torch 2.11, triton 3.6), against 7.7 µs for the same compiled kernel called through its
precompiled launcher with integer arguments. That launcher (``CompiledKernel.run``) is internal API whose
argument list changes between releases, so it is probed once per process on a scratch copy, checked bit-exact,
and the normal path is used with a one-time warning when no known form works. Under ``TRITON_INTERPRET=1``
every launch takes the interpreter's normal path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from copytune.log import logger

INTERPRET = triton.runtime.interpreter.InterpretedFunction if hasattr(triton.runtime, "interpreter") else ()


def interpreting(fn) -> bool:
    """True when ``fn`` was decorated under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors too)."""
    return bool(INTERPRET) and isinstance(fn, INTERPRET)


@triton.jit(do_not_specialize=["src", "dst", "n"])
def _probe_kernel(src: tl.int64, dst: tl.int64, n: tl.int64, UNIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst.to(tl.pointer_type(UNIT)) + offs, tl.load(src.to(tl.pointer_type(UNIT)) + offs, mask=mask), mask=mask)


def _compile(fn, device: torch.device, grid3, args, num_warps: int, constexprs: dict):
    """Compile without launching (binding a batch must not copy yet) and load the binary on ``device``."""
    with torch.cuda.device(device):
        ck = fn.warmup(*args, grid=grid3, num_warps=num_warps, **constexprs)
        ck._init_handles()
    return ck


def _direct_forms(ck) -> list[Callable[..., None]]:
    """Call forms of ``CompiledKernel.run`` known from Triton 3.2–3.9, most likely first."""
    from triton import knobs

    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    run, fn, meta = ck.run, ck.function, ck.packed_metadata

    def with_constexprs(g, stream, args, constexprs):
        run(g[0], g[1], g[2], stream, fn, meta, None, enter, leave, *args, *constexprs)

    def without_constexprs(g, stream, args, constexprs):
        run(g[0], g[1], g[2], stream, fn, meta, None, enter, leave, *args)

    return [with_constexprs, without_constexprs]


_direct_form_index: int | None = None  # which of _direct_forms works in this process; -1: none
_warned = False


def _probe_direct(device: torch.device) -> int:
    """Find the working direct-launch form on a scratch copy; -1 when none copies bit-exactly."""
    global _direct_form_index
    if _direct_form_index is not None:
        return _direct_form_index
    _direct_form_index = -1
    src = torch.randint(-(2**31), 2**31 - 1, (1000,), dtype=torch.int32, device=device)
    try:
        ck = _compile(_probe_kernel, device, (4, 1, 1), (0, 0, 0), 4, {"UNIT": tl.int32, "BLOCK": 256})
        forms = _direct_forms(ck)
    except Exception as exc:  # noqa: BLE001
        _warn_once(f"{type(exc).__name__}: {exc}")
        return -1
    for i, form in enumerate(forms):
        dst = torch.full_like(src, -7)
        try:
            with torch.cuda.device(device):
                form((4, 1, 1), _raw_stream(device.index), (src.data_ptr(), dst.data_ptr(), src.numel()),
                     (tl.int32, 256))
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - a wrong form raises TypeError from the launcher's argument parser
            continue
        if torch.equal(src, dst):
            _direct_form_index = i
            return i
    _warn_once("no known CompiledKernel.run form copied the probe exactly")
    return -1


def _warn_once(why: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning("copytune: Triton %s's compiled launcher is not usable (%s); using the normal call path "
                       "(slower launches)", triton.__version__, why)


def _raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


class TritonLauncher:
    """Launches one ``@triton.jit`` kernel with a fixed argument layout: integer scalars, then constexprs."""

    def __init__(self, fn):
        self.fn = fn
        params = inspect.signature(fn.fn).parameters.values()
        self.constexpr_names = [p.name for p in params if "constexpr" in str(p.annotation)]
        self._compiled: dict[tuple, object] = {}
        self._bound: dict[tuple, Callable] = {}  # one launcher closure per (device, warps, constexprs, grid)

    def bind(self, device: torch.device, grid: Sequence[int], constexprs: dict, num_warps: int,
             example_args: Sequence[int]) -> Callable[[Sequence[int]], None]:
        """A callable ``go(args)`` that launches ``grid`` with new scalar args and nothing else per call.

        Compiles a new specialisation here (``example_args`` give the argument types), never in ``go``.
        """
        fn, cvals = self.fn, tuple(constexprs[n] for n in self.constexpr_names)
        grid3 = (tuple(grid) + (1, 1))[:3]
        if interpreting(fn) or device.type != "cuda":
            return lambda args: fn[grid3](*args, num_warps=num_warps, **constexprs)
        key = (device.index, num_warps, cvals, grid3)
        go = self._bound.get(key)
        if go is None:
            go = self._bound[key] = self._make(fn, device, grid3, constexprs, cvals, num_warps, example_args)
        return go

    def _make(self, fn, device, grid3, constexprs, cvals, num_warps, example_args):
        ck_key = (device.index, num_warps, cvals)
        ck = self._compiled.get(ck_key)
        if ck is None:
            ck = self._compiled[ck_key] = _compile(fn, device, grid3, example_args, num_warps, constexprs)
        form = _probe_direct(device)
        if form < 0:
            return lambda args: _normal_launch(fn, device, grid3, args, num_warps, constexprs)
        direct, index = _direct_forms(ck)[form], device.index

        def go(args: Sequence[int]) -> None:
            if torch.cuda.current_device() == index:
                direct(grid3, _raw_stream(index), args, cvals)
            else:
                with torch.cuda.device(index):
                    direct(grid3, _raw_stream(index), args, cvals)

        return go


def _normal_launch(fn, device, grid3, args, num_warps, constexprs) -> None:
    with torch.cuda.device(device):
        fn[grid3](*args, num_warps=num_warps, **constexprs)
