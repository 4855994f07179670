// Optimizer kernels on the GPU: the fused AdamW update and the sum of squares behind the global
// gradient norm (kernels/cpu/optim.cpp and reduce.cpp's semantics).
#include <initializer_list>

#include "adamw.h"
#include "backend_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/reduce.cuh"
#include "dtype_dispatch.h"

namespace dilatron::kernels {
namespace {

// kernels/adamw.h's update, one pass over p, g, m, v.
template <typename T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, AdamWConstants<T> c) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    adamw_update(p[i], g[i], m[i], v[i], c);
}

template <typename T>
struct Square {
  const T* x;
  __device__ double operator()(int64_t, int64_t k) const {
    const auto v = static_cast<double>(x[k]);
    return v * v;
  }
};

}  // namespace

void CudaBackend::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) {
  check_adamw(param, grad, m, v, hp);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&param, &grad, &m, &v})
    cuda::check_on_device("adamw_step", "param/grad/m/v", *t, index_);
  const int64_t n = param.numel();
  if (n == 0) return;
  DeviceGuard guard(index_);
  dispatch_float(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const AdamWConstants<T> c = AdamWConstants<T>::from(hp);
    adamw_kernel<T><<<grid_for(n), kBlockThreads, 0, kStream>>>(param.data<T>(), grad.data<T>(), m.data<T>(),
                                                                 v.data<T>(), n, c);
    CUDA_CHECK_LAUNCH();
  });
}

double CudaBackend::sum_squares(const Tensor& in) {
  DILATRON_CHECK(in.is_contiguous(), "sum_squares: input must be contiguous");
  cuda::check_on_device("sum_squares", "input", in, index_);
  DeviceGuard guard(index_);
  ScratchBuffer<double> total(1, Device::cuda(index_));
  double result = 0.0;
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    // One row of numel() elements: chunk partials added in order (reduce.cuh), so the norm is
    // bitwise reproducible.
    cuda::row_sums(total.data(), 1, in.numel(), Square<T>{in.data<T>()}, index_);
  });
  CUDA_CHECK(cudaMemcpy(&result, total.data(), sizeof result, cudaMemcpyDeviceToHost));
  return result;
}

}  // namespace dilatron::kernels
