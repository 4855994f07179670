// Reductions over contiguous [M, K] views (kernels/cpu/reduce.cpp's semantics): sums accumulate in
// double in an order fixed by the shape (reduce.cuh); max keeps the first maximum, or the first NaN.
#include <algorithm>

#include "cpu/cpu_utils.h"
#include "cuda/cuda_backend.h"
#include "cuda/reduce.cuh"

namespace dilatron::kernels {
namespace {

using cuda::BlockReduce;
using cuda::DeviceGuard;
using cuda::kBlockThreads;
using cuda::kStream;

template <typename T>
struct Load {
  const T* x;
  int64_t K;
  __device__ double operator()(int64_t m, int64_t k) const { return static_cast<double>(x[m * K + k]); }
};

template <typename T>
struct ArgMax {
  T value;
  int64_t index;
};

template <typename T>
__device__ __forceinline__ bool is_nan(T v) {
  return v != v;
}

// The better of two candidates as torch.max picks: a NaN beats any number, a larger value beats a
// smaller one, and on a tie (or two NaNs) the smaller index wins.
struct ArgMaxOp {
  template <typename T>
  __device__ __forceinline__ ArgMax<T> operator()(const ArgMax<T>& a, const ArgMax<T>& b) const {
    if (is_nan(a.value) != is_nan(b.value)) return is_nan(a.value) ? a : b;
    if (!is_nan(a.value) && a.value != b.value) return a.value > b.value ? a : b;
    return a.index <= b.index ? a : b;
  }
};

// One block per row; each thread scans its strided slice in increasing index, then the block combines.
template <typename T>
__global__ void max_last_kernel(T* values, int64_t* indices, const T* x, int64_t K) {
  __shared__ typename BlockReduce<ArgMax<T>>::TempStorage temp;
  const T* row = x + blockIdx.x * K;
  ArgMax<T> best{row[0], 0};
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) best = ArgMaxOp{}(best, ArgMax<T>{row[k], k});
  const ArgMax<T> result = BlockReduce<ArgMax<T>>(temp).Reduce(best, ArgMaxOp{});
  if (threadIdx.x == 0) {
    values[blockIdx.x] = result.value;
    indices[blockIdx.x] = result.index;
  }
}

// [M, K] geometry of a contiguous input whose row count is out's element count.
void check_rows(const char* what, const Tensor& out, const Tensor& in, int64_t& rows, int64_t& cols) {
  DILATRON_CHECK(in.is_contiguous(), what, ": input must be contiguous");
  DILATRON_CHECK(in.dim() == 2, what, ": expected a 2-D [M, K] input, got shape ", shape_str(in.shape()));
  rows = in.shape()[0];
  cols = in.shape()[1];
  DILATRON_CHECK(out.is_contiguous() && out.numel() == rows, what, ": out shape ", shape_str(out.shape()),
                 " for input ", shape_str(in.shape()));
}

}  // namespace

void CudaBackend::sum_last(Tensor& out, const Tensor& in) {
  int64_t rows = 0, cols = 0;
  check_rows("sum_last", out, in, rows, cols);
  DILATRON_CHECK(out.dtype() == in.dtype(), "sum_last: input is ", dtype_name(in.dtype()), ", out is ",
                 dtype_name(out.dtype()));
  DeviceGuard guard(index_);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    cuda::row_sums(out.data<T>(), rows, cols, Load<T>{in.data<T>(), cols}, index_);
  });
}

void CudaBackend::max_last(Tensor& values, Tensor& indices, const Tensor& in) {
  int64_t rows = 0, cols = 0;
  check_rows("max_last", values, in, rows, cols);
  DILATRON_CHECK(cols > 0 || rows == 0, "max_last: cannot take the max over an empty dim, input shape ",
                 shape_str(in.shape()));
  DILATRON_CHECK(values.dtype() == in.dtype() && indices.dtype() == DType::Int64 && indices.numel() == rows,
                 "max_last: values must be ", dtype_name(in.dtype()), " and indices int64 of ", rows, " elements");
  if (rows == 0) return;
  DeviceGuard guard(index_);
  dispatch_all(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    max_last_kernel<T><<<static_cast<unsigned>(rows), kBlockThreads, 0, kStream>>>(
        values.data<T>(), indices.data<int64_t>(), in.data<T>(), cols);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::sum_first(Tensor& out, const Tensor& in) {
  DILATRON_CHECK(in.is_contiguous() && in.dim() == 2, "sum_first: expected a contiguous 2-D input, got shape ",
                 shape_str(in.shape()));
  const int64_t rows = in.shape()[0], cols = in.shape()[1];
  DILATRON_CHECK(out.is_contiguous() && out.numel() == cols && out.dtype() == in.dtype(), "sum_first: out shape ",
                 shape_str(out.shape()), " (", dtype_name(out.dtype()), ") for input ", shape_str(in.shape()), " (",
                 dtype_name(in.dtype()), ")");
  DeviceGuard guard(index_);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    cuda::column_sums(out.data<T>(), rows, cols, Load<T>{in.data<T>(), cols}, index_);
  });
}

}  // namespace dilatron::kernels
