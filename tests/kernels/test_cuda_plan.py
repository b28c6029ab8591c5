"""cuda_ext's launch planning, checked on any machine with nvcc (no GPU): the host-side ``LaunchPlan`` (what
``BoundBatch`` launches) is compiled into a small program, and its descriptors are replayed here exactly as the
kernel indexes memory, so every split into a 16-byte-store body loaded in pieces plus a narrow tail, every
broadcast to several destinations and every source moved in place must move exactly the bytes of the copies, with
every access aligned to its width (a misaligned vector access faults on the GPU)."""

import random
import subprocess
from typing import NamedTuple

import numpy as np
import pytest

from copytune.kernels import cuda_ext
from tests.kernels.test_cuda_ext import NVCC

HARNESS = r"""
#include "batched_copy.cuh"
#include <cstdio>
#include <vector>
// Reads steps of a batch: "count unroll", then per step `count` copies (6 values each). The first step is planned;
// each later one patched in place where LaunchPlan::moved says it may (as BoundBatch does), else planned again.
// Prints per step "moved|planned launches", then per launch "tiles count wide" and its descriptors.
static bool read(std::vector<copytune::RawCopy>* raw) {
  for (auto& r : *raw) {
    long long v[6];
    for (auto& x : v) if (scanf("%lld", &x) != 1) return false;
    r = copytune::RawCopy{v[0], v[1], v[2], v[3], v[4], v[5]};
  }
  return true;
}
int main() {
  int count, unroll;
  if (scanf("%d %d", &count, &unroll) != 2) return 2;
  std::vector<copytune::RawCopy> planned(count), now(count);
  if (!read(&planned)) return 2;
  copytune::LaunchPlan plan;
  plan.plan(planned, unroll);
  bool moved = false;
  while (true) {
    printf("%s %zu\n", moved ? "moved" : "planned", plan.launches());
    for (size_t k = 0; k < plan.launches(); ++k) {
      const copytune::Params& p = plan.params(k);
      printf("%lld %d %d\n", (long long)plan.tiles(k), p.count, p.wide);
      for (int e = 0; e < p.count; ++e) {
        const copytune::Copy& c = p.c[e];
        printf("%lld %lld %lld %lld %lld %lld %lld %d %d %u %d %d %d |", (long long)c.src, (long long)c.dst,
               (long long)c.n, (long long)c.cols, (long long)c.src_stride, (long long)c.dst_stride,
               (long long)c.tile_begin, c.vec_log2, c.load_log2, c.cols_mul, c.cols_shr, c.wide, c.row_tiles);
        for (int x = 0; x < c.extra_count; ++x) printf(" %lld", (long long)p.extra[c.extra_begin + x]);
        printf("\n");
      }
    }
    if (!read(&now)) return 0;
    moved = plan.moved(planned, now);
    if (moved) plan.move_sources(now); else plan.plan(now, unroll);
    planned.swap(now);
  }
}
"""
THREADS = 256
MAX_COPIES, MAX_EXTRA = 32, 64


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


def steps(harness, raw_steps, unroll):
    """Every step of a batch whose copies change from step to step (the same count): per step, whether its plan
    was patched in place ("moved") or made again ("planned"), and its launches (tiles, descriptors), each
    descriptor (src, dst, n, cols, src_stride, dst_stride, tile_begin, vec_log2, load_log2, extra destinations,
    Kernel(cols_mul, cols_shr, wide, row_tiles))."""
    text = f"{len(raw_steps[0])} {unroll}\n" + "\n".join(" ".join(map(str, r)) for raws in raw_steps for r in raws)
    out = subprocess.run([str(harness)], input=text + "\n", capture_output=True, text=True,
                         check=True).stdout.split("\n")
    result, k = [], 0
    while k < len(out) and out[k]:
        kind, count = out[k].split()
        k += 1
        launched = []
        for _ in range(int(count)):
            tiles, n, wide = map(int, out[k].split())
            entries = []
            for line in out[k + 1:k + 1 + n]:
                fields, extra = line.split("|")
                v = tuple(map(int, fields.split()))
                entries.append(v[:9] + (tuple(map(int, extra.split())), Kernel(*v[9:])))
            assert len(entries) <= MAX_COPIES and sum(len(e[9]) for e in entries) <= MAX_EXTRA
            assert wide == any(e[10].wide for e in entries), "the launch's index width is its descriptors'"
            launched.append((tiles, entries))
            k += 1 + n
        result.append((kind, launched))
    assert len(result) == len(raw_steps)
    return result


def launches(harness, raws, unroll):
    """Every launch of one batch: (tiles, descriptors)."""
    (_, launched), = steps(harness, [raws], unroll)
    return launched


def plan(harness, raws, unroll):
    """The one launch of a batch that fits one: (tiles, descriptors)."""
    (tiles, entries), = launches(harness, raws, unroll)
    return tiles, entries


class Kernel(NamedTuple):
    """What a descriptor tells the kernel beyond its copy: the multiply-shift divisor (of ``cols``, or of the tiles
    per row where ``row_tiles``), and whether its indices take 64 bits."""
    mul: int
    shr: int
    wide: int
    row_tiles: int


def units_of(n: int, cols: int, tile_units: int, k: Kernel) -> tuple[np.ndarray, np.ndarray, int]:
    """Every unit the kernel moves for one descriptor, as (row, column) with the row found as the kernel finds it,
    and the descriptor's tiles. Row tiles: each row ``chunks`` tiles, a tile's row by the multiply-shift of its
    index and its lanes past the row's end idle; flat tiles: unit i of the copy, its row by the multiply-shift of
    i (32-bit) or a division (64-bit)."""
    if k.row_tiles:
        rows, chunks = n // cols, -(-cols // tile_units)
        t = np.arange(rows * chunks, dtype=np.int64)
        row = fast_quotient(t, k.mul, k.shr)
        assert np.array_equal(row, t // chunks), "row of a tile"
        col = ((t - row * chunks) * tile_units)[:, None] + np.arange(tile_units, dtype=np.int64)
        assert chunks * tile_units - 1 < 2**32, "column index wraps"
        live = col < cols
        return np.broadcast_to(row[:, None], col.shape)[live], col[live], rows * chunks
    i = np.arange(n, dtype=np.int64)
    if cols == n:
        return np.zeros_like(i), i, -(-n // tile_units)
    r = i // cols if k.wide else fast_quotient(i, k.mul, k.shr)
    assert np.array_equal(r, i // cols), "row of a unit"
    return r, i - r * cols, -(-n // tile_units)


def replay(entries, memory: np.ndarray, tiles: int, unroll: int) -> None:
    """Move bytes as the kernel does: unit i of entry e is loaded in pieces and stored whole, to its destination
    and to each extra one at the same offset."""
    tile_units = THREADS * unroll
    expect_begin = 0
    for src, dst, n, cols, src_stride, dst_stride, tile_begin, vec, load, extra, kernel in entries:
        assert tile_begin == expect_begin and load <= vec
        r, col, used = units_of(n, cols, tile_units, kernel)
        expect_begin += used
        assert len(col) == n and len(np.unique(r * cols + col)) == n, "every unit once"
        unit, piece = 1 << vec, 1 << load
        src_at = src + (r * src_stride + col * (unit // piece)) * piece
        dst_at = (r * dst_stride + col) * unit
        assert not (src_at % piece).any(), "misaligned load"
        if not kernel.wide and n:  # the 32-bit kernel: every index it forms (load pieces, stores, the tile's last unit)
            per = unit // piece
            if kernel.row_tiles:  # within a row: the row's offset is added to the 64-bit base addresses
                pieces, stores = col * per + (per - 1), col
            else:
                pieces, stores = (src_at - src) // piece + (per - 1), dst_at // unit
                assert n - 1 <= 2**31 - 1 and used * tile_units - 1 < 2**32, "tile index wraps"
            assert max(int(pieces.max()), int(stores.max())) <= 2**31 - 1, "index past 31 bits"
        offsets = np.arange(unit, dtype=np.int64)
        loaded = memory[(src_at[:, None] + offsets).ravel()]  # every load before any store, as a thread does
        for base in (dst, *extra):
            assert not ((base + dst_at) % unit).any(), "misaligned store"
            memory[(base + dst_at[:, None] + offsets).ravel()] = loaded
    assert expect_begin == tiles


def fast_quotient(i: np.ndarray, mul: int, shr: int) -> np.ndarray:
    """The kernel's 32-bit row index: umulhi(i, mul) >> shr (mul 0: the divisor is 1)."""
    if mul == 0:
        return i
    return ((i.astype(np.uint64) * np.uint64(mul)) >> np.uint64(32 + shr)).astype(np.int64)


def copy_bytes(raws, memory: np.ndarray) -> np.ndarray:
    want = memory.copy()
    for src, dst, rows, row_bytes, src_stride, dst_stride in raws:
        for r in range(rows):
            want[dst + r * dst_stride:dst + r * dst_stride + row_bytes] = \
                memory[src + r * src_stride:src + r * src_stride + row_bytes]
    return want


def random_copy(rng: random.Random, base: int, room: int):
    """A 1-D or 2-D copy whose source and destination alignments differ (the case that splits), or not; drawn
    again until its source fits the first half of ``room`` and its destination the second."""
    while True:
        rows = rng.choice([1, 1, 2, 3, 7, 33])
        item = rng.choice([1, 2, 4, 4, 4, 8])
        row_bytes = item * rng.choice([1, 3, 4, 5, 17, 64, 255, 257, 1025])
        src_stride = row_bytes + item * rng.choice([0, 0, 1, 3, 8])
        dst_stride = row_bytes + 16 * rng.choice([0, 1, 4]) + item * rng.choice([0, 0, 2])
        src = base + item * rng.randrange(0, 8)
        dst = base + room // 2 + 16 * rng.randrange(0, 4) + item * rng.choice([0, 0, 0, 1, 2])
        if src + rows * src_stride < base + room // 2 and dst + rows * dst_stride < base + room:
            return src, dst, rows, row_bytes, src_stride, dst_stride


@pytest.mark.parametrize("seed", range(16))
def test_planned_descriptors_move_exactly_the_bytes_with_aligned_accesses(harness, seed):
    """Random batches, some copies reading one source into several destinations (a broadcast where their row
    strides agree), over one launch's capacity or not: every launch replayed, the bytes exact."""
    rng = random.Random(seed)
    room = 1 << 17
    count = rng.choice([1, 2, 5, 7, 20, 32, 45, 100])
    raws = []
    for k in range(count):
        raw = random_copy(rng, k * room + 64, room - 128)
        if raws and rng.random() < 0.5:  # the same source as an earlier copy, into this copy's own region
            src, _, rows, row_bytes, src_stride, dst_stride = rng.choice(raws)
            dst = raw[1]
            if dst + rows * dst_stride < k * room + room:
                raw = (src, dst, rows, row_bytes, src_stride, dst_stride)
        raws.append(raw)
    memory = np.frombuffer(rng.randbytes(count * room), dtype=np.uint8).copy()
    want = copy_bytes(raws, memory)
    unroll = rng.choice(cuda_ext.UNROLLS)
    for tiles, entries in launches(harness, raws, unroll):
        replay(entries, memory, tiles, unroll)
    assert np.array_equal(memory, want)


def test_nsa_page_table_with_an_odd_width_splits_into_a_wide_body_and_a_tail(harness):
    """[512, 1025] int32 into a 16-byte aligned buffer row: 16-byte stores from 4-byte loads, then 4 bytes a row."""
    tiles, entries = plan(harness, [(4, 16, 512, 4100, 4100, 16400)], 4)
    (body, tail) = entries
    assert body[2:4] == (512 * 256, 256) and body[7:9] == (4, 2)  # units of 16 B, loads of 4 B
    assert tail[:4] == (4 + 4096, 16 + 4096, 512, 1) and tail[7:9] == (2, 2)


def test_a_full_launch_is_not_split_past_its_capacity(harness):
    raws = [(4 + 64 * k, 1 << 20 | 16 * k, 2, 20, 20, 32) for k in range(MAX_COPIES)]
    _, entries = plan(harness, raws, 4)
    assert len(entries) == MAX_COPIES  # no room: each stays one descriptor of common-width units


def nsa_step(backends: int, bs: int = 32, cols: int = 1025):
    """Speculative decoding's refresh: every draft backend copies the same 7 sources (five [bs] int32, the
    cumulative lengths, a [bs, cols] page table) into its own buffers (the page table rows 4 KiB apart)."""
    sources = [(1 << 20) + 4096 * k for k in range(6)] + [1 << 22]
    copies = []
    for b in range(backends):
        base = (1 << 24) * (b + 1)
        copies += [(sources[k], base + 4096 * k, 1, 4 * bs, 4 * bs, 4 * bs) for k in range(5)]
        copies.append((sources[5] + 4, base + 4096 * 5 + 4, 1, 4 * bs, 4 * bs, 4 * bs))  # cu_seqlens[1:]
        copies.append((sources[6], base + (1 << 23), bs, 4 * cols, 4 * cols, 4 * 4096))
    return copies


@pytest.mark.parametrize("backends", [2, 4, 6, 10])
def test_draft_backends_of_one_step_read_each_source_once(harness, backends):
    """N backends x 7 copies of 7 sources: one launch of 7 descriptors (8: the odd-width page table splits while
    the extras have room), each storing to all N destinations."""
    raws = nsa_step(backends)
    (tiles, entries), = launches(harness, raws, 4)
    assert len(entries) in (7, 8)
    assert all(len(e[9]) == backends - 1 for e in entries)
    assert len(entries) == 8 or 8 * (backends - 1) > MAX_EXTRA  # split where the extras hold both parts
    low, high = min(min(r[0], r[1]) for r in raws), max(r[1] + r[2] * r[5] for r in raws)
    memory = np.frombuffer(random.Random(backends).randbytes(high - low + 64), dtype=np.uint8).copy()
    shifted = [(s - low, d - low, *rest) for s, d, *rest in raws]
    want = copy_bytes(shifted, memory)
    replay([(s - low, d - low, *mid, tuple(x - low for x in extra), div) for s, d, *mid, extra, div in entries],
           memory, tiles, 4)
    assert np.array_equal(memory, want)


def test_more_backends_than_a_launch_holds_take_further_launches(harness):
    """12 backends: 77 extra destinations past 64 - the copies that do not fit go into a second launch."""
    raws = nsa_step(12)
    plans = launches(harness, raws, 2)
    assert len(plans) == 2 and sum(1 + len(e[9]) for e in plans[0][1]) == 7 + MAX_EXTRA


def test_copies_of_one_source_with_other_row_strides_are_not_merged(harness):
    raws = [(1 << 20, 1 << 22, 4, 64, 64, 128), (1 << 20, 1 << 23, 4, 64, 64, 256)]
    _, entries = plan(harness, raws, 4)
    assert len(entries) == 2 and not entries[0][9] and not entries[1][9]


def groups_of(raws) -> dict:
    """Copy index -> its group's first copy, as plan_launch groups them: the same source bytes (address, rows, row
    length, source stride) into destinations of the same row stride."""
    first = {}
    return {i: first.setdefault((r[0], r[2], r[3], r[4], r[5]), i) for i, r in enumerate(raws)}


@pytest.mark.parametrize("seed", range(12))
def test_sources_moved_in_place_keep_the_plan_only_where_it_still_holds(harness, seed):
    """Steps of one batch whose sources move (as a serving loop's do): by whole 16 bytes with every group moving
    together, the plan is patched in place; to another alignment, or a group's members apart, it is planned again.
    Every step replayed: exactly the bytes of that step's copies."""
    rng = random.Random(seed)
    room = 1 << 17
    count = rng.choice([3, 7, 20, 40, 90])
    raws = []
    for k in range(count):  # destinations 2 KiB further up than random_copy puts them: room to move the sources
        src, dst, rows, row_bytes, src_stride, dst_stride = random_copy(rng, k * room + 64, room - 4096)
        if raws and rng.random() < 0.5:  # an earlier copy's source, often of its shape too (a group)
            src, _, rows, row_bytes, src_stride, other = rng.choice(raws)
            dst_stride = other if rng.random() < 0.8 else dst_stride
            if dst + 2048 + rows * max(dst_stride, row_bytes) >= k * room + room:
                continue
        raws.append((src, dst + 2048, rows, row_bytes, src_stride, dst_stride))
    raw_steps, kinds, base = [raws], ["planned"], [r[0] for r in raws]
    for step in range(6):
        prev = raw_steps[-1]
        shift = {b: 16 * rng.randrange(0, 60) for b in set(base)}  # from the first step's sources: < 1 KiB
        now = [(b + shift[b],) + r[1:] for b, r in zip(base, raws)]
        how = "together" if step == 0 else rng.choice(["together", "together", "realign", "apart"])
        if how == "realign":
            i = rng.randrange(len(now))
            now = [(r[0] + 4,) + r[1:] if base[j] == base[i] else r for j, r in enumerate(now)]
        if how == "apart":
            i = rng.randrange(len(now))
            now[i] = (now[i][0] + 16,) + now[i][1:]
        groups = groups_of(prev)
        delta = [n[0] - p[0] for n, p in zip(now, prev)]
        kinds.append("moved" if all(d % 16 == 0 for d in delta) and all(
            delta[i] == delta[g] for i, g in groups.items()) else "planned")
        raw_steps.append(now)
    unroll = rng.choice(cuda_ext.UNROLLS)
    got = steps(harness, raw_steps, unroll)
    assert [kind for kind, _ in got] == kinds
    for (kind, launched), step_raws in zip(got, raw_steps):
        memory = np.frombuffer(rng.randbytes(len(raws) * room), dtype=np.uint8).copy()
        want = copy_bytes(step_raws, memory)
        for tiles, entries in launched:
            replay(entries, memory, tiles, unroll)
        assert np.array_equal(memory, want), kind
    assert kinds[1] == "moved"  # the patch path is exercised in every case


@pytest.mark.parametrize("unit", [1, 4, 16])
def test_row_index_division_is_exact_for_every_unit_up_to_the_32_bit_bound(harness, unit):
    """The kernel divides an index by the units per row (flat tiles) or a tile's by the tiles per row (row tiles)
    with a multiply and a shift the host chose: exact for every divisor the planner produces, at the largest
    indices the 32-bit path reaches (2^31 - 1)."""
    rng = random.Random(unit)
    widths = [1, 2, 3, 5, 7, 64, 255, 256, 257, 1025, 4097, 65535, 65537]
    widths += [rng.randrange(2, 1 << 20) for _ in range(40)]
    if unit == 1:  # the widest rows the 32-bit path takes: two rows, the second's end just under 2^31
        widths += [2**30 - 9, 2**30 - 11, 2**29 + 1, 3 * 2**27 - 1]
    for cols in widths:
        row_bytes = cols * unit
        rows = 3 if cols < 2**20 else 2
        raws = [(0, 1 << 40, rows, row_bytes, row_bytes + unit, row_bytes + 16)]  # strided: rows, not one run
        _, entries = plan(harness, raws, 1)
        body = entries[0]
        n, cols_units, kernel = body[2], body[3], body[10]
        assert not kernel.wide and cols_units != n
        divisor = -(-cols_units // THREADS) if kernel.row_tiles else cols_units  # row tiles: tiles per row
        top = 2**31 - 1
        i = np.unique(np.concatenate([np.arange(0, min(4 * divisor, 1 << 16)),
                                      np.array([rng.randrange(top) for _ in range(4000)]),
                                      top - np.arange(0, min(2 * divisor, 1 << 16)),
                                      (top // divisor - np.arange(0, 1000)) * divisor - 1,  # row ends
                                      (top // divisor - np.arange(0, 1000)) * divisor])).astype(np.int64)
        i = i[(i >= 0) & (i <= top)]
        assert np.array_equal(fast_quotient(i, kernel.mul, kernel.shr), i // divisor), cols


def test_indices_past_32_bits_take_the_64_bit_path(harness):
    """A copy whose last row starts 2^31 units or more past its first is planned wide (64-bit indices)."""
    (_, entries), = launches(harness, [(0, 1 << 40, 2, 16, 2**35, 16)], 1)
    assert entries[0][10].wide == 1
    (_, entries), = launches(harness, [(0, 1 << 40, 2, 16, 16, 32)], 1)
    assert entries[0][10].wide == 0
    # 1-byte units (odd strides); one past the second row's last unit at 2^31 - 1 (narrow) or 2^31 + 1 (wide)
    for stride, wide in ((2**31 - 17, 0), (2**31 - 15, 1)):
        (_, entries), = launches(harness, [(0, 1 << 40, 2, 16, 16, stride)], 1)
        assert entries[0][7] == 0 and entries[0][10].wide == wide, stride


@pytest.mark.parametrize("unroll", [1, 2])
def test_rows_that_fill_whole_tiles_are_row_tiled(harness, unroll):
    """The NSA page table at max_len 8192 ([128, 8193] int32 into rows of a wider buffer): its body rows are 2048
    16-byte units, whole tiles, so each row gets tiles of its own (no per-thread division); the 1-unit tail rows
    stay flat. Replayed exact."""
    raws = [(4, 1 << 24, 128, 4 * 8193, 4 * 8193, 4 * 8320)]
    tiles, entries = plan(harness, raws, unroll)
    body, tail = entries
    assert body[10].row_tiles and not body[10].wide and body[3] == 2048
    assert not tail[10].row_tiles and tail[3] == 1
    assert tiles == 128 * 2048 // (THREADS * unroll) + 1
    memory = np.frombuffer(random.Random(unroll).randbytes((1 << 24) + 128 * 4 * 8320), dtype=np.uint8).copy()
    want = copy_bytes(raws, memory)
    replay(entries, memory, tiles, unroll)
    assert np.array_equal(memory, want)


def test_short_rows_stay_flat_and_far_apart_rows_stay_32_bit_when_row_tiled(harness):
    """Rows of 300 units would take 2 tiles each (1.5x the flat tiles): flat. Rows of whole tiles 2^35 bytes
    apart: row-tiled, and the 32-bit kernel (a row's offset is added to the base address in 64 bits)."""
    (_, entries), = launches(harness, [(0, 1 << 40, 3, 16 * 300, 16 * 300, 16 * 320)], 1)
    assert not entries[0][10].row_tiles
    (_, entries), = launches(harness, [(0, 1 << 40, 2, 16 * 256, 2**35, 16 * 256)], 1)
    assert entries[0][10].row_tiles and not entries[0][10].wide
    (_, entries), = launches(harness, [(0, 1 << 40, 2, 16, 2**35, 16)], 1)  # 1 unit a row: flat, so 64-bit
    assert not entries[0][10].row_tiles and entries[0][10].wide
