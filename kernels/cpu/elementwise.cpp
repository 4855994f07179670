// Elementwise CPU kernels: unary, binary (broadcast inputs arrive as stride-0 views), scalar forms and where.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "backend_checks.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"
#include "gelu.h"

namespace dilatron::kernels {
namespace {

constexpr int64_t kGrain = 1 << 14;

// The CPU's GELU math (kernels/gelu.h): in float, Phi(x) = erfc(-x / sqrt2) / 2 by Numerical Recipes'
// erfcc (a Chebyshev fit with relative error under 1.2e-7 everywhere) and e^x by exp_float
// (cpu_utils.h), both forced inline, as are the gelu functions and their lambdas below (a call left
// in a loop keeps it scalar): they vectorise, and unlike 1 + erf, erfcc keeps its relative accuracy
// in the negative tail, where gelu's outputs are tiny. In double, libm's.
struct CpuGeluMath {
  template <typename T>
  [[gnu::always_inline]] static T exp(T x) {
    if constexpr (std::is_same_v<T, float>) return exp_float(x);
    else return std::exp(x);
  }
  template <typename T>
  [[gnu::always_inline]] static T normal_cdf(T x) {
    if constexpr (std::is_same_v<T, float>) {
      const float z = std::abs(x) * float(M_SQRT1_2);
      const float t = 1.0f / (1.0f + 0.5f * z);
      // erfcc's exponent is poly(t) - z^2; poly by Horner from the highest power of t.
      float poly = 0.17087277f;
      poly = poly * t - 0.82215223f;
      poly = poly * t + 1.48851587f;
      poly = poly * t - 1.13520398f;
      poly = poly * t + 0.27886807f;
      poly = poly * t - 0.18628806f;
      poly = poly * t + 0.09678418f;
      poly = poly * t + 0.37409196f;
      poly = poly * t + 1.00002368f;
      poly = poly * t - 1.26551223f;
      const float lower_tail = 0.5f * t * exp_float(poly - z * z);  // Phi(-|x|)
      return x < 0.0f ? lower_tail : 1.0f - lower_tail;
    } else {
      return LibmMath::normal_cdf(x);
    }
  }
};

// Calls run(f) with f the scalar function of op on T (op dispatched once, outside the loops).
template <typename T, typename Run>
void with_unary_op(UnaryOp op, Run&& run) {
  switch (op) {
    case UnaryOp::Neg: return run([](T x) { return -x; });
    case UnaryOp::Exp: return run([](T x) { return std::exp(x); });
    case UnaryOp::Log: return run([](T x) { return std::log(x); });
    case UnaryOp::Tanh: return run([](T x) { return std::tanh(x); });
    case UnaryOp::Sqrt: return run([](T x) { return std::sqrt(x); });
    case UnaryOp::Rsqrt: return run([](T x) { return T(1) / std::sqrt(x); });
    case UnaryOp::Relu: return run([](T x) { return x < T(0) ? T(0) : x; });  // NaN passes through
    case UnaryOp::Gelu: return run([](T x) __attribute__((always_inline)) { return gelu<T, CpuGeluMath>(x); });
    case UnaryOp::GeluTanh: return run([](T x) { return gelu_tanh(x); });
    case UnaryOp::Abs: return run([](T x) { return std::abs(x); });
    case UnaryOp::Square: return run([](T x) { return x * x; });
    case UnaryOp::Reciprocal: return run([](T x) { return T(1) / x; });
    case UnaryOp::Sigmoid: return run([](T x) { return T(1) / (T(1) + std::exp(-x)); });
  }
  throw Error(detail::concat("unary: unknown op ", static_cast<int>(op)));
}

// Arithmetic ops (out has the inputs' float dtype).
template <typename T, typename Run>
void with_arith_op(BinaryOp op, Run&& run) {
  switch (op) {
    case BinaryOp::Add: return run([](T a, T b) { return a + b; });
    case BinaryOp::Sub: return run([](T a, T b) { return a - b; });
    case BinaryOp::Mul: return run([](T a, T b) { return a * b; });
    case BinaryOp::Div: return run([](T a, T b) { return a / b; });
    // NaN in either input propagates, as torch.maximum / torch.minimum.
    case BinaryOp::Max: return run([](T a, T b) { return (a > b || a != a) ? a : b; });
    case BinaryOp::Min: return run([](T a, T b) { return (a < b || a != a) ? a : b; });
    case BinaryOp::Pow: return run([](T a, T b) { return std::pow(a, b); });
    case BinaryOp::ReluBackward: return run([](T g, T x) { return x > T(0) ? g : T(0); });
    case BinaryOp::GeluBackward:
      return run([](T g, T x) __attribute__((always_inline)) { return g * gelu_grad<T, CpuGeluMath>(x); });
    case BinaryOp::GeluTanhBackward: return run([](T g, T x) { return g * gelu_tanh_grad(x); });
    default: break;
  }
  throw Error(detail::concat("binary: op ", static_cast<int>(op), " is not an arithmetic op"));
}

// Comparisons (out is Bool), for any input dtype.
template <typename T, typename Run>
void with_compare_op(BinaryOp op, Run&& run) {
  switch (op) {
    case BinaryOp::Eq: return run([](T a, T b) { return a == b; });
    case BinaryOp::Ne: return run([](T a, T b) { return a != b; });
    case BinaryOp::Lt: return run([](T a, T b) { return a < b; });
    case BinaryOp::Le: return run([](T a, T b) { return a <= b; });
    case BinaryOp::Gt: return run([](T a, T b) { return a > b; });
    case BinaryOp::Ge: return run([](T a, T b) { return a >= b; });
    default: break;
  }
  throw Error(detail::concat("binary: op ", static_cast<int>(op), " is not a comparison"));
}

template <typename T, typename F>
void unary_loop(Tensor& out, const Tensor& in, F f) {
  T* po = out.data<T>();
  const T* px = in.data<T>();
  const ElementwiseLoop<2> loop(out.shape(), {&out.strides(), &in.strides()});
  const int64_t sx = loop.inner_strides()[1];
  parallel_for(out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    loop.for_each_run(begin, end, [&](const std::array<int64_t, 2>& off, int64_t len) {
      T* o = po + off[0];
      const T* x = px + off[1];
      if (sx == 1) {
        for (int64_t i = 0; i < len; ++i) o[i] = f(x[i]);
      } else {
        for (int64_t i = 0; i < len; ++i) o[i] = f(x[i * sx]);
      }
    });
  });
}

// out = f(a, b) with a and b given as (data, strides) over out's shape; a scalar operand is data with
// all-zero strides. The unit/zero inner-stride cases get their own loops so they vectorise.
template <typename O, typename A, typename B, typename F>
void binary_loop(Tensor& out, const A* pa, const Shape& a_strides, const B* pb, const Shape& b_strides, F f) {
  O* po = static_cast<O*>(out.raw_data());
  const ElementwiseLoop<3> loop(out.shape(), {&out.strides(), &a_strides, &b_strides});
  const auto st = loop.inner_strides();
  const int64_t sa = st[1], sb = st[2];
  parallel_for(out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    loop.for_each_run(begin, end, [&](const std::array<int64_t, 3>& off, int64_t len) {
      O* o = po + off[0];
      const A* a = pa + off[1];
      const B* b = pb + off[2];
      if (sa == 1 && sb == 1) {
        for (int64_t i = 0; i < len; ++i) o[i] = f(a[i], b[i]);
      } else if (sa == 1 && sb == 0) {
        const B bv = *b;
        for (int64_t i = 0; i < len; ++i) o[i] = f(a[i], bv);
      } else if (sa == 0 && sb == 1) {
        const A av = *a;
        for (int64_t i = 0; i < len; ++i) o[i] = f(av, b[i]);
      } else {
        for (int64_t i = 0; i < len; ++i) o[i] = f(a[i * sa], b[i * sb]);
      }
    });
  });
}

void check_elementwise_out(const char* what, const Tensor& out, const Tensor& in) {
  DILATRON_CHECK(out.is_contiguous(), what, ": out must be contiguous");
  DILATRON_CHECK(in.shape() == out.shape(), what, ": input shape ", shape_str(in.shape()), " != out shape ",
                 shape_str(out.shape()));
}

// Dispatches a binary op on the inputs' dtype: run(O{}, T{}, f) with T the input and O the output element type.
template <typename Run>
void with_binary_op(const char* what, BinaryOp op, DType in_dtype, const Tensor& out, Run&& run) {
  if (is_comparison(op)) {
    DILATRON_CHECK(out.dtype() == DType::Bool, what, ": comparisons write bool, out is ", dtype_name(out.dtype()));
    dispatch_all(in_dtype, [&](auto tag) {
      using T = decltype(tag);
      with_compare_op<T>(op, [&](auto f) { run(bool{}, tag, f); });
    });
    return;
  }
  DILATRON_CHECK(out.dtype() == in_dtype, what, ": inputs are ", dtype_name(in_dtype), ", out is ",
                 dtype_name(out.dtype()));
  dispatch_float(in_dtype, [&](auto tag) {
    using T = decltype(tag);
    with_arith_op<T>(op, [&](auto f) { run(tag, tag, f); });
  });
}

}  // namespace

void CpuBackend::unary(UnaryOp op, Tensor& out, const Tensor& in) {
  check_elementwise_out("unary", out, in);
  DILATRON_CHECK(in.dtype() == out.dtype(), "unary: input is ", dtype_name(in.dtype()), ", out is ",
                 dtype_name(out.dtype()));
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    with_unary_op<T>(op, [&](auto f) { unary_loop<T>(out, in, f); });
  });
}

void CpuBackend::binary(BinaryOp op, Tensor& out, const Tensor& a, const Tensor& b) {
  check_elementwise_out("binary", out, a);
  check_elementwise_out("binary", out, b);
  DILATRON_CHECK(a.dtype() == b.dtype(), "binary: input dtypes differ: ", dtype_name(a.dtype()), " and ",
                 dtype_name(b.dtype()));
  with_binary_op("binary", op, a.dtype(), out, [&](auto out_tag, auto tag, auto f) {
    using O = decltype(out_tag);
    using T = decltype(tag);
    binary_loop<O>(out, a.data<T>(), a.strides(), b.data<T>(), b.strides(), f);
  });
}

void CpuBackend::binary_scalar(BinaryOp op, Tensor& out, const Tensor& in, double scalar, bool scalar_first) {
  if (op == BinaryOp::Pow && !scalar_first && scalar == 2.0) return unary(UnaryOp::Square, out, in);
  check_elementwise_out("binary_scalar", out, in);
  // The binary loops with the scalar as an operand of all-zero strides.
  const Shape scalar_strides(in.shape().size(), 0);
  with_binary_op("binary_scalar", op, in.dtype(), out, [&](auto out_tag, auto tag, auto f) {
    using O = decltype(out_tag);
    using T = decltype(tag);
    const T s = static_cast<T>(scalar);
    if (scalar_first) binary_loop<O>(out, &s, scalar_strides, in.data<T>(), in.strides(), f);
    else binary_loop<O>(out, in.data<T>(), in.strides(), &s, scalar_strides, f);
  });
}

void CpuBackend::where(Tensor& out, const Tensor& cond, const Tensor& a, const Tensor& b) {
  check_elementwise_out("where", out, cond);
  check_elementwise_out("where", out, a);
  check_elementwise_out("where", out, b);
  DILATRON_CHECK(cond.dtype() == DType::Bool, "where: condition must be bool, got ", dtype_name(cond.dtype()));
  DILATRON_CHECK(a.dtype() == out.dtype() && b.dtype() == out.dtype(), "where: values are ", dtype_name(a.dtype()),
                 " and ", dtype_name(b.dtype()), ", out is ", dtype_name(out.dtype()));
  dispatch_all(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* po = out.data<T>();
    const bool* pc = cond.data<bool>();
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    const ElementwiseLoop<4> loop(out.shape(), {&out.strides(), &cond.strides(), &a.strides(), &b.strides()});
    const auto st = loop.inner_strides();
    parallel_for(out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      loop.for_each_run(begin, end, [&](const std::array<int64_t, 4>& off, int64_t len) {
        T* o = po + off[0];
        const bool* c = pc + off[1];
        const T* x = pa + off[2];
        const T* y = pb + off[3];
        for (int64_t i = 0; i < len; ++i) o[i] = c[i * st[1]] ? x[i * st[2]] : y[i * st[3]];
      });
    });
  });
}

}  // namespace dilatron::kernels
