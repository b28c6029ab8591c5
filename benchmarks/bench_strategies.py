"""Per-call µs of every strategy on NSA-like batches, eager and CUDA-graph-replayed, vs ``torch_per_copy``.

The batch is the NSA backend's decode refresh: five ``[bs]`` int32 copies into views of ``[max_bs]`` buffers, one
``[bs]`` into ``cu_seqlens[1:bs+1]`` and the page table ``[bs, max_len]`` into ``page_table_1[:bs, :max_len]`` of
a ``[max_bs, max_pages]`` buffer (2-D strided destination). Sources are rotated among several sets, fresh each
call, as in a serving step.

eager      wall time of N back-to-back bound launches on rotating sources, one synchronize (CPU launch cost counts)
unbound    the same through ``strategy.copy(pairs)``: validation + description + launch per call
graph      K launches captured in one CUDA graph, replayed; CUDA-event time per launch (GPU time)

Usage: python benchmarks/bench_strategies.py [--bs 1,8,32,128,256,512] [--max-len 128,2048] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import copytune
from copytune import CopyPlan
from copytune.tuner import default_timer

MAX_BS, MAX_PAGES, SETS = 512, 8192, 4


def nsa_batch(bs: int, max_len: int, device="cuda"):
    """Destinations (graph-static buffers) and SETS rotating source sets of one NSA decode refresh."""
    i32 = dict(dtype=torch.int32, device=device)
    bufs = [torch.full((MAX_BS,), -1, **i32) for _ in range(5)]
    cu = torch.full((MAX_BS + 1,), -1, **i32)
    pt = torch.full((MAX_BS, MAX_PAGES), -1, **i32)
    dsts = [b[:bs] for b in bufs] + [cu[1:bs + 1], pt[:bs, :max_len]]

    def sources():
        return [torch.randint(1, 1 << 30, tuple(d.shape), **i32) for d in dsts]

    return dsts, [sources() for _ in range(SETS)]


def _median_us(fn, calls: int) -> float:
    """Eager: wall µs per call over ``calls`` back-to-back calls and one synchronize (the tuner's timer)."""
    return default_timer(fn, "eager", torch.device("cuda"), calls=calls, repeats=7)


def _graph_us(fn) -> float:
    """GPU µs per call: 20 calls captured in one CUDA graph, replayed (the tuner's timer)."""
    return default_timer(fn, "graph", torch.device("cuda"), calls=1000, repeats=5)


def verify(strategy, dsts, srcs) -> None:
    for d in dsts:
        d.fill_(-7)
    strategy.bind(CopyPlan.from_pairs(list(zip(srcs[0], dsts))))(srcs[1])
    torch.cuda.synchronize()
    for d, s in zip(dsts, srcs[1]):
        if not torch.equal(d, s):
            raise AssertionError(f"{strategy.name} copied wrong bytes")


def bench_one(strategy, dsts, srcs, calls: int) -> dict:
    verify(strategy, dsts, srcs)
    launch = strategy.bind(CopyPlan.from_pairs(list(zip(srcs[0], dsts))))
    pair_sets = [list(zip(s, dsts)) for s in srcs]
    row = {"eager": _median_us(lambda i: launch(srcs[i % SETS]), calls),
           "unbound": _median_us(lambda i: strategy.copy(pair_sets[i % SETS]), calls // 4)}
    row["graph"] = _graph_us(lambda i: launch(srcs[i % SETS]))
    return row


def manual_copies(dsts, srcs, calls: int) -> dict:
    """7 × ``dst.copy_(src)`` on prebuilt views: the strongest form of the baseline."""
    def step(i):
        for s, d in zip(srcs[i % SETS], dsts):
            d.copy_(s)
    return {"eager": _median_us(step, calls), "graph": _graph_us(step)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", default="1,8,32,128,256,512")
    ap.add_argument("--max-len", default="128,2048")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    card = torch.cuda.get_device_name()
    print(f"# {card} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__} | "
          f"copytune {copytune.__version__}")
    from copytune.kernels import cuda_ext

    try:
        lib, seconds = cuda_ext.build("cuda")
        state = f"built in {seconds:.1f} s" if seconds else "already built"
        print(f"# cuda_ext: {lib.name} ({state})")
    except cuda_ext.BuildError as exc:
        print(f"# cuda_ext unavailable: {exc}")
    names = [n for n, s in copytune.strategies().items() if s.available("cuda") is None]
    results = []
    for max_len in map(int, args.max_len.split(",")):
        for bs in map(int, args.bs.split(",")):
            dsts, srcs = nsa_batch(bs, max_len)
            rows = {"manual_copy_": manual_copies(dsts, srcs, args.calls)}
            for name in names:
                rows[name] = bench_one(copytune.get_strategy(name), dsts, srcs, args.calls)
            results.append({"bs": bs, "max_len": max_len, "rows": rows})
            base = rows["torch_per_copy"]
            print(f"\nbs={bs} max_len={max_len}  (ratio = µs / torch_per_copy µs, same run)")
            print(f"{'strategy':<18} {'eager µs':>9} {'ratio':>6} {'unbound µs':>11} {'ratio':>6} "
                  f"{'graph µs':>9} {'ratio':>6}")
            for name, r in rows.items():
                unb = r.get("unbound")
                print(f"{name:<18} {r['eager']:9.2f} {r['eager'] / base['eager']:6.2f} "
                      + (f"{unb:11.2f} {unb / base['unbound']:6.2f} " if unb else f"{'-':>11} {'-':>6} ")
                      + f"{r['graph']:9.2f} {r['graph'] / base['graph']:6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "triton": triton.__version__,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
