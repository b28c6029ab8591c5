// copytune cuda_ext kernel: one launch copies up to kMaxCopies 1-D or 2-D strided byte ranges.
//
// Blocks map to (copy, tile) through a flattened tile list, so no block is launched only to exit (the scalar
// grid-stride design costs ~3 us of GPU time even for tiny batches on an H100; tile-mapped kernels 1.5-1.9 us).
// Descriptors travel by value as one __grid_constant__ struct: no device-side table, no per-call H2D copy.
#include "batched_copy.cuh"

#include <atomic>
#include <mutex>
#include <type_traits>

#include <cuda.h>
#include <dlfcn.h>

namespace copytune {

// T: the unit (one store); L: one load piece (T itself, or a narrower type when the source is less aligned).
// Every thread moves at most kUnroll units, so its instruction count per unit is the kernel's cost: the host
// decided everything it could (index width, divisor, tiling), and pieces are read at constant offsets from one
// pointer. Units [start, n) of the copy from `src_row` load pieces and `dst_row` units past its addresses (a row
// of a row-tiled copy; 0 otherwise); kRows: the units are rows of `cols` (flat tiles across rows).
template <int kUnroll, typename T, typename L, bool kRows, typename Index>
__device__ __forceinline__ void copy_tile(const Copy& c, const int64_t* extra, Index start, Index n, int64_t src_row,
                                          int64_t dst_row) {
  constexpr int kPieces = sizeof(T) / sizeof(L);
  union Unit {
    T t;
    L l[kPieces];
  };
  const L* __restrict__ src = reinterpret_cast<const L*>(c.src) + src_row;
  T* __restrict__ dst = reinterpret_cast<T*>(c.dst) + dst_row;
  Unit v[kUnroll];
  Index to[kUnroll];
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {  // all loads first: kUnroll independent units in flight per thread
    const Index i = start + Index(k) * kThreads + threadIdx.x;
    if (i < n) {
      Index from = i * kPieces;
      to[k] = i;
      if constexpr (kRows) {
        Index r;
        if constexpr (sizeof(Index) == 4) {  // i < n <= INT32_MAX: the multiply-shift quotient is exact
          r = c.cols_mul == 0 ? i : __umulhi(i, c.cols_mul) >> c.cols_shr;
        } else {
          r = i / static_cast<Index>(c.cols);
        }
        const Index col = i - r * static_cast<Index>(c.cols);
        from = r * static_cast<Index>(c.src_stride) + col * kPieces;
        to[k] = r * static_cast<Index>(c.dst_stride) + col;
      }
      const L* piece = src + from;
      if constexpr (kPieces == 1) {
        v[k].t = *reinterpret_cast<const T*>(piece);
      } else {
#pragma unroll
        for (int q = 0; q < kPieces; ++q) v[k].l[q] = piece[q];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    if (start + Index(k) * kThreads + threadIdx.x < n) dst[to[k]] = v[k].t;
  }
  for (int e = 0; e < c.extra_count; ++e) {  // a broadcast: the units loaded once, stored to every destination
    T* __restrict__ more = reinterpret_cast<T*>(extra[c.extra_begin + e]) + dst_row;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (start + Index(k) * kThreads + threadIdx.x < n) more[to[k]] = v[k].t;
    }
  }
}

// Tile `t` of copy `c`. A row-tiled copy's tiles walk its rows (each row `chunks` tiles): the row is the block's
// one division, by the multiply-shift in cols_mul/cols_shr (t < 2^31: exact), and its offset is added to the
// block's base addresses, so a thread forms only an index within its row - no division, and no row offset that
// needs 64 bits. Otherwise the tiles cut the copy's units flat, and each thread finds its unit's row.
template <int kUnroll, typename T, typename L, typename Index>
__device__ __forceinline__ void copy_units(const Copy& c, const int64_t* extra, uint32_t t) {
  constexpr uint32_t kTileUnits = kThreads * kUnroll;
  if (c.row_tiles) {
    const uint32_t chunks = (static_cast<uint32_t>(c.cols) + kTileUnits - 1) / kTileUnits;
    const uint32_t row = c.cols_mul == 0 ? t : __umulhi(t, c.cols_mul) >> c.cols_shr;
    copy_tile<kUnroll, T, L, false, Index>(c, extra, Index((t - row * chunks) * kTileUnits), Index(c.cols),
                                           int64_t(row) * c.src_stride, int64_t(row) * c.dst_stride);
  } else if (c.cols != c.n) {
    copy_tile<kUnroll, T, L, true, Index>(c, extra, Index(t) * Index(kTileUnits), Index(c.n), 0, 0);
  } else {
    copy_tile<kUnroll, T, L, false, Index>(c, extra, Index(t) * Index(kTileUnits), Index(c.n), 0, 0);
  }
}

// The block's tile of the launch: the last copy whose first tile <= `tile` (empty copies share a begin: skipped),
// and its units by their (unit, load piece) widths.
template <int kUnroll, typename Index>
__device__ __forceinline__ void copy_block(const Params& p, int tile) {
  int lo = 0, hi = p.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.c[mid].tile_begin <= tile) lo = mid; else hi = mid - 1;
  }
  const Copy& c = p.c[lo];
  const uint32_t t = static_cast<uint32_t>(tile - c.tile_begin);
  switch (c.vec_log2 * 8 + c.load_log2) {  // (unit, load piece); plan_launch only splits into these three
    case 4 * 8 + 4: copy_units<kUnroll, uint4, uint4, Index>(c, p.extra, t); break;
    case 4 * 8 + 3: copy_units<kUnroll, uint4, uint2, Index>(c, p.extra, t); break;
    case 4 * 8 + 2: copy_units<kUnroll, uint4, uint32_t, Index>(c, p.extra, t); break;
    case 3 * 8 + 3: copy_units<kUnroll, uint2, uint2, Index>(c, p.extra, t); break;
    case 3 * 8 + 2: copy_units<kUnroll, uint2, uint32_t, Index>(c, p.extra, t); break;
    case 2 * 8 + 2: copy_units<kUnroll, uint32_t, uint32_t, Index>(c, p.extra, t); break;
    case 1 * 8 + 1: copy_units<kUnroll, uint16_t, uint16_t, Index>(c, p.extra, t); break;
    default: copy_units<kUnroll, uint8_t, uint8_t, Index>(c, p.extra, t); break;
  }
}

// kWide: 64-bit indices, compiled as a kernel of its own (the host launches it only for a launch holding a copy
// that needs them): the common kernel then fits unroll 2 in 32 registers (36 before), 8 blocks of 256 per SM.
// (Its halved code measured no time of its own; a build of only the NSA shapes ran 5% faster: probe_kernels.py.)
template <int kUnroll, bool kWide>
__global__ void __launch_bounds__(kThreads) batched_copy_kernel(const __grid_constant__ Params p) {
  copy_block<kUnroll, typename std::conditional<kWide, int64_t, uint32_t>::type>(p, static_cast<int>(blockIdx.x));
}

namespace {

// CUTLASS's FastDivmod divisor: for every n < 2^31, n / d == umulhi(n, mul) >> shr (mul == 0: d == 1).
void fast_divisor(int64_t d, uint32_t* mul, int8_t* shr) {
  if (d <= 1) {
    *mul = 0;
    *shr = 0;
    return;
  }
  int log2_ceil = 0;
  while ((int64_t(1) << log2_ceil) < d) ++log2_ceil;
  const int p = 31 + log2_ceil;
  *mul = static_cast<uint32_t>(((uint64_t(1) << p) + uint64_t(d) - 1) / uint64_t(d));
  *shr = static_cast<int8_t>(p - 32);
}

int widest_log2(uint64_t bits) {  // the widest of 16/8/4/2/1 bytes that divides `bits`
  int v = 4;
  while (v > 0 && (bits & ((uint64_t(1) << v) - 1))) --v;
  return v;
}

void describe(const RawCopy& r, int vec, int load, int64_t tile_units, int64_t* tiles, Copy* c) {
  c->src = r.src;
  c->dst = r.dst;
  c->vec_log2 = static_cast<int8_t>(vec);
  c->load_log2 = static_cast<int8_t>(load);
  c->extra_begin = c->extra_count = c->reserved = 0;
  c->cols = r.row_bytes >> vec;
  c->n = r.rows * c->cols;
  c->src_stride = r.src_stride >> load;
  c->dst_stride = r.dst_stride >> vec;
  if (c->cols == 0) c->cols = 1;  // empty copy: n == 0, never divided by
  const int64_t flat_tiles = (c->n + tile_units - 1) / tile_units;
  // Row tiles (each row its own tiles) where they add at most 1/8 more tiles than flat ones, so a thread forms
  // only an index within its row (< 2^31 load pieces: the 32-bit kernel, whatever the strides).
  const int64_t chunks = (c->cols + tile_units - 1) / tile_units;
  c->row_tiles = c->n > 0 && c->cols != c->n && 8 * r.rows * chunks <= 9 * flat_tiles &&
                 (c->cols << (vec - load)) <= INT32_MAX;
  // Flat tiles take 32-bit indices when every index the kernel forms fits: one past the last load piece and the
  // last unit (a source's rows may overlap: an expanded tensor has row stride 0)
  const int64_t last_row = c->cols != c->n ? c->n / c->cols - 1 : 0;
  const int64_t src_reach = last_row * c->src_stride + (c->cols << (vec - load));
  const int64_t dst_reach = last_row * c->dst_stride + c->cols;
  c->wide = !c->row_tiles && !(c->n <= INT32_MAX && src_reach <= INT32_MAX && dst_reach <= INT32_MAX);
  fast_divisor(c->row_tiles ? chunks : c->wide ? 1 : c->cols, &c->cols_mul, &c->cols_shr);
  c->tile_begin = static_cast<int32_t>(*tiles);  // launch_batched_copy refuses grids past 2^31 - 1 tiles
  *tiles += c->row_tiles ? r.rows * chunks : flat_tiles;
}

bool same_source(const RawCopy& a, const RawCopy& b) {  // one read serves both: a broadcast
  return a.src == b.src && a.rows == b.rows && a.row_bytes == b.row_bytes && a.src_stride == b.src_stride &&
         a.dst_stride == b.dst_stride;
}

uint64_t dst_bits(const RawCopy& r) { return uint64_t(r.dst) | (r.rows > 1 ? uint64_t(r.dst_stride) : 0); }

// How a group of copies of one source is described: its store and load widths (log2), and the body's bytes per
// row where it splits into a body of wide units loaded in pieces and a narrow tail (0: no split).
struct Shape {
  int both, store, load;
  int64_t body;
};

Shape shape_of(const RawCopy& r, uint64_t dst) {
  const uint64_t src = uint64_t(r.src) | (r.rows > 1 ? uint64_t(r.src_stride) : 0);
  Shape s;
  s.both = widest_log2(dst | src | uint64_t(r.row_bytes));
  s.store = widest_log2(dst);
  s.load = widest_log2(src);
  // Split: destination units of 8 or 16 bytes loaded in 4- or 8-byte pieces, if wider than the common unit and
  // at least one unit per row.
  s.body = s.store > 2 && s.load >= 2 && s.load < s.store && s.store > s.both
      ? r.row_bytes & ~((int64_t(1) << s.store) - 1) : 0;
  return s;
}

}  // namespace

int64_t plan_launch(const RawCopy* raw, int count, int unroll, Params* p, int* planned, int* leaders,
                    int* desc_leaders) {
  // Groups of copies of one source, first member first; as many copies as the descriptors and extra
  // destinations hold unsplit (kMaxCopies groups; kMaxExtra members beyond the groups' first).
  int leader[kMaxCopies], members[kMaxCopies], last[kMaxCopies];
  int next[kMaxCopies + kMaxExtra];  // the group's next member after copy j, -1 at the end
  uint64_t bits[kMaxCopies];
  int groups = 0, extras = 0, j = 0;
  for (; j < count; ++j) {
    int g = 0;
    while (g < groups && !same_source(raw[leader[g]], raw[j])) ++g;
    if (g < groups ? extras == kMaxExtra : groups == kMaxCopies) break;  // so j < kMaxCopies + kMaxExtra
    if (g == groups) {
      leader[g] = last[g] = j;
      members[g] = 1;
      bits[g] = 0;
      ++groups;
    } else {
      next[last[g]] = j;
      last[g] = j;
      ++members[g];
      ++extras;
    }
    next[j] = -1;
    bits[g] |= dst_bits(raw[j]);
    if (leaders != nullptr) leaders[j] = leader[g];
  }
  *planned = j;
  const int64_t tile_units = int64_t(kThreads) * unroll;
  int64_t tiles = 0;
  int e = 0, x = 0, extras_after = extras;
  for (int g = 0; g < groups; ++g) {
    const RawCopy& r = raw[leader[g]];
    const Shape s = shape_of(r, bits[g]);
    const int64_t tail = r.row_bytes - s.body;
    const int need = s.body > 0 && tail > 0 ? 2 : 1;
    extras_after -= members[g] - 1;
    // split only while the groups after this one still fit unsplit (what remains stays unsplit)
    const bool split = s.body > 0 && e + need + (groups - g - 1) <= kMaxCopies &&
                       x + need * (members[g] - 1) + extras_after <= kMaxExtra;
    const int first = e;
    if (split) {
      RawCopy b = r;
      b.row_bytes = s.body;
      describe(b, s.store, s.load, tile_units, &tiles, &p->c[e++]);
      if (tail > 0) {
        RawCopy t = r;
        t.src += s.body;
        t.dst += s.body;
        t.row_bytes = tail;
        uint64_t tbits = uint64_t(t.src) | uint64_t(tail) |
                         (t.rows > 1 ? uint64_t(t.src_stride) | uint64_t(t.dst_stride) : 0);
        for (int m = leader[g]; m >= 0; m = next[m]) tbits |= uint64_t(raw[m].dst + s.body);
        const int v = widest_log2(tbits);
        describe(t, v, v, tile_units, &tiles, &p->c[e++]);
      }
    } else {
      describe(r, s.both, s.both, tile_units, &tiles, &p->c[e++]);
    }
    for (int d = first; d < e; ++d) {  // every descriptor of the group stores to the other members too
      Copy& c = p->c[d];
      if (desc_leaders != nullptr) desc_leaders[d] = leader[g];
      c.extra_begin = static_cast<int8_t>(x);
      for (int m = next[leader[g]]; m >= 0; m = next[m]) p->extra[x++] = raw[m].dst + (c.dst - r.dst);
      c.extra_count = static_cast<int8_t>(x - c.extra_begin);
    }
  }
  p->count = e;
  p->wide = 0;
  for (int d = 0; d < e; ++d) p->wide |= p->c[d].wide;
  return tiles;
}

void LaunchPlan::plan(const std::vector<RawCopy>& raw, int unroll) {
  chunks_ = 0;
  group_leader_.clear();
  std::vector<size_t>& leaders_of = scratch_;  // reused: a plan per step (a page table one column wider)
  leaders_of.resize(raw.size());              // allocates nothing once grown
  size_t done = 0, chunks = 0;
  while (done < raw.size()) {
    if (chunks == params_.size()) {
      params_.emplace_back();
      tiles_.push_back(0);
      map_.emplace_back();
    }
    int planned = 0;
    int leaders[kMaxCopies + kMaxExtra];
    Map& m = map_[chunks];
    const int count = static_cast<int>(raw.size() - done < (size_t(1) << 20) ? raw.size() - done : size_t(1) << 20);
    tiles_[chunks] = plan_launch(raw.data() + done, count, unroll, &params_[chunks], &planned, leaders,
                                 m.desc_leader);
    for (int j = 0; j < planned; ++j) leaders_of[done + j] = done + leaders[j];
    for (int d = 0; d < params_[chunks].count; ++d) {
      m.desc_leader[d] += static_cast<int>(done);
      m.src_offset[d] = params_[chunks].c[d].src - raw[m.desc_leader[d]].src;  // a tail's: its body's bytes
    }
    done += static_cast<size_t>(planned);
    ++chunks;
  }
  group_leader_.swap(scratch_);  // only a whole plan is ever patched
  chunks_ = chunks;
}

bool LaunchPlan::moved(const std::vector<RawCopy>& planned, const std::vector<RawCopy>& now) const {
  if (group_leader_.size() != planned.size() || now.size() != planned.size()) return false;
  for (size_t i = 0; i < planned.size(); ++i) {
    const RawCopy &a = now[i], &b = planned[i];
    if (a.dst != b.dst || a.rows != b.rows || a.row_bytes != b.row_bytes || a.src_stride != b.src_stride ||
        a.dst_stride != b.dst_stride || ((a.src ^ b.src) & 15)) {
      return false;
    }
    const size_t l = group_leader_[i];
    if (now[l].src - planned[l].src != a.src - b.src) return false;
  }
  return true;
}

void LaunchPlan::move_sources(const std::vector<RawCopy>& now) {
  for (size_t k = 0; k < chunks_; ++k) {
    const Map& m = map_[k];
    for (int d = 0; d < params_[k].count; ++d) params_[k].c[d].src = now[m.desc_leader[d]].src + m.src_offset[d];
  }
}

namespace {

int unroll_slot(int unroll) { return unroll == 1 ? 0 : unroll == 2 ? 1 : unroll == 8 ? 3 : 2; }

const void* kernel_for(bool wide, int unroll) {
  static const void* const kernels[2][4] = {
      {reinterpret_cast<const void*>(&batched_copy_kernel<1, false>),
       reinterpret_cast<const void*>(&batched_copy_kernel<2, false>),
       reinterpret_cast<const void*>(&batched_copy_kernel<4, false>),
       reinterpret_cast<const void*>(&batched_copy_kernel<8, false>)},
      {reinterpret_cast<const void*>(&batched_copy_kernel<1, true>),
       reinterpret_cast<const void*>(&batched_copy_kernel<2, true>),
       reinterpret_cast<const void*>(&batched_copy_kernel<4, true>),
       reinterpret_cast<const void*>(&batched_copy_kernel<8, true>)}};
  return kernels[wide ? 1 : 0][unroll_slot(unroll)];
}

// The driver's cuLaunchKernel with the kernel's CUfunction looked up once: the runtime's cudaLaunchKernel maps its
// host stub to that handle on every call, 0.28-0.36 us of a 3.3 us launch on an H100 host (benchmarks/RESULTS.md).
// The entry points come from the libcuda the process has already loaded (dlopen RTLD_NOLOAD, as c10's driver API
// does): no link against libcuda, and no runtime entry-point API, which ties the build to a libcudart at least as
// new as its toolkit. A handle belongs to the context that made it, named by its unique id (a context destroyed
// and another made at the same address has another id): a launch under any other context (a pushed or green one,
// a thread with none yet) goes through the runtime, and the first context to need a kernel keeps its handle (a
// process whose first launch ran under a pushed context launches its primary one's through the runtime).
#ifdef CUDA_API_PER_THREAD_DEFAULT_STREAM
#error "stream 0 would be the per-thread stream for the runtime and the legacy one for cuLaunchKernel"
#endif
using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              CUstream, void**, void**);
using CurrentFn = CUresult (*)(CUcontext*);
using IdFn = CUresult (*)(CUcontext, unsigned long long*);

struct Driver {
  LaunchFn launch = nullptr;
  CurrentFn current = nullptr;
  IdFn id = nullptr;  // cuCtxGetId: drivers of CUDA 12.0 and later; without it, no direct launch
};

// nullptr until the process has loaded libcuda (looked for again on each launch until then: a launch before CUDA
// is initialized is not a launch this code ever makes, so the retry costs nothing in practice).
const Driver* driver() {
  static std::atomic<const Driver*> found{nullptr};
  static Driver entries;
  static std::mutex filling;
  const Driver* d = found.load(std::memory_order_acquire);
  if (d != nullptr) return d;
  std::lock_guard<std::mutex> lock(filling);
  d = found.load(std::memory_order_acquire);
  if (d != nullptr) return d;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);  // the runtime's copy, or nothing
  if (lib == nullptr) return nullptr;
  entries.launch = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
  entries.current = reinterpret_cast<CurrentFn>(dlsym(lib, "cuCtxGetCurrent"));
  entries.id = reinterpret_cast<IdFn>(dlsym(lib, "cuCtxGetId"));
  if (entries.launch == nullptr || entries.current == nullptr || entries.id == nullptr) entries = Driver{};
  found.store(&entries, std::memory_order_release);  // entries.launch == nullptr: no direct launch, for good
  return &entries;
}

constexpr int kMaxDevices = 64;
constexpr unsigned long long kNoContext = ~0ull;

struct Handle {  // filled once: fn stored before ctx, read after it
  std::atomic<unsigned long long> ctx{kNoContext};
  std::atomic<CUfunction> fn{nullptr};
};

std::atomic<int64_t> direct_launches{0}, runtime_launches{0};

// The kernel's handle where the context `ctx` (an id) made it, or nullptr: another context made it, or the lookup
// failed.
CUfunction handle_in(const Driver& d, unsigned long long ctx, int device, bool wide, int unroll) {
  static Handle handles[kMaxDevices][2][4];
  static std::mutex filling;
  Handle& h = handles[device][wide ? 1 : 0][unroll_slot(unroll)];
  unsigned long long owner = h.ctx.load(std::memory_order_acquire);
  if (owner == kNoContext) {
    std::lock_guard<std::mutex> lock(filling);
    owner = h.ctx.load(std::memory_order_acquire);
    if (owner == kNoContext) {
      if (cudaPeekAtLastError() != cudaSuccess) return nullptr;  // somebody's pending error: not ours to clear
      cudaFunction_t fn = nullptr;
      if (cudaGetFuncBySymbol(&fn, kernel_for(wide, unroll)) != cudaSuccess) {
        cudaGetLastError();  // the lookup's own error (none was pending before it)
        return nullptr;
      }
      CUcontext made = nullptr;  // the runtime looked the handle up in the thread's current context
      unsigned long long id = kNoContext;
      if (d.current(&made) != CUDA_SUCCESS || made == nullptr || d.id(made, &id) != CUDA_SUCCESS) return nullptr;
      h.fn.store(reinterpret_cast<CUfunction>(fn), std::memory_order_relaxed);
      h.ctx.store(id, std::memory_order_release);
      owner = id;
    }
  }
  return owner == ctx ? h.fn.load(std::memory_order_relaxed) : nullptr;
}

// Errors of the handle or its context: the direct launch could not be made, and the runtime's launch is tried.
bool handle_error(CUresult r) {
  return r == CUDA_ERROR_INVALID_HANDLE || r == CUDA_ERROR_INVALID_CONTEXT || r == CUDA_ERROR_CONTEXT_IS_DESTROYED;
}

}  // namespace

void launch_counts(int64_t* direct, int64_t* runtime) {
  *direct = direct_launches.load(std::memory_order_relaxed);
  *runtime = runtime_launches.load(std::memory_order_relaxed);
}

cudaError_t launch_batched_copy(const Params& p, int64_t tiles, int unroll, cudaStream_t stream, int device) {
  if (tiles == 0) return cudaSuccess;
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;  // gridDim.x limit; never reached by small copies
  void* args[] = {const_cast<Params*>(&p)};
  const bool wide = p.wide != 0;
  const Driver* d = driver();
  CUcontext ctx = nullptr;
  unsigned long long id = kNoContext;
  if (d != nullptr && d->launch != nullptr && device >= 0 && device < kMaxDevices &&
      d->current(&ctx) == CUDA_SUCCESS && ctx != nullptr && d->id(ctx, &id) == CUDA_SUCCESS) {
    const CUfunction f = handle_in(*d, id, device, wide, unroll);
    if (f != nullptr) {
      const CUresult r = d->launch(f, static_cast<unsigned>(tiles), 1, 1, kThreads, 1, 1, 0, stream, args, nullptr);
      if (r == CUDA_SUCCESS) {
        direct_launches.fetch_add(1, std::memory_order_relaxed);
        return cudaSuccess;
      }
      // Any other failure is the launch's own (a bad configuration, an invalidated capture): the runtime would
      // fail the same way, or report the capture it invalidated instead. CUresult and cudaError_t share these
      // codes (1 invalid value, 700s launch and memory errors, 900s stream capture).
      if (!handle_error(r)) return static_cast<cudaError_t>(r);
    }
  }
  runtime_launches.fetch_add(1, std::memory_order_relaxed);
  // The launch's own status: cudaGetLastError() after <<<>>> would also return an error left pending by
  // somebody else's earlier launch and blame this one for it.
  return cudaLaunchKernel(kernel_for(wide, unroll), dim3(static_cast<unsigned>(tiles)), dim3(kThreads), args, 0,
                          stream);
}

}  // namespace copytune
