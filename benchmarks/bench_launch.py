"""What one kernel launch costs from Python on this host, by launch path: the floor under every eager refresh.

Rows (µs per call, back-to-back calls, one synchronize; empty kernel with a 2 KiB ``__grid_constant__`` struct,
as cuda_ext's): a pybind call doing nothing; the runtime's ``<<<>>>`` on torch's current stream (cuda_ext's
path); the same on a stream handle passed in; ``cudaLaunchKernel`` with a prebuilt argument array; the driver's
``cuLaunchKernel`` on a cached ``CUfunction``. Built with ``load_inline`` (a measurement, not a strategy).

Usage: python benchmarks/bench_launch.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime.h>

struct P { char b[2048]; };
__global__ void empty_kernel(const __grid_constant__ P p) {}

static P params;
static CUfunction function = nullptr;

int64_t noop() { return 0; }
int64_t runtime_current_stream() {
  empty_kernel<<<1, 32, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(params);
  return 0;
}
int64_t runtime_given_stream(int64_t stream) {
  empty_kernel<<<1, 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(params);
  return 0;
}
int64_t runtime_launch_kernel(int64_t stream) {
  static void* args[] = {&params};
  return cudaLaunchKernel(reinterpret_cast<const void*>(&empty_kernel), dim3(1), dim3(32), args, 0,
                          reinterpret_cast<cudaStream_t>(stream));
}
int64_t driver_launch(int64_t stream) {
  if (function == nullptr) {
    cudaFunction_t f;
    if (cudaGetFuncBySymbol(&f, reinterpret_cast<const void*>(&empty_kernel)) != cudaSuccess) return -1;
    function = reinterpret_cast<CUfunction>(f);
  }
  static void* args[] = {&params};
  return cuLaunchKernel(function, 1, 1, 1, 32, 1, 1, 0, reinterpret_cast<CUstream>(stream), args, nullptr);
}
"""
CPP = """
int64_t noop(); int64_t runtime_current_stream(); int64_t runtime_given_stream(int64_t);
int64_t runtime_launch_kernel(int64_t); int64_t driver_launch(int64_t);
"""
FUNCTIONS = ["noop", "runtime_current_stream", "runtime_given_stream", "runtime_launch_kernel", "driver_launch"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    mod = load_inline("copytune_bench_launch", CPP, cuda_sources=SOURCE, functions=FUNCTIONS,
                      extra_ldflags=["-lcuda"], verbose=False)
    stream = torch.cuda.current_stream().cuda_stream
    rows = {"pybind call, no work": lambda: mod.noop(),
            "<<<>>>, torch's current stream (cuda_ext)": lambda: mod.runtime_current_stream(),
            "<<<>>>, stream handle passed in": lambda: mod.runtime_given_stream(stream),
            "cudaLaunchKernel, prebuilt args": lambda: mod.runtime_launch_kernel(stream),
            "cuLaunchKernel, cached CUfunction": lambda: mod.driver_launch(stream)}
    assert mod.runtime_launch_kernel(stream) == 0 and mod.driver_launch(stream) == 0
    times = {name: [] for name in rows}
    for _ in range(7):  # round-robin: a slow phase of the host hits every row alike
        for name, fn in rows.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda})")
    for name, ts in times.items():
        print(f"{name:45s} {statistics.median(ts):6.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
