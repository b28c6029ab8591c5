// copytune cuda_ext: descriptors and launch API of the batched copy kernel (no torch headers: this part compiles
// with plain nvcc, which is how CI checks it on machines without a GPU).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

namespace copytune {

// Descriptors per launch. 32 descriptors of 64 bytes and 64 further destinations keep the parameter struct at
// 2.5 KiB, under the 4 KiB kernel parameter limit of every CUDA 12+ target (its size costs no launch time:
// benchmarks/RESULTS.md, issue 7); 3 NSA backends (21 copies) fit one launch unbroadcast, up to 10 draft backends
// of one step broadcast (7 or 8 descriptors, the rest extra destinations).
constexpr int kMaxCopies = 32;
constexpr int kMaxExtra = 64;  // destinations beyond each descriptor's first, per launch (broadcast copies)
constexpr int kThreads = 256;  // per block; 8 warps
static_assert(kMaxExtra <= 127, "extra destinations are indexed by int8");
inline bool valid_unroll(int unroll) { return unroll == 1 || unroll == 2 || unroll == 4 || unroll == 8; }

// One copy as the caller describes it, in bytes: `rows` rows of `row_bytes` contiguous bytes.
struct RawCopy {
  int64_t src, dst, rows, row_bytes, src_stride, dst_stride;
};

// One copy as the kernel reads it: in units of (1 << vec_log2) bytes, the widest that divides the destination
// address, row length and row stride (and, unless loads are split, the source's too), so 16-byte stores are used
// wherever alignment allows. Each unit is loaded as 1 << (vec_log2 - load_log2) pieces of (1 << load_log2) bytes:
// one piece where the source is as aligned as the destination; several where it is not (an NSA page table whose
// width is not a multiple of 4 int32: contiguous source rows 4-byte aligned, destination rows 16-byte aligned).
struct Copy {
  int64_t src, dst;
  int64_t n;           // units in the copy
  int64_t cols;        // units per row
  int64_t src_stride;  // load pieces between source rows
  int64_t dst_stride;  // units between destination rows
  int32_t tile_begin;  // first tile of this copy in the launch's flattened tile list (the grid is < 2^31)
  // Decided on the host, so that a thread's first instructions are loads: whether each row has tiles of its own
  // (`row_tiles`: a thread indexes within one row, the block finds its row), the one divisor a 32-bit index is
  // divided by as a multiply-shift (FastDivmod: q / d == umulhi(q, cols_mul) >> cols_shr for every q < 2^31;
  // cols_mul == 0 means d == 1) - the tiles per row of a row-tiled copy, else `cols` - and whether indices need 64
  // bits (`wide`: 64-bit division is emulated, ~100 cycles a thread before its first load).
  uint32_t cols_mul;
  int8_t cols_shr;
  int8_t wide;
  int8_t vec_log2;
  int8_t load_log2;    // <= vec_log2
  int8_t row_tiles;
  int8_t extra_begin;  // the same units are also stored at Params::extra[extra_begin, extra_begin + extra_count):
  int8_t extra_count;  // a broadcast, several copies of one source read once (draft backends of one step)
  int8_t reserved;
};
static_assert(sizeof(Copy) == 64, "a descriptor is one 64-byte line of the parameter space");

struct Params {
  Copy c[kMaxCopies];
  int64_t extra[kMaxExtra];  // further destination addresses, in the layout of their descriptor's dst
  int32_t count;
  int32_t wide;  // some descriptor needs 64-bit indices: the launch takes the kernel compiled for them
};
static_assert(sizeof(Params) <= 4096, "kernel parameters are limited to 4 KiB");

// Fill `p` from a prefix of `raw[0..count)` for tiles of kThreads * unroll units; returns the number of tiles (the
// grid) and sets `*planned` to the prefix's length (at least 1; the rest goes into another launch).
// Copies of the same source bytes (address, rows, row length, source stride) into destinations of the same row
// stride become one descriptor that stores each unit to every destination: the source is read once. Copies in
// a batch never write where another reads or writes (the plan validated that), so their order is free.
// A 2-D copy whose rows are less aligned on the source than on the destination is split into a body of whole
// 16- or 8-byte destination units (loaded in pieces) and a narrow tail per row, while `p` has room.
// `leaders` (optional, room for kMaxCopies + kMaxExtra): for each planned copy, the index of its group's first
// copy, whose source every descriptor of the group reads; `desc_leaders` (optional, kMaxCopies): the same per
// descriptor. With them a caller can move sources without planning again (BoundBatch::commit_and_launch).
int64_t plan_launch(const RawCopy* raw, int count, int unroll, Params* p, int* planned, int* leaders = nullptr,
                    int* desc_leaders = nullptr);

// Launch one chunk planned with the same `unroll` on `stream` of `device`, which must be the current device.
// Returns the launch's cudaError_t.
cudaError_t launch_batched_copy(const Params& p, int64_t tiles, int unroll, cudaStream_t stream, int device);

// Launches so far that went out through the driver directly, and through the runtime (tests and diagnostics).
void launch_counts(int64_t* direct, int64_t* runtime);

// A batch's launches (host side): its copies planned into as many parameter structs as they need, and where each
// descriptor's source comes from, so that a call whose sources only moved patches addresses instead of planning
// again. The structs are kept and only grow: a step allocates nothing once the batch has run.
class LaunchPlan {
 public:
  // Plan `raw` (every copy of the batch, in order) for tiles of kThreads * unroll units. May throw bad_alloc;
  // then nothing of a half-made plan is kept (launches() is 0 and moved() answers false).
  void plan(const std::vector<RawCopy>& raw, int unroll);

  // Whether `now` differs from `planned` (the copies of the last plan()) only in source addresses that keep the
  // plan: the same shapes, the same alignment (mod 16 bytes, the widest unit), and every group's members moved
  // together (still one source). Sources that come to coincide keep their separate descriptors (same bytes).
  bool moved(const std::vector<RawCopy>& planned, const std::vector<RawCopy>& now) const;

  // After moved() said so: each descriptor reads its group leader's source in `now`.
  void move_sources(const std::vector<RawCopy>& now);

  size_t launches() const { return chunks_; }
  const Params& params(size_t k) const { return params_[k]; }
  int64_t tiles(size_t k) const { return tiles_[k]; }

 private:
  struct Map {  // where each descriptor's source comes from: now[desc_leader].src + src_offset
    int desc_leader[kMaxCopies];
    int64_t src_offset[kMaxCopies];
  };
  std::vector<Params> params_;  // one per launch; only the first chunks_ are this batch's
  std::vector<int64_t> tiles_;
  std::vector<Map> map_;
  std::vector<size_t> group_leader_;  // copy i reads the source of copy group_leader_[i]
  std::vector<size_t> scratch_;       // the next plan's group_leader_ while it is made
  size_t chunks_ = 0;
};

}  // namespace copytune
