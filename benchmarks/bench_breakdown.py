"""Where the eager µs of one metadata refresh go: each layer of the call timed alone, floors first.

Every row is the wall time per call of 400 back-to-back calls and one synchronize (the tuner's eager timer), the
median of 9 rounds in which every row is timed once (round-robin: a slow phase of the host hits all rows alike);
a "+" row minus the row above it is what that layer adds. Floors come from ``copytune.reference`` (a call through
torch's inline-extension bindings, the same parsing 6 tensors, an empty kernel launched with 8 B to 2 KiB of
parameters). The copytune rows go from the bare C++ launch of the bound winner up to the public call, for the NSA
decode refresh (page-table width growing every step, as in decoding) and for the generic ``batched_copy`` /
``BoundCopy.run`` paths. The last table is GPU time alone (CUDA-graph replay): launch floors, and page tables
(``--gpu-sizes``; by default 2 MiB with 16-, 4- and 8-byte units: 1024, 1025, 1026 columns) for every tile shape
beside torch's ``copy_`` of the same, with the bandwidth each gets.

Usage: python benchmarks/bench_breakdown.py [--bs 32,256] [--max-len 128,2048,8192] [--only generic,multi]
       [--backends 3,4] [--gpu-sizes 512x1024,1024x8193] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_strategies import SETS, _graph_us, nsa_batch  # noqa: E402

import copytune  # noqa: E402
from copytune import Dispatcher, benchmark, nsa, reference  # noqa: E402
from copytune.dispatch import set_default_dispatcher  # noqa: E402
from copytune.kernels import cuda_ext  # noqa: E402


def nsa_rows(bs: int, max_len: int, ref) -> list[tuple[str, float]]:
    d = Dispatcher(None, mode="eager", strategy="cuda_ext")
    width = max_len + SETS + 64
    md = nsa.make_example(bs, max_len, width, device="cuda", seed=1)[0]
    pres = [nsa.make_example(bs, max_len + k, width, device="cuda", seed=100 + k)[1] for k in range(SETS)]
    nsa.batched_copy_metadata(md, pres[0], dispatcher=d)
    binding = nsa._SITE.binding(id(md))
    previous = set_default_dispatcher(d)  # the seam's step serves the default dispatcher's bindings
    nsa.batched_copy_metadata(md, pres[0])
    step = nsa._SITE.step if nsa._SITE.step(md, pres[1], "decode") else None  # None: no seam table here
    sources = [binding.get_sources(p) for p in pres]
    batch = binding.bound._launch.batch if hasattr(binding.bound._launch, "batch") else None
    views = [[s for s, _ in nsa.copy_pairs(md, p)] for p in pres]
    dsts = [dst for _, dst in nsa.copy_pairs(md, pres[0])]
    steps = [
        ("timer loop (lambda i: None)", lambda i: None),
        ("pybind call, no work", lambda i: ref.noop()),
        (f"pybind parse of {len(sources[0])} tensors", lambda i: ref.noop_tensors(sources[i % SETS])),
        ("empty kernel launch, 8 B params", lambda i: ref.empty_launch(8)),
        ("empty kernel launch, 512 B params", lambda i: ref.empty_launch(512)),
        ("empty kernel launch, 2 KiB params", lambda i: ref.empty_launch(2048)),
        ("engine-style kernel (views prebuilt)", lambda i: ref.launch(views[i % SETS], dsts)),
    ]
    if batch is not None:
        steps += [("cuda_ext BoundBatch.run() (bound addresses)", lambda i: batch.run()),
                  ("+ run_sources(6 base tensors)", lambda i: binding.launch(sources[i % SETS]))]
    steps += [
        ("+ attrgetter of the sources", lambda i: binding.launch(binding.get_sources(pres[i % SETS]))),
    ]
    if binding.from_object is not None:  # what _Binding.run calls instead of the two rows above
        steps += [("C++ reads the attributes: run_attrs(pre)", lambda i: binding.from_object(pres[i % SETS]))]
    steps += [
        ("+ binding lookup: batched_copy_metadata", lambda i: nsa.batched_copy_metadata(md, pres[i % SETS],
                                                                                         dispatcher=d)),
        ("_Binding.run alone (the multi-backend path)", lambda i: binding.run(pres[i % SETS])),
        ("7 × copy_ (reference_copy)", lambda i: nsa.reference_copy(md, pres[i % SETS])),
    ]
    if step is not None:
        steps.append(("the seam's step: CallSite.step (one C call)", lambda i: step(md, pres[i % SETS], "decode")))
    out = list(benchmark.interleaved(dict(steps), "eager", torch.device("cuda"), repeats=9).items())
    if previous is not None:
        set_default_dispatcher(previous)
    if batch is not None:
        out.append(("GPU time of the launch (graph replay)", _graph_us(lambda i: batch.run())))
    return out


def generic_rows(bs: int, max_len: int, ref) -> list[tuple[str, float]]:
    """The generic call paths on the 7-copy decode batch (issue 13's table): the pairs a caller builds per call
    (``list(zip(srcs, dsts))``), the bound paths, and the engine-style kernel handed the 14 tensors."""
    dsts, srcs = nsa_batch(bs, max_len)
    d = Dispatcher(None, mode="eager", strategy="cuda_ext")
    checked = d.bind(list(zip(srcs[0], dsts)))
    unchecked = d.bind(list(zip(srcs[0], dsts)), checked=False)
    pairs = [list(zip(s, dsts)) for s in srcs]
    for p in pairs:  # each set bound once: the exact-address cache holds them (as a serving loop's would)
        d.copy(p)
    launch = unchecked._launch
    steps = [
        ("pybind call + empty kernel launch", lambda i: ref.empty_launch(2048)),
        ("engine-style kernel, 14 tensors (pybind)", lambda i: ref.launch(srcs[i % SETS], dsts)),
        ("cuda_ext bound launch, list of sources", lambda i: launch(srcs[i % SETS])),
        ("BoundCopy.run(srcs), checked=False", lambda i: unchecked.run(srcs[i % SETS])),
        ("BoundCopy.run(srcs), checked", lambda i: checked.run(srcs[i % SETS])),
        ("Dispatcher.copy(pairs) (exact-address cache)", lambda i: d.copy(pairs[i % SETS])),
        ("Dispatcher.copy(list(zip(srcs, dsts)))", lambda i: d.copy(list(zip(srcs[i % SETS], dsts)))),
        ("7 × copy_", lambda i: [dst.copy_(s) for s, dst in zip(srcs[i % SETS], dsts)]),
    ]
    return list(benchmark.interleaved(dict(steps), "eager", torch.device("cuda"), repeats=9).items())


def multi_rows(bs: int, max_len: int, backends: int) -> list[tuple[str, float]]:
    """The multi-backend refresh (speculative decoding: ``backends`` draft backends, one precomputed set), layer by
    layer: the bound launch, the C++ read of the sources, the binding, the public call."""
    d = Dispatcher(None, mode="eager", strategy="cuda_ext")
    width = max_len + SETS + 64
    mds = [nsa.make_example(bs, max_len, width, device="cuda", seed=1 + b)[0] for b in range(backends)]
    pres = [nsa.make_example(bs, max_len + k, width, device="cuda", seed=100 + k)[1] for k in range(SETS)]
    nsa.batched_copy_metadata_multi(mds, pres[0], dispatcher=d)
    binding = nsa._SITE.binding(tuple(map(id, mds)))
    batch = getattr(binding.bound._launch, "batch", None)
    steps = [] if batch is None else [("cuda_ext BoundBatch.run() (bound addresses)", lambda i: batch.run())]
    if binding.from_object is not None:
        steps += [("C++ reads the attributes: run_attrs(pre)", lambda i: binding.from_object(pres[i % SETS]))]
    steps += [
        ("+ _Binding.run", lambda i: binding.run(pres[i % SETS])),
        ("+ batched_copy_metadata_multi", lambda i: nsa.batched_copy_metadata_multi(mds, pres[i % SETS],
                                                                                     dispatcher=d)),
        (f"{backends} × the engine's copy_ sequence", lambda i: [nsa.reference_copy(md, pres[i % SETS])
                                                                for md in mds]),
    ]
    out = list(benchmark.interleaved(dict(steps), "eager", torch.device("cuda"), repeats=9).items())
    nsa.batched_copy_metadata_multi(mds, pres[1], dispatcher=d)  # every destination holds another step first
    nsa.batched_copy_metadata_multi(mds, pres[0], dispatcher=d)
    torch.cuda.synchronize()
    assert all(torch.equal(s, t) for md in mds for s, t in nsa.copy_pairs(md, pres[0])), "multi copied wrong bytes"
    return out


def gpu_rows(ref, sizes: list[tuple[int, int]]) -> list[tuple[str, float]]:
    """GPU µs (graph replay) of the launch floors and of a page-table copy alone (rows x columns int32 into a
    wider buffer, each width as given: aligned, or rows only 4- or 8-byte aligned), for every tile shape, beside
    torch's own ``copy_`` of it (the bandwidth any kernel gets on this card) and the GB/s each moves."""
    rows = [] if ref is None else \
        [(f"empty kernel, {b} B params", _graph_us(lambda i, b=b: ref.empty_launch(b))) for b in (8, 512, 2048)]
    strategy = copytune.get_strategy("cuda_ext")
    for n, cols in sizes:
        width = -(-(cols + 64) // 4) * 4  # the buffer's rows 16-byte aligned, as the engine's are
        dst = torch.empty(n, width, dtype=torch.int32, device="cuda")[:, :cols]
        src = torch.randint(0, 1 << 30, (n, cols), dtype=torch.int32, device="cuda")
        moved = 2 * src.numel() * 4  # bytes read and written
        us = _graph_us(lambda i: dst.copy_(src))
        rows.append((f"page table {n}x{cols} int32, torch copy_ ({moved / us / 1e3:.0f} GB/s)", us))
        for unroll in cuda_ext.UNROLLS:
            launch = strategy.bind(copytune.CopyPlan.from_pairs([(src, dst)]), {"unroll": unroll})
            units = launch.batch.vector_bytes()  # store units per descriptor: a split adds a tail
            shape = f"{units[0]} B units" + (f" + {units[1]} B tail" if len(units) > 1 else "")
            us = _graph_us(lambda i, launch=launch: launch())
            rows.append((f"page table {n}x{cols} int32, unroll {unroll}, {shape} ({moved / us / 1e3:.0f} GB/s)", us))
            dst.fill_(-1)
            launch()
            torch.cuda.synchronize()
            assert torch.equal(dst, src), "cuda_ext copied wrong bytes"
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", default="32,256")
    ap.add_argument("--max-len", default="2048", help="page-table columns, comma-separated")
    ap.add_argument("--only", default="nsa,generic,multi,gpu", help="sections: nsa, generic, multi, gpu")
    ap.add_argument("--backends", default="3,4", help="draft backends of the multi section")
    ap.add_argument("--gpu-sizes", default="512x1024,512x1025,512x1026",
                    help="page tables (rows x columns int32) of the GPU-time section")
    ap.add_argument("--out", default=None)
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU-time table, without the reference module")
    args = ap.parse_args()
    only = {"gpu"} if args.gpu_only else set(args.only.split(","))
    ref = reference.load() if only & {"nsa", "generic", "gpu"} and not args.gpu_only else None
    cuda_ext.build("cuda")
    card = torch.cuda.get_device_name()
    print(f"# {card} | torch {torch.__version__} (CUDA {torch.version.cuda}) | copytune {copytune.__version__} | "
          f"eager µs per call, median of 9 round-robin rounds")
    results = {}
    sections = []
    for bs in map(int, args.bs.split(",")):
        for max_len in map(int, args.max_len.split(",")):
            if "nsa" in only:
                sections.append((f"NSA decode refresh, bs={bs}, max_len={max_len}+step",
                                 lambda bs=bs, m=max_len: nsa_rows(bs, m, ref)))
            if "generic" in only:
                sections.append((f"generic 7-copy batch, bs={bs}, max_len={max_len}",
                                 lambda bs=bs, m=max_len: generic_rows(bs, m, ref)))
            for n in map(int, args.backends.split(",")) if "multi" in only else ():
                sections.append((f"NSA multi-backend refresh, {n} backends, bs={bs}, max_len={max_len}+step",
                                 lambda bs=bs, m=max_len, n=n: multi_rows(bs, m, n)))
    for title, measure in sections:
        rows = measure()
        print(f"\n{title}\n{'layer':<46} {'µs':>7} {'+µs':>7}")
        prev = None
        for name, us in rows:
            delta = f"{us - prev:+7.2f}" if prev is not None and name.startswith("+") else ""
            print(f"{name:<46} {us:7.2f} {delta:>7}")
            prev = us
        results[title] = rows
        if args.out:  # after every section: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"card": card, "torch": torch.__version__, "results": results}, f, indent=1)
    if "gpu" not in only:
        return 0
    gpu = gpu_rows(ref, [tuple(map(int, size.split("x"))) for size in args.gpu_sizes.split(",")])
    print(f"\nGPU time alone (CUDA-graph replay)\n{'what':<72} {'µs':>7}")
    for name, us in gpu:
        print(f"{name:<72} {us:7.2f}")
    results["GPU time alone"] = gpu
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
