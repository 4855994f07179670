// Elementwise CUDA kernels: unary, binary (broadcast inputs arrive as stride-0 views), scalar forms
// and where. Each op's formula is the CPU's (kernels/cpu/elementwise.cpp) in CUDA's libm; GELU
// comes from kernels/gelu.h, whose comment says where the CPU's float path differs. The op is a kernel
// argument switched on per element: the branch is uniform across the grid and these kernels are
// bound by memory traffic, so one kernel per dtype serves every op.
#include "backend_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dtype_dispatch.h"
#include "gelu.h"

namespace dilatron::kernels {
namespace {

using cuda::StridedIndexer;

template <typename T>
__device__ T unary_value(UnaryOp op, T x) {
  switch (op) {
    case UnaryOp::Neg: return -x;
    case UnaryOp::Exp: return exp(x);
    case UnaryOp::Log: return log(x);
    case UnaryOp::Tanh: return tanh(x);
    case UnaryOp::Sqrt: return sqrt(x);
    case UnaryOp::Rsqrt: return T(1) / sqrt(x);
    case UnaryOp::Relu: return x < T(0) ? T(0) : x;  // NaN passes through
    case UnaryOp::Gelu: return gelu(x);
    case UnaryOp::GeluTanh: return gelu_tanh(x);
    case UnaryOp::Abs: return fabs(x);
    case UnaryOp::Square: return x * x;
    case UnaryOp::Reciprocal: return T(1) / x;
    case UnaryOp::Sigmoid: return T(1) / (T(1) + exp(-x));
  }
  return x;
}

// Arithmetic ops (float T) and comparisons (any T, written as bool).
template <typename T>
__device__ T arith_value(BinaryOp op, T a, T b) {
  switch (op) {
    case BinaryOp::Add: return a + b;
    case BinaryOp::Sub: return a - b;
    case BinaryOp::Mul: return a * b;
    case BinaryOp::Div: return a / b;
    case BinaryOp::Max: return (a > b || a != a) ? a : b;  // NaN in either input propagates
    case BinaryOp::Min: return (a < b || a != a) ? a : b;
    case BinaryOp::Pow: return pow(a, b);
    case BinaryOp::ReluBackward: return b > T(0) ? a : T(0);
    case BinaryOp::GeluBackward: return a * gelu_grad(b);
    case BinaryOp::GeluTanhBackward: return a * gelu_tanh_grad(b);
    default: return T(0);
  }
}
template <typename T>
__device__ bool compare_value(BinaryOp op, T a, T b) {
  switch (op) {
    case BinaryOp::Eq: return a == b;
    case BinaryOp::Ne: return a != b;
    case BinaryOp::Lt: return a < b;
    case BinaryOp::Le: return a <= b;
    case BinaryOp::Gt: return a > b;
    case BinaryOp::Ge: return a >= b;
    default: return false;
  }
}
template <typename O, typename T>
__device__ __forceinline__ O binary_value(BinaryOp op, T a, T b) {
  if constexpr (std::is_same_v<O, bool>) return compare_value(op, a, b);
  else return arith_value(op, a, b);
}

#define GRID_STRIDE_LOOP(i, n) \
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < (n); i += int64_t{gridDim.x} * blockDim.x)

template <typename T>
__global__ void unary_kernel(UnaryOp op, T* out, const T* in, StridedIndexer in_index, int64_t n) {
  GRID_STRIDE_LOOP(i, n) out[i] = unary_value(op, in[in_index(i)]);
}

template <typename O, typename T>
__global__ void binary_kernel(BinaryOp op, O* out, const T* a, StridedIndexer a_index, const T* b,
                              StridedIndexer b_index, int64_t n) {
  GRID_STRIDE_LOOP(i, n) out[i] = binary_value<O>(op, a[a_index(i)], b[b_index(i)]);
}

template <typename O, typename T>
__global__ void binary_scalar_kernel(BinaryOp op, O* out, const T* in, StridedIndexer in_index, T scalar,
                                     bool scalar_first, int64_t n) {
  GRID_STRIDE_LOOP(i, n) {
    const T x = in[in_index(i)];
    out[i] = scalar_first ? binary_value<O>(op, scalar, x) : binary_value<O>(op, x, scalar);
  }
}

template <typename T>
__global__ void where_kernel(T* out, const bool* cond, StridedIndexer c_index, const T* a, StridedIndexer a_index,
                             const T* b, StridedIndexer b_index, int64_t n) {
  GRID_STRIDE_LOOP(i, n) out[i] = cond[c_index(i)] ? a[a_index(i)] : b[b_index(i)];
}

void check_elementwise_out(const char* what, const Tensor& out, const Tensor& in, int device_index) {
  DILATRON_CHECK(out.is_contiguous(), what, ": out must be contiguous");
  DILATRON_CHECK(in.shape() == out.shape(), what, ": input shape ", shape_str(in.shape()), " != out shape ",
                 shape_str(out.shape()));
  cuda::check_on_device(what, "input", in, device_index);
  cuda::check_on_device(what, "out", out, device_index);
}

// run(O{}, T{}) with T the input and O the output element type of a binary op, after the dtype checks
// of the CPU backend: comparisons take any dtype and write bool, arithmetic keeps the float dtype.
template <typename Run>
void with_binary_types(const char* what, BinaryOp op, DType in_dtype, const Tensor& out, Run&& run) {
  if (is_comparison(op)) {
    DILATRON_CHECK(out.dtype() == DType::Bool, what, ": comparisons write bool, out is ", dtype_name(out.dtype()));
    dispatch_all(in_dtype, [&](auto tag) { run(bool{}, tag); });
    return;
  }
  DILATRON_CHECK(out.dtype() == in_dtype, what, ": inputs are ", dtype_name(in_dtype), ", out is ",
                 dtype_name(out.dtype()));
  dispatch_float(in_dtype, [&](auto tag) { run(tag, tag); });
}

}  // namespace

void CudaBackend::unary(UnaryOp op, Tensor& out, const Tensor& in) {
  check_elementwise_out("unary", out, in, index_);
  DILATRON_CHECK(in.dtype() == out.dtype(), "unary: input is ", dtype_name(in.dtype()), ", out is ",
                 dtype_name(out.dtype()));
  DeviceGuard guard(index_);
  const int64_t n = out.numel();
  if (n == 0) return;
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    unary_kernel<T><<<grid_for(n), kBlockThreads, 0, kStream>>>(op, out.data<T>(), in.data<T>(),
                                                                 cuda::make_indexer(in), n);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::binary(BinaryOp op, Tensor& out, const Tensor& a, const Tensor& b) {
  check_elementwise_out("binary", out, a, index_);
  check_elementwise_out("binary", out, b, index_);
  DILATRON_CHECK(a.dtype() == b.dtype(), "binary: input dtypes differ: ", dtype_name(a.dtype()), " and ",
                 dtype_name(b.dtype()));
  DeviceGuard guard(index_);
  const int64_t n = out.numel();
  if (n == 0) return;
  with_binary_types("binary", op, a.dtype(), out, [&](auto out_tag, auto tag) {
    using O = decltype(out_tag);
    using T = decltype(tag);
    binary_kernel<O, T><<<grid_for(n), kBlockThreads, 0, kStream>>>(
        op, out.data<O>(), a.data<T>(), cuda::make_indexer(a), b.data<T>(), cuda::make_indexer(b), n);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::binary_scalar(BinaryOp op, Tensor& out, const Tensor& in, double scalar, bool scalar_first) {
  if (op == BinaryOp::Pow && !scalar_first && scalar == 2.0) return unary(UnaryOp::Square, out, in);
  check_elementwise_out("binary_scalar", out, in, index_);
  DeviceGuard guard(index_);
  const int64_t n = out.numel();
  if (n == 0) return;
  with_binary_types("binary_scalar", op, in.dtype(), out, [&](auto out_tag, auto tag) {
    using O = decltype(out_tag);
    using T = decltype(tag);
    binary_scalar_kernel<O, T><<<grid_for(n), kBlockThreads, 0, kStream>>>(
        op, out.data<O>(), in.data<T>(), cuda::make_indexer(in), static_cast<T>(scalar), scalar_first, n);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::where(Tensor& out, const Tensor& cond, const Tensor& a, const Tensor& b) {
  check_elementwise_out("where", out, cond, index_);
  check_elementwise_out("where", out, a, index_);
  check_elementwise_out("where", out, b, index_);
  DILATRON_CHECK(cond.dtype() == DType::Bool, "where: condition must be bool, got ", dtype_name(cond.dtype()));
  DILATRON_CHECK(a.dtype() == out.dtype() && b.dtype() == out.dtype(), "where: values are ", dtype_name(a.dtype()),
                 " and ", dtype_name(b.dtype()), ", out is ", dtype_name(out.dtype()));
  DeviceGuard guard(index_);
  const int64_t n = out.numel();
  if (n == 0) return;
  dispatch_all(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    where_kernel<T><<<grid_for(n), kBlockThreads, 0, kStream>>>(out.data<T>(), cond.data<bool>(),
                                                                 cuda::make_indexer(cond), a.data<T>(),
                                                                 cuda::make_indexer(a), b.data<T>(),
                                                                 cuda::make_indexer(b), n);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace dilatron::kernels
