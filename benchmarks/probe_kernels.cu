// Probes for benchmarks/probe_kernels.py: variants of a 2-D int32 copy (contiguous source rows of `cols`
// elements into destination rows `dst_stride` apart, the NSA page table) and of the host launch itself, timed
// against the shipped kernel (copytune/kernels/csrc, linked in) so a change to it is chosen by measurement.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>

#include <chrono>

#include "batched_copy_kernel.cu"  // the shipped kernel, its templates visible to the probes below

namespace {

// The engine's page-table loop (sglang fused_metadata_copy.cuh): 4-byte elements, grid-stride, <= 1024 blocks.
__global__ void engine_like(const int* __restrict__ src, int* __restrict__ dst, int rows, int cols, int stride) {
  const int tid = blockIdx.x * blockDim.x + threadIdx.x, total = gridDim.x * blockDim.x, n = rows * cols;
#pragma unroll 4
  for (int i = tid; i < n; i += total) {
    const int r = i / cols, c = i % cols;
    dst[r * stride + c] = src[i];
  }
}

// Row-tiled: grid (chunks of a row, rows); 16-byte destination units loaded as four 4-byte pieces (source rows
// 4-byte aligned), no division; the row's tail (< 4 elements) by the first chunk. kU units per thread.
template <int kU, int kT>
__global__ void __launch_bounds__(kT) row_tiled(const int* __restrict__ src, int* __restrict__ dst, int cols,
                                                int stride) {
  const int r = blockIdx.y;
  const int* s = src + int64_t(r) * cols;
  int4* d = reinterpret_cast<int4*>(dst + int64_t(r) * stride);
  const int units = cols >> 2;
  const int base = blockIdx.x * kT * kU + threadIdx.x;
  int4 v[kU];
#pragma unroll
  for (int k = 0; k < kU; ++k) {
    const int j = base + k * kT;
    if (j < units) v[k] = make_int4(s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3]);
  }
#pragma unroll
  for (int k = 0; k < kU; ++k) {
    const int j = base + k * kT;
    if (j < units) d[j] = v[k];
  }
  if (blockIdx.x == 0 && threadIdx.x < (cols & 3)) {
    const int c = (units << 2) + threadIdx.x;
    dst[int64_t(r) * stride + c] = s[c];
  }
}

// Flat persistent: the shipped kernel's (copy, tile) mapping but a capped grid looping over tiles.
template <int kT>
__global__ void __launch_bounds__(kT) flat_persistent(const int* __restrict__ src, int* __restrict__ dst, int rows,
                                                      int cols, int stride) {
  const int units = cols >> 2, n = rows * units;
  for (int i = blockIdx.x * kT + threadIdx.x; i < n; i += gridDim.x * kT) {
    const int r = i / units, j = i - r * units;
    const int* s = src + int64_t(r) * cols + 4 * j;
    reinterpret_cast<int4*>(dst + int64_t(r) * stride)[j] = make_int4(s[0], s[1], s[2], s[3]);
  }
  const int tails = rows * (cols & 3);
  for (int i = blockIdx.x * kT + threadIdx.x; i < tails; i += gridDim.x * kT) {
    const int r = i / (cols & 3), c = (units << 2) + i % (cols & 3);
    dst[int64_t(r) * stride + c] = src[int64_t(r) * cols + c];
  }
}

// Aligned loads: each 16-byte destination unit assembled from the two 16-byte-aligned source vectors around it
// (source rows start at any 4-byte offset); neighbours share vectors, so L1 serves half the loads.
template <int kT>
__global__ void __launch_bounds__(kT) row_aligned_loads(const int* __restrict__ src, int* __restrict__ dst, int cols,
                                                        int stride) {
  const int r = blockIdx.y;
  const int64_t first = int64_t(r) * cols;  // element index of the row's start
  const int shift = int(first & 3);
  const int4* a = reinterpret_cast<const int4*>(src + (first - shift));
  int4* d = reinterpret_cast<int4*>(dst + int64_t(r) * stride);
  const int units = cols >> 2;
  const int j = blockIdx.x * kT + threadIdx.x;
  if (j < units) {
    const int4 lo = __ldg(a + j);
    int4 out;
    if (shift == 0) {
      out = lo;
    } else {
      const int4 hi = __ldg(a + j + 1);
      const int w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      out = shift == 1 ? make_int4(w[1], w[2], w[3], w[4])
            : shift == 2 ? make_int4(w[2], w[3], w[4], w[5])
                         : make_int4(w[3], w[4], w[5], w[6]);
    }
    d[j] = out;
  }
  if (blockIdx.x == 0 && threadIdx.x < (cols & 3)) {
    const int c = (units << 2) + threadIdx.x;
    dst[int64_t(r) * stride + c] = src[first + c];
  }
}

// The shipped descriptors and copy_tile, with only the (unit, load piece) cases of an NSA page table compiled in
// (the shipped kernel inlines eight cases x two index widths x rows or not): does its code size cost?
template <int kUnroll, bool kSearch>
__global__ void __launch_bounds__(copytune::kThreads) lite(const __grid_constant__ copytune::Params p) {
  using namespace copytune;
  const int64_t tile = blockIdx.x;
  int lo = 0;
  if constexpr (kSearch) {
    int hi = p.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (p.c[mid].tile_begin <= tile) lo = mid; else hi = mid - 1;
    }
  } else {
    lo = p.count > 1 && p.c[1].tile_begin <= tile ? 1 : 0;
  }
  const Copy& c = p.c[lo];
  const uint32_t start = uint32_t((tile - c.tile_begin) * (int64_t(kThreads) * kUnroll));
  if (c.vec_log2 == 4) {
    if (c.load_log2 == 2) copy_tile<kUnroll, uint4, uint32_t, true, uint32_t>(c, p.extra, start, uint32_t(c.n), 0, 0);
    else copy_tile<kUnroll, uint4, uint4, true, uint32_t>(c, p.extra, start, uint32_t(c.n), 0, 0);
  } else {
    copy_tile<kUnroll, uint32_t, uint32_t, true, uint32_t>(c, p.extra, start, uint32_t(c.n), 0, 0);
  }
}

// lite without the search, its descriptor read by value in one round (kByValue) or through static offsets only
// (kStatic: two copies spelled out, so every field is an operand of the instruction, as a plain kernel's are).
template <bool kByValue, bool kStatic>
__global__ void __launch_bounds__(copytune::kThreads) lite_read(const __grid_constant__ copytune::Params p) {
  using namespace copytune;
  const int64_t tile = blockIdx.x;
  auto run = [&](const Copy& c) {
    const uint32_t start = uint32_t((tile - c.tile_begin) * int64_t(kThreads));
    if (c.vec_log2 == 4) {
      if (c.load_log2 == 2) copy_tile<1, uint4, uint32_t, true, uint32_t>(c, p.extra, start, uint32_t(c.n), 0, 0);
      else copy_tile<1, uint4, uint4, true, uint32_t>(c, p.extra, start, uint32_t(c.n), 0, 0);
    } else {
      copy_tile<1, uint32_t, uint32_t, true, uint32_t>(c, p.extra, start, uint32_t(c.n), 0, 0);
    }
  };
  if constexpr (kStatic) {
    if (p.count > 1 && p.c[1].tile_begin <= tile) run(p.c[1]); else run(p.c[0]);
  } else {
    const int lo = p.count > 1 && p.c[1].tile_begin <= tile ? 1 : 0;
    if constexpr (kByValue) {
      const Copy c = p.c[lo];
      run(c);
    } else {
      run(p.c[lo]);
    }
  }
}

__global__ void empty_kernel(int) {}

struct Big {
  char bytes[sizeof(copytune::Params)];
};
__global__ void empty_big(const __grid_constant__ Big) {}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The page table planned by the shipped host code into one struct that outlives the call (a captured launch keeps
// the parameter values it was given); returns the tiles. `flat`: every copy's tiles cut across its rows (the plan
// before row tiles, and the only one the lite kernels read).
int64_t plan_page_table(const int* s, int* d, int rows, int cols, int stride, int unroll, copytune::Params* p,
                        bool flat = false) {
  const copytune::RawCopy r{int64_t(s), int64_t(d), rows, int64_t(cols) * 4, int64_t(cols) * 4, int64_t(stride) * 4};
  int planned = 0;
  int64_t tiles = copytune::plan_launch(&r, 1, unroll, p, &planned);
  if (flat) {
    const int64_t tile_units = int64_t(copytune::kThreads) * unroll;
    tiles = 0;
    for (int e = 0; e < p->count; ++e) {
      copytune::Copy& c = p->c[e];
      TORCH_CHECK(!c.wide);
      if (c.row_tiles) copytune::fast_divisor(c.cols, &c.cols_mul, &c.cols_shr);
      c.row_tiles = 0;
      c.tile_begin = static_cast<int32_t>(tiles);
      tiles += (c.n + tile_units - 1) / tile_units;
    }
  }
  return tiles;
}

}  // namespace

// Launch one variant once on the current stream (for graph capture in Python).
void launch(const std::string& variant, int64_t param, const torch::Tensor& src, torch::Tensor& dst) {
  const int rows = src.size(0), cols = src.size(1), stride = dst.stride(0);
  const int* s = src.data_ptr<int>();
  int* d = dst.data_ptr<int>();
  const int units = cols >> 2;
  static copytune::Params p;  // the descriptor variants' parameters
  if (variant == "engine") {
    const int n = rows * cols;
    engine_like<<<std::min((n + 255) / 256, 1024), 256, 0, stream()>>>(s, d, rows, cols, stride);
  } else if (variant == "row1") {
    row_tiled<1, 256><<<dim3((units + 255) / 256, rows), 256, 0, stream()>>>(s, d, cols, stride);
  } else if (variant == "row2") {
    row_tiled<2, 256><<<dim3((units + 511) / 512, rows), 256, 0, stream()>>>(s, d, cols, stride);
  } else if (variant == "row1x512") {
    row_tiled<1, 512><<<dim3((units + 511) / 512, rows), 512, 0, stream()>>>(s, d, cols, stride);
  } else if (variant == "row1x128") {
    row_tiled<1, 128><<<dim3((units + 127) / 128, rows), 128, 0, stream()>>>(s, d, cols, stride);
  } else if (variant == "aligned") {
    row_aligned_loads<256><<<dim3((units + 255) / 256, rows), 256, 0, stream()>>>(s, d, cols, stride);
  } else if (variant == "persistent") {  // param: blocks
    flat_persistent<256><<<param, 256, 0, stream()>>>(s, d, rows, cols, stride);
  } else if (variant == "shipped" || variant == "shipped_flat") {  // param: unroll
    const int64_t tiles = plan_page_table(s, d, rows, cols, stride, int(param), &p, variant == "shipped_flat");
    TORCH_CHECK(copytune::launch_batched_copy(p, tiles, int(param), stream(), src.get_device()) == cudaSuccess);
  } else if (variant == "lite" || variant == "lite_nosearch") {  // param: unroll
    const int64_t tiles = plan_page_table(s, d, rows, cols, stride, int(param), &p, true);
    TORCH_CHECK(p.count <= 2);
    const void* k = variant == "lite" ? (param == 1 ? reinterpret_cast<const void*>(&lite<1, true>)
                                                    : reinterpret_cast<const void*>(&lite<2, true>))
                                      : (param == 1 ? reinterpret_cast<const void*>(&lite<1, false>)
                                                    : reinterpret_cast<const void*>(&lite<2, false>));
    void* args[] = {&p};
    TORCH_CHECK(cudaLaunchKernel(k, dim3(tiles), dim3(copytune::kThreads), args, 0, stream()) == cudaSuccess);
  } else if (variant == "lite_value" || variant == "lite_static") {
    const int64_t tiles = plan_page_table(s, d, rows, cols, stride, 1, &p, true);
    TORCH_CHECK(p.count <= 2);
    const void* k = variant == "lite_value" ? reinterpret_cast<const void*>(&lite_read<true, false>)
                                            : reinterpret_cast<const void*>(&lite_read<false, true>);
    void* args[] = {&p};
    TORCH_CHECK(cudaLaunchKernel(k, dim3(tiles), dim3(copytune::kThreads), args, 0, stream()) == cudaSuccess);
  } else if (variant == "memcpy2d") {
    TORCH_CHECK(cudaMemcpy2DAsync(d, stride * 4, s, cols * 4, cols * 4, rows, cudaMemcpyDeviceToDevice, stream()) ==
                cudaSuccess);
  } else {
    TORCH_CHECK(false, "unknown variant ", variant);
  }
  TORCH_CHECK(cudaGetLastError() == cudaSuccess);
}

// Host µs per launch of `n` back-to-back launches (one synchronize), for each way of launching an empty kernel.
double launch_cost(const std::string& how, int64_t n) {
  cudaStream_t st = stream();
  static Big big;
  CUfunction f_small = nullptr, f_big = nullptr;
  cudaGetFuncBySymbol(reinterpret_cast<cudaFunction_t*>(&f_small), reinterpret_cast<const void*>(&empty_kernel));
  cudaGetFuncBySymbol(reinterpret_cast<cudaFunction_t*>(&f_big), reinterpret_cast<const void*>(&empty_big));
  int arg = 0;
  void* small_args[] = {&arg};
  void* big_args[] = {&big};
  size_t big_size = sizeof(Big);
  void* big_config[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, &big, CU_LAUNCH_PARAM_BUFFER_SIZE, &big_size,
                        CU_LAUNCH_PARAM_END};
  auto one = [&]() {
    if (how == "runtime_small") {
      cudaLaunchKernel(reinterpret_cast<const void*>(&empty_kernel), dim3(1), dim3(32), small_args, 0, st);
    } else if (how == "runtime_big") {
      cudaLaunchKernel(reinterpret_cast<const void*>(&empty_big), dim3(1), dim3(32), big_args, 0, st);
    } else if (how == "driver_small") {
      cuLaunchKernel(f_small, 1, 1, 1, 32, 1, 1, 0, st, small_args, nullptr);
    } else if (how == "driver_big") {
      cuLaunchKernel(f_big, 1, 1, 1, 32, 1, 1, 0, st, big_args, nullptr);
    } else if (how == "driver_big_buffer") {
      cuLaunchKernel(f_big, 1, 1, 1, 32, 1, 1, 0, st, nullptr, big_config);
    } else if (how == "driver_7_copies" || how == "runtime_7_copies" || how == "shipped_7_copies") {
      static copytune::Params p;  // the shipped kernel and a planned 7-copy decode batch through either API,
                                  // or through the shipped launch (its context checks and handle lookup)
      static int64_t tiles = [] {
        void* buf = nullptr;
        TORCH_CHECK(cudaMalloc(&buf, 1 << 20) == cudaSuccess);
        copytune::RawCopy raw[7];
        for (int k = 0; k < 7; ++k) {
          const int64_t base = reinterpret_cast<int64_t>(buf) + 4096 * k;
          raw[k] = copytune::RawCopy{base, base + (1 << 19), k == 6 ? 32 : 1, 128, 128, 256};
        }
        int planned = 0;
        return copytune::plan_launch(raw, 7, 2, &p, &planned);
      }();
      const void* kernel = reinterpret_cast<const void*>(&copytune::batched_copy_kernel<2, false>);
      void* args[] = {&p};
      if (how == "shipped_7_copies") {
        static const int device = c10::cuda::current_device();
        copytune::launch_batched_copy(p, tiles, 2, st, device);
      } else if (how == "driver_7_copies") {
        static CUfunction f = [kernel] {
          cudaFunction_t found = nullptr;
          TORCH_CHECK(cudaGetFuncBySymbol(&found, kernel) == cudaSuccess);
          return reinterpret_cast<CUfunction>(found);
        }();
        cuLaunchKernel(f, unsigned(tiles), 1, 1, copytune::kThreads, 1, 1, 0, st, args, nullptr);
      } else {
        cudaLaunchKernel(kernel, dim3(tiles), dim3(copytune::kThreads), args, 0, st);
      }
    } else if (how == "stream_lookup_only") {
      st = c10::cuda::getCurrentCUDAStream().stream();
    }
  };
  for (int i = 0; i < 200; ++i) one();
  cudaStreamSynchronize(st);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; ++i) one();
  const auto t1 = std::chrono::steady_clock::now();
  cudaStreamSynchronize(st);
  return std::chrono::duration<double, std::micro>(t1 - t0).count() / n;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("launch", &launch);
  m.def("launch_cost", &launch_cost);
}
