// copytune cuda_ext: descriptors and launch API of the batched copy kernel (no torch headers: this part compiles
// with plain nvcc, which is how CI checks it on machines without a GPU).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace copytune {

// Copies per launch. 32 descriptors of 64 bytes keep the parameter struct at 2 KiB, under the 4 KiB kernel
// parameter limit of every CUDA 12+ target; 3 NSA backends (21 copies) fit one launch.
constexpr int kMaxCopies = 32;
constexpr int kThreads = 256;  // per block; 8 warps
// Units per thread per tile (independent loads in flight per thread), a tuned parameter: 4 (16 KiB tiles of
// 16-byte units) serves most batches; 1-2 spread a few MiB over more SMs, 8 halves the blocks of large copies.
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
  int64_t tile_begin;  // first tile of this copy in the launch's flattened tile list
  int32_t vec_log2;
  int32_t load_log2;   // <= vec_log2
};

struct Params {
  Copy c[kMaxCopies];
  int32_t count;
};

// Fill `p` from `raw[0..count)` for tiles of kThreads * unroll units; returns the number of tiles (the grid).
// A 2-D copy whose rows are less aligned on the source than on the destination is split into a body of whole
// 16- or 8-byte destination units (loaded in pieces) and a narrow tail per row, while `p` has room.
int64_t plan_launch(const RawCopy* raw, int count, int unroll, Params* p);

// Launch one chunk (at most kMaxCopies copies) planned with the same `unroll`. Returns the launch's cudaError_t.
cudaError_t launch_batched_copy(const Params& p, int64_t tiles, int unroll, cudaStream_t stream);

}  // namespace copytune
