"""The tuning key: device fingerprint + bucketed shape signature + launch mode, hashed in one place.

Rows and columns are rounded up to a power of two so that bs=100 and bs=120 share a tuned entry; itemsize,
layout and alignment stay exact because they change which kernel variant runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform

import torch

from copytune.plan import CopyPlan, pow2_align

MODES = ("eager", "graph")


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _versions() -> dict:
    from copytune import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "copytune": __version__}


def _driver_version() -> int | None:
    try:
        out = ctypes.c_int()
        return out.value if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(out)) == 0 else None
    except OSError:
        return None


@functools.cache
def _fingerprint(device_type: str, index: int | None) -> tuple:
    if device_type == "cuda":
        p = torch.cuda.get_device_properties(index)
        fp = {"kind": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
              "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30),
              "driver": _driver_version(), "cuda_runtime": torch.version.cuda}
    else:
        # CPU (interpreter) timings live under their own fingerprint, so they can never be applied to a GPU.
        fp = {"kind": device_type, "machine": platform.machine(), "cpus": os.cpu_count(),
              "interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    return tuple(sorted({**fp, **_versions()}.items()))


def device_fingerprint(device: torch.device | str) -> dict:
    """GPU name, capability, SM count, memory, driver and CUDA runtime, torch/triton/copytune versions."""
    device = torch.device(device)
    index = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    return dict(_fingerprint(device.type, index))


def _address_align(d) -> int:
    """Alignment of a copy's addresses and row strides, not of its length: lengths vary inside a bucket."""
    return pow2_align(d.src, d.dst, *((d.src_row_stride, d.dst_row_stride) if d.rows > 1 else ()))


def shape_signature(plan: CopyPlan) -> list[list]:
    """Per copy: itemsize, layout, bucketed rows and columns, alignment of its addresses and row strides."""
    sig = []
    for d in plan.descs:
        layout = "nd" if not d.rowwise else "1d" if d.rows <= 1 else "strided" if d.row_bytes == d.itemsize else "2d"
        cols = d.row_bytes // d.itemsize if d.rowwise else d.numel
        sig.append([d.itemsize, layout, bucket(d.rows), bucket(cols), _address_align(d)])
    return sig


def make_key(fingerprint: dict, signature: list, mode: str) -> str:
    """Stable hash of the readable parts; the parts themselves are stored beside it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    blob = json.dumps([fingerprint, signature, mode], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def describe_signature(signature: list) -> str:
    """'7 copies: 6×1d[32]i4, 2d[32×2048]i4' — the signature in words for tables."""
    groups: dict[str, int] = {}
    for itemsize, layout, rows, cols, _ in signature:
        shape = f"{rows}×{cols}" if layout == "2d" else f"{rows * cols}" if layout == "strided" else f"{cols}"
        text = f"{layout}[≤{shape}]×{itemsize}B"
        groups[text] = groups.get(text, 0) + 1
    parts = [f"{n}×{text}" if n > 1 else text for text, n in groups.items()]
    return f"{len(signature)} copies: " + ", ".join(parts)
