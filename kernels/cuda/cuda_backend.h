// The CUDA backend: every Backend method, implemented in the kernels/cuda/*.cu files named below
// (they mirror kernels/cpu/*.cpp, which define the semantics). Plain C++: no CUDA headers, so
// tests and tools can include it.
#pragma once

#include <cstdint>

#include "dilatron/kernels/backend.h"

namespace dilatron::kernels {

// Final as BFloat16Backend<CudaBackend> (kernels/bfloat16_backend.h), the instances cuda::backend() returns.
class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int device_index) : index_(device_index) {}
  Device device() const override { return Device::cuda(index_); }

  // memory.cu
  void synchronize() override;
  void copy(Tensor& out, const Tensor& in) override;
  void fill(Tensor& out, double value) override;
  void fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double low, double high) override;
  void fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double mean, double std) override;

  // elementwise.cu
  void unary(UnaryOp op, Tensor& out, const Tensor& in) override;
  void binary(BinaryOp op, Tensor& out, const Tensor& a, const Tensor& b) override;
  void binary_scalar(BinaryOp op, Tensor& out, const Tensor& in, double scalar, bool scalar_first) override;
  void where(Tensor& out, const Tensor& cond, const Tensor& a, const Tensor& b) override;

  // reduce.cu
  void sum_last(Tensor& out, const Tensor& in) override;
  void max_last(Tensor& values, Tensor& indices, const Tensor& in) override;
  void sum_first(Tensor& out, const Tensor& in) override;

  // gemm.cu: float32, float64 and bfloat16 (cuBLAS with float32 accumulation)
  static constexpr bool kNativeBf16Gemm = true;
  void gemm(Tensor& out, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
            double beta) override;

  // nn.cu
  void softmax_last(Tensor& out, const Tensor& in) override;
  void softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) override;
  void log_softmax_last(Tensor& out, const Tensor& in) override;
  void log_softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) override;
  void cross_entropy(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                     int64_t ignore_index) override;
  void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& lse,
                              const Tensor& targets, int64_t ignore_index) override;
  void layer_norm(Tensor& out, Tensor& mean, Tensor& rstd, const Tensor& x, const Tensor& weight,
                  const Tensor& bias, double eps) override;
  void layer_norm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy, const Tensor& x,
                           const Tensor& mean, const Tensor& rstd, const Tensor& weight) override;
  void embedding(Tensor& out, const Tensor& weight, const Tensor& indices) override;
  void embedding_backward(Tensor& dweight, const Tensor& dout, const Tensor& indices) override;
  void dropout(Tensor& out, const Tensor& in, double p, uint64_t seed, uint32_t offset) override;

  // rotary.cu
  void rotary(Tensor& out, const Tensor& x, const Tensor& cos, const Tensor& sin) override;

  // dilated_attention_decode.cu
  void dilated_attention_decode(Tensor& o, const Tensor& q, const std::vector<Tensor>& k_caches,
                                const std::vector<Tensor>& v_caches, const Tensor& bias, const AttentionParams& params,
                                int64_t t) override;
  // dilated_attention.cu
  void dilated_attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& bias, const AttentionParams& params) override;
  void dilated_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dbias, const Tensor& dout,
                                  const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                  const Tensor& lse, const Tensor& bias, const AttentionParams& params) override;

  // dilated_attention_bf16.cu: bf16 attention on tensor cores. BFloat16Backend<CudaBackend> sends a
  // bf16 call here when native_bf16_attention(D) (else to the float32 kernels above); lse is float32.
  static bool native_bf16_attention(int64_t head_dim);
  void dilated_attention_forward_bf16(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& bias, const AttentionParams& params);
  void dilated_attention_backward_bf16(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dbias, const Tensor& dout,
                                       const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                       const Tensor& lse, const Tensor& bias, const AttentionParams& params);

  // optim.cu
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) override;
  double sum_squares(const Tensor& in) override;

 private:
  int index_;
};

}  // namespace dilatron::kernels
