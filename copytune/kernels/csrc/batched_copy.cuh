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
constexpr int kUnroll = 4;     // units per thread per tile: 4 independent 16-byte loads in flight
constexpr int64_t kTileUnits = int64_t(kThreads) * kUnroll;

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

// Fill `p` from `raw[0..count)` and return the number of tiles (the grid size).
int64_t plan_launch(const RawCopy* raw, int count, Params* p);

// Launch one chunk (at most kMaxCopies copies). Returns the launch's cudaError_t.
cudaError_t launch_batched_copy(const Params& p, int64_t tiles, cudaStream_t stream);

}  // namespace copytune
