// Helpers shared by the CPU kernels: dtype dispatch, strided indexing, OpenMP parallel loops.
#pragma once

#include <omp.h>

#include <cstdint>
#include <utility>

#include "dilatron/tensor.h"

namespace dilatron::kernels {

// Calls f(T{}) with T the C++ type of a float dtype; errors for others.
template <typename F>
void dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    default: throw Error(detail::concat("expected a float32 or float64 tensor, got ", dtype_name(t)));
  }
}

// Calls f(T{}) for any dtype (Bool as bool).
template <typename F>
void dispatch_all(DType t, F&& f) {
  switch (t) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    case DType::Int64: f(int64_t{}); return;
    case DType::Bool: f(bool{}); return;
  }
}

// Maps a row-major linear index to the storage offset (relative to data()) of a strided view.
class StridedIndex {
 public:
  StridedIndex(const Shape& shape, const Shape& strides) : shape_(shape), strides_(strides) {
    contiguous_ = true;
    int64_t expected = 1;
    for (size_t i = shape.size(); i-- > 0;) {
      if (shape[i] != 1 && strides[i] != expected) contiguous_ = false;
      expected *= shape[i];
    }
  }
  int64_t operator()(int64_t linear) const {
    if (contiguous_) return linear;
    int64_t off = 0;
    for (size_t i = shape_.size(); i-- > 0;) {
      const int64_t s = shape_[i];
      off += (linear % s) * strides_[i];
      linear /= s;
    }
    return off;
  }
  bool contiguous() const { return contiguous_; }

 private:
  Shape shape_, strides_;
  bool contiguous_;
};

// Splits [0, n) into per-thread chunks of at least `grain` items; f(begin, end). Serial when small.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int max_threads = omp_get_max_threads();
  const int64_t chunks = std::min<int64_t>(max_threads, (n + grain - 1) / grain);
  if (chunks <= 1 || omp_in_parallel()) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel for num_threads(static_cast<int>(chunks)) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
    f(begin, end);
  }
}

}  // namespace dilatron::kernels
