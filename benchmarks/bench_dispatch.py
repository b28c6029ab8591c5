"""Tune NSA-like batches in both modes, then measure what the dispatcher adds over a bare launch of the winner.

bare          the winning strategy's own bound launch on the bound addresses (``launch()``): kernel + launcher
bound(srcs)   ``BoundCopy.run(srcs)`` with ``checked=False`` (new source addresses, no checks)
bound+check   ``BoundCopy.run(srcs)`` with the default per-call geometry and overlap checks
batched_copy  ``Dispatcher.copy(pairs)``: validation, signature lookup, launch
All eager, rotating fresh sources, µs per call (median), ratios to 7 × ``copy_`` of the same run.

Usage: python benchmarks/bench_dispatch.py --cache FILE [--bs 1,32,256] [--max-len 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_strategies import SETS, _median_us, nsa_batch

import copytune
from copytune import CopyPlan, Dispatcher, get_strategy


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--bs", default="1,32,256")
    ap.add_argument("--max-len", default="2048")
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    import triton

    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copytune {copytune.__version__}")
    for mode in ("eager", "graph"):
        d = Dispatcher(args.cache, mode=mode)
        for max_len in map(int, args.max_len.split(",")):
            for bs in map(int, args.bs.split(",")):
                dsts, srcs = nsa_batch(bs, max_len)
                pairs = list(zip(srcs[0], dsts))
                t0 = time.perf_counter()
                choice = d.choose(CopyPlan.from_pairs(pairs))
                print(f"tuned {mode:5} bs={bs:<4} max_len={max_len:<5} -> {choice.strategy} {choice.params} "
                      f"({choice.origin}, {time.perf_counter() - t0:.1f} s)")
    d = Dispatcher(args.cache, mode="eager", tune=False)
    print(f"\n{'bs':>4} {'max_len':>7} {'winner':<18} {'7×copy_':>8} {'bare':>7} {'bound(srcs)':>11} "
          f"{'bound+check':>11} {'batched_copy':>12}   overhead bound(srcs)-bare")
    for max_len in map(int, args.max_len.split(",")):
        for bs in map(int, args.bs.split(",")):
            dsts, srcs = nsa_batch(bs, max_len)
            pair_sets = [list(zip(s, dsts)) for s in srcs]
            plan = CopyPlan.from_pairs(pair_sets[0])
            choice = d.choose(plan)
            bare = get_strategy(choice.strategy).bind(plan, choice.params)
            fast = d.bind(pair_sets[0], checked=False)
            checked = d.bind(pair_sets[0])

            def manual(i):
                for s, dd in pair_sets[i % SETS]:
                    dd.copy_(s)
            t = {"manual": _median_us(manual, args.calls),
                 "bare": _median_us(lambda i: bare(), args.calls),
                 "fast": _median_us(lambda i: fast.run(srcs[i % SETS]), args.calls),
                 "checked": _median_us(lambda i: checked.run(srcs[i % SETS]), args.calls),
                 "unbound": _median_us(lambda i: d.copy(pair_sets[i % SETS]), args.calls // 4)}
            print(f"     (dispatcher runner cache: {len(d._runners)} entries)")
            for dd, s in zip(dsts, srcs[(args.calls - 1) % SETS]):
                assert torch.equal(dd, s), "dispatcher copied wrong bytes"
            r = {k: v / t["manual"] for k, v in t.items()}
            print(f"{bs:>4} {max_len:>7} {choice.strategy:<18} {t['manual']:8.2f} {t['bare']:7.2f} {t['fast']:11.2f} "
                  f"{t['checked']:11.2f} {t['unbound']:12.2f}   {t['fast'] - t['bare']:+.2f} µs")
            print(f"{'':>4} {'ratio':>7} {'':<18} {1:8.2f} {r['bare']:7.2f} {r['fast']:11.2f} {r['checked']:11.2f} "
                  f"{r['unbound']:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
