// GELU and its gradients, the one definition both backends use (host and device): exact,
// x * Phi(x), and PyTorch's approximate="tanh".
//
// The exact form is written on a Math policy giving Phi and e^x. Both devices use LibmMath (erf and
// exp of libm or CUDA), except the CPU in float: its policy (kernels/cpu/elementwise.cpp) computes
// Phi from Numerical Recipes' erfcc and e^x by exp_float, which vectorise and run several times
// faster, with relative error near 1e-7; that is the only place the backends' GELUs differ.
//
// The tanh form is 0.5 x (1 + tanh(u)) = x * sigmoid(2u), written as the sigmoid: one exp instead of
// a (much slower) tanh, and no cancellation for negative u.
#pragma once

#include <cmath>

#include "dilatron/host_device.h"

namespace dilatron::kernels {

struct LibmMath {
  template <typename T>
  DILATRON_HOST_DEVICE_INLINE static T exp(T x) {
#if defined(__CUDA_ARCH__)
    return ::exp(x);
#else
    return std::exp(x);
#endif
  }
  // Phi(x), the standard normal CDF.
  template <typename T>
  DILATRON_HOST_DEVICE_INLINE static T normal_cdf(T x) {
#if defined(__CUDA_ARCH__)
    return T(0.5) * (T(1) + ::erf(x * T(M_SQRT1_2)));
#else
    return T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
#endif
  }
};

template <typename T, typename Math = LibmMath>
DILATRON_HOST_DEVICE_INLINE T gelu(T x) {
  return x * Math::normal_cdf(x);
}

// d/dx of x * Phi(x) = Phi(x) + x * phi(x), phi(x) = e^(-x^2 / 2) / sqrt(2 pi).
template <typename T, typename Math = LibmMath>
DILATRON_HOST_DEVICE_INLINE T gelu_grad(T x) {
  return Math::normal_cdf(x) + x * Math::exp(T(-0.5) * x * x) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);
}

constexpr double kGeluTanhBeta = M_SQRT2 * M_2_SQRTPI * 0.5;  // sqrt(2 / pi)
constexpr double kGeluTanhKappa = 0.044715;

// sigmoid(2u) = 0.5 (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3).
template <typename T>
DILATRON_HOST_DEVICE_INLINE T gelu_tanh_sigmoid(T x) {
  const T u = T(kGeluTanhBeta) * (x + T(kGeluTanhKappa) * x * x * x);
  return T(1) / (T(1) + LibmMath::exp(T(-2) * u));
}

template <typename T>
DILATRON_HOST_DEVICE_INLINE T gelu_tanh(T x) {
  return x * gelu_tanh_sigmoid(x);
}

// d/dx [0.5 x (1 + tanh u)] = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u', with 0.5 (1 + tanh u) = s
// and 1 - tanh^2 u = 4 s (1 - s).
template <typename T>
DILATRON_HOST_DEVICE_INLINE T gelu_tanh_grad(T x) {
  const T s = gelu_tanh_sigmoid(x);
  return s + T(2) * x * s * (T(1) - s) * T(kGeluTanhBeta) * (T(1) + T(3 * kGeluTanhKappa) * x * x);
}

}  // namespace dilatron::kernels
