// The kernel interface every device implements. Ops (lib/ops/ops_*.cpp) own shapes, broadcasting
// and autograd; a Backend only computes. The CPU backend implements all of it in kernels/cpu/;
// the CUDA backend adds the same methods in kernels/cuda/ without touching the ops.
//
// Conventions: `out` tensors are allocated by the caller with the right shape, dtype and device,
// and are contiguous. Inputs may be strided views (broadcast inputs have stride 0) unless a method
// says "contiguous". Float methods run in the tensors' dtype (float32 or float64; bfloat16 runs as
// float32 with each output rounded once, kernels/bfloat16_backend.h).
#pragma once

#include <cstdint>

#include "dilatron/kernels/dilated_attention.h"
#include "dilatron/tensor.h"

namespace dilatron::kernels {

enum class UnaryOp {
  Neg, Exp, Log, Tanh, Sqrt, Rsqrt, Relu, Gelu, GeluTanh, Abs, Square, Reciprocal, Sigmoid,
};
enum class BinaryOp {
  Add, Sub, Mul, Div, Max, Min, Pow,
  Eq, Ne, Lt, Le, Gt, Ge,  // comparisons write Bool
  ReluBackward,      // a = grad, b = x: grad * (x > 0)
  GeluBackward,      // a = grad, b = x: grad * gelu'(x)        (exact erf form)
  GeluTanhBackward,  // a = grad, b = x: grad * gelu_tanh'(x)
};

struct AdamWParams {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // 1-based, for bias correction
};

class Backend {
 public:
  // Whether gemm takes bfloat16 operands itself (float32 accumulation, out rounded once); otherwise
  // BFloat16Backend runs it as a float32 gemm.
  static constexpr bool kNativeBf16Gemm = false;

  virtual ~Backend() = default;
  virtual Device device() const = 0;
  // Waits until the device has finished all work issued so far (a no-op where work is synchronous).
  virtual void synchronize() = 0;

  // ---- memory ----
  // Copy between any two tensors of the same shape, any dtypes, host<->device where one side is on
  // the CPU. out may be a strided view (not overlapping itself, nor in), so ops write pieces of a
  // result in place (cat into narrow views of its output).
  virtual void copy(Tensor& out, const Tensor& in) = 0;
  virtual void fill(Tensor& out, double value) = 0;
  // Philox4x32-10 fills: element i uses counter {i/4 lo, i/4 hi, offset lo, offset hi}, key = seed,
  // word i%4 (see dilatron/philox.h).
  virtual void fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double low, double high) = 0;
  virtual void fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double mean, double std) = 0;

  // ---- elementwise ----
  virtual void unary(UnaryOp op, Tensor& out, const Tensor& in) = 0;
  // a and b already expanded (stride 0) to out's shape.
  virtual void binary(BinaryOp op, Tensor& out, const Tensor& a, const Tensor& b) = 0;
  // out = op(in, scalar) (scalar_first: op(scalar, in))
  virtual void binary_scalar(BinaryOp op, Tensor& out, const Tensor& in, double scalar, bool scalar_first) = 0;
  // out = cond ? a : b, all expanded to out's shape; cond is Bool.
  virtual void where(Tensor& out, const Tensor& cond, const Tensor& a, const Tensor& b) = 0;

  // ---- reductions over the last dim of a contiguous [M, K] view: out [M] ----
  virtual void sum_last(Tensor& out, const Tensor& in) = 0;
  // values [M] (in's dtype), indices [M] (Int64); first index of the max wins.
  virtual void max_last(Tensor& values, Tensor& indices, const Tensor& in) = 0;
  // Sum over the first dim of a contiguous [M, K]: out [K] (bias gradients, broadcast reduction).
  virtual void sum_first(Tensor& out, const Tensor& in) = 0;

  // ---- GEMM: out[b] = alpha * op(a[b]) @ op(b[b]) + beta * out[b], all contiguous 3-D ----
  // a is [batch, M, K] (or [batch, K, M] when trans_a), b is [batch, K, N] (or [batch, N, K]).
  // A batch stride of 0 for a or b (size-1 batch) broadcasts it.
  virtual void gemm(Tensor& out, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
                    double beta) = 0;

  // ---- fused nn kernels, over the last dim of contiguous [M, K] ----
  virtual void softmax_last(Tensor& out, const Tensor& in) = 0;
  virtual void softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) = 0;
  virtual void log_softmax_last(Tensor& out, const Tensor& in) = 0;
  virtual void log_softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) = 0;
  // logits [M, C], targets [M] Int64. loss [M] (0 where ignored), lse [M], both in compute_dtype(logits' dtype).
  // Targets outside [0, C) other than ignore_index throw an Error naming the value and position.
  virtual void cross_entropy(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                             int64_t ignore_index) = 0;
  // dlogits [M, C] = dloss[m] * (softmax - onehot), zero rows for ignored targets.
  virtual void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits,
                                      const Tensor& lse, const Tensor& targets, int64_t ignore_index) = 0;
  // x [M, K]; weight, bias [K] or undefined. mean, rstd [M] in compute_dtype(x's dtype).
  virtual void layer_norm(Tensor& out, Tensor& mean, Tensor& rstd, const Tensor& x, const Tensor& weight,
                          const Tensor& bias, double eps) = 0;
  // dweight/dbias may be undefined (no affine); they are overwritten, not accumulated.
  virtual void layer_norm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy, const Tensor& x,
                                   const Tensor& mean, const Tensor& rstd, const Tensor& weight) = 0;
  // weight [V, E], indices Int64 [M] -> out [M, E]; indices outside [0, V) throw naming the value.
  virtual void embedding(Tensor& out, const Tensor& weight, const Tensor& indices) = 0;
  // dweight [V, E] (overwritten) = scatter-add of dout [M, E] rows.
  virtual void embedding_backward(Tensor& dweight, const Tensor& dout, const Tensor& indices) = 0;
  // out = in * keep / (1 - p), keep_i = philox_word(seed, offset, i) >= floor(p * 2^32), i.e.
  // counter {i/4 lo, i/4 hi, offset, 0}, key seed, word i % 4. The backward calls it again on the gradient.
  virtual void dropout(Tensor& out, const Tensor& in, double p, uint64_t seed, uint32_t offset) = 0;

  // ---- rotary / XPOS position embedding ----
  // x [B, N, H, D] (any strides), cos and sin contiguous [N, D/2] with any XPOS scale folded in,
  // out contiguous [B, N, H, D]: out[..., 2i] = x[2i] cos - x[2i+1] sin, out[..., 2i+1] = x[2i+1] cos + x[2i] sin.
  virtual void rotary(Tensor& out, const Tensor& x, const Tensor& cos, const Tensor& sin) = 0;

  // ---- flash dilated attention (the contract: docs/attention-contract.md) ----
  // q, k, v, o: contiguous [B, N, H, D]; lse: [B, H, N] in compute_dtype(q's dtype) (float32, or float64 for
  // float64 inputs: a float32 lse would cap the float64 backward at float32 accuracy); bias: [H, num_buckets]
  // or undefined.
  virtual void dilated_attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& bias, const AttentionParams& params) = 0;
  // dq, dk, dv (and dbias when defined) are overwritten.
  virtual void dilated_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dbias, const Tensor& dout,
                                          const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                          const Tensor& lse, const Tensor& bias, const AttentionParams& params) = 0;

  // Decoding, one query per (b, h) at position t: q and o [B, H, D]; k_caches[i] and v_caches[i]
  // [B, H, capacity_i, D] hold branch i's keys decode_key_span(...) at indices 0, 1, ... Causal, no
  // dropout; params.bucket_of_distance covers the distances 0 .. largest segment - 1.
  virtual void dilated_attention_decode(Tensor& o, const Tensor& q, const std::vector<Tensor>& k_caches,
                                        const std::vector<Tensor>& v_caches, const Tensor& bias,
                                        const AttentionParams& params, int64_t t) = 0;

  // ---- optimizers (in place, contiguous) ----
  virtual void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) = 0;
  // Sum of squares of every element, accumulated in double (global gradient norm).
  virtual double sum_squares(const Tensor& in) = 0;
};

// The backend of a device; throws an Error naming the device when it is not available
// (for CUDA: not compiled in, or no GPU present).
Backend& backend(Device device);
inline Backend& backend_of(const Tensor& t) { return backend(t.device()); }

Backend& cpu_backend();

// CUDA availability, safe to call in any build.
bool cuda_compiled();
int cuda_device_count();  // 0 when not compiled or no GPU

}  // namespace dilatron::kernels
