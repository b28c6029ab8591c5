"""copytune against a reproduction of the serving engine's own fused metadata-copy kernel, same shapes, same run.

The reference (``copytune.reference``) follows the engine's design as DESIGN.md describes it: one launch, a
grid-stride loop over each copy in turn, 256 threads a block, grid <= 1024 blocks, parameters in a
``__grid_constant__`` struct, int32 only, tensors handed to C++. Built with ``load_inline`` (a benchmark, not a
strategy).

Prints eager µs (rotating fresh sources, CPU launch cost included) and GPU µs (CUDA-graph replay) for the NSA
decode batch of ``bench_strategies.py``: 7 × ``copy_``, the reference kernel, and copytune's bound ``cuda_ext``.

Usage: python benchmarks/bench_reference.py [--bs 1,32,256,512] [--max-len 2048]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_strategies import SETS, _graph_us, _median_us, nsa_batch  # noqa: E402

from copytune import CopyPlan, get_strategy, reference  # noqa: E402
from copytune.kernels import cuda_ext  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", default="1,32,256,512")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    ref = reference.load()
    cuda_ext.build("cuda")
    strategy = get_strategy("cuda_ext")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | NSA decode batch, max_len {args.max_len}")
    print(f"{'bs':>4} {'7×copy_ eager':>13} {'engine eager':>12} {'cuda_ext eager':>14} {'vs engine':>9} | "
          f"{'7×copy_ gpu':>11} {'engine gpu':>10} {'cuda_ext gpu':>12} {'vs engine':>9}")
    for bs in map(int, args.bs.split(",")):
        dsts, srcs = nsa_batch(bs, args.max_len)
        bound = strategy.bind(CopyPlan.from_pairs(list(zip(srcs[0], dsts))))
        for d in dsts:
            d.fill_(-7)
        ref.launch(srcs[1], dsts)
        torch.cuda.synchronize()
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs[1])), "reference copied wrong bytes"

        def manual(i):
            for s, d in zip(srcs[i % SETS], dsts):
                d.copy_(s)
        steps = {"manual": manual, "engine": lambda i: ref.launch(srcs[i % SETS], dsts),
                 "ours": lambda i: bound(srcs[i % SETS])}
        eager = {k: _median_us(f, args.calls) for k, f in steps.items()}
        gpu = {k: _graph_us(f) for k, f in steps.items()}
        print(f"{bs:>4} {eager['manual']:13.2f} {eager['engine']:12.2f} {eager['ours']:14.2f} "
              f"{eager['ours'] / eager['engine']:8.2f}× | {gpu['manual']:11.2f} {gpu['engine']:10.2f} "
              f"{gpu['ours']:12.2f} {gpu['ours'] / gpu['engine']:8.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
