// Optimizer kernels on the GPU: the fused AdamW update and the sum of squares behind the global
// gradient norm (kernels/cpu/optim.cpp and reduce.cpp's semantics).
#include <cmath>
#include <initializer_list>

#include "cpu/cpu_utils.h"
#include "cuda/cuda_backend.h"
#include "cuda/reduce.cuh"

namespace dilatron::kernels {
namespace {

using cuda::DeviceGuard;
using cuda::grid_for;
using cuda::kBlockThreads;
using cuda::kStream;

// Per-element constants of one AdamW step, folded on the host in double as the CPU backend does.
template <typename T>
struct AdamWConstants {
  T decay, b1, b2, one_minus_b1, one_minus_b2, step_size, inv_sqrt_bias2, eps;
};

// torch.optim.AdamW, term for term, one pass over p, g, m, v:
//   p -= lr * wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
template <typename T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, AdamWConstants<T> c) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const T gi = g[i];
    const T mi = c.b1 * m[i] + c.one_minus_b1 * gi;
    const T vi = c.b2 * v[i] + c.one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * c.decay - c.step_size * mi / (sqrt(vi) * c.inv_sqrt_bias2 + c.eps);
  }
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
  for (const Tensor* t : std::initializer_list<const Tensor*>{&grad, &m, &v}) {
    DILATRON_CHECK(t->shape() == param.shape() && t->dtype() == param.dtype(), "adamw_step: grad/m/v must be ",
                   dtype_name(param.dtype()), " ", shape_str(param.shape()), ", got ", dtype_name(t->dtype()), " ",
                   shape_str(t->shape()));
  }
  for (const Tensor* t : std::initializer_list<const Tensor*>{&param, &grad, &m, &v}) {
    DILATRON_CHECK(t->is_contiguous(), "adamw_step: tensors must be contiguous, got strides ",
                   shape_str(t->strides()), " for shape ", shape_str(t->shape()));
    cuda::check_on_device("adamw_step", "param/grad/m/v", *t, index_);
  }
  DILATRON_CHECK(hp.step >= 1, "adamw_step: step is 1-based, got ", hp.step);
  const int64_t n = param.numel();
  if (n == 0) return;
  const double bias1 = 1.0 - std::pow(hp.beta1, static_cast<double>(hp.step));
  const double bias2 = 1.0 - std::pow(hp.beta2, static_cast<double>(hp.step));
  DeviceGuard guard(index_);
  dispatch_float(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const AdamWConstants<T> c{static_cast<T>(1.0 - hp.lr * hp.weight_decay),
                              static_cast<T>(hp.beta1),
                              static_cast<T>(hp.beta2),
                              static_cast<T>(1.0 - hp.beta1),
                              static_cast<T>(1.0 - hp.beta2),
                              static_cast<T>(hp.lr / bias1),
                              static_cast<T>(1.0 / std::sqrt(bias2)),
                              static_cast<T>(hp.eps)};
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
