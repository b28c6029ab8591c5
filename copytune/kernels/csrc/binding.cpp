// copytune cuda_ext binding: a BoundBatch holds the planned parameter structs of one batch and relaunches them,
// reading new source addresses from tensors in C++ (on an H100, 14 data_ptr() reads cost 3.0 us in Python; pybind
// parses 14 tensors in 2.3 us).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "batched_copy.cuh"

namespace copytune {

class BoundBatch {
 public:
  // flat: 6 int64 per copy (src, dst, rows, row_bytes, src_stride, dst_stride), bytes; empty copies excluded.
  BoundBatch(const std::vector<int64_t>& flat, int64_t device) : device_(static_cast<int>(device)) {
    TORCH_CHECK(flat.size() % 6 == 0, "cuda_ext: descriptor list length ", flat.size(), " is not a multiple of 6");
    raw_.resize(flat.size() / 6);
    for (size_t i = 0; i < raw_.size(); ++i) {
      raw_[i] = RawCopy{flat[6 * i], flat[6 * i + 1], flat[6 * i + 2], flat[6 * i + 3], flat[6 * i + 4],
                        flat[6 * i + 5]};
    }
    const size_t chunks = (raw_.size() + kMaxCopies - 1) / kMaxCopies;
    params_.resize(chunks);
    tiles_.resize(chunks);
    plan();
  }

  void run() { launch(); }

  // Bytes to add to each new source's data_ptr() (callers that pass base tensors instead of slice views).
  void set_source_offsets(const std::vector<int64_t>& offsets) {
    TORCH_CHECK(offsets.size() == raw_.size(), "cuda_ext: expected ", raw_.size(), " offsets");
    offsets_ = offsets;
  }

  // Copy i (among the bound non-empty copies) now has `rows` rows of `row_bytes` bytes, rows `src_stride` /
  // `dst_stride` bytes apart; the destination address is unchanged. The caller guarantees both sides hold that
  // many bytes (an NSA page table gaining a column: a new contiguous source, the same wide destination).
  void set_shape(int64_t i, int64_t rows, int64_t row_bytes, int64_t src_stride, int64_t dst_stride) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(raw_.size()), "cuda_ext: copy index ", i, " out of range");
    TORCH_CHECK(rows >= 0 && row_bytes >= 0 && src_stride >= 0 && dst_stride >= 0, "cuda_ext: negative shape");
    raw_[i].rows = rows;
    raw_[i].row_bytes = row_bytes;
    raw_[i].src_stride = src_stride;
    raw_[i].dst_stride = dst_stride;
    plan();
  }

  // From now on copy i takes its row length and source row stride from each new source tensor (2-D, rows
  // fixed): an NSA page table `[rows, max_len]` whose max_len grows every decode step, read here in C++ instead
  // of a Python resize per step. `max_row_bytes` is what the destination rows hold; more is refused.
  void follow_source_shape(int64_t i, int64_t max_row_bytes, int64_t itemsize) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(raw_.size()), "cuda_ext: copy index ", i, " out of range");
    follow_.resize(raw_.size(), Follow{0, 0});
    follow_[i] = Follow{max_row_bytes, itemsize};
  }

  // New sources of the bound geometry, in pair order (one per copy, empty copies excluded by the caller).
  void run_sources(const std::vector<at::Tensor>& srcs) {
    TORCH_CHECK(srcs.size() == raw_.size(), "cuda_ext: expected ", raw_.size(), " sources, got ", srcs.size());
    for (size_t i = 0; i < raw_.size(); ++i) {
      raw_[i].src = reinterpret_cast<int64_t>(srcs[i].data_ptr()) + (offsets_.empty() ? 0 : offsets_[i]);
      if (!follow_.empty() && follow_[i].itemsize) {
        const at::Tensor& t = srcs[i];
        TORCH_CHECK(t.dim() == 2 && t.size(0) == raw_[i].rows, "cuda_ext: source ", i, " must be 2-D with ",
                    raw_[i].rows, " rows");
        const int64_t row_bytes = t.size(1) * follow_[i].itemsize;
        TORCH_CHECK(row_bytes <= follow_[i].max_row_bytes && t.stride(1) == 1, "cuda_ext: source ", i, " has ",
                    t.size(1), " columns; the destination rows hold ", follow_[i].max_row_bytes / follow_[i].itemsize);
        raw_[i].row_bytes = row_bytes;
        raw_[i].src_stride = t.stride(0) * follow_[i].itemsize;
      }
    }
    plan();  // alignment may differ: vector widths and tiles are recomputed (a few ns per copy)
    launch();
  }

  std::vector<int64_t> vector_bytes() const {
    std::vector<int64_t> out;
    for (size_t k = 0; k < params_.size(); ++k)
      for (int j = 0; j < params_[k].count; ++j) out.push_back(int64_t(1) << params_[k].c[j].vec_log2);
    return out;
  }

  std::vector<int64_t> tiles() const { return tiles_; }

 private:
  void plan() {
    for (size_t k = 0; k < params_.size(); ++k) {
      const int count = static_cast<int>(std::min<size_t>(kMaxCopies, raw_.size() - k * kMaxCopies));
      tiles_[k] = plan_launch(raw_.data() + k * kMaxCopies, count, &params_[k]);
    }
  }

  void launch() {
    c10::cuda::OptionalCUDAGuard guard;
    if (c10::cuda::current_device() != device_) guard.set_index(device_);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_).stream();
    for (size_t k = 0; k < params_.size(); ++k) {
      const cudaError_t err = launch_batched_copy(params_[k], tiles_[k], stream);
      TORCH_CHECK(err == cudaSuccess, "cuda_ext: launch failed: ", cudaGetErrorString(err));
    }
  }

  int device_;
  std::vector<RawCopy> raw_;
  std::vector<int64_t> offsets_;
  struct Follow {
    int64_t max_row_bytes, itemsize;  // itemsize 0: the copy keeps its bound shape
  };
  std::vector<Follow> follow_;
  std::vector<Params> params_;
  std::vector<int64_t> tiles_;
};

}  // namespace copytune

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<copytune::BoundBatch>(m, "BoundBatch")
      .def(pybind11::init<const std::vector<int64_t>&, int64_t>())
      .def("run", &copytune::BoundBatch::run)
      .def("run_sources", &copytune::BoundBatch::run_sources)
      .def("set_source_offsets", &copytune::BoundBatch::set_source_offsets)
      .def("set_shape", &copytune::BoundBatch::set_shape)
      .def("follow_source_shape", &copytune::BoundBatch::follow_source_shape)
      .def("vector_bytes", &copytune::BoundBatch::vector_bytes)
      .def("tiles", &copytune::BoundBatch::tiles);
  m.attr("MAX_COPIES") = copytune::kMaxCopies;
}
