// copytune cuda_ext kernel: one launch copies up to kMaxCopies 1-D or 2-D strided byte ranges.
//
// Blocks map to (copy, tile) through a flattened tile list, so no block is launched only to exit (the scalar
// grid-stride design costs ~3 us of GPU time even for tiny batches on an H100; tile-mapped kernels 1.5-1.9 us).
// Descriptors travel by value as one __grid_constant__ struct: no device-side table, no per-call H2D copy.
#include "batched_copy.cuh"

namespace copytune {

template <int kUnroll, typename T, bool kRows, typename Index>
__device__ __forceinline__ void copy_tile(const Copy& c, Index start) {
  const T* __restrict__ src = reinterpret_cast<const T*>(c.src);
  T* __restrict__ dst = reinterpret_cast<T*>(c.dst);
  const Index n = static_cast<Index>(c.n);
  T v[kUnroll];
  Index to[kUnroll];
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {  // all loads first: kUnroll independent loads in flight per thread
    const Index i = start + Index(k) * kThreads + threadIdx.x;
    if (i < n) {
      Index from = i;
      to[k] = i;
      if constexpr (kRows) {
        const Index cols = static_cast<Index>(c.cols);
        const Index r = i / cols, col = i - r * cols;
        from = r * static_cast<Index>(c.src_stride) + col;
        to[k] = r * static_cast<Index>(c.dst_stride) + col;
      }
      v[k] = src[from];
    }
  }
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    if (start + Index(k) * kThreads + threadIdx.x < n) dst[to[k]] = v[k];
  }
}

template <int kUnroll, typename T>
__device__ __forceinline__ void copy_units(const Copy& c, int64_t start) {
  // 32-bit index arithmetic when the copy allows it: 64-bit division is emulated and several times slower.
  const bool rows = c.cols != c.n;
  if (c.n <= INT32_MAX && (!rows || (c.src_stride <= INT32_MAX / 2 && c.dst_stride <= INT32_MAX / 2 &&
                                      c.n / c.cols * (c.src_stride > c.dst_stride ? c.src_stride : c.dst_stride)
                                          <= INT32_MAX))) {
    rows ? copy_tile<kUnroll, T, true, uint32_t>(c, uint32_t(start))
         : copy_tile<kUnroll, T, false, uint32_t>(c, uint32_t(start));
  } else {
    rows ? copy_tile<kUnroll, T, true, int64_t>(c, start) : copy_tile<kUnroll, T, false, int64_t>(c, start);
  }
}

template <int kUnroll>
__global__ void __launch_bounds__(kThreads) batched_copy_kernel(const __grid_constant__ Params p) {
  const int64_t tile = blockIdx.x;
  int lo = 0, hi = p.count - 1;  // last copy whose first tile <= tile (empty copies share a begin: skipped)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.c[mid].tile_begin <= tile) lo = mid; else hi = mid - 1;
  }
  const Copy& c = p.c[lo];
  const int64_t start = (tile - c.tile_begin) * (int64_t(kThreads) * kUnroll);
  switch (c.vec_log2) {
    case 4: copy_units<kUnroll, uint4>(c, start); break;
    case 3: copy_units<kUnroll, uint2>(c, start); break;
    case 2: copy_units<kUnroll, uint32_t>(c, start); break;
    case 1: copy_units<kUnroll, uint16_t>(c, start); break;
    default: copy_units<kUnroll, uint8_t>(c, start); break;
  }
}

int64_t plan_launch(const RawCopy* raw, int count, int unroll, Params* p) {
  const int64_t tile_units = int64_t(kThreads) * unroll;
  int64_t tiles = 0;
  p->count = count;
  for (int j = 0; j < count; ++j) {
    const RawCopy& r = raw[j];
    uint64_t bits = uint64_t(r.src) | uint64_t(r.dst) | uint64_t(r.row_bytes);
    if (r.rows > 1) bits |= uint64_t(r.src_stride) | uint64_t(r.dst_stride);
    int v = 4;
    while (v > 0 && (bits & ((uint64_t(1) << v) - 1))) --v;
    Copy& c = p->c[j];
    c.src = r.src;
    c.dst = r.dst;
    c.vec_log2 = v;
    c.pad_ = 0;
    c.cols = r.row_bytes >> v;
    c.n = r.rows * c.cols;
    c.src_stride = r.src_stride >> v;
    c.dst_stride = r.dst_stride >> v;
    if (c.cols == 0) c.cols = 1;  // empty copy: n == 0, never divided by
    c.tile_begin = tiles;
    tiles += (c.n + tile_units - 1) / tile_units;
  }
  return tiles;
}

cudaError_t launch_batched_copy(const Params& p, int64_t tiles, int unroll, cudaStream_t stream) {
  if (tiles == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(tiles);
  switch (unroll) {
    case 1: batched_copy_kernel<1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: batched_copy_kernel<2><<<grid, kThreads, 0, stream>>>(p); break;
    case 8: batched_copy_kernel<8><<<grid, kThreads, 0, stream>>>(p); break;
    default: batched_copy_kernel<4><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace copytune
