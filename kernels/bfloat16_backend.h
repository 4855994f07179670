// bfloat16 on every backend: BFloat16Backend<Base> runs each computing Backend method of a bf16 call
// as Base's float32 kernel on float32 copies of the bf16 operands, and rounds each bf16 output once
// (round to nearest even) when it is written back. So the CPU and CUDA backends compute bf16 with
// the same float32 formulas and round at the same points, and the CPU is the parity reference.
// Base handles bf16 itself where no arithmetic happens: copy (the conversions), fill, where, max_last
// and the embedding gather; and gemm where Base::kNativeBf16Gemm (cuBLAS: float32 accumulation and
// one rounding too, so parity holds up to summation order, as for float32). Outputs that keep statistics or losses (lse, layer_norm mean/rstd,
// cross_entropy loss/lse) are float32 for bf16 inputs (compute_dtype), and pass through unconverted.
// Host-only, so the CUDA backend's .cpp and .cu files include it too.
#pragma once

#include <deque>
#include <utility>
#include <vector>

#include "dilatron/kernels/backend.h"

namespace dilatron::kernels {

inline bool is_bf16(const Tensor& t) { return t.defined() && t.dtype() == DType::BFloat16; }

// The float32 stand-ins of one bf16 call.
class Float32Compute {
 public:
  explicit Float32Compute(Backend& backend) : backend_(backend) {}

  // t as float32 (a contiguous copy) when it is bf16, else t itself (undefined stays undefined).
  Tensor in(const Tensor& t) const {
    if (!is_bf16(t)) return t;
    Tensor f = float32_like(t);
    backend_.copy(f, t);
    return f;
  }
  std::vector<Tensor> in(const std::vector<Tensor>& ts) const {
    std::vector<Tensor> out;
    for (const Tensor& t : ts) out.push_back(in(t));
    return out;
  }
  // A float32 stand-in for a bf16 output, rounded into it by finish() (holding t's values first when
  // the kernel reads them: gemm with beta != 0); any other t is itself.
  Tensor& out(Tensor& t, bool read = false) {
    if (!is_bf16(t)) return t;
    outs_.emplace_back(&t, read ? in(t) : float32_like(t));
    return outs_.back().second;
  }
  void finish() {
    for (auto& [bf16, f32] : outs_) backend_.copy(*bf16, f32);
  }

 private:
  static Tensor float32_like(const Tensor& t) {
    return Tensor::empty(t.shape(), TensorOptions(DType::Float32).with_device(t.device()));
  }

  Backend& backend_;
  std::deque<std::pair<Tensor*, Tensor>> outs_;  // a deque keeps the references out() hands out valid
};

template <typename Base>
class BFloat16Backend final : public Base {
 public:
  using Base::Base;

 private:
  static constexpr bool kNativeBf16Attention = requires { Base::native_bf16_attention(int64_t{}); };

  // call(f) with f the float32 stand-ins, then the rounding into the bf16 outputs.
  template <typename Call>
  void via_float32(Call&& call) {
    Float32Compute f(*this);
    call(f);
    f.finish();
  }

 public:
  void fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double low, double high) override {
    if (!is_bf16(out)) return Base::fill_uniform(out, seed, offset, low, high);
    via_float32([&](Float32Compute& f) { Base::fill_uniform(f.out(out), seed, offset, low, high); });
  }
  void fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double mean, double std) override {
    if (!is_bf16(out)) return Base::fill_normal(out, seed, offset, mean, std);
    via_float32([&](Float32Compute& f) { Base::fill_normal(f.out(out), seed, offset, mean, std); });
  }

  void unary(UnaryOp op, Tensor& out, const Tensor& in) override {
    if (!is_bf16(in)) return Base::unary(op, out, in);
    via_float32([&](Float32Compute& f) { Base::unary(op, f.out(out), f.in(in)); });
  }
  // Comparisons write Bool, which passes through.
  void binary(BinaryOp op, Tensor& out, const Tensor& a, const Tensor& b) override {
    if (!is_bf16(a)) return Base::binary(op, out, a, b);
    via_float32([&](Float32Compute& f) { Base::binary(op, f.out(out), f.in(a), f.in(b)); });
  }
  // The scalar takes part as a float32, as in a float32 call.
  void binary_scalar(BinaryOp op, Tensor& out, const Tensor& in, double scalar, bool scalar_first) override {
    if (!is_bf16(in)) return Base::binary_scalar(op, out, in, scalar, scalar_first);
    via_float32([&](Float32Compute& f) { Base::binary_scalar(op, f.out(out), f.in(in), scalar, scalar_first); });
  }

  void sum_last(Tensor& out, const Tensor& in) override {
    if (!is_bf16(in)) return Base::sum_last(out, in);
    via_float32([&](Float32Compute& f) { Base::sum_last(f.out(out), f.in(in)); });
  }
  void sum_first(Tensor& out, const Tensor& in) override {
    if (!is_bf16(in)) return Base::sum_first(out, in);
    via_float32([&](Float32Compute& f) { Base::sum_first(f.out(out), f.in(in)); });
  }
  double sum_squares(const Tensor& in) override {
    return Base::sum_squares(is_bf16(in) ? Float32Compute(*this).in(in) : in);
  }

  void gemm(Tensor& out, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
            double beta) override {
    if (!is_bf16(a) || Base::kNativeBf16Gemm) return Base::gemm(out, a, b, trans_a, trans_b, alpha, beta);
    via_float32([&](Float32Compute& f) {
      Base::gemm(f.out(out, /*read=*/beta != 0.0), f.in(a), f.in(b), trans_a, trans_b, alpha, beta);
    });
  }

  void softmax_last(Tensor& out, const Tensor& in) override {
    if (!is_bf16(in)) return Base::softmax_last(out, in);
    via_float32([&](Float32Compute& f) { Base::softmax_last(f.out(out), f.in(in)); });
  }
  void softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) override {
    if (!is_bf16(y)) return Base::softmax_backward_last(dx, y, dy);
    via_float32([&](Float32Compute& f) { Base::softmax_backward_last(f.out(dx), f.in(y), f.in(dy)); });
  }
  void log_softmax_last(Tensor& out, const Tensor& in) override {
    if (!is_bf16(in)) return Base::log_softmax_last(out, in);
    via_float32([&](Float32Compute& f) { Base::log_softmax_last(f.out(out), f.in(in)); });
  }
  void log_softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) override {
    if (!is_bf16(y)) return Base::log_softmax_backward_last(dx, y, dy);
    via_float32([&](Float32Compute& f) { Base::log_softmax_backward_last(f.out(dx), f.in(y), f.in(dy)); });
  }
  void cross_entropy(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                     int64_t ignore_index) override {
    if (!is_bf16(logits)) return Base::cross_entropy(loss, lse, logits, targets, ignore_index);
    via_float32(
        [&](Float32Compute& f) { Base::cross_entropy(f.out(loss), f.out(lse), f.in(logits), targets, ignore_index); });
  }
  void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& lse,
                              const Tensor& targets, int64_t ignore_index) override {
    if (!is_bf16(logits)) return Base::cross_entropy_backward(dlogits, dloss, logits, lse, targets, ignore_index);
    via_float32([&](Float32Compute& f) {
      Base::cross_entropy_backward(f.out(dlogits), f.in(dloss), f.in(logits), f.in(lse), targets, ignore_index);
    });
  }
  void layer_norm(Tensor& out, Tensor& mean, Tensor& rstd, const Tensor& x, const Tensor& weight, const Tensor& bias,
                  double eps) override {
    if (!is_bf16(x)) return Base::layer_norm(out, mean, rstd, x, weight, bias, eps);
    via_float32([&](Float32Compute& f) {
      Base::layer_norm(f.out(out), f.out(mean), f.out(rstd), f.in(x), f.in(weight), f.in(bias), eps);
    });
  }
  void layer_norm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy, const Tensor& x,
                           const Tensor& mean, const Tensor& rstd, const Tensor& weight) override {
    if (!is_bf16(x)) return Base::layer_norm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight);
    via_float32([&](Float32Compute& f) {
      Base::layer_norm_backward(f.out(dx), f.out(dweight), f.out(dbias), f.in(dy), f.in(x), f.in(mean), f.in(rstd),
                                f.in(weight));
    });
  }
  void embedding_backward(Tensor& dweight, const Tensor& dout, const Tensor& indices) override {
    if (!is_bf16(dweight)) return Base::embedding_backward(dweight, dout, indices);
    via_float32([&](Float32Compute& f) { Base::embedding_backward(f.out(dweight), f.in(dout), indices); });
  }
  void dropout(Tensor& out, const Tensor& in, double p, uint64_t seed, uint32_t offset) override {
    if (!is_bf16(in)) return Base::dropout(out, in, p, seed, offset);
    via_float32([&](Float32Compute& f) { Base::dropout(f.out(out), f.in(in), p, seed, offset); });
  }
  void rotary(Tensor& out, const Tensor& x, const Tensor& cos, const Tensor& sin) override {
    if (!is_bf16(x)) return Base::rotary(out, x, cos, sin);
    via_float32([&](Float32Compute& f) { Base::rotary(f.out(out), f.in(x), f.in(cos), f.in(sin)); });
  }

  // lse is float32 for bf16 q (compute_dtype); o and the gradients are bf16. A Base with its own bf16
  // attention kernels (CudaBackend's tensor-core ones) runs the calls they cover itself.
  void dilated_attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& bias, const AttentionParams& params) override {
    if (!is_bf16(q)) return Base::dilated_attention_forward(o, lse, q, k, v, bias, params);
    if constexpr (kNativeBf16Attention)
      if (Base::native_bf16_attention(q.size(3)))
        return Base::dilated_attention_forward_bf16(o, lse, q, k, v, bias, params);
    via_float32([&](Float32Compute& f) {
      Base::dilated_attention_forward(f.out(o), f.out(lse), f.in(q), f.in(k), f.in(v), f.in(bias), params);
    });
  }
  void dilated_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dbias, const Tensor& dout,
                                  const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                                  const Tensor& bias, const AttentionParams& params) override {
    if (!is_bf16(q)) return Base::dilated_attention_backward(dq, dk, dv, dbias, dout, q, k, v, o, lse, bias, params);
    if constexpr (kNativeBf16Attention)
      if (Base::native_bf16_attention(q.size(3)))
        return Base::dilated_attention_backward_bf16(dq, dk, dv, dbias, dout, q, k, v, o, lse, bias, params);
    via_float32([&](Float32Compute& f) {
      Base::dilated_attention_backward(f.out(dq), f.out(dk), f.out(dv), f.out(dbias), f.in(dout), f.in(q), f.in(k),
                                       f.in(v), f.in(o), f.in(lse), f.in(bias), params);
    });
  }
  void dilated_attention_decode(Tensor& o, const Tensor& q, const std::vector<Tensor>& k_caches,
                                const std::vector<Tensor>& v_caches, const Tensor& bias, const AttentionParams& params,
                                int64_t t) override {
    if (!is_bf16(q)) return Base::dilated_attention_decode(o, q, k_caches, v_caches, bias, params, t);
    via_float32([&](Float32Compute& f) {
      Base::dilated_attention_decode(f.out(o), f.in(q), f.in(k_caches), f.in(v_caches), f.in(bias), params, t);
    });
  }

  // bf16 weights or moments would lose every update below half an ulp of the weight: the optimizer
  // keeps float32 master weights instead.
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) override {
    DILATRON_CHECK(!is_bf16(param) && !is_bf16(grad) && !is_bf16(m) && !is_bf16(v),
                   "adamw_step: bfloat16 parameters, gradients or moments are not supported (",
                   dtype_name(param.dtype()), " parameter, ", dtype_name(grad.dtype()),
                   " gradient); keep float32 master weights and optimizer state");
    Base::adamw_step(param, grad, m, v, hp);
  }
};

}  // namespace dilatron::kernels
