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

// One copy as the kernel reads it: in units of (1 << vec_log2) bytes, the widest that divides both addresses,
// the row length and both row strides, so 16-byte vector loads are used wherever alignment allows.
struct Copy {
  int64_t src, dst;
  int64_t n;     // units in the copy
  int64_t cols;  // units per row
  int64_t src_stride, dst_stride;  // units between rows
  int64_t tile_begin;              // first tile of this copy in the launch's flattened tile list
  int32_t vec_log2;
  int32_t pad_;
};

struct Params {
  Copy c[kMaxCopies];
  int32_t count;
};

// Fill `p` from `raw[0..count)` for tiles of kThreads * unroll units; returns the number of tiles (the grid).
int64_t plan_launch(const RawCopy* raw, int count, int unroll, Params* p);

// Launch one chunk (at most kMaxCopies copies) planned with the same `unroll`. Returns the launch's cudaError_t.
cudaError_t launch_batched_copy(const Params& p, int64_t tiles, int unroll, cudaStream_t stream);

}  // namespace copytune
