// Optimizer update kernels on the CPU.
#include <cmath>
#include <initializer_list>

#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"

namespace dilatron::kernels {

// torch.optim.AdamW, term for term:
//   p -= lr * wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
void CpuBackend::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&grad, &m, &v}) {
    DILATRON_CHECK(t->shape() == param.shape() && t->dtype() == param.dtype(), "adamw_step: grad/m/v must be ",
                   dtype_name(param.dtype()), " ", shape_str(param.shape()), ", got ", dtype_name(t->dtype()), " ",
                   shape_str(t->shape()));
  }
  for (const Tensor* t : std::initializer_list<const Tensor*>{&param, &grad, &m, &v})
    DILATRON_CHECK(t->is_contiguous(), "adamw_step: tensors must be contiguous, got strides ",
                   shape_str(t->strides()), " for shape ", shape_str(t->shape()));
  DILATRON_CHECK(hp.step >= 1, "adamw_step: step is 1-based, got ", hp.step);
  const int64_t n = param.numel();
  const double bias1 = 1.0 - std::pow(hp.beta1, static_cast<double>(hp.step));
  const double bias2 = 1.0 - std::pow(hp.beta2, static_cast<double>(hp.step));
  dispatch_float(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    T* mp = m.data<T>();
    T* vp = v.data<T>();
    const T decay = static_cast<T>(1.0 - hp.lr * hp.weight_decay);
    const T b1 = static_cast<T>(hp.beta1), b2 = static_cast<T>(hp.beta2);
    const T one_minus_b1 = static_cast<T>(1.0 - hp.beta1), one_minus_b2 = static_cast<T>(1.0 - hp.beta2);
    const T step_size = static_cast<T>(hp.lr / bias1);
    const T inv_sqrt_bias2 = static_cast<T>(1.0 / std::sqrt(bias2));
    const T eps = static_cast<T>(hp.eps);
    parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T gi = g[i];
        const T mi = b1 * mp[i] + one_minus_b1 * gi;
        const T vi = b2 * vp[i] + one_minus_b2 * gi * gi;
        mp[i] = mi;
        vp[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bias2 + eps);
      }
    });
  });
}

}  // namespace dilatron::kernels
