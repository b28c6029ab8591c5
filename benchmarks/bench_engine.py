"""copytune against the real engine's own metadata refresh, same run, same card (``copytune.engine_bench``; the
same as ``copytune bench --engine VERSION``, without the strategy sweep).

Usage: python benchmarks/bench_engine.py [--version 0.5.23] [--bs 1,32,128,256] [--max-len 1024,8192]
                                         [--backends 2,3,4,6] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from copytune import engine_bench, nsa


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="0.5.23")
    ap.add_argument("--bs", default="1,32,128,256")
    ap.add_argument("--max-len", default="1024,8192")
    ap.add_argument("--backends", default="2,3,4,6")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    t0 = time.perf_counter()
    results = engine_bench.run(args.version, ints(args.bs), ints(args.max_len), ints(args.backends),
                               torch.device("cuda"), progress=lambda line: print(line, flush=True))
    print("#", results["header"])
    print(f"# {time.perf_counter() - t0:.0f} s; {nsa.stats().line()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
