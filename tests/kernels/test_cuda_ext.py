"""cuda_ext: a clear reason and no crash without a GPU; the kernel compiles with plain nvcc where one exists
(CI machines have nvcc but no GPU); bit-exact on a GPU."""

import ctypes
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from copytune import CopyPlan, Dispatcher, get_strategy
from copytune.kernels import UnsupportedPlan, cuda_ext
from tests.cases import Case, check_strategy, random_case, random_fill
from tests.kernels import triton_checks as checks
from tests.kernels.exact_suite import *  # noqa: F403 - the shared exactness suite, for this strategy

NAME = "cuda_ext"
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


def test_unavailable_on_cpu_with_a_reason():
    strategy = get_strategy(NAME)
    assert "needs a CUDA device" in strategy.available("cpu")
    plan = CopyPlan.from_pairs([(torch.ones(4), torch.zeros(4))])
    assert not strategy.supports(plan)
    with pytest.raises(UnsupportedPlan, match="cuda_ext: needs a CUDA device"):
        strategy.copy(plan)


def test_build_key_changes_with_arch_and_is_stable():
    assert cuda_ext.build_key("90") == cuda_ext.build_key("90") != cuda_ext.build_key("80")


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_kernel_compiles_without_spills_and_uses_16_byte_accesses(tmp_path):
    src = cuda_ext.CSRC / "batched_copy_kernel.cu"
    arch = ["-gencode=arch=compute_90,code=sm_90", "-std=c++17", "-O3"]
    out = subprocess.run([NVCC, "-c", *arch, "-Xptxas", "-v", str(src), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True, check=True)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    assert len(spills) == 2 * len(cuda_ext.UNROLLS), out.stderr  # per tile shape: 32- and 64-bit indices
    assert all(st == ld == "0" for st, ld in spills), out.stderr
    subprocess.run([NVCC, "-ptx", *arch, str(src), "-o", str(tmp_path / "k.ptx")], check=True)
    ptx = (tmp_path / "k.ptx").read_text()
    assert re.search(r"ld\.global(\.nc)?\.v4\.u32", ptx) and "st.global.v4.u32" in ptx  # uint4: 16-byte accesses


CXX = shutil.which("g++") or shutil.which("c++")
CUDA_INCLUDE = next((p for p in ("/usr/local/cuda/include", "/usr/include") if Path(p, "cuda_runtime.h").exists()),
                    None)


@pytest.mark.skipif(CXX is None or CUDA_INCLUDE is None, reason="no C++ compiler or CUDA headers here")
def test_the_binding_compiles_against_torch_headers(tmp_path):
    """binding.cpp checked by the C++ compiler against this torch's headers, on machines without a GPU (CI): a
    type or syntax error shows here instead of on the first GPU machine. A CPU wheel of torch lacks one generated
    CUDA header; a stand-in takes its place."""
    from torch.utils import cpp_extension

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path), *cpp_extension.include_paths(), CUDA_INCLUDE,
                __import__("sysconfig").get_paths()["include"]]
    out = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", "-w", *[f"-I{p}" for p in includes],
                          "-DTORCH_EXTENSION_NAME=copytune_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
                          str(cuda_ext.CSRC / "binding.cpp")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def built():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    lib, seconds = cuda_ext.build("cuda")
    print(f"cuda_ext build: {seconds:.1f} s -> {lib}")
    return lib


@pytest.mark.cuda
def test_available_after_build_and_second_build_is_cached(built):
    assert get_strategy(NAME).available("cuda") is None
    assert cuda_ext.build("cuda")[1] == 0.0


@pytest.fixture
def strategy_name(request):
    """The shared exactness suite runs for cuda_ext on a GPU, after the extension is built."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    request.getfixturevalue("built")
    return NAME


def test_unsupported_layout_declined(strategy_name, device):
    checks.run_unsupported_layout(NAME, device)


def test_unknown_tile_shape_is_declined_before_anything_else():
    plan = CopyPlan.from_pairs([(torch.ones(4), torch.zeros(4))])
    with pytest.raises(UnsupportedPlan, match=r"unroll must be one of \(4, 1, 2, 8\), got 3"):
        get_strategy(NAME).bind(plan, {"unroll": 3})


@pytest.mark.cuda
@pytest.mark.parametrize("unroll", cuda_ext.UNROLLS)
def test_every_tile_shape_is_exact(built, unroll):
    """Each tuned tile shape on random batches (every layout and dtype, odd sizes), and on new sources."""
    strategy = get_strategy(NAME)
    for seed in range(6):
        case = random_case(seed, torch.device("cuda"), max_elems=40_000)
        if not strategy.supports(CopyPlan.from_pairs(case.pairs)):
            continue
        expected = case.expected()
        launch = strategy.bind(CopyPlan.from_pairs(case.pairs), {"unroll": unroll})
        assert launch.batch.unroll() == unroll
        launch()
        torch.cuda.synchronize()
        case.check(expected)


@pytest.mark.cuda
def test_indices_past_32_bits_take_the_64_bit_kernel_and_are_exact(built):
    """A copy whose destination rows lie 2^32 + 7 bytes apart (1-byte units: the second row's index wraps in 32
    bits, so a wrong index width writes it 7 bytes past the first) beside a small copy in the same launch: both
    exact, and nothing written between the rows; a row-tiled copy in the same (64-bit) launch; rows 2^31 + 1
    bytes apart, row-tiled, on the 32-bit kernel."""
    try:
        big = torch.full((2**32 + 64,), 0x5A, dtype=torch.uint8, device="cuda")
    except torch.cuda.OutOfMemoryError:
        pytest.skip("4 GiB of GPU memory not free")
    dst = big.as_strided((2, 3), (2**32 + 7, 1), storage_offset=1)
    src = torch.randint(0, 0x5A, (2, 3), dtype=torch.uint8, device="cuda")  # never the poison byte
    small_src = torch.randint(-1000, 1000, (1000,), dtype=torch.int32, device="cuda")
    small_dst = torch.full((1000,), -7, dtype=torch.int32, device="cuda")
    rows_src = torch.randint(-1000, 1000, (3, 4096), dtype=torch.int32, device="cuda")  # row tiles (1 a row)
    rows_buf = torch.full((3, 4200), -7, dtype=torch.int32, device="cuda")
    strategy = get_strategy(NAME)
    launch = strategy.bind(CopyPlan.from_pairs([(src, dst), (small_src, small_dst), (rows_src, rows_buf[:, :4096])]),
                           {"unroll": 4})
    assert launch.batch.index_bits() == [64] and sorted(launch.batch.row_tiles()) == [0, 0, 1]
    launch()
    torch.cuda.synchronize()
    assert torch.equal(dst, src) and torch.equal(small_dst, small_src) and torch.equal(rows_buf[:, :4096], rows_src)
    assert bool((rows_buf[:, 4096:] == -7).all())
    changed = sum(int((chunk != 0x5A).sum()) for chunk in big.split(1 << 28))  # 256 MiB at a time
    assert changed == 6  # the two rows of three bytes, no other byte
    # Rows of whole tiles 2^31 + 1 bytes apart: row tiles on the 32-bit kernel, the row's offset in 64 bits.
    far = big.as_strided((2, 1024), (2**31 + 1, 1), storage_offset=4096)
    far_src = torch.randint(0, 0x5A, (2, 1024), dtype=torch.uint8, device="cuda")
    launch = strategy.bind(CopyPlan.from_pairs([(far_src, far)]), {"unroll": 4})
    assert launch.batch.index_bits() == [32] and launch.batch.row_tiles() == [1]
    launch()
    torch.cuda.synchronize()
    assert torch.equal(far, far_src)
    changed = sum(int((chunk != 0x5A).sum()) for chunk in big.split(1 << 28))
    assert changed == 6 + 2048
    del big


def launch_counts() -> tuple[int, int]:
    """Launches so far (direct through the driver, through the runtime) of the built module."""
    return tuple(cuda_ext.load(torch.device("cuda")).launch_counts())


@pytest.mark.cuda
def test_launches_go_out_through_the_driver_and_a_fresh_thread_through_the_runtime(built):
    """On the thread that made the kernel's handle, a launch is the driver's cuLaunchKernel. A serving engine may
    refresh from a thread of its own: one that has made no CUDA call has no current context, so its first launch
    goes through the runtime (which makes the device's primary context current), and its second, in the context
    that made the handle, through the driver. Every copy exact."""
    src = torch.randint(-1000, 1000, (33, 1025), dtype=torch.int32, device="cuda")
    dst = torch.full((33, 1100), -7, dtype=torch.int32, device="cuda")
    launch = get_strategy(NAME).bind(CopyPlan.from_pairs([(src, dst[:, :1025])]), {"unroll": 2})
    launch()  # makes the handle here, if no earlier test did
    before = launch_counts()
    launch()
    assert launch_counts() == (before[0] + 1, before[1])  # direct
    dst.fill_(-7)
    torch.cuda.synchronize()
    seen, errors, had_context = [], [], []

    def run():
        try:
            ctx = ctypes.c_void_p()
            assert ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(ctx)) == 0
            had_context.append(ctx.value is not None)
            for _ in range(2):
                first = launch_counts()
                launch()
                seen.append(tuple(b - a for a, b in zip(first, launch_counts())))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    torch.cuda.synchronize()
    assert not errors and had_context == [False]  # a fresh thread has no current context
    assert seen == [(0, 1), (1, 0)]  # so the runtime first, then the driver in the context it made current
    assert torch.equal(dst[:, :1025], src) and bool((dst[:, 1025:] == -7).all())


@pytest.mark.cuda
def test_a_launch_captured_in_a_cuda_graph_replays_exactly(built):
    """The driver's launch is captured as the runtime's is: a graph of it, replayed onto a poisoned buffer after
    the sources changed, copies the new bytes."""
    src = torch.randint(-1000, 1000, (129, 1025), dtype=torch.int32, device="cuda")
    dst = torch.full((129, 1100), -7, dtype=torch.int32, device="cuda")
    launch = get_strategy(NAME).bind(CopyPlan.from_pairs([(src, dst[:, :1025])]), {"unroll": 2})
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch()  # warm: the handle exists before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            launch()
    torch.cuda.current_stream().wait_stream(stream)
    src.copy_(torch.randint(-1000, 1000, src.shape, dtype=torch.int32, device="cuda"))
    dst.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(dst[:, :1025], src) and bool((dst[:, 1025:] == -7).all())


@pytest.mark.cuda
def test_more_copies_than_one_launch_holds(built):
    """40 copies > 32 slots: two launches, every copy exact, odd byte offsets included."""
    dev = torch.device("cuda")
    pairs, bufs = [], []
    for i in range(40):
        buf = random_fill(torch.empty(1000 + i, dtype=torch.uint8, device=dev))
        src = random_fill(torch.empty(900 + i, dtype=torch.uint8, device=dev))[i % 5:]
        pairs.append((src, buf[i % 7:i % 7 + src.numel()]))
        bufs.append(buf)
    check_strategy(get_strategy(NAME), Case(pairs, bufs))


@pytest.mark.cuda
def test_vector_width_follows_alignment(built):
    dev = torch.device("cuda")
    aligned = torch.empty(1024, dtype=torch.int32, device=dev)
    plan = CopyPlan.from_pairs([(torch.ones(1024, dtype=torch.int32, device=dev), aligned),
                                (torch.ones(255, dtype=torch.int32, device=dev), torch.empty(256, dtype=torch.int32,
                                                                                             device=dev)[1:])])
    assert get_strategy(NAME).bind(plan).batch.vector_bytes() == [16, 4]


@pytest.mark.cuda
def test_errors_are_python_exceptions_not_crashes(built):
    """The module never throws across pybind (that crashed the process on the GPU hosts): bad calls come back as
    messages and are raised in Python."""
    dev = torch.device("cuda")
    launch = get_strategy(NAME).bind(CopyPlan.from_pairs([(torch.ones(8, device=dev), torch.zeros(8, device=dev))]))
    assert "expected 1 sources, got 0" in launch.batch.run_sources([])
    with pytest.raises(RuntimeError, match="expected 1 sources, got 2"):
        launch([torch.ones(8, device=dev), torch.ones(8, device=dev)])
    assert launch.batch.set_shape(5, 1, 4, 0, 0) == "cuda_ext: copy index out of range"


@pytest.mark.cuda
def test_attribute_launcher_reads_sources_off_an_object(built):
    """The NSA step's one C++ call: sources are attributes of one object, read in C++; bad objects come back as
    messages before any launch, never as crashes."""
    from types import SimpleNamespace

    dev = torch.device("cuda")
    dsts = [random_fill(torch.empty(n, dtype=torch.int32, device=dev)) for n in (5, 300)]
    srcs = [random_fill(torch.empty(n, dtype=torch.int32, device=dev)) for n in (5, 300)]
    bound = Dispatcher(None, strategy=NAME).bind(list(zip(srcs, dsts)), checked=False)
    run = bound.attribute_launcher(["a", "b"])
    assert type(run).__name__ == "builtin_function_or_method"  # METH_O into C++, not a pybind11 method
    del bound  # the entry point keeps its batch alive
    fresh = SimpleNamespace(a=random_fill(torch.empty(5, dtype=torch.int32, device=dev)),
                            b=random_fill(torch.empty(300, dtype=torch.int32, device=dev)))
    assert not run(fresh)
    torch.cuda.synchronize()
    assert torch.equal(dsts[0], fresh.a) and torch.equal(dsts[1], fresh.b)
    before = [d.clone() for d in dsts]
    assert "no attribute b" in run(SimpleNamespace(a=fresh.a))
    assert "source 1 is not a tensor" in run(SimpleNamespace(a=fresh.a, b=[1, 2]))
    torch.cuda.synchronize()
    assert all(torch.equal(d, b) for d, b in zip(dsts, before))


@pytest.mark.cuda
@pytest.mark.parametrize("unroll", cuda_ext.UNROLLS)
def test_rows_less_aligned_on_the_source_split_into_a_wide_body_and_a_tail(built, unroll):
    """An NSA page table gaining a column each step: source rows 4- or 8-byte aligned, destination rows 16-byte
    aligned. The body is stored in 16-byte units from narrower loads, the tail in narrow units: exact bytes into a
    poisoned buffer, nothing outside the slice touched."""
    dev = torch.device("cuda")
    for cols in range(1021, 1029):
        buf = random_fill(torch.empty(37, 1100, dtype=torch.int32, device=dev))
        src = random_fill(torch.empty(37, cols, dtype=torch.int32, device=dev))
        want = buf.clone()
        want[:, :cols] = src
        launch = get_strategy(NAME).bind(CopyPlan.from_pairs([(src, buf[:, :cols])]), {"unroll": unroll})
        assert launch.batch.vector_bytes() == ([16] if cols % 4 == 0 else [16, 4 if cols % 2 else 8])
        launch()
        torch.cuda.synchronize()
        assert torch.equal(buf, want), cols


@pytest.mark.cuda
@pytest.mark.parametrize("unroll", cuda_ext.UNROLLS)
def test_one_source_into_several_destinations_is_read_once_and_exact(built, unroll):
    """Draft backends of one step copy the same sources into their own buffers: one descriptor stores each unit
    to every destination (``destinations()`` says how many). Poisoned buffers, odd widths that split, every
    byte outside the slices untouched; new sources through the attribute path (each path read once). 5 and 12
    backends (33 extra destinations where the page table splits)."""
    from types import SimpleNamespace

    dev = torch.device("cuda")
    for backends, cols in itertools.product((5, 12), (1024, 1025, 1026)):
        src = SimpleNamespace(a=random_fill(torch.empty(37, dtype=torch.int32, device=dev)),
                              t=random_fill(torch.empty(33, cols, dtype=torch.int32, device=dev)))
        bufs = [(random_fill(torch.empty(40, dtype=torch.int32, device=dev)),
                 random_fill(torch.empty(33, 1100, dtype=torch.int32, device=dev))) for _ in range(backends)]
        pairs = [p for a, t in bufs for p in ((src.a, a[3:]), (src.t, t[:, :cols]))]
        launch = get_strategy(NAME).bind(CopyPlan.from_pairs(pairs), {"unroll": unroll})
        want = [(a.clone(), t.clone()) for a, t in bufs]
        for a, t in want:
            a[3:], t[:, :cols] = src.a, src.t
        assert launch.batch.destinations() == [backends] * (2 if cols % 4 == 0 else 3)  # the tail too
        launch()
        torch.cuda.synchronize()
        assert all(torch.equal(a, wa) and torch.equal(t, wt) for (a, t), (wa, wt) in zip(bufs, want)), cols
        run = launch.attribute_launcher(["a", "t"] * backends)
        fresh = SimpleNamespace(a=random_fill(torch.empty(37, dtype=torch.int32, device=dev)),
                                t=random_fill(torch.empty(33, cols, dtype=torch.int32, device=dev)))
        assert not run(fresh)
        torch.cuda.synchronize()
        assert all(torch.equal(a[3:], fresh.a) and torch.equal(t[:, :cols], fresh.t) for a, t in bufs)
        assert all(torch.equal(a[:3], wa[:3]) and torch.equal(t[:, cols:], wt[:, cols:])
                   for (a, t), (wa, wt) in zip(bufs, want))
        # the bound plan read one source for all; now each backend has its own (a moved group is planned again)
        own = [random_fill(torch.empty(37, dtype=torch.int32, device=dev)) for _ in range(backends)]
        launch([x for b in range(backends) for x in (own[b], fresh.t)])
        torch.cuda.synchronize()
        assert all(torch.equal(a[3:], o) and torch.equal(t[:, :cols], fresh.t) for (a, t), o in zip(bufs, own))
        assert not run(src)  # and back to one source, moved with the same alignment: the addresses follow
        torch.cuda.synchronize()
        assert all(torch.equal(a[3:], src.a) and torch.equal(t[:, :cols], src.t) for a, t in bufs)


@pytest.mark.cuda
def test_every_new_source_is_checked_before_any_launch(built):
    """Unchecked bindings (the engine's hot path) still refuse a source of another device, dtype or geometry in
    C++, with one line, before launching; a call that fails at copy k leaves every copy's source as it was, and
    a failing call holds no reference (no leak)."""
    import sys
    from types import SimpleNamespace

    dev = torch.device("cuda")
    dsts = [random_fill(torch.empty(n, dtype=torch.int32, device=dev)) for n in (5, 300)]
    srcs = [random_fill(torch.empty(n, dtype=torch.int32, device=dev)) for n in (5, 300)]
    bound = Dispatcher(None, strategy=NAME).bind(list(zip(srcs, dsts)), checked=False)
    launch = bound.sources_launcher()
    good = random_fill(torch.empty(5, dtype=torch.int32, device=dev))
    bad = {
        "has shape [2] strides [1]; bound [300] [1]": torch.ones(2, dtype=torch.int32, device=dev),
        "is Long, bound Int": torch.ones(300, dtype=torch.int64, device=dev),
        "is on cpu; the batch runs on cuda:0": torch.ones(300, dtype=torch.int32),
        "has shape [300] strides [2]": torch.ones(600, dtype=torch.int32, device=dev)[::2],
    }
    refs = sys.getrefcount(good)
    for message, source in bad.items():
        err = launch([good, source])
        assert err.startswith("cuda_ext: source 1 ") and message in err and "\n" not in err, err
    assert sys.getrefcount(good) == refs
    bound.run()  # relaunch on the last accepted sources: the bound ones, never copy 0's source of a failed call
    torch.cuda.synchronize()
    assert torch.equal(dsts[0], srcs[0]) and torch.equal(dsts[1], srcs[1])
    run = bound.attribute_launcher(["a", "inner.b"])  # dotted paths: a source on an object inside the object
    fresh = SimpleNamespace(a=good, inner=SimpleNamespace(b=random_fill(torch.empty(300, dtype=torch.int32,
                                                                                    device=dev))))
    assert not run(fresh)
    torch.cuda.synchronize()
    assert torch.equal(dsts[0], good) and torch.equal(dsts[1], fresh.inner.b)
    holder = SimpleNamespace(a=good, inner=SimpleNamespace(b=bad[next(iter(bad))]))
    refs = (sys.getrefcount(holder), sys.getrefcount(holder.inner), sys.getrefcount(good),
            sys.getrefcount(holder.inner.b))
    for _ in range(5):  # the attribute path's references (PyObject_GetAttr) are released on the error path too
        assert "source 1 has shape [2]" in run(holder)
    assert refs == (sys.getrefcount(holder), sys.getrefcount(holder.inner), sys.getrefcount(good),
                    sys.getrefcount(holder.inner.b))
    assert "no attribute inner.b" in run(SimpleNamespace(a=good, inner=None))
    assert "source 1 has shape [2]" in run(SimpleNamespace(a=good, inner=SimpleNamespace(b=bad[next(iter(bad))])))


@pytest.mark.cuda
def test_a_bad_description_is_refused_by_the_constructor_without_throwing(built):
    """The C++ constructor checks what Python should already have: 6 values a copy, a device, a compiled unroll,
    no negative sizes, no null address. It never throws across pybind; every entry point returns the reason."""
    module = cuda_ext.load(torch.device("cuda"))
    good = [1 << 20, 2 << 20, 1, 64, 0, 0]
    cases = {"7 descriptor values, not 6 per copy": (good + [0], 0, 4),
             "device index -1": (good, -1, 4),
             "unroll must be 1, 2, 4 or 8, got 3": (good, 0, 3),
             "copy 0 is negative": ([1 << 20, 2 << 20, -1, 64, 0, 0], 0, 4),
             "copy 0 at null": ([0, 2 << 20, 1, 64, 0, 0], 0, 4)}
    for message, args in cases.items():
        batch = module.BoundBatch(*args)
        assert batch.error() == "cuda_ext: " + message
        assert batch.run() == batch.error() and batch.run_sources([]) == batch.error()
    assert module.BoundBatch(good, 0, 8).error() == ""


@pytest.mark.cuda
def test_an_earlier_pending_cuda_error_is_not_blamed_on_the_launch(built):
    """The launch reports its own status (cudaLaunchKernel), not an error some earlier call left pending."""
    import ctypes

    dev = torch.device("cuda")
    src, dst = random_fill(torch.empty(64, dtype=torch.int32, device=dev)), torch.zeros(64, dtype=torch.int32,
                                                                                        device=dev)
    launch = get_strategy(NAME).bind(CopyPlan.from_pairs([(src, dst)]))
    cudart = next((ln.split()[-1] for ln in open("/proc/self/maps") if "libcudart.so" in ln), None)
    if cudart is None:
        pytest.skip("the CUDA runtime is linked statically here")
    rt = ctypes.CDLL(cudart)
    assert rt.cudaSetDevice(ctypes.c_int(10_000)) != 0  # leaves cudaErrorInvalidDevice pending on this thread
    try:
        launch()
    finally:
        rt.cudaGetLastError()
    torch.cuda.synchronize()
    assert torch.equal(dst, src)


@pytest.mark.cuda
def test_bad_sources_never_reach_the_gpu_under_compute_sanitizer(built, tmp_path):
    """Every C++ entry point given bad sources (short, wider, another dtype, on the CPU, strided, not a tensor,
    too few) runs under compute-sanitizer's memcheck without one invalid access; the good run after them is exact."""
    sanitizer = shutil.which("compute-sanitizer") or shutil.which("compute-sanitizer", path="/usr/local/cuda/bin")
    if sanitizer is None:
        pytest.skip("no compute-sanitizer")
    script = tmp_path / "bad_sources.py"
    script.write_text(SANITIZED_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=600, cwd=root,
                         env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in out.stdout and "bad sources refused: 16" in out.stdout, out.stdout[-3000:]


SANITIZED_SCRIPT = r'''
from types import SimpleNamespace
import torch
from copytune import Dispatcher
from tests.cases import random_fill

dev = torch.device("cuda")
n = 1 << 20
srcs = [random_fill(torch.empty(n, dtype=torch.int32, device=dev)),
        random_fill(torch.empty(64, 300, dtype=torch.int32, device=dev))]
bufs = [torch.empty(n, dtype=torch.int32, device=dev), torch.empty(64, 512, dtype=torch.int32, device=dev)]
dsts = [bufs[0], bufs[1][:, :300]]
bound = Dispatcher(None, strategy="cuda_ext").bind(list(zip(srcs, dsts)), checked=False)
assert bound.follow_source_shape(1, 512 * 4)
by_list, by_attrs = bound.sources_launcher(), bound.attribute_launcher(["a", "b"])
table = srcs[1]
bad = [torch.ones(2, dtype=torch.int32, device=dev), torch.ones(n, dtype=torch.int64, device=dev),
       torch.ones(n, dtype=torch.int32), torch.ones(2 * n, dtype=torch.int32, device=dev)[::2], [1, 2]]
bad_tables = [torch.ones(64, 513, dtype=torch.int32, device=dev), torch.ones(65, 300, dtype=torch.int32, device=dev),
              torch.ones(64, 300, dtype=torch.int16, device=dev)]
refused = 0
for b in bad:
    refused += bool(by_list([b, table])) + bool(by_attrs(SimpleNamespace(a=b, b=table)))
for t in bad_tables:
    refused += bool(by_list([srcs[0], t])) + bool(by_attrs(SimpleNamespace(a=srcs[0], b=t)))
print("bad sources refused:", refused)
fresh = [random_fill(torch.empty_like(srcs[0])), random_fill(torch.empty(64, 301, dtype=torch.int32, device=dev))]
assert not by_list(fresh)
torch.cuda.synchronize()
assert torch.equal(bufs[0], fresh[0]) and torch.equal(bufs[1][:, :301], fresh[1])
'''


@pytest.mark.cuda
def test_a_batch_seen_before_is_looked_up_and_launched_in_cpp(built, monkeypatch):
    """Dispatcher.copy(pairs): the first call validates and binds; a later call with the same addresses and
    geometry is one C++ lookup and launch (the Python path is never entered); new addresses miss."""
    dev = torch.device("cuda")
    d = Dispatcher(None, strategy=NAME)
    buf = torch.empty(64, 300, dtype=torch.int32, device=dev)
    dsts = [torch.empty(37, dtype=torch.int32, device=dev), buf[:, :257]]
    srcs = [random_fill(torch.empty(37, dtype=torch.int32, device=dev)),
            random_fill(torch.empty(64, 257, dtype=torch.int32, device=dev))]
    pairs = list(zip(srcs, dsts))
    d.copy(pairs)
    assert d._exact is not None and d._exact.size() == 1
    monkeypatch.setattr(d, "_runner", lambda plan: pytest.fail("the Python path ran for a batch seen before"))
    for _ in range(3):
        for t in dsts:
            random_fill(t)
        d.copy(pairs)
        torch.cuda.synchronize()
        assert all(torch.equal(s, t) for s, t in pairs)
    monkeypatch.undo()
    fresh = [(random_fill(torch.empty_like(s)), t) for s, t in pairs]  # other addresses: a miss, then a hit
    d.copy(fresh)
    torch.cuda.synchronize()
    assert all(torch.equal(s, t) for s, t in fresh) and d._exact.size() == 2
    d.copy([[s, t] for s, t in pairs])  # lists, not tuples: the Python path, still exact
    assert d._exact.size() == 2


@pytest.mark.cuda
def test_the_checked_run_checks_in_cpp_with_the_same_verdicts(built):
    """BoundCopy.run(srcs) with checked=True: geometry and source/destination overlap decided in C++, the same
    errors as the Python check, and interleaved strided views (extents meet, bytes do not) still copied."""
    dev = torch.device("cuda")
    d = Dispatcher(None, strategy=NAME)
    buf = torch.zeros(4096, dtype=torch.int32, device=dev)
    dst, src = buf[0:2048:2], random_fill(torch.empty(1024, dtype=torch.int32, device=dev))
    other = torch.zeros(100, dtype=torch.int32, device=dev)

    def strided():  # 100 elements two apart: the geometry pair 1 is bound with
        return random_fill(torch.empty(200, dtype=torch.int32, device=dev))[::2]
    bound = d.bind([(src, dst), (strided(), other)])
    assert bound._checked_run is not None
    fresh = [random_fill(torch.empty(1024, dtype=torch.int32, device=dev)), strided()]
    bound.run(fresh)
    torch.cuda.synchronize()
    assert torch.equal(dst, fresh[0]) and torch.equal(other, fresh[1])
    with pytest.raises(ValueError, match="pair 1: source .* does not match the bound"):
        bound.run([fresh[0], torch.ones(100, dtype=torch.int32, device=dev)])
    with pytest.raises(ValueError, match="pair 1: source overlaps the destination of pair 0"):
        bound.run([fresh[0], buf[100:300:2]])  # even elements: pair 0's destination bytes
    interleaved = buf[1:201:2]  # odd elements: within pair 0's extent, none of its bytes
    random_fill(interleaved)
    want = interleaved.clone()
    bound.run([fresh[0], interleaved])
    torch.cuda.synchronize()
    assert torch.equal(other, want)
