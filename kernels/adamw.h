// The AdamW update, the one definition both backends use (host and device): torch.optim.AdamW,
// term for term,
//   p -= lr * wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// with the per-step constants folded on the host in double.
#pragma once

#include <cmath>

#include "dilatron/host_device.h"
#include "dilatron/kernels/backend.h"

namespace dilatron::kernels {

template <typename T>
struct AdamWConstants {
  T decay, b1, b2, one_minus_b1, one_minus_b2, step_size, inv_sqrt_bias2, eps;

  static AdamWConstants from(const AdamWParams& hp) {
    const double bias1 = 1.0 - std::pow(hp.beta1, static_cast<double>(hp.step));
    const double bias2 = 1.0 - std::pow(hp.beta2, static_cast<double>(hp.step));
    return {static_cast<T>(1.0 - hp.lr * hp.weight_decay),
            static_cast<T>(hp.beta1),
            static_cast<T>(hp.beta2),
            static_cast<T>(1.0 - hp.beta1),
            static_cast<T>(1.0 - hp.beta2),
            static_cast<T>(hp.lr / bias1),
            static_cast<T>(1.0 / std::sqrt(bias2)),
            static_cast<T>(hp.eps)};
  }
};

// One element: updates p, m and v in place.
template <typename T>
DILATRON_HOST_DEVICE_INLINE void adamw_update(T& p, T g, T& m, T& v, const AdamWConstants<T>& c) {
  const T mi = c.b1 * m + c.one_minus_b1 * g;
  const T vi = c.b2 * v + c.one_minus_b2 * g * g;
  m = mi;
  v = vi;
#if defined(__CUDA_ARCH__)
  p = p * c.decay - c.step_size * mi / (::sqrt(vi) * c.inv_sqrt_bias2 + c.eps);
#else
  p = p * c.decay - c.step_size * mi / (std::sqrt(vi) * c.inv_sqrt_bias2 + c.eps);
#endif
}

}  // namespace dilatron::kernels
