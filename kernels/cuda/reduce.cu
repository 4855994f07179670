// Reductions over contiguous [M, K] views (kernels/cpu/reduce.cpp's semantics): sums accumulate in
// double in an order fixed by the shape (reduce.cuh); max keeps the first maximum, or the first NaN.
#include <algorithm>

#include "backend_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/reduce.cuh"
#include "dtype_dispatch.h"

namespace dilatron::kernels {
namespace {

using cuda::BlockReduce;

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

}  // namespace

void CudaBackend::sum_last(Tensor& out, const Tensor& in) {
  const auto [rows, cols] = check_sum_last(out, in);
  DeviceGuard guard(index_);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    cuda::row_sums(out.data<T>(), rows, cols, Load<T>{in.data<T>(), cols}, index_);
  });
}

void CudaBackend::max_last(Tensor& values, Tensor& indices, const Tensor& in) {
  const auto [rows, cols] = check_max_last(values, indices, in);
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
  const auto [rows, cols] = check_sum_first(out, in);
  DeviceGuard guard(index_);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    cuda::column_sums(out.data<T>(), rows, cols, Load<T>{in.data<T>(), cols}, index_);
  });
}

}  // namespace dilatron::kernels
