"""copytune against the real serving engine's own metadata refresh, in one run on one GPU (``copytune bench
--engine``, ``benchmarks/bench_engine.py``).

The engine's files (sglang 0.5.23, or another release) come from its wheel (``copytune.sglang_oracle``); its copy
seam runs its JIT fused kernel through its own wrapper (apache-tvm-ffi + nvcc) — the path a serving process takes.
Rows, timed round-robin (``benchmark.interleaved``), each checked bit-exact against the engine first:

  engine           the engine's ``_copy_base_replay_buffers`` (0.5.16+) / replay method (0.5.10), unpatched
  engine copy_     the engine's ``.copy_()`` sequence (its fallback), as ``copytune.nsa.reference_copy`` performs it
  copytune         the same seam patched by ``copytune.nsa.install`` (what the engine calls per step)
  bare launch      the winner's bound launch alone (C++ reads the sources off the precomputed object)

eager: wall µs per call (CPU launch cost counts); graph: GPU µs per call (20 calls captured in a CUDA graph).
Then the multi-step replay with N draft backends: the engine's whole out-of-graph refresh and its copies alone
(its 3-backend kernel + its seam per further backend) against copytune's one launch for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from copytune import benchmark, dispatch, nsa, sglang_oracle

SETS = 4  # rotating precomputed sets; the page table gains a column each


def plain(obj, cls):
    """``obj`` as an instance of a subclass that keeps the engine's unpatched methods (round-robin rows need the
    engine's code and copytune's patch callable side by side)."""
    obj.__class__ = cls
    return obj


def unpatched_classes(engine):
    """Subclasses holding the engine's own seam methods as they resolve now (call before ``install``)."""
    names = (nsa.SEAM_METHOD, nsa.REPLAY_METHOD, *nsa.MULTISTEP_METHODS)

    def keep(cls):
        return type(f"Engine{cls.__name__}", (cls,), {n: getattr(cls, n) for n in names if hasattr(cls, n)})
    return keep(engine.Backend), keep(engine.MultiStepBackend)


def check_same(engine, a, b, what: str) -> None:
    torch.cuda.synchronize()
    sa, sb = engine.snapshot(a), engine.snapshot(b)
    for name, want in sb.items():
        if isinstance(want, torch.Tensor) and not torch.equal(sa[name], want):
            raise AssertionError(f"{what}: {name} differs from the engine's result")


def seam(engine, backend):
    """The bound method the engine calls per step: (bs, metadata, precomputed, forward_mode) -> None."""
    if engine.layout == "dsa":
        return backend._copy_base_replay_buffers
    replay = backend.init_forward_metadata_replay_cuda_graph_from_precomputed
    return lambda bs, md, pre, fm: replay(bs, pre, fm)


def single_rows(engine, classes, mode, bs, max_len, device, width):
    fm = engine.forward_mode(mode)
    kw = dict(page_size=64, max_context_len=width, device=device)
    theirs = plain(engine.make_backend([bs], mode=mode, seed=1, **kw), classes[0])
    ours = engine.make_backend([bs], mode=mode, seed=1, **kw)
    pres = [engine.make_precomputed(bs, mode, max_len + k, seed=10 + k, **kw) for k in range(SETS)]
    md_t, md_o = theirs.decode_cuda_graph_metadata[bs], ours.decode_cuda_graph_metadata[bs]
    engine_seam = seam(engine, theirs)
    for pre in pres:  # bit-exact first (and binds, tunes, JIT-builds outside the clock)
        engine_seam(bs, md_t, pre, fm)
        seam(engine, ours)(bs, md_o, pre, fm)
        check_same(engine, ours, theirs, f"{mode} bs={bs}")
    # bound after the first steps, as the engine looks its method up on every call: the seam's method is the seam
    # table's C method from the first binding on
    copytune_seam = seam(engine, ours)
    binding = nsa._SITE.binding(id(md_o))
    launch = binding.from_object or (lambda p: binding.launch(binding.get_sources(p)))
    steps = {
        "engine": lambda i: engine_seam(bs, md_t, pres[i % SETS], fm),
        "engine copy_": lambda i: nsa.reference_copy(md_t, pres[i % SETS], fm),
        "copytune": lambda i: copytune_seam(bs, md_o, pres[i % SETS], fm),
        "bare launch": lambda i: launch(pres[i % SETS]),
    }
    out = {"strategy": binding.bound.strategy}
    for timing in ("eager", "graph"):
        try:
            out[timing] = benchmark.interleaved(steps, timing, device)
        except Exception as exc:  # noqa: BLE001 - e.g. a path that cannot be captured: say so, keep the rest
            out[timing] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return out


def multi_rows(engine, classes, n, bs, max_len, device, width, kernel):
    kw = dict(page_size=64, max_context_len=width, device=device)
    theirs = plain(engine.make_multistep(n, [bs], seed=2, **kw), classes[1])
    for b in theirs.attn_backends:
        plain(b, classes[0])
    ours = engine.make_multistep(n, [bs], seed=2, **kw)
    pres = [engine.make_precomputed(bs, "decode", max_len + k, seed=20 + k, **kw) for k in range(SETS)]
    for pre in pres:
        engine.run_multistep(theirs, bs, pre)
        engine.run_multistep(ours, bs, pre)
        for a, b in zip(ours.attn_backends, theirs.attn_backends):
            check_same(engine, a, b, f"{n} backends bs={bs}")
    mds = [b.decode_cuda_graph_metadata[bs] for b in ours.attn_backends]
    steps = {
        "engine replay": lambda i: engine.run_multistep(theirs, bs, pres[i % SETS]),
        "copytune replay": lambda i: engine.run_multistep(ours, bs, pres[i % SETS]),
        "engine copies": engine_copies(engine, theirs, bs, pres, kernel),
        "copytune copies": lambda i: nsa.batched_copy_metadata_multi(mds, pres[i % SETS]),
    }
    return {"eager": benchmark.interleaved(steps, "eager", device)}


def engine_copies(engine, multistep, bs, pres, kernel):
    """What the engine's multi-step replay spends on copies alone: its 3-backend kernel (called as the engine
    calls it) for backends 0-2 where it has three or more, and its copy seam for every other backend."""
    backends = multistep.attn_backends
    mds = [b.decode_cuda_graph_metadata[bs] for b in backends]
    fm = engine.forward_mode("decode")
    multi = getattr(getattr(kernel, nsa.MULTI_KERNEL, None), "__wrapped__", None)
    fused = multi is not None and len(backends) >= 3
    p = "dsa" if engine.layout == "dsa" else "nsa"

    def args(pre):
        fl = pre.flashmla_metadata
        src = (pre.cache_seqlens, pre.cu_seqlens_k, pre.page_indices, getattr(pre, f"{p}_cache_seqlens"),
               getattr(pre, f"{p}_cu_seqlens_k"), pre.real_page_table, fl and fl.num_splits,
               fl and fl.flashmla_metadata)
        dst = tuple(t for md in mds[:3] for t in (
            md.cache_seqlens_int32, md.cu_seqlens_k, md.page_table_1, getattr(md, f"{p}_cache_seqlens_int32"),
            getattr(md, f"{p}_cu_seqlens_k"), md.real_page_table if pre.real_page_table is not None else None,
            md.flashmla_metadata and md.flashmla_metadata.num_splits,
            md.flashmla_metadata and md.flashmla_metadata.flashmla_metadata))
        return (*src, *dst, bs, pre.max_len, pre.seqlens_expanded_size)

    rest = [(seam(engine, b), md) for b, md in zip(backends, mds)][3 if fused else 0:]

    def step(i):
        pre = pres[i % SETS]
        if fused:
            multi(*args(pre))
        for copy, md in rest:
            copy(bs, md, pre, fm)
    return step


def run(version: str, batch_sizes: Sequence[int], max_lens: Sequence[int], backends: Sequence[int],
        device: torch.device, progress: Callable[[str], None] = print) -> dict:
    """Load the engine, patch a copy of its classes' seams with copytune and time both, point by point; every
    point's rows are checked bit-exact first. ``progress`` receives one line per point."""
    engine = sglang_oracle.load(version)
    classes = unpatched_classes(engine)  # before install: the engine's own seams
    kernel = None
    try:
        kernel = engine.module(nsa.ENGINE_LAYOUTS[0 if engine.layout == "dsa" else 1][3])
    except Exception as exc:  # noqa: BLE001 - no JIT toolchain: the engine falls back, and so is it measured
        progress(f"# the engine's JIT kernel module does not load here: {exc}")
    # tuned on first use, before any timing: no key may tune in the background while the rows are timed
    previous = dispatch.set_default_dispatcher(dispatch.Dispatcher(tuning="inline"))
    nsa.install(engine.Backend, engine.MultiStepBackend, kernel)
    try:
        return _sweep(engine, classes, kernel, batch_sizes, max_lens, backends, device, progress)
    finally:
        nsa.uninstall()
        if previous is not None:
            dispatch.set_default_dispatcher(previous)


def _sweep(engine, classes, kernel, batch_sizes, max_lens, backends, device, progress) -> dict:
    import triton

    header = (f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
              f"triton {triton.__version__} | sglang {engine.version} | copytune {__import__('copytune').__version__}")
    results = {"header": header, "single": [], "multi": []}
    for max_len in max_lens:
        width = max_len + SETS + 64
        for mode in ("decode", "target_verify"):
            for bs in batch_sizes:
                r = single_rows(engine, classes, mode, bs, max_len, device, width)
                results["single"].append({"mode": mode, "bs": bs, "max_len": max_len, **r})
                progress(format_single(results["single"][-1]))
        for n in backends:
            for bs in batch_sizes:
                r = multi_rows(engine, classes, n, bs, max_len, device, width, kernel)
                results["multi"].append({"backends": n, "bs": bs, "max_len": max_len, **r})
                progress(format_multi(results["multi"][-1]))
    return results


def format_single(p: dict) -> str:
    e, g = p["eager"], p["graph"]
    cells = " ".join(f"{k}={v:.2f}" for k, v in e.items()) if "error" not in e else e["error"]
    gcells = " ".join(f"{k}={v:.2f}" for k, v in g.items()) if "error" not in g else g["error"]
    ratio = e["copytune"] / e["engine"] if "error" not in e else float("nan")
    gratio = g["copytune"] / g["engine"] if "error" not in g else float("nan")
    return (f"{p['mode']:>13} max_len={p['max_len']:<5} bs={p['bs']:<4} {p['strategy']:<14} eager[{cells}] "
            f"x{ratio:.3f} | gpu[{gcells}] x{gratio:.3f}")


def format_multi(p: dict) -> str:
    e = p["eager"]
    return (f"{p['backends']} backends max_len={p['max_len']:<5} bs={p['bs']:<4} "
            + " ".join(f"{k}={v:.2f}" for k, v in e.items())
            + f" replay x{e['copytune replay'] / e['engine replay']:.3f}"
              f" copies x{e['copytune copies'] / e['engine copies']:.3f}")
