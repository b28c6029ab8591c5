"""Probe: GPU time of variants of the NSA page-table copy (int32 rows, contiguous source, strided destination)
against the shipped ``cuda_ext`` kernel and an engine-like loop, and host µs of ways to launch a kernel. A
research tool for choosing kernel changes by measurement (results in benchmarks/RESULTS.md); needs a GPU.

Usage: python benchmarks/probe_kernels.py [--sizes 128x8193,256x8193] [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils import cpp_extension

from copytune import tuner

HERE = Path(__file__).parent
CSRC = HERE.parent / "copytune" / "kernels" / "csrc"
VARIANTS = [("shipped", 1), ("shipped", 2), ("shipped", 4), ("shipped_flat", 1), ("shipped_flat", 2), ("lite", 1),
            ("lite", 2), ("lite_nosearch", 1), ("lite_value", 1), ("lite_static", 1), ("engine", 0), ("row1", 0),
            ("row2", 0), ("row1x512", 0), ("row1x128", 0), ("aligned", 0), ("persistent", 132 * 4),
            ("persistent", 132 * 8), ("memcpy2d", 0)]
LAUNCHES = ["runtime_small", "driver_small", "runtime_big", "driver_big", "driver_big_buffer", "runtime_7_copies",
            "driver_7_copies", "shipped_7_copies", "stream_lookup_only"]


def build():
    arch = "".join(map(str, torch.cuda.get_device_capability()))
    return cpp_extension.load(
        name="copytune_probe", sources=[str(HERE / "probe_kernels.cu")],
        extra_include_paths=[str(CSRC)], extra_ldflags=["-lcuda"],
        extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"])


def graph_us(fn) -> float:
    """GPU µs per call, the tuner's graph timer (20 calls captured in one CUDA graph, replayed), one sample: the
    probe's own rounds repeat it round-robin."""
    return tuner.default_timer(lambda i: fn(), "graph", torch.device("cuda"), calls=1000)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launch-only", action="store_true")
    ap.add_argument("--sizes", default="32x8193,128x8193,256x8193,512x8193,128x8192,1024x1025,256x1025")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    mod = build()
    card = torch.cuda.get_device_name()
    print(f"# {card} | torch {torch.__version__} (CUDA {torch.version.cuda})")
    results = {"card": card, "torch": torch.__version__, "copy": {}, "launch": {}}
    for size in [] if args.launch_only else args.sizes.split(","):
        rows, cols = map(int, size.split("x"))
        width = -(-(cols + 64) // 4) * 4
        dst_buf = torch.empty(rows, width, dtype=torch.int32, device="cuda")
        dst = dst_buf[:, :cols]
        src = torch.randint(-(1 << 30), 1 << 30, (rows, cols), dtype=torch.int32, device="cuda")
        times = {f"{v}:{p}": [] for v, p in VARIANTS}
        for v, p in VARIANTS:  # exact first, into a poisoned buffer
            dst_buf.fill_(-7)
            mod.launch(v, p, src, dst_buf)
            torch.cuda.synchronize()
            assert torch.equal(dst, src) and bool((dst_buf[:, cols:] == -7).all()), f"{v}:{p} wrong at {size}"
        for _ in range(args.rounds):
            for v, p in VARIANTS:
                times[f"{v}:{p}"].append(graph_us(lambda v=v, p=p: mod.launch(v, p, src, dst_buf)))
        med = {k: statistics.median(t) for k, t in times.items()}
        base = med["shipped:2"]
        print(f"\n{size} int32 ({src.numel() * 4 / 2**20:.2f} MiB), GPU µs per call (graph replay)")
        for k, us in med.items():
            print(f"  {k:<18} {us:7.2f}  x{us / base:.3f}  {2 * src.numel() * 4 / us / 1e3:6.0f} GB/s")
        results["copy"][size] = med
    print("\nhost µs per launch (5000 back-to-back, C++ loop; median of 15 round-robin rounds)")
    costs = {how: [] for how in LAUNCHES}
    for _ in range(15):  # round-robin: a shared host's slow phases fall on every row alike
        for how in LAUNCHES:
            costs[how].append(mod.launch_cost(how, 5000))
    for how, ts in costs.items():
        results["launch"][how] = statistics.median(ts)
        print(f"  {how:<20} {statistics.median(ts):6.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
