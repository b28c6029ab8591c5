"""cuda_ext's launch planning, checked on any machine with nvcc (no GPU): the host-side ``plan_launch`` is compiled
into a small program, and its descriptors are replayed here exactly as the kernel indexes memory, so every split
into a 16-byte-store body loaded in pieces plus a narrow tail must move exactly the bytes of the copy, with every
access aligned to its width (a misaligned vector access faults on the GPU)."""

import random
import subprocess

import numpy as np
import pytest

from copytune.kernels import cuda_ext
from tests.kernels.test_cuda_ext import NVCC

HARNESS = r"""
#include "batched_copy.cuh"
#include <cstdio>
int main() {
  int count, unroll;
  if (scanf("%d %d", &count, &unroll) != 2) return 2;
  copytune::RawCopy raw[copytune::kMaxCopies];
  for (int i = 0; i < count; ++i) {
    long long v[6];
    for (auto& x : v) if (scanf("%lld", &x) != 1) return 2;
    raw[i] = copytune::RawCopy{v[0], v[1], v[2], v[3], v[4], v[5]};
  }
  copytune::Params p;
  const long long tiles = copytune::plan_launch(raw, count, unroll, &p);
  printf("%lld %d\n", tiles, p.count);
  for (int e = 0; e < p.count; ++e) {
    const copytune::Copy& c = p.c[e];
    printf("%lld %lld %lld %lld %lld %lld %lld %d %d\n", (long long)c.src, (long long)c.dst, (long long)c.n,
           (long long)c.cols, (long long)c.src_stride, (long long)c.dst_stride, (long long)c.tile_begin,
           c.vec_log2, c.load_log2);
  }
}
"""
THREADS = 256
MAX_COPIES = 32


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if NVCC is None:
        pytest.skip("no nvcc on this machine")
    folder = tmp_path_factory.mktemp("plan")
    (folder / "harness.cu").write_text(HARNESS)
    exe = folder / "harness"
    subprocess.run([NVCC, "-std=c++17", "-O1", f"-I{cuda_ext.CSRC}", str(folder / "harness.cu"),
                    str(cuda_ext.CSRC / "batched_copy_kernel.cu"), "-gencode=arch=compute_90,code=sm_90",
                    "-o", str(exe)], check=True, capture_output=True)
    return exe


def plan(harness, raws, unroll):
    text = f"{len(raws)} {unroll}\n" + "\n".join(" ".join(map(str, r)) for r in raws) + "\n"
    out = subprocess.run([str(harness)], input=text, capture_output=True, text=True, check=True).stdout.split("\n")
    tiles, count = map(int, out[0].split())
    return tiles, [tuple(map(int, line.split())) for line in out[1:1 + count]]


def replay(entries, memory: np.ndarray, tiles: int, unroll: int) -> None:
    """Move bytes as the kernel does: unit i of entry e is loaded in pieces and stored whole."""
    tile_units = THREADS * unroll
    expect_begin = 0
    for src, dst, n, cols, src_stride, dst_stride, tile_begin, vec, load in entries:
        assert tile_begin == expect_begin and load <= vec
        expect_begin += -(-n // tile_units)
        unit, piece = 1 << vec, 1 << load
        i = np.arange(n, dtype=np.int64)
        if cols != n:
            r, col = np.divmod(i, cols)
            src_at = src + (r * src_stride + col * (unit // piece)) * piece
            dst_at = dst + (r * dst_stride + col) * unit
        else:
            src_at, dst_at = src + i * unit, dst + i * unit
        assert not (src_at % piece).any() and not (dst_at % unit).any(), "misaligned vector access"
        offsets = np.arange(unit, dtype=np.int64)
        memory[(dst_at[:, None] + offsets).ravel()] = memory[(src_at[:, None] + offsets).ravel()]
    assert expect_begin == tiles


def random_copy(rng: random.Random, base: int, room: int):
    """A 1-D or 2-D copy whose source and destination alignments differ (the case that splits), or not."""
    rows = rng.choice([1, 1, 2, 3, 7, 33])
    item = rng.choice([1, 2, 4, 4, 4, 8])
    row_bytes = item * rng.choice([1, 3, 4, 5, 17, 64, 255, 257, 1025])
    src_stride = row_bytes + item * rng.choice([0, 0, 1, 3, 8])
    dst_stride = row_bytes + 16 * rng.choice([0, 1, 4]) + item * rng.choice([0, 0, 2])
    src = base + item * rng.randrange(0, 8)
    dst = base + room // 2 + 16 * rng.randrange(0, 4) + item * rng.choice([0, 0, 0, 1, 2])
    assert src + rows * src_stride < base + room // 2 and dst + rows * dst_stride < base + room
    return src, dst, rows, row_bytes, src_stride, dst_stride


@pytest.mark.parametrize("seed", range(12))
def test_planned_descriptors_move_exactly_the_bytes_with_aligned_accesses(harness, seed):
    rng = random.Random(seed)
    room = 1 << 17
    count = rng.choice([1, 2, 5, 7, 20, 32])
    raws = [random_copy(rng, k * room + 64, room - 128) for k in range(count)]
    memory = np.frombuffer(rng.randbytes(count * room), dtype=np.uint8).copy()
    want = memory.copy()
    for src, dst, rows, row_bytes, src_stride, dst_stride in raws:
        for r in range(rows):
            want[dst + r * dst_stride:dst + r * dst_stride + row_bytes] = \
                memory[src + r * src_stride:src + r * src_stride + row_bytes]
    unroll = rng.choice(cuda_ext.UNROLLS)
    tiles, entries = plan(harness, raws, unroll)
    assert len(entries) <= MAX_COPIES
    replay(entries, memory, tiles, unroll)
    assert np.array_equal(memory, want)


def test_nsa_page_table_with_an_odd_width_splits_into_a_wide_body_and_a_tail(harness):
    """[512, 1025] int32 into a 16-byte aligned buffer row: 16-byte stores from 4-byte loads, then 4 bytes a row."""
    tiles, entries = plan(harness, [(4, 16, 512, 4100, 4100, 16400)], 4)
    (body, tail) = entries
    assert body[2:4] == (512 * 256, 256) and body[7:] == (4, 2)  # units of 16 B, loads of 4 B
    assert tail[:4] == (4 + 4096, 16 + 4096, 512, 1) and tail[7:] == (2, 2)


def test_a_full_launch_is_not_split_past_its_capacity(harness):
    raws = [(4 + 64 * k, 1 << 20 | 16 * k, 2, 20, 20, 32) for k in range(MAX_COPIES)]
    _, entries = plan(harness, raws, 4)
    assert len(entries) == MAX_COPIES  # no room: each stays one descriptor of common-width units
