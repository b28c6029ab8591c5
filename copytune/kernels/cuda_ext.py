"""``cuda_ext``: a CUDA C++ kernel (``csrc/``) that copies up to 32 byte ranges per launch, blocks mapped to
(copy, tile), 16-byte vector loads wherever addresses, row lengths and strides allow, descriptors by value in one
``__grid_constant__`` struct.

A cold ``torch.utils.cpp_extension`` build took 45 s on our H100 hosts, so it never happens on a serving path:
``copytune build`` (or ``copytune tune``, or ``build()``) compiles ahead of use into a directory keyed by the source
hash, GPU arch, torch, CUDA and Python versions; later processes import the built module directly (no ninja
run). Until then ``available()`` says which command builds it.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from copytune.kernels.base import (
    BatchRunner,
    BoundLaunch,
    Config,
    Params,
    UnsupportedPlan,
    as_device,
    as_plan,
    int_in,
    launch_error,
)
from copytune.plan import CopyPlan

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("binding.cpp", "batched_copy_kernel.cu")
HEADERS = ("batched_copy.cuh",)
BUILD_COMMAND = "copytune build"
UNROLLS = (4, 1, 2, 8)  # units per thread per tile, compiled in (csrc); the first is the default


class BuildError(RuntimeError):
    """nvcc or the C++ compiler failed; the message starts with the compiler's first error line."""


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def build_key(arch: str) -> str:
    """Hash of everything that makes a build reusable: sources, arch, torch, CUDA and Python versions."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((CSRC / name).read_bytes())
    h.update(f"{arch}|{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


def build_root() -> Path:
    """``$COPYTUNE_BUILD_DIR``, else ``~/.cache/copytune/build`` (beside the winner cache)."""
    if os.environ.get("COPYTUNE_BUILD_DIR"):
        return Path(os.environ["COPYTUNE_BUILD_DIR"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "copytune" / "build"


def _paths(arch: str) -> tuple[str, Path]:
    key = build_key(arch)
    name = f"copytune_cuda_{key}"
    return name, build_root() / f"{name}_sm{arch}"


_modules: dict[str, object] = {}


def load(device: torch.device):
    """The built extension for ``device``'s arch, imported without compiling; None if not built."""
    arch = _arch(device)
    if arch in _modules:
        return _modules[arch]
    name, folder = _paths(arch)
    lib = folder / f"{name}.so"
    if not lib.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, lib, loader=importlib.machinery.ExtensionFileLoader(name,
                                                                                                           str(lib)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _modules[arch] = module
    return module


def build(device: torch.device | str = "cuda", verbose: bool = False) -> tuple[Path, float]:
    """Compile the extension for ``device``'s arch (a no-op when already built); returns (library, seconds)."""
    from torch.utils import cpp_extension  # noqa: PLC0415 - heavy import, cold path only

    device = torch.device(device)
    arch = _arch(device)
    name, folder = _paths(arch)
    lib = folder / f"{name}.so"
    if lib.exists():
        return lib, 0.0
    if cpp_extension.CUDA_HOME is None:
        raise BuildError("no CUDA toolkit (nvcc) found: set CUDA_HOME")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "FAILED").unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=name, sources=[str(CSRC / s) for s in SOURCES], build_directory=str(folder), verbose=verbose,
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
            extra_ldflags=["-ldl"],  # dlopen of the loaded libcuda (glibc before 2.34 keeps it in libdl)
        )
    except Exception as exc:  # noqa: BLE001 - record why, so available() can say it without rebuilding
        first = next((ln for ln in str(exc).splitlines() if "error" in ln.lower()), str(exc).splitlines()[0])
        (folder / "FAILED").write_text(first.strip())
        raise BuildError(first.strip()) from exc
    _modules[arch] = module
    return lib, time.perf_counter() - t0


class CudaExt:
    name = "cuda_ext"
    serves_cpu = False

    def available(self, device) -> str | None:
        device = as_device(device)
        if device.type != "cuda":
            return f"needs a CUDA device, not {device.type}"
        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        try:
            if load(device) is not None:
                return None
        except ImportError as exc:
            return f"built extension failed to import: {exc}"
        from torch.utils import cpp_extension  # noqa: PLC0415

        _, folder = _paths(_arch(device))
        if (folder / "FAILED").exists():
            return f"nvcc build failed: {(folder / 'FAILED').read_text()}"
        if cpp_extension.CUDA_HOME is None:
            return "no CUDA toolkit (nvcc) found"
        return f"not built for sm_{_arch(device)} with torch {torch.__version__}: run `{BUILD_COMMAND}`"

    def supports(self, plan: CopyPlan) -> bool:
        return (plan.device is not None and plan.device.type == "cuda" and plan.first_non_rowwise() is None
                and self.available(plan.device) is None)

    def candidates(self, plan: CopyPlan) -> list[Params]:
        """Tile shapes (units per thread; 256 threads a block); the vector width is chosen per copy in C++."""
        return [Config(unroll=u) for u in UNROLLS]

    def validate_params(self, params: Params) -> str | None:
        """``{"unroll": u}`` with u one of UNROLLS, or ``{}`` (entries of the first version: the default)."""
        if set(params) - {"unroll"}:
            return f"cuda_ext takes only 'unroll', got {sorted(params)}"
        if "unroll" in params and not int_in(params["unroll"], UNROLLS):
            return f"cuda_ext: unroll must be one of {UNROLLS}, got {params['unroll']!r}"
        return None

    def bind(self, plan: CopyPlan, params: Params | None = None):
        unroll = (params or {}).get("unroll", UNROLLS[0])
        if unroll not in UNROLLS:  # e.g. an entry from an imported cache of another version
            raise UnsupportedPlan(f"cuda_ext: unroll must be one of {UNROLLS}, got {unroll!r}")
        module = self._module(plan)
        live = [i for i, d in enumerate(plan.descs) if d.nbytes]
        flat = [v for i in live for v in _raw(plan.descs[i])]
        batch = module.BoundBatch(flat, plan.device.index, unroll)
        if batch.error():  # the C++ side checks the description again (its constructor never throws)
            raise UnsupportedPlan(batch.error())
        return BoundCuda(batch, None if len(live) == len(plan.descs) else live, module)

    def runner(self, plan: CopyPlan, params: Params | None = None) -> BatchRunner:
        bound = self.bind(plan, params)
        if bound.live is not None:  # empty copies are not in the kernel's list: the pairs' own order differs
            return lambda pairs=None: bound()
        return BatchRunner(bound.batch, bound.module)

    def copy(self, plan_or_pairs, params: Params | None = None) -> None:
        self.bind(as_plan(plan_or_pairs), params)()

    def _module(self, plan: CopyPlan):
        reason = self.available(plan.device) if plan.device is not None else "empty batch"
        if reason is None and plan.first_non_rowwise() is not None:
            i = plan.first_non_rowwise()
            reason = f"pair {i} does not reduce to rows of contiguous bytes (shape {tuple(plan.pairs[i][1].shape)})"
        if reason is not None:
            raise UnsupportedPlan(f"cuda_ext: {reason}")
        return load(plan.device)


def _raw(d) -> tuple[int, int, int, int, int, int]:
    return d.src, d.dst, d.rows, d.row_bytes, d.src_row_stride, d.dst_row_stride


class BoundCuda(BoundLaunch):
    """``()`` relaunches on the bound addresses; ``(srcs)`` hands the new source tensors to C++, which reads their
    addresses and re-derives vector widths (a misaligned new source simply gets narrower loads) for that call
    only: a later ``()`` copies the bound sources again, as every strategy's launch does."""

    strategy = "cuda_ext"

    def __init__(self, batch, live: list[int] | None, module):
        self.batch, self.live, self.module = batch, live, module
        self.checks_sources = False
        self._sequence = _fast(batch, "run_sequence") if live is None else None  # METH_O: no pybind11 parse

    def __call__(self, srcs=None) -> None:
        if srcs is None:
            err = self.batch.run()
        elif self._sequence is not None:
            err = self._sequence(srcs if isinstance(srcs, (list, tuple)) else list(srcs))
        else:
            err = self.batch.run_sources(srcs if self.live is None else [srcs[i] for i in self.live])
        if err:
            raise launch_error(err)

    def set_shape(self, i: int, rows: int, row_bytes: int, src_stride: int, dst_stride: int) -> bool:
        """Copy ``i`` now moves ``rows`` rows of ``row_bytes`` bytes with these row strides (bytes); False if it
        was empty when bound (not in the kernel's list), so the caller must bind anew."""
        j = i if self.live is None else (self.live.index(i) if i in self.live else -1)
        return j >= 0 and not self.batch.set_shape(j, rows, row_bytes, src_stride, dst_stride)

    def follow_source_shape(self, i: int, max_row_bytes: int, itemsize: int) -> bool:
        """From now on copy ``i`` takes its columns and source row stride from each new (2-D) source tensor, read
        in C++ on every run; more than ``max_row_bytes`` per row raises before the launch."""
        j = i if self.live is None else (self.live.index(i) if i in self.live else -1)
        return j >= 0 and not self.batch.follow_source_shape(j, max_row_bytes, itemsize)

    def sources_launcher(self):
        """A plain CPython function into C++ taking the new sources (a list or tuple) when no copy was empty (the
        module never throws, see binding.cpp); it returns None or the error message."""
        if self.live is not None:
            return super().sources_launcher()
        if self._sequence is not None:
            return self._sequence
        run = self.batch.run_sources
        return lambda srcs: run(srcs) or None

    def checked_launcher(self):
        """The checked call in C++ (``run_checked``): source geometry against the bound one, and source extents
        against the destinations' (binary search); None from a build without it or with empty copies."""
        if self.live is not None or not self.checks_sources:
            return None
        fast = _fast(self.batch, "run_checked")
        self.maybe_overlap = self.module.MAYBE_OVERLAP  # the build is keyed by these sources: it has it
        return fast

    def attribute_launcher(self, names: list[str] | list[int]):
        """A callable taking one object whose attributes ``names`` (one per copy; or int indices into it, a tuple
        or list) are the new sources, read in C++, each distinct one once; it returns an error message or ""
        (no Python frame, no tuple of tensors per call). The batch reads its sources the way last asked: one
        launcher per launch."""
        names = names if self.live is None else [names[i] for i in self.live]
        if all(isinstance(n, int) for n in names):
            err = self.batch.set_source_items(names)
        elif all(isinstance(n, str) for n in names):
            err = self.batch.set_source_attrs(names)
        else:
            return None  # a mix: the caller reads them
        if err:
            raise RuntimeError(err)
        fast = _fast(self.batch, "run_attrs")
        if fast is not None:
            return fast
        run = self.batch.run_attrs
        return lambda obj: run(obj) or None

    def seam_table(self, step_var, values, present):
        """The C++ SeamTable (binding.cpp): entries are this module's run_attrs entry points."""
        return self.module.SeamTable(step_var, list(values), list(present))

    def expect_sources(self, samples: list) -> bool:
        """Every later source must have its sample's device, dtype, shape and strides (a followed page table: 2-D,
        the bound rows, unit column stride), checked in C++ before each launch."""
        err = self.batch.expect_sources(samples if self.live is None else [samples[i] for i in self.live])
        if err:
            raise RuntimeError(err)
        self.checks_sources = True
        return True

    def set_source_offsets(self, offsets: list[int]) -> bool:
        """Later ``(srcs)`` calls pass base tensors: copy i reads from ``srcs[i].data_ptr() + offsets[i]``."""
        err = self.batch.set_source_offsets(offsets if self.live is None else [offsets[i] for i in self.live])
        if err:
            raise RuntimeError(err)
        return True


def _fast(batch, which: str):
    """``batch``'s METH_O entry point ``which`` (0.70 µs less per call than the pybind11 method on the H200 host),
    or None from a build without it."""
    make = getattr(batch, "fast", None)
    return None if make is None else make(which)


STRATEGY = CudaExt()
