"""Per-step µs of the NSA metadata refresh: ``batched_copy_metadata`` vs the engine's own ``.copy_()`` sequence,
one backend and three (speculative decoding), eager, with the longest sequence growing by one every step as in
real decoding (so the page tables' column counts change every call).

Each step's precomputed set is made ahead (SETS of them, rotated); the timed loop is only the refresh.

Usage: python benchmarks/bench_nsa.py [--bs 1,32,128,256] [--max-len 4096] [--cache FILE]
"""

from __future__ import annotations

import argparse
import sys

import torch

import copytune
from copytune import Dispatcher, nsa
from copytune.tuner import default_timer

SETS = 8


def _time(step, calls: int) -> float:
    return default_timer(step, "eager", torch.device("cuda"), calls=calls, repeats=7)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", default="1,32,128,256")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    import triton

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copytune {copytune.__version__} | eager µs per refresh, max_len {args.max_len}+step, page_size 64")
    d = Dispatcher(args.cache, mode="eager")
    print(f"{'bs':>4} {'backends':>8} {'manual copy_':>12} {'copytune':>9} {'ratio':>6}  winner")
    for bs in map(int, args.bs.split(",")):
        width = args.max_len + SETS + 64
        mds = [nsa.make_example(bs, args.max_len, width, device="cuda", seed=k)[0] for k in range(3)]
        pres = [nsa.make_example(bs, args.max_len + k, width, device="cuda", seed=100 + k)[1] for k in range(SETS)]
        for n in (1, 3):
            targets = mds[:n]

            def manual(i):
                for md in targets:
                    nsa.reference_copy(md, pres[i % SETS])

            def fused(i):  # the engine's call for one backend; the speculative-decoding call for several
                if n == 1:
                    nsa.batched_copy_metadata(targets[0], pres[i % SETS], dispatcher=d)
                else:
                    nsa.batched_copy_metadata_multi(targets, pres[i % SETS], dispatcher=d)
            fused(0)  # bind (and tune) outside the clock
            t_manual, t_fused = _time(manual, args.calls), _time(fused, args.calls)
            last = pres[(args.calls - 1) % SETS]
            for md in targets:  # the destinations hold exactly what the engine's copies write
                for src, dst in nsa.copy_pairs(md, last):
                    assert torch.equal(src, dst), "a destination differs from the engine's copies"
            owner = id(targets[0]) if n == 1 else tuple(map(id, targets))
            binding = nsa._SITE.binding(owner)
            print(f"{bs:>4} {n:>8} {t_manual:12.2f} {t_fused:9.2f} {t_fused / t_manual:6.3f}  "
                  f"{binding.bound.strategy} ({binding.n_copies} copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
