"""Serving-grade tuning against the real engine's buffers (sglang via ``copytune.sglang_oracle``), on this GPU:

1. start-up: what the capture hook adds to the engine's start-up per captured batch size (``nsa.prepare`` through
   the patched capture method), decode and target_verify, the first one cold (compiles), then warm;
2. a signature first met on a serving step (another page-table width): the step's latency with tuning ``inline``
   vs ``deferred``, the real tuner slowed on purpose by ``--slow`` seconds per timing round, then the steps while
   the deferred tune runs and after its winner is adopted;
3. the operator's log lines (INFO) the integration prints on the way.

Usage: python benchmarks/bench_startup.py [--version 0.5.23] [--bs 1,2,4,...] [--slow 0.05] [--json F]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from copytune import Dispatcher, dispatch, engine_bench, log, nsa, sglang_oracle, tuner

GRAPH_BS = "1,2,4,8,12,16,24,32,48,64,96,128,160,192,256"  # a serving engine's usual CUDA-graph batch sizes
WIDTH = 8192  # page-table columns of the graph buffers (the engine's max context length, scaled down)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")
        print("  log:", self.lines[-1], file=sys.stderr)


def startup(engine, bs_list, mode: str, cache: Path) -> list[dict]:
    d = Dispatcher(cache, tuning="deferred")
    dispatch._default = {"eager": d}
    cls, backend, capture = engine.capturing_backend(bs_list, mode=mode, device="cuda", max_context_len=WIDTH)
    nsa.install(cls)
    rows = []
    try:
        for bs in bs_list:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            capture(bs)
            rows.append({"mode": mode, "bs": bs, "ms": (time.perf_counter() - t0) * 1e3,
                         "keys": len([c for c in d._table.values() if c.origin == "tuned"])})
            print(f"start-up {mode:<13} bs {bs:>4}: {rows[-1]['ms']:8.1f} ms  (keys tuned so far {rows[-1]['keys']})")
    finally:
        nsa.uninstall()
    return rows


def new_signature(engine, tuning: str, slow_s: float, cache: Path) -> dict:
    """A backend tuned at start-up (width 4096) meets a step of 1000 columns: a key nobody tuned."""
    def slowed(step, mode, device):
        time.sleep(slow_s)
        return tuner.default_timer(step, mode, device)
    bs = 32
    d = Dispatcher(cache, tuning=tuning, timer=slowed)
    dispatch._default = {"eager": d}
    cls, backend, capture = engine.capturing_backend([bs], device="cuda", max_context_len=WIDTH)
    nsa.install(cls)
    try:
        capture(bs)  # start-up (slowed too)
        d.wait_tuned()
        md = backend.decode_cuda_graph_metadata[bs]
        seam = engine_bench.seam(engine, backend)
        fm = engine.forward_mode("decode")
        pres = [engine.make_precomputed(bs, "decode", 1000 + 4 * k, device="cuda", seed=k) for k in range(8)]

        def step(k: int) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            seam(bs, md, pres[k % len(pres)], fm)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e6
        first = step(0)
        during = [step(k) for k in range(1, 41)]
        pending = d._background.pending() if d._background is not None else 0
        t0 = time.perf_counter()
        d.wait_tuned()
        waited = time.perf_counter() - t0
        after = [step(k) for k in range(41, 81)]
        for src, dst in nsa.copy_pairs(md, pres[80 % len(pres)], fm):
            assert torch.equal(src, dst), "a refresh differs from the engine's copies"
        choice = nsa._SITE.binding(id(md)).bound.choice
        out = {"tuning": tuning, "slow_s": slow_s, "first_step_us": first,
               "during_median_us": statistics.median(during), "pending_after_40_steps": pending,
               "background_left_s": waited, "after_median_us": statistics.median(after),
               "winner": f"{choice.strategy} {choice.params} ({choice.origin})"}
        print(f"new signature, {tuning:<8}: first step {first:10.1f} us, next 40 median {out['during_median_us']:.1f}"
              " us"
              f" ({pending} key(s) still tuning), after adoption {out['after_median_us']:.1f} us, {out['winner']}")
        return out
    finally:
        nsa.uninstall()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="0.5.23")
    ap.add_argument("--bs", default=GRAPH_BS)
    ap.add_argument("--slow", type=float, default=0.05, help="seconds added to every timing round")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    lines = Lines()
    log.logger.addHandler(lines)
    log.logger.setLevel(logging.INFO)
    engine = sglang_oracle.load(args.version)
    bs_list = [int(x) for x in args.bs.split(",")]
    tmp = Path(tempfile.mkdtemp())
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "engine": args.version,
               "startup": [], "new_signature": []}
    for mode in ("decode", "target_verify"):
        results["startup"] += startup(engine, bs_list, mode, tmp / f"startup-{mode}.db")
    for mode in ("decode", "target_verify"):
        ms = [r["ms"] for r in results["startup"] if r["mode"] == mode]
        print(f"start-up {mode}: first bs {ms[0]:.0f} ms (cold), then median {statistics.median(ms[1:]):.0f} ms per "
              f"batch size, {sum(ms) / 1e3:.2f} s for {len(ms)} batch sizes")
    for tuning in ("inline", "deferred"):
        results["new_signature"].append(new_signature(engine, tuning, args.slow, tmp / f"{tuning}.db"))
    results["log"] = lines.lines
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
