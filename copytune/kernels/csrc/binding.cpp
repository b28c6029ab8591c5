// copytune cuda_ext binding: a BoundBatch holds the planned parameter structs of one batch and relaunches them,
// reading new source addresses from tensors in C++ (on an H100, 14 data_ptr() reads cost 3.0 us in Python; pybind
// parses 14 tensors in 2.3 us).
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstddef>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "batched_copy.cuh"

namespace copytune {

// run_sequence_checked: a source's extent meets a destination's; the caller checks byte by byte.
const char* const kMaybeOverlap = "cuda_ext: a source's extent meets a destination's";

// Errors come back as strings (empty on success) instead of exceptions: on the GPU hosts (torch 2.11, CUDA 13)
// a c10::Error thrown out of this module through pybind11 crashed the process with SIGSEGV, and a serving process
// must get a Python exception, never a crash. Every entry point catches everything it calls.
// Sets a flag for the scope: a call that may run Python (attribute reads) refuses to be entered again meanwhile.
struct Busy {
  explicit Busy(bool* flag) : flag_(flag) { *flag_ = true; }
  ~Busy() { *flag_ = false; }
  Busy(const Busy&) = delete;
  Busy& operator=(const Busy&) = delete;
  bool* flag_;
};

class BoundBatch {
 public:
  // flat: 6 int64 per copy (src, dst, rows, row_bytes, src_stride, dst_stride), bytes; empty copies excluded.
  // unroll: units per thread per tile (1, 2, 4 or 8). A bad description never throws (see above): the batch
  // keeps the reason in error(), and every entry point returns it instead of launching.
  BoundBatch(const std::vector<int64_t>& flat, int64_t device, int64_t unroll)
      : device_(static_cast<int>(device)), unroll_(static_cast<int>(unroll)) {
    try {
      error_ = describe_error(flat, device, unroll);
      if (!error_.empty()) return;
      raw_.resize(flat.size() / 6);
      for (size_t i = 0; i < raw_.size(); ++i) {
        raw_[i] = RawCopy{flat[6 * i], flat[6 * i + 1], flat[6 * i + 2], flat[6 * i + 3], flat[6 * i + 4],
                          flat[6 * i + 5]};
      }
      bound_ = raw_;
      index_destinations();
      plan();
    } catch (const std::exception& e) {
      error_ = std::string("cuda_ext: ") + first_line(e.what());
    }
  }

  // Why this batch cannot run ("" when it can).
  const std::string& error() const { return error_; }

  // The bound sources again, whatever sources earlier calls passed: run() means one thing for every strategy
  // (the sources given at bind, which the Python binding keeps alive; a per-call source is never remembered).
  std::string run() {
    if (!error_.empty()) return error_;
    if (rebound_) {
      raw_ = bound_;
      const std::string err = replan();
      if (!err.empty()) return err;
      rebound_ = false;
    }
    return launch();
  }

  // Bytes to add to each new source's data_ptr() (callers that pass base tensors instead of slice views).
  std::string set_source_offsets(const std::vector<int64_t>& offsets) {
    if (offsets.size() != raw_.size()) return "cuda_ext: expected " + std::to_string(raw_.size()) + " offsets";
    offsets_ = offsets;
    shared_.clear();
    return "";
  }

  // Copy i (among the bound non-empty copies) now has `rows` rows of `row_bytes` bytes, rows `src_stride` /
  // `dst_stride` bytes apart; the destination address is unchanged. The caller guarantees both sides hold that
  // many bytes (an NSA page table gaining a column: a new contiguous source, the same wide destination).
  std::string set_shape(int64_t i, int64_t rows, int64_t row_bytes, int64_t src_stride, int64_t dst_stride) {
    if (i < 0 || i >= static_cast<int64_t>(raw_.size())) return "cuda_ext: copy index out of range";
    if (rows < 0 || row_bytes < 0 || src_stride < 0 || dst_stride < 0) return "cuda_ext: negative shape";
    for (std::vector<RawCopy>* v : {&raw_, &bound_}) {
      (*v)[i].rows = rows;
      (*v)[i].row_bytes = row_bytes;
      (*v)[i].src_stride = src_stride;
      (*v)[i].dst_stride = dst_stride;
    }
    shared_.clear();  // rows take part in find_shared
    index_destinations();
    return replan();
  }

  // From now on copy i takes its row length and source row stride from each new source tensor (2-D, rows
  // fixed): an NSA page table `[rows, max_len]` whose max_len grows every decode step, read here in C++ instead
  // of a Python resize per step. `max_row_bytes` is what the destination rows hold; more is refused.
  std::string follow_source_shape(int64_t i, int64_t max_row_bytes, int64_t itemsize) {
    if (i < 0 || i >= static_cast<int64_t>(raw_.size()) || itemsize <= 0) return "cuda_ext: bad follow request";
    follow_.resize(raw_.size(), Follow{0, 0});
    follow_[i] = Follow{max_row_bytes, itemsize};
    shared_.clear();
    return "";
  }

  // New sources of the bound geometry, in pair order (one per copy, empty copies excluded by the caller).
  std::string run_sources(const std::vector<at::Tensor>& srcs) {
    if (!error_.empty()) return error_;
    if (srcs.size() != raw_.size()) {
      return "cuda_ext: expected " + std::to_string(raw_.size()) + " sources, got " + std::to_string(srcs.size());
    }
    try {
      pending_.resize(raw_.size());
      for (size_t i = 0; i < raw_.size(); ++i) {
        std::string err = take_source(i, srcs[i], &pending_[i]);
        if (!err.empty()) return err;
      }
    } catch (const std::exception& e) {
      return std::string("cuda_ext: ") + first_line(e.what());
    }
    return commit_and_launch();
  }

  // New sources as a Python list or tuple of tensors, read straight off the sequence: no pybind11 conversion to a
  // std::vector<at::Tensor> (a refcount pair per tensor) when called through fast("run_sequence").
  std::string run_sequence(PyObject* seq) {
    std::string err = take_sequence(seq);
    return err.empty() ? commit_and_launch() : err;
  }

  // The checked call (BoundCopy.run with checked=True): the checks above, and no source's bytes within a
  // destination's extent. Where an extent meets one, kMaybeOverlap comes back and nothing is launched: strided
  // views can interleave without sharing a byte, which the caller decides (and then launches) itself.
  std::string run_sequence_checked(PyObject* seq) {
    std::string err = take_sequence(seq);
    if (!err.empty()) return err;
    for (const RawCopy& c : pending_) {
      if (c.rows <= 0 || c.row_bytes <= 0) continue;
      const int64_t lo = c.src, hi = c.src + (c.rows - 1) * c.src_stride + c.row_bytes;
      const size_t k = std::upper_bound(dst_lo_.begin(), dst_lo_.end(), lo) - dst_lo_.begin();
      if ((k > 0 && dst_reach_[k - 1] > lo) || (k < dst_lo_.size() && dst_lo_[k] < hi)) return kMaybeOverlap;
    }
    return commit_and_launch();
  }

  // A call's sources as a Python list or tuple of tensors, checked, into pending_ (nothing committed).
  std::string take_sequence(PyObject* seq) {
    if (!error_.empty()) return error_;
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) return "cuda_ext: the sources must be a list or a tuple";
    const size_t n = static_cast<size_t>(PySequence_Fast_GET_SIZE(seq));
    if (n != raw_.size()) {
      return "cuda_ext: expected " + std::to_string(raw_.size()) + " sources, got " + std::to_string(n);
    }
    try {
      pending_.resize(raw_.size());
      PyObject** items = PySequence_Fast_ITEMS(seq);
      for (size_t i = 0; i < n; ++i) {
        if (!THPVariable_Check(items[i])) return "cuda_ext: source " + std::to_string(i) + " is not a tensor";
        std::string err = take_source(i, THPVariable_Unpack(items[i]), &pending_[i]);
        if (!err.empty()) return err;
      }
    } catch (const std::exception& e) {
      return std::string("cuda_ext: ") + first_line(e.what());
    }
    return "";
  }

  // Every later source is checked against these samples (one per copy, the tensors bound) before anything is
  // launched: device, dtype, and shape and strides - or, for a followed copy, 2-D with the bound rows and unit
  // column stride. A wrong source is an error string, never an out-of-bounds read: a check costs nanoseconds, an
  // illegal address costs the serving process.
  std::string expect_sources(const std::vector<at::Tensor>& samples) {
    if (samples.size() != raw_.size()) return "cuda_ext: expected " + std::to_string(raw_.size()) + " samples";
    expect_.clear();
    shared_.clear();
    try {  // a sparse or nested sample has no strides: c10::Error, returned (never thrown across pybind11)
      for (const at::Tensor& t : samples) {
        expect_.push_back(Expect{t.scalar_type(), t.sizes().vec(), t.strides().vec()});
      }
    } catch (const std::exception& e) {
      expect_.clear();
      return std::string("cuda_ext: ") + first_line(e.what());
    }
    return "";
  }

  // The sources are attributes of one Python object (an engine's PrecomputedMetadata), one dotted path per copy
  // ("cache_seqlens", "flashmla_metadata.num_splits"): the names are interned here once, so a step is one call
  // that reads them with PyObject_GetAttr - no attrgetter tuple, no std::vector<at::Tensor> with its refcounts
  // (on an H100 host those cost ~1.4 us of a ~7.8 us refresh).
  std::string set_source_attrs(const std::vector<std::string>& paths) {
    if (paths.size() != raw_.size()) return "cuda_ext: expected " + std::to_string(raw_.size()) + " names";
    std::vector<std::string> distinct;
    std::vector<size_t> source_of = index_distinct(paths, &distinct);
    std::vector<std::vector<pybind11::object>> interned;
    for (const std::string& path : distinct) {
      std::vector<pybind11::object> parts;
      size_t start = 0;
      while (true) {
        const size_t dot = path.find('.', start);
        const std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        PyObject* name = part.empty() ? nullptr : PyUnicode_InternFromString(part.c_str());
        if (name == nullptr) {
          PyErr_Clear();
          return "cuda_ext: bad attribute path '" + path + "'";
        }
        parts.push_back(pybind11::reinterpret_steal<pybind11::object>(name));
        if (dot == std::string::npos) break;
        start = dot + 1;
      }
      interned.push_back(std::move(parts));
    }
    attrs_ = std::move(interned);
    paths_ = std::move(distinct);
    items_.clear();
    read_sources(std::move(source_of), attrs_.size());
    return "";
  }

  // The sources are items of one tuple or list (an engine kernel's positional arguments), one index per copy;
  // run_attrs then reads each distinct index once.
  std::string set_source_items(const std::vector<int64_t>& indices) {
    if (indices.size() != raw_.size()) return "cuda_ext: expected " + std::to_string(raw_.size()) + " indices";
    for (int64_t index : indices) {
      if (index < 0) return "cuda_ext: negative source index " + std::to_string(index);
    }
    std::vector<int64_t> distinct;
    std::vector<size_t> source_of = index_distinct(indices, &distinct);
    attrs_.clear();
    paths_.clear();
    items_ = std::move(distinct);
    read_sources(std::move(source_of), items_.size());
    return "";
  }

  std::string run_attrs(pybind11::handle obj) {
    if (!error_.empty()) return error_;
    if (source_of_.size() != raw_.size()) return "cuda_ext: set_source_attrs was not called";
    // An attribute read may run Python (a property, a finalizer) that calls this batch again: the inner call
    // would clear the outer call's read_ and pending_ under it. Refused instead.
    if (busy_) return "cuda_ext: a source read called this batch again";
    const Busy busy(&busy_);
    std::string err;
    try {
      if (!items_.empty()) {
        if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr())) {
          return "cuda_ext: the sources must be a list or a tuple";
        }
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj.ptr());
        PyObject** items = PySequence_Fast_ITEMS(obj.ptr());
        for (size_t j = 0; j < items_.size() && err.empty(); ++j) {
          if (items_[j] >= n) {
            err = "cuda_ext: the sources have no item " + std::to_string(items_[j]);
          } else {
            read_[j] = pybind11::reinterpret_borrow<pybind11::object>(items[items_[j]]);
          }
        }
      }
      for (size_t j = 0; j < attrs_.size() && err.empty(); ++j) {
        // each reference is owned by a pybind11::object, so every return path releases it
        pybind11::object t = pybind11::reinterpret_borrow<pybind11::object>(obj);
        for (const pybind11::object& name : attrs_[j]) {
          PyObject* next = PyObject_GetAttr(t.ptr(), name.ptr());  // new reference
          if (next == nullptr) {
            PyErr_Clear();
            err = "cuda_ext: the sources have no attribute " + paths_[j];
            break;
          }
          t = pybind11::reinterpret_steal<pybind11::object>(next);
        }
        read_[j] = std::move(t);
      }
      pending_.resize(raw_.size());
      if (shared_.size() != raw_.size()) find_shared();
      for (size_t i = 0; i < raw_.size() && err.empty(); ++i) {
        const int k = shared_[i];
        if (k >= 0) {  // read and checked as copy k: the same tensor, the same expectations
          const RawCopy& first = pending_[k];
          pending_[i] = raw_[i];
          pending_[i].src = first.src;
          if (!follow_.empty() && follow_[i].itemsize) {
            pending_[i].row_bytes = first.row_bytes;
            pending_[i].src_stride = first.src_stride;
          }
          continue;
        }
        PyObject* t = read_[source_of_[i]].ptr();
        if (!THPVariable_Check(t)) {
          err = "cuda_ext: source " + std::to_string(i) + " is not a tensor";
        } else {
          // read_ keeps the tensor alive until the launch; only its address and geometry are read
          err = take_source(i, THPVariable_Unpack(t), &pending_[i]);
        }
      }
    } catch (const std::exception& e) {
      PyErr_Clear();
      err = std::string("cuda_ext: ") + first_line(e.what());
    }
    if (err.empty()) err = commit_and_launch();
    for (pybind11::object& t : read_) t = pybind11::object();  // no step's sources outlive the call
    return err;
  }

  std::vector<int64_t> vector_bytes() const {
    std::vector<int64_t> out;
    for (size_t k = 0; k < plan_.launches(); ++k)
      for (int j = 0; j < plan_.params(k).count; ++j) out.push_back(int64_t(1) << plan_.params(k).c[j].vec_log2);
    return out;
  }

  std::vector<int64_t> tiles() const {
    std::vector<int64_t> out;
    for (size_t k = 0; k < plan_.launches(); ++k) out.push_back(plan_.tiles(k));
    return out;
  }

  // Destinations per descriptor (1 + its broadcast extras), launch by launch: what the plan made of the batch.
  std::vector<int64_t> destinations() const {
    std::vector<int64_t> out;
    for (size_t k = 0; k < plan_.launches(); ++k)
      for (int j = 0; j < plan_.params(k).count; ++j) out.push_back(1 + plan_.params(k).c[j].extra_count);
    return out;
  }
  // Per descriptor, launch by launch: 1 where its tiles are per row (row tiles), 0 where flat.
  std::vector<int64_t> row_tiles() const {
    std::vector<int64_t> out;
    for (size_t k = 0; k < plan_.launches(); ++k)
      for (int j = 0; j < plan_.params(k).count; ++j) out.push_back(plan_.params(k).c[j].row_tiles);
    return out;
  }

  // Per launch: the index width of the kernel it takes (32 or 64).
  std::vector<int64_t> index_bits() const {
    std::vector<int64_t> out;
    for (size_t k = 0; k < plan_.launches(); ++k) out.push_back(plan_.params(k).wide ? 64 : 32);
    return out;
  }
  int64_t unroll() const { return unroll_; }

 private:
  // `values` without repeats into `distinct` (first seen first); returns each value's index there. One read per
  // distinct source: several draft backends copy the same one (N backends, one precomputed set).
  template <typename T>
  static std::vector<size_t> index_distinct(const std::vector<T>& values, std::vector<T>* distinct) {
    std::vector<size_t> index_of;
    for (const T& v : values) {
      const size_t j = std::find(distinct->begin(), distinct->end(), v) - distinct->begin();
      if (j == distinct->size()) distinct->push_back(v);
      index_of.push_back(j);
    }
    return index_of;
  }

  // From now on copy i reads distinct source source_of[i] of `distinct` ones (run_attrs).
  void read_sources(std::vector<size_t> source_of, size_t distinct) {
    source_of_ = std::move(source_of);
    shared_.clear();
    read_.assign(distinct, pybind11::object());
  }

  // shared_[i]: an earlier copy k whose source is the same object, taken the same way (offset, expectations,
  // followed width and rows), so copy i's source is copy k's: N draft backends check each source once. -1: its own.
  void find_shared() {
    shared_.assign(raw_.size(), -1);
    for (size_t i = 0; i < raw_.size(); ++i) {
      for (size_t k = 0; k < i; ++k) {
        if (shared_[k] >= 0 || source_of_[k] != source_of_[i]) continue;
        const bool same_offset = offsets_.empty() || offsets_[k] == offsets_[i];
        const bool same_expect = expect_.empty() || (expect_[k].dtype == expect_[i].dtype &&
                                                     expect_[k].sizes == expect_[i].sizes &&
                                                     expect_[k].strides == expect_[i].strides);
        const bool same_follow = follow_.empty() ||
            (follow_[k].itemsize == follow_[i].itemsize && follow_[k].max_row_bytes == follow_[i].max_row_bytes &&
             (!follow_[i].itemsize || raw_[k].rows == raw_[i].rows));
        if (same_offset && same_expect && same_follow) {
          shared_[i] = static_cast<int>(k);
          break;
        }
      }
    }
  }

  // What copy i reads once `t` is its source (its address plus the bound offset; its shape where followed), into
  // `out`; nothing of the batch changes until every source of a call passed (commit_and_launch).
  std::string take_source(size_t i, const at::Tensor& t, RawCopy* out) {
    // the message's head only on a refusal: a string of this length is a heap allocation, per source per call
    const auto which = [i] { return "cuda_ext: source " + std::to_string(i); };
    if (!t.is_cuda() || t.get_device() != device_) {
      return which() + " is on " + t.device().str() + "; the batch runs on cuda:" + std::to_string(device_);
    }
    const bool followed = !follow_.empty() && follow_[i].itemsize;
    if (!expect_.empty()) {
      const Expect& e = expect_[i];
      if (t.scalar_type() != e.dtype) {
        return which() + " is " + std::string(c10::toString(t.scalar_type())) + ", bound " + c10::toString(e.dtype);
      }
      if (!followed && (t.sizes() != c10::IntArrayRef(e.sizes) || t.strides() != c10::IntArrayRef(e.strides))) {
        return which() + " has shape " + dims(t.sizes()) + " strides " + dims(t.strides()) + "; bound " +
               dims(e.sizes) + " " + dims(e.strides);
      }
    }
    *out = raw_[i];
    out->src = reinterpret_cast<int64_t>(t.data_ptr()) + (offsets_.empty() ? 0 : offsets_[i]);
    if (!followed) return "";
    if (t.dim() != 2 || t.size(0) != raw_[i].rows) {
      return which() + " must be 2-D with " + std::to_string(raw_[i].rows) + " rows";
    }
    const int64_t row_bytes = t.size(1) * follow_[i].itemsize;
    if (t.element_size() != follow_[i].itemsize || row_bytes > follow_[i].max_row_bytes ||
        (t.stride(1) != 1 && t.size(1) != 1)) {
      return which() + " has " + std::to_string(t.size(1)) + " columns; the destination rows hold " +
             std::to_string(follow_[i].max_row_bytes / follow_[i].itemsize);
    }
    out->row_bytes = row_bytes;
    out->src_stride = t.stride(0) * follow_[i].itemsize;
    return "";
  }

  std::string commit_and_launch() {
    const bool moved_only = plan_.moved(raw_, pending_);
    raw_.swap(pending_);  // all sources passed: take them together (no allocation: the buffers trade places)
    rebound_ = true;      // for this call only: run() goes back to bound_
    if (moved_only) {
      plan_.move_sources(raw_);  // the plan stands: each descriptor reads its group leader's new source
    } else {
      const std::string err = replan();  // widths, splits or groups may differ (grouping: O(copies x groups))
      if (!err.empty()) return err;
    }
    return launch();
  }

  // plan(), whose vectors may fail to grow: the error instead of an exception, and a state that plans again next
  // time (no descriptor of a half-made plan is ever launched or patched).
  std::string replan() {
    try {
      plan();
      return "";
    } catch (const std::exception& e) {
      rebound_ = true;
      return std::string("cuda_ext: ") + first_line(e.what());
    }
  }

  // "[a, b]" by hand: c10::str (an ostringstream across the libtorch boundary) crashed this module on the H200
  // host (torch 2.11, CUDA 13) the first time it formatted a shape.
  static std::string dims(c10::IntArrayRef d) {
    std::string s = "[";
    for (size_t k = 0; k < d.size(); ++k) s += (k ? ", " : "") + std::to_string(d[k]);
    return s + "]";
  }

  // Destination extents sorted by start, with the furthest end so far: one binary search tells whether a source
  // extent meets any of them (run_sequence_checked).
  void index_destinations() {
    std::vector<std::pair<int64_t, int64_t>> ext;
    for (const RawCopy& c : raw_) {
      if (c.rows > 0 && c.row_bytes > 0) ext.emplace_back(c.dst, c.dst + (c.rows - 1) * c.dst_stride + c.row_bytes);
    }
    std::sort(ext.begin(), ext.end());
    dst_lo_.clear();
    dst_reach_.clear();
    for (const auto& e : ext) {
      dst_lo_.push_back(e.first);
      dst_reach_.push_back(dst_reach_.empty() ? e.second : std::max(dst_reach_.back(), e.second));
    }
  }

  static std::string describe_error(const std::vector<int64_t>& flat, int64_t device, int64_t unroll) {
    if (flat.size() % 6) return "cuda_ext: " + std::to_string(flat.size()) + " descriptor values, not 6 per copy";
    if (device < 0) return "cuda_ext: device index " + std::to_string(device);
    if (!valid_unroll(static_cast<int>(unroll)) || unroll != static_cast<int>(unroll)) {
      return "cuda_ext: unroll must be 1, 2, 4 or 8, got " + std::to_string(unroll);
    }
    for (size_t i = 0; i < flat.size() / 6; ++i) {
      const int64_t* c = &flat[6 * i];
      if (c[2] < 0 || c[3] < 0 || c[4] < 0 || c[5] < 0) return "cuda_ext: copy " + std::to_string(i) + " is negative";
      if (c[2] > 0 && c[3] > 0 && (c[0] == 0 || c[1] == 0)) return "cuda_ext: copy " + std::to_string(i) + " at null";
    }
    return "";
  }

  static std::string first_line(const char* what) {  // c10 errors carry a whole backtrace after the message
    const std::string s(what);
    return s.substr(0, s.find('\n'));
  }

  void plan() { plan_.plan(raw_, unroll_); }

  std::string launch() {
    try {
      c10::cuda::OptionalCUDAGuard guard;
      if (c10::cuda::current_device() != device_) guard.set_index(device_);
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_).stream();
      for (size_t k = 0; k < plan_.launches(); ++k) {
        const cudaError_t err = launch_batched_copy(plan_.params(k), plan_.tiles(k), unroll_, stream, device_);
        if (err != cudaSuccess) return std::string("cuda_ext: launch failed: ") + cudaGetErrorString(err);
      }
    } catch (const std::exception& e) {
      return std::string("cuda_ext: ") + first_line(e.what());
    }
    return "";
  }

  int device_;
  int unroll_;
  std::string error_;           // set by the constructor when the description is invalid
  std::vector<RawCopy> raw_;    // what the next launch copies
  std::vector<RawCopy> bound_;  // the bound sources and shapes (run()); raw_ differs after a call's sources
  bool rebound_ = false;
  std::vector<int64_t> dst_lo_, dst_reach_;  // index_destinations()
  std::vector<int64_t> offsets_;
  struct Follow {
    int64_t max_row_bytes, itemsize;  // itemsize 0: the copy keeps its bound shape
  };
  std::vector<Follow> follow_;
  struct Expect {
    at::ScalarType dtype;
    std::vector<int64_t> sizes, strides;
  };
  std::vector<Expect> expect_;  // what every new source must look like (empty: unchecked, legacy callers)
  std::vector<RawCopy> pending_;  // a call's sources while they are checked
  std::vector<std::vector<pybind11::object>> attrs_;  // interned attribute paths, one per distinct source
  std::vector<std::string> paths_;                     // the distinct paths as given, for error messages
  std::vector<int64_t> items_;                         // or distinct indices into one tuple or list
  std::vector<size_t> source_of_;                      // copy i reads distinct source source_of_[i]
  std::vector<pybind11::object> read_;                 // a call's distinct sources while they are checked
  std::vector<int> shared_;                            // find_shared(); empty: to be found again
  bool busy_ = false;                                  // inside run_attrs
  LaunchPlan plan_;  // raw_'s launches
};

// The unbound call at the floor: batched_copy(pairs) whose every pair has the addresses, dtype, device, sizes and
// strides of a batch validated and bound before (the caching allocator hands a serving step the same blocks) is
// looked up and launched here: no Python frame, no tuple of ~10 attributes a pair. Everything validation depends
// on is in the key, so a hit needs no check; a miss goes back to Python, which validates, binds and put()s.
class ExactCache {
 public:
  explicit ExactCache(int64_t capacity) : capacity_(static_cast<size_t>(std::max<int64_t>(capacity, 1))) {}

  // None: launched; False: not here (or not a list/tuple of (src, dst) tuples of tensors); str: the launch's error.
  PyObject* run(PyObject* pairs) {
    bool found = false;
    std::string err;
    try {
      if (key_of(pairs, &key_)) {
        auto it = map_.find(key_);
        if (it != map_.end()) {
          found = true;
          err = it->second.batch->run();
        }
      }
    } catch (const std::exception& e) {  // a tensor without storage, say: not ours to launch
      found = false;
    }
    if (!found) Py_RETURN_FALSE;
    if (err.empty()) Py_RETURN_NONE;
    return PyUnicode_FromStringAndSize(err.data(), static_cast<Py_ssize_t>(err.size()));
  }

  // Remember `batch` (a BoundBatch bound for exactly these pairs); "" or why not (nothing changes then).
  std::string put(pybind11::handle pairs, pybind11::object batch) {
    if (!pybind11::isinstance<BoundBatch>(batch)) return "cuda_ext: not a BoundBatch";
    std::vector<int64_t> key;
    try {
      if (!key_of(pairs.ptr(), &key)) return "cuda_ext: not a list or tuple of (src, dst) tuples of tensors";
    } catch (const std::exception& e) {
      return std::string("cuda_ext: ") + e.what();
    }
    if (map_.size() >= capacity_) map_.clear();  // a new working set: the next misses rebuild it
    map_[std::move(key)] = Entry{batch.cast<BoundBatch*>(), batch};
    return "";
  }

  void clear() { map_.clear(); }
  int64_t size() const { return static_cast<int64_t>(map_.size()); }

 private:
  struct Entry {
    BoundBatch* batch;
    pybind11::object owner;  // keeps `batch` alive
  };
  struct Hash {
    size_t operator()(const std::vector<int64_t>& k) const {
      uint64_t h = 1469598103934665603ull;  // FNV-1a over the values
      for (int64_t v : k) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
      return static_cast<size_t>(h);
    }
  };

  static bool key_of(PyObject* pairs, std::vector<int64_t>* key) {
    if (!PyList_Check(pairs) && !PyTuple_Check(pairs)) return false;
    key->clear();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(pairs);
    PyObject** items = PySequence_Fast_ITEMS(pairs);
    key->push_back(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* pair = items[i];
      if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) return false;
      for (int side = 0; side < 2; ++side) {
        PyObject* obj = PyTuple_GET_ITEM(pair, side);
        if (!THPVariable_Check(obj)) return false;
        const at::Tensor& t = THPVariable_Unpack(obj);
        key->push_back(reinterpret_cast<int64_t>(t.data_ptr()));
        key->push_back(static_cast<int64_t>(t.scalar_type()));
        key->push_back(static_cast<int64_t>(t.device().type()) * 4096 + t.device().index());
        key->push_back(t.dim());
        for (int64_t d : t.sizes()) key->push_back(d);
        for (int64_t d : t.strides()) key->push_back(d);
      }
    }
    return true;
  }

  size_t capacity_;
  std::vector<int64_t> key_;  // reused by run(): no allocation per call once grown
  std::unordered_map<std::vector<int64_t>, Entry, Hash> map_;
};

// An engine seam's common step in one C call: the call site's bindings of the default dispatcher, keyed by the
// destination object and the mode as the engine passes them, with the structure the copy list depends on (int
// attribute values, attributes present or None) read off the step's source object and compared here. A hit
// launches the bound batch (run_attrs: every source checked); anything else - a multi-step replay in flight
// (step_var set), another structure, an owner or mode never bound, a refused source - answers False, and the
// Python call site takes the step (binds, raises, or hands it to the engine).
class SeamTable {
 public:
  SeamTable(pybind11::object step_var, const std::vector<std::string>& values, const std::vector<std::string>& present)
      : step_var_(step_var) {
    for (const auto* names : {&values, &present}) {
      for (const std::string& name : *names) {
        PyObject* s = PyUnicode_InternFromString(name.c_str());
        if (s == nullptr) {  // never throws (see BoundBatch): the table then serves nothing
          PyErr_Clear();
          error_ = "cuda_ext: bad attribute name '" + name + "'";
          return;
        }
        guards_.push_back(pybind11::reinterpret_steal<pybind11::object>(s));
      }
    }
    n_values_ = values.size();
  }

  // Serve (owner, mode, the structure of `source`) by `launcher` (a batch's run_attrs entry point) from now on;
  // "" or why not (nothing changes then). `owner`: one destination object, or a list or tuple of them (several
  // draft backends refreshed in one launch). Owners are held weakly where they can be: addresses are only keys.
  std::string put(pybind11::handle owner, pybind11::object mode, pybind11::handle source, pybind11::object launcher) {
    if (!error_.empty()) return error_;
    BoundBatch* batch = batch_of(launcher.ptr());
    if (batch == nullptr) return "cuda_ext: not a run_attrs entry point";
    std::vector<int64_t> structure;
    if (!read_structure(source.ptr(), &structure)) return "cuda_ext: the structure is not int values and Nones";
    Entry e{{}, mode, std::move(structure), batch, launcher};
    const bool many = PyList_Check(owner.ptr()) || PyTuple_Check(owner.ptr());
    const Py_ssize_t n = many ? PySequence_Fast_GET_SIZE(owner.ptr()) : 1;
    if (n < 1) return "cuda_ext: no owner";
    PyObject** items = many ? PySequence_Fast_ITEMS(owner.ptr()) : nullptr;
    for (Py_ssize_t k = 0; k < n; ++k) {
      PyObject* o = many ? items[k] : owner.ptr();
      PyObject* ref = PyWeakref_NewRef(o, nullptr);
      if (ref == nullptr) {
        PyErr_Clear();
        e.owners.push_back(pybind11::reinterpret_borrow<pybind11::object>(o));  // not weak-referenceable: kept
        e.weak.push_back(false);
      } else {
        e.owners.push_back(pybind11::reinterpret_steal<pybind11::object>(ref));
        e.weak.push_back(true);
      }
    }
    e.many = many;
    auto& entries = by_owner_[reinterpret_cast<uintptr_t>(many ? items[0] : owner.ptr())];
    for (Entry& old : entries) {
      if (old.mode.ptr() == mode.ptr() && old.structure == e.structure && same_owners(old, owner.ptr())) {
        old = std::move(e);
        return "";
      }
    }
    entries.push_back(std::move(e));
    return "";
  }

  // Forget every entry launching through `launcher` (its binding was dropped: a new winner, a freed owner).
  void drop(pybind11::handle launcher) {
    for (auto it = by_owner_.begin(); it != by_owner_.end();) {
      auto& v = it->second;
      v.erase(std::remove_if(v.begin(), v.end(), [&](const Entry& e) { return e.launcher.ptr() == launcher.ptr(); }),
              v.end());
      it = v.empty() ? by_owner_.erase(it) : std::next(it);
    }
  }

  void clear() { by_owner_.clear(); }
  int64_t size() const {
    int64_t n = 0;
    for (const auto& kv : by_owner_) n += static_cast<int64_t>(kv.second.size());
    return n;
  }
  int64_t served() const { return served_; }

  // (owner or owners, source, mode) -> True: launched; False: the caller takes the step. Never raises.
  PyObject* run(PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 3 || by_owner_.empty() || !error_.empty() || busy_) Py_RETURN_FALSE;
    const Busy busy(&busy_);  // structure_ is this call's until it returns (attribute reads may run Python)
    PyObject *owner = args[0], *source = args[1], *mode = args[2];
    if (!step_var_.is_none()) {
      PyObject* step = nullptr;
      if (PyContextVar_Get(step_var_.ptr(), Py_None, &step) < 0) {
        PyErr_Clear();
        Py_RETURN_FALSE;
      }
      const bool busy = step != Py_None;
      Py_XDECREF(step);
      if (busy) Py_RETURN_FALSE;
    }
    // attribute reads may run Python (properties): the structure is read before the table is looked at, and
    // the entry found is held (launcher) rather than iterated while its batch launches
    if (!read_structure(source, &structure_)) Py_RETURN_FALSE;
    const bool many = PyList_Check(owner) || PyTuple_Check(owner);
    if (many && PySequence_Fast_GET_SIZE(owner) < 1) Py_RETURN_FALSE;
    auto it = by_owner_.find(reinterpret_cast<uintptr_t>(many ? PySequence_Fast_ITEMS(owner)[0] : owner));
    if (it == by_owner_.end()) Py_RETURN_FALSE;
    BoundBatch* hit = nullptr;
    pybind11::object keep;
    for (const Entry& e : it->second) {
      if (e.mode.ptr() != mode || e.structure != structure_ || !same_owners(e, owner)) continue;
      hit = e.batch;
      keep = e.launcher;
      break;
    }
    if (hit == nullptr || !hit->run_attrs(pybind11::handle(source)).empty()) Py_RETURN_FALSE;
    ++served_;
    Py_RETURN_TRUE;
  }

 private:
  struct Entry {
    std::vector<pybind11::object> owners;  // each a weak reference, or the owner itself where it has none
    pybind11::object mode;                 // compared by identity (the engine's enum members are singletons)
    std::vector<int64_t> structure;
    BoundBatch* batch;
    pybind11::object launcher;             // keeps `batch` alive
    std::vector<bool> weak;                // owners[k] is a weak reference
    bool many = false;                     // put with a list or tuple of owners
  };

  // What a weak reference points to (None once dead), for an identity test only: never dereferenced.
  static PyObject* referent(PyObject* ref) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject* obj = nullptr;
    if (PyWeakref_GetRef(ref, &obj) < 0) PyErr_Clear();
    Py_XDECREF(obj);
    return obj == nullptr ? Py_None : obj;
#else
    return PyWeakref_GetObject(ref);
#endif
  }

  // Whether `owner` (an object, or a list or tuple of them) is the entry's, each by identity: an address is an
  // owner's only while the owner lives (a freed owner's address may be another object's, its weak reference dead).
  static bool same_owners(const Entry& e, PyObject* owner) {
    const bool many = PyList_Check(owner) || PyTuple_Check(owner);
    if (many != e.many) return false;
    const Py_ssize_t n = many ? PySequence_Fast_GET_SIZE(owner) : 1;
    if (n != static_cast<Py_ssize_t>(e.owners.size())) return false;
    PyObject** items = many ? PySequence_Fast_ITEMS(owner) : &owner;
    for (Py_ssize_t k = 0; k < n; ++k) {
      PyObject* held = e.weak[k] ? referent(e.owners[k].ptr()) : e.owners[k].ptr();
      if (held != items[k]) return false;
    }
    return true;
  }

  static BoundBatch* batch_of(PyObject* launcher);

  // The values of the guard attributes: ints as they are (values), None-ness as 0/1 (present); False where an
  // attribute is missing or a value is not an int (such a structure is never served here).
  bool read_structure(PyObject* source, std::vector<int64_t>* out) const {
    out->resize(guards_.size());
    for (size_t g = 0; g < guards_.size(); ++g) {
      PyObject* v = PyObject_GetAttr(source, guards_[g].ptr());
      if (v == nullptr) {
        PyErr_Clear();
        return false;
      }
      bool ok = true;
      if (g < n_values_) {
        int overflow = 0;
        (*out)[g] = PyLong_Check(v) ? PyLong_AsLongLongAndOverflow(v, &overflow) : 0;
        ok = PyLong_Check(v) && !overflow && !PyErr_Occurred();
        PyErr_Clear();
      } else {
        (*out)[g] = v == Py_None;
      }
      Py_DECREF(v);
      if (!ok) return false;
    }
    return true;
  }

  pybind11::object step_var_;
  std::string error_;
  std::vector<pybind11::object> guards_;  // interned attribute names: values first, then present
  size_t n_values_ = 0;
  std::unordered_map<uintptr_t, std::vector<Entry>> by_owner_;
  std::vector<int64_t> structure_;  // reused by run(): no allocation per call once grown
  bool busy_ = false;               // inside run()
  int64_t served_ = 0;
};

// Per-step entry points as plain CPython functions (METH_O, bound to a capsule holding the batch): a pybind11
// method call costs 0.70 us on the H200 host before any work (benchmarks/bench_launch.py), a METH_O call a
// fraction of that. They return None on success and the error message otherwise; they never raise.
namespace fast {

constexpr const char* kCapsule = "copytune.BoundBatch";
constexpr const char* kCacheCapsule = "copytune.ExactCache";
constexpr const char* kSeamCapsule = "copytune.SeamTable";

void release_owner(PyObject* capsule) {
  Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(capsule)));
}

// `def` as a plain CPython function bound to a capsule named `name` holding `ptr`, whose context keeps `owner` (the
// pybind11 object that owns `ptr`) alive as long as the function lives; None where it cannot be made.
pybind11::object bind_entry(PyMethodDef* def, void* ptr, const char* name, pybind11::handle owner) {
  PyObject* capsule = PyCapsule_New(ptr, name, release_owner);
  if (capsule == nullptr || PyCapsule_SetContext(capsule, owner.ptr()) != 0) {
    PyErr_Clear();
    Py_XDECREF(capsule);  // its context is not set: releases nothing
    return pybind11::none();
  }
  Py_INCREF(owner.ptr());  // released with the capsule
  PyObject* fn = PyCFunction_New(def, capsule);
  Py_DECREF(capsule);  // the function holds it now
  if (fn == nullptr) {
    PyErr_Clear();
    return pybind11::none();
  }
  return pybind11::reinterpret_steal<pybind11::object>(fn);
}

BoundBatch* batch_of(PyObject* capsule) { return static_cast<BoundBatch*>(PyCapsule_GetPointer(capsule, kCapsule)); }

PyObject* result(const std::string& err) {
  if (err.empty()) Py_RETURN_NONE;
  return PyUnicode_FromStringAndSize(err.data(), static_cast<Py_ssize_t>(err.size()));
}

PyObject* run_attrs(PyObject* capsule, PyObject* obj) {
  BoundBatch* b = batch_of(capsule);
  return b == nullptr ? nullptr : result(b->run_attrs(pybind11::handle(obj)));
}

PyObject* run_sequence(PyObject* capsule, PyObject* seq) {
  BoundBatch* b = batch_of(capsule);
  return b == nullptr ? nullptr : result(b->run_sequence(seq));
}

PyObject* run_checked(PyObject* capsule, PyObject* seq) {
  BoundBatch* b = batch_of(capsule);
  return b == nullptr ? nullptr : result(b->run_sequence_checked(seq));
}

PyMethodDef kRunAttrs = {"run_attrs", run_attrs, METH_O, "Launch with the sources read off one object."};
PyMethodDef kRunSequence = {"run_sequence", run_sequence, METH_O, "Launch with a list or tuple of sources."};
PyMethodDef kRunChecked = {"run_checked", run_checked, METH_O, "Launch with checked sources (no overlap)."};

// The METH_O function `which` bound to `self`; None where it cannot be made (the pybind11 methods remain).
pybind11::object make(pybind11::object self, const std::string& which) {
  PyMethodDef* def = which == "run_attrs" ? &kRunAttrs : which == "run_sequence" ? &kRunSequence
                     : which == "run_checked" ? &kRunChecked : nullptr;
  BoundBatch* batch = pybind11::isinstance<BoundBatch>(self) ? self.cast<BoundBatch*>() : nullptr;
  if (def == nullptr || batch == nullptr) return pybind11::none();
  return bind_entry(def, batch, kCapsule, self);
}

PyObject* cache_run(PyObject* capsule, PyObject* pairs) {
  auto* cache = static_cast<ExactCache*>(PyCapsule_GetPointer(capsule, kCacheCapsule));
  return cache == nullptr ? nullptr : cache->run(pairs);
}

PyMethodDef kCacheRun = {"run", cache_run, METH_O, "Launch a batch seen before: None, False (a miss) or an error."};

// The cache's run() as a METH_O function (what Dispatcher.copy calls first); None where it cannot be made.
pybind11::object make_cache_run(pybind11::object self) {
  ExactCache* cache = pybind11::isinstance<ExactCache>(self) ? self.cast<ExactCache*>() : nullptr;
  return cache == nullptr ? pybind11::none() : bind_entry(&kCacheRun, cache, kCacheCapsule, self);
}

PyObject* seam_run(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  auto* table = static_cast<SeamTable*>(PyCapsule_GetPointer(capsule, kSeamCapsule));
  return table == nullptr ? nullptr : table->run(args, nargs);
}

PyMethodDef kSeamRun = {"run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(seam_run)), METH_FASTCALL,
                        "(owner, source, mode): True when the bound step launched, else False."};

// The table's run() as a METH_FASTCALL function (what the engine seam calls first); None where it cannot be made.
pybind11::object make_seam_run(pybind11::object self) {
  SeamTable* table = pybind11::isinstance<SeamTable>(self) ? self.cast<SeamTable*>() : nullptr;
  return table == nullptr ? pybind11::none() : bind_entry(&kSeamRun, table, kSeamCapsule, self);
}

// The engine seam's method itself as a C object: a method descriptor (Py_TPFLAGS_METHOD_DESCRIPTOR, so the
// engine's `self.seam(bs, metadata, precomputed, forward_mode)` calls it with `self` first and no bound-method
// object) whose served step never enters the interpreter - the patched Python method cost 0.13-0.6 us over the C
// step it wraps on H100 hosts (benchmarks/RESULTS.md). A step the table does not serve (another structure, a
// multi-step replay in flight, an owner not bound yet, keyword arguments) goes to `fallback`, the patched Python
// method, with the engine's arguments unchanged. Not tracked by the GC: it lives as long as the class holds it
// (copytune.nsa keeps it only while installed; uninstall() puts the engine's method back). It has no __name__ or
// __doc__ of its own: __wrapped__ is the engine's method.
struct SeamMethodObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  SeamTable* table;
  PyObject* table_owner;  // keeps `table` alive
  PyObject* fallback;     // (self, bs, metadata, precomputed, forward_mode) -> None
  PyObject* wrapped;      // __wrapped__: the engine's own method
  long long served;       // steps served here (the table's step launched)
};

PyObject* seam_method_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* m = reinterpret_cast<SeamMethodObject*>(self);
  if (kwnames == nullptr && PyVectorcall_NARGS(nargsf) == 5) {  // (self, bs, metadata, precomputed, forward_mode)
    PyObject* r = m->table->run(args + 2, 3);                   // (owner, source, mode); never raises
    if (r == Py_True) {
      Py_DECREF(r);
      ++m->served;
      Py_RETURN_NONE;
    }
    if (r == nullptr) PyErr_Clear();
    Py_XDECREF(r);
  }
  return PyObject_Vectorcall(m->fallback, args, nargsf, kwnames);
}

PyObject* seam_method_get(PyObject* self, PyObject* obj, PyObject* /*type*/) {
  if (obj == nullptr || obj == Py_None) {  // looked up on the class: the descriptor itself, as a function's is
    Py_INCREF(self);
    return self;
  }
  return PyMethod_New(self, obj);
}

void seam_method_dealloc(PyObject* self) {
  auto* m = reinterpret_cast<SeamMethodObject*>(self);
  Py_XDECREF(m->table_owner);
  Py_XDECREF(m->fallback);
  Py_XDECREF(m->wrapped);
  PyObject_Free(self);
}

PyObject* seam_method_served(PyObject* self, void*) {
  return PyLong_FromLongLong(reinterpret_cast<SeamMethodObject*>(self)->served);
}
PyObject* seam_method_wrapped(PyObject* self, void*) {
  PyObject* w = reinterpret_cast<SeamMethodObject*>(self)->wrapped;
  Py_INCREF(w);
  return w;
}
PyObject* seam_method_marker(PyObject*, void*) { Py_RETURN_TRUE; }

PyTypeObject* seam_method_type() {
  static PyGetSetDef getset[] = {
      {"served", seam_method_served, nullptr, "Steps this method served in C.", nullptr},
      {"__wrapped__", seam_method_wrapped, nullptr, "The engine's own method.", nullptr},
      {"__copytune__", seam_method_marker, nullptr, "Patched by copytune.", nullptr},
      {nullptr, nullptr, nullptr, nullptr, nullptr}};
  static PyTypeObject type = [] {
    PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
    t.tp_name = "copytune.SeamMethod";
    t.tp_basicsize = sizeof(SeamMethodObject);
    t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR;
    t.tp_vectorcall_offset = offsetof(SeamMethodObject, vectorcall);
    t.tp_call = PyVectorcall_Call;
    t.tp_descr_get = seam_method_get;
    t.tp_dealloc = seam_method_dealloc;
    t.tp_getset = getset;
    t.tp_doc = "The engine seam's method, served by copytune's seam table in C.";
    return t;
  }();
  static const bool ready = PyType_Ready(&type) == 0;
  if (!ready) PyErr_Clear();
  return ready ? &type : nullptr;
}

// The seam method over `self` (a SeamTable); None where it cannot be made (the Python method stays).
pybind11::object make_seam_method(pybind11::object self, pybind11::object fallback, pybind11::object wrapped) {
  SeamTable* table = pybind11::isinstance<SeamTable>(self) ? self.cast<SeamTable*>() : nullptr;
  PyTypeObject* type = seam_method_type();
  if (table == nullptr || type == nullptr || !PyCallable_Check(fallback.ptr())) return pybind11::none();
  SeamMethodObject* m = PyObject_New(SeamMethodObject, type);
  if (m == nullptr) {
    PyErr_Clear();
    return pybind11::none();
  }
  m->vectorcall = seam_method_call;
  m->table = table;
  m->table_owner = self.inc_ref().ptr();
  m->fallback = fallback.inc_ref().ptr();
  m->wrapped = wrapped.inc_ref().ptr();
  m->served = 0;
  return pybind11::reinterpret_steal<pybind11::object>(reinterpret_cast<PyObject*>(m));
}

}  // namespace fast

BoundBatch* SeamTable::batch_of(PyObject* launcher) {
  if (!PyCFunction_Check(launcher) || PyCFunction_GET_FUNCTION(launcher) != reinterpret_cast<PyCFunction>(fast::run_attrs)) {
    return nullptr;
  }
  return fast::batch_of(PyCFunction_GET_SELF(launcher));
}

}  // namespace copytune


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("launch_counts", [] {
    int64_t direct = 0, runtime = 0;
    copytune::launch_counts(&direct, &runtime);
    return std::make_pair(direct, runtime);
  });
  pybind11::class_<copytune::BoundBatch>(m, "BoundBatch")
      .def(pybind11::init<const std::vector<int64_t>&, int64_t, int64_t>())
      .def("error", &copytune::BoundBatch::error)
      .def("run", &copytune::BoundBatch::run)
      .def("run_sources", &copytune::BoundBatch::run_sources)
      .def("set_source_attrs", &copytune::BoundBatch::set_source_attrs)
      .def("set_source_items", &copytune::BoundBatch::set_source_items)
      .def("run_attrs", &copytune::BoundBatch::run_attrs)
      .def("expect_sources", &copytune::BoundBatch::expect_sources)
      .def("set_source_offsets", &copytune::BoundBatch::set_source_offsets)
      .def("set_shape", &copytune::BoundBatch::set_shape)
      .def("follow_source_shape", &copytune::BoundBatch::follow_source_shape)
      .def("vector_bytes", &copytune::BoundBatch::vector_bytes)
      .def("tiles", &copytune::BoundBatch::tiles)
      .def("destinations", &copytune::BoundBatch::destinations)
      .def("row_tiles", &copytune::BoundBatch::row_tiles)
      .def("index_bits", &copytune::BoundBatch::index_bits)
      .def("unroll", &copytune::BoundBatch::unroll)
      .def("fast", &copytune::fast::make);
  pybind11::class_<copytune::ExactCache>(m, "ExactCache")
      .def(pybind11::init<int64_t>())
      .def("put", &copytune::ExactCache::put)
      .def("clear", &copytune::ExactCache::clear)
      .def("size", &copytune::ExactCache::size)
      .def("fast_run", &copytune::fast::make_cache_run);
  pybind11::class_<copytune::SeamTable>(m, "SeamTable")
      .def(pybind11::init<pybind11::object, const std::vector<std::string>&, const std::vector<std::string>&>())
      .def("put", &copytune::SeamTable::put)
      .def("drop", &copytune::SeamTable::drop)
      .def("clear", &copytune::SeamTable::clear)
      .def("size", &copytune::SeamTable::size)
      .def("served", &copytune::SeamTable::served)
      .def("fast_run", &copytune::fast::make_seam_run)
      .def("seam_method", &copytune::fast::make_seam_method);
  m.attr("MAX_COPIES") = copytune::kMaxCopies;
  m.attr("MAYBE_OVERLAP") = copytune::kMaybeOverlap;
}
