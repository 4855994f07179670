// Fused nn ops. Each is one autograd Function whose forward and backward are single backend
// kernels over the rows of the last dim; the kernels treat [..., K] as contiguous [M, K].
#include <algorithm>
#include <cmath>
#include <string>

#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron {

using kernels::backend_of;

namespace {

void check_floating(const char* op, const char* what, const Tensor& t) {
  DILATRON_CHECK(t.defined(), op, ": ", what, " is undefined");
  DILATRON_CHECK(is_floating(t.dtype()), op, ": ", what, " must be float32, float64 or bfloat16, got ",
                 dtype_name(t.dtype()));
}

// Softmax or log-softmax over the last dim.
template <bool Log>
struct SoftmaxLast : autograd::Function<SoftmaxLast<Log>> {
  static const char* name() { return Log ? "log_softmax" : "softmax"; }
  static Tensor forward(autograd::Context& ctx, const Tensor& x) {
    Tensor y = Tensor::empty(x.shape(), x.options());
    if constexpr (Log) backend_of(x).log_softmax_last(y, x.contiguous());
    else backend_of(x).softmax_last(y, x.contiguous());
    ctx.save_for_backward({y});
    return y;
  }
  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& y = ctx.saved()[0];
    Tensor dx = Tensor::empty(y.shape(), y.options());
    if constexpr (Log) backend_of(y).log_softmax_backward_last(dx, y, grads[0].contiguous());
    else backend_of(y).softmax_backward_last(dx, y, grads[0].contiguous());
    return {dx};
  }
};

// Another dim is moved last by a transpose (the forward copies it contiguous) and the result is
// transposed back, so it comes out as a transposed view.
template <bool Log>
Tensor softmax_along(const Tensor& x, int64_t dim) {
  check_floating(SoftmaxLast<Log>::name(), "input", x);
  DILATRON_CHECK(x.dim() >= 1, SoftmaxLast<Log>::name(), ": needs at least one dim, got a scalar");
  const int64_t d = wrap_dim(dim, x.dim()), last = x.dim() - 1;
  if (d == last) return SoftmaxLast<Log>::apply(x);
  return transpose(SoftmaxLast<Log>::apply(transpose(x, d, last)), d, last);
}

// Per-row losses [...] (0 where ignored) for logits [..., C] and targets [...].
struct CrossEntropyRows : autograd::Function<CrossEntropyRows> {
  static const char* name() { return "cross_entropy"; }
  static Tensor forward(autograd::Context& ctx, const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
    const Tensor x = logits.contiguous(), t = targets.contiguous();
    // float32 losses for bf16 logits (compute_dtype), as PyTorch's autocast gives cross_entropy.
    const TensorOptions stats = logits.options().with_dtype(compute_dtype(logits.dtype()));
    Tensor loss = Tensor::empty(targets.shape(), stats);
    Tensor lse = Tensor::empty(targets.shape(), stats);
    backend_of(x).cross_entropy(loss, lse, x, t, ignore_index);
    ctx.save_for_backward({x, lse, t});
    ctx.set("ignore_index", ignore_index);
    return loss;
  }
  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor &x = ctx.saved()[0], &lse = ctx.saved()[1], &t = ctx.saved()[2];
    Tensor dx = Tensor::empty(x.shape(), x.options());
    backend_of(x).cross_entropy_backward(dx, grads[0].contiguous(), x, lse, t, ctx.get<int64_t>("ignore_index"));
    return {dx, Tensor()};
  }
};

struct LayerNormRows : autograd::Function<LayerNormRows> {
  static const char* name() { return "layer_norm"; }
  static Tensor forward(autograd::Context& ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                        double eps) {
    const Tensor xc = x.contiguous();
    const Tensor w = weight.defined() ? weight.contiguous() : Tensor();
    const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
    const Shape rows(x.shape().begin(), x.shape().end() - 1);
    Tensor y = Tensor::empty(x.shape(), x.options());
    const TensorOptions stats = x.options().with_dtype(compute_dtype(x.dtype()));
    Tensor mean = Tensor::empty(rows, stats), rstd = Tensor::empty(rows, stats);
    backend_of(x).layer_norm(y, mean, rstd, xc, w, b, eps);
    ctx.save_for_backward({xc, mean, rstd, w});
    return y;
  }
  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor &x = ctx.saved()[0], &mean = ctx.saved()[1], &rstd = ctx.saved()[2], &w = ctx.saved()[3];
    const Shape param_shape{x.size(-1)};
    Tensor dx = Tensor::empty(x.shape(), x.options());
    Tensor dw = ctx.needs_input_grad[1] ? Tensor::empty(param_shape, x.options()) : Tensor();
    Tensor db = ctx.needs_input_grad[2] ? Tensor::empty(param_shape, x.options()) : Tensor();
    backend_of(x).layer_norm_backward(dx, dw, db, grads[0].contiguous(), x, mean, rstd, w);
    return {dx, dw, db};
  }
};

struct EmbeddingLookup : autograd::Function<EmbeddingLookup> {
  static const char* name() { return "embedding"; }
  static Tensor forward(autograd::Context& ctx, const Tensor& weight, const Tensor& indices) {
    const Tensor idx = indices.contiguous();
    Shape out_shape = indices.shape();
    out_shape.push_back(weight.size(1));
    Tensor out = Tensor::empty(out_shape, weight.options());
    backend_of(weight).embedding(out, weight.contiguous(), idx);
    ctx.save_for_backward({idx});
    ctx.set("weight_shape", weight.shape());
    return out;
  }
  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& idx = ctx.saved()[0];
    Tensor dweight = Tensor::empty(ctx.get<Shape>("weight_shape"), grads[0].options());
    backend_of(dweight).embedding_backward(dweight, grads[0].contiguous(), idx);
    return {dweight, Tensor()};
  }
};

// The mask is never stored: the backward regenerates it from (seed, offset) through the same kernel.
struct DropoutMask : autograd::Function<DropoutMask> {
  static const char* name() { return "dropout"; }
  static Tensor forward(autograd::Context& ctx, const Tensor& x, double p, uint64_t seed, uint32_t offset) {
    Tensor out = Tensor::empty(x.shape(), x.options());
    backend_of(x).dropout(out, x.contiguous(), p, seed, offset);
    ctx.set("p", p);
    ctx.set("seed", seed);
    ctx.set("offset", offset);
    return out;
  }
  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& g = grads[0];
    Tensor dx = Tensor::empty(g.shape(), g.options());
    backend_of(g).dropout(dx, g.contiguous(), ctx.get<double>("p"), ctx.get<uint64_t>("seed"),
                          ctx.get<uint32_t>("offset"));
    return {dx};
  }
};

// A rotation by angle a scaled by k is k R(a), whose adjoint k R(-a) is the same kernel with sin negated.
struct RotaryFn : autograd::Function<RotaryFn> {
  static const char* name() { return "rotary"; }
  static Tensor forward(autograd::Context& ctx, const Tensor& x, const Tensor& cos, const Tensor& sin) {
    Tensor out = Tensor::empty(x.shape(), x.options());
    backend_of(x).rotary(out, x, cos, sin);
    ctx.save_for_backward({cos, sin});
    return out;
  }
  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor &cos = ctx.saved()[0], &sin = ctx.saved()[1];
    Tensor dx = Tensor::empty(grads[0].shape(), grads[0].options());
    backend_of(dx).rotary(dx, grads[0], cos, neg(sin));
    return {dx, Tensor(), Tensor()};
  }
};

}  // namespace

Tensor softmax(const Tensor& x, int64_t dim) { return softmax_along<false>(x, dim); }
Tensor log_softmax(const Tensor& x, int64_t dim) { return softmax_along<true>(x, dim); }

// "mean" divides by the number (or total weight) of non-ignored targets. When that is 0 the loss is 0
// (PyTorch returns nan there), so a fully padded batch does not poison a training run.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, const std::string& reduction,
                     const Tensor& weight) {
  DILATRON_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
                 "cross_entropy: reduction must be \"mean\", \"sum\" or \"none\", got \"", reduction, "\"");
  check_floating("cross_entropy", "logits", logits);
  DILATRON_CHECK(targets.defined() && targets.dtype() == DType::Int64, "cross_entropy: targets must be int64, got ",
                 targets.defined() ? dtype_name(targets.dtype()) : "undefined");
  DILATRON_CHECK(logits.dim() >= 1 && Shape(logits.shape().begin(), logits.shape().end() - 1) == targets.shape(),
                 "cross_entropy: logits ", shape_str(logits.shape()), " need targets of shape [...] for [..., C], got ",
                 shape_str(targets.shape()));
  DILATRON_CHECK(targets.device() == logits.device(), "cross_entropy: targets on ", targets.device().str(),
                 " but logits on ", logits.device().str());
  Tensor loss = CrossEntropyRows::apply(logits, targets, ignore_index);
  // Host copies of the weights and targets (small next to the logits) to check and count them.
  std::vector<double> w;
  if (weight.defined()) {
    DILATRON_CHECK(weight.shape() == targets.shape() && weight.dtype() == logits.dtype() &&
                       weight.device() == logits.device(),
                   "cross_entropy: weight must be ", dtype_name(logits.dtype()), " ", shape_str(targets.shape()), " on ",
                   logits.device().str(), ", got ", dtype_name(weight.dtype()), " ", shape_str(weight.shape()), " on ",
                   weight.device().str());
    // The "mean" normaliser is a host number, so a gradient for the weights would miss its share.
    DILATRON_CHECK(!weight.requires_grad(), "cross_entropy: weight is constant and takes no gradient");
    w = weight.to_vector<double>();
    for (size_t i = 0; i < w.size(); ++i)
      DILATRON_CHECK(std::isfinite(w[i]) && w[i] >= 0.0, "cross_entropy: weight ", w[i], " at position ", i,
                     " is not a finite number >= 0");
    // mul's backward scales each row's gradient by its weight before the fused backward sees it.
    loss = mul(loss, weight.to(loss.dtype()));
  }
  if (reduction == "none") return loss;
  if (reduction == "sum") return sum(loss);
  const std::vector<int64_t> t = targets.to_vector<int64_t>();
  double total = 0.0;
  for (size_t i = 0; i < t.size(); ++i)
    if (t[i] != ignore_index) total += w.empty() ? 1.0 : w[i];
  return mul(sum(loss), 1.0 / (total > 0.0 ? total : 1.0));
}

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  check_floating("layer_norm", "input", x);
  DILATRON_CHECK(x.dim() >= 1, "layer_norm: needs at least one dim, got a scalar");
  const Shape param_shape{x.size(-1)};
  for (const Tensor* t : {&weight, &bias}) {
    if (!t->defined()) continue;
    DILATRON_CHECK(t->shape() == param_shape && t->dtype() == x.dtype() && t->device() == x.device(),
                   "layer_norm: weight and bias must be ", dtype_name(x.dtype()), " ", shape_str(param_shape),
                   " on ", x.device().str(), " for input ", shape_str(x.shape()), ", got ", dtype_name(t->dtype()),
                   " ", shape_str(t->shape()), " on ", t->device().str());
  }
  DILATRON_CHECK(eps >= 0.0, "layer_norm: eps must be >= 0, got ", eps);
  return LayerNormRows::apply(x, weight, bias, eps);
}

Tensor embedding(const Tensor& weight, const Tensor& indices) {
  check_floating("embedding", "weight", weight);
  DILATRON_CHECK(weight.dim() == 2, "embedding: weight must be [num_embeddings, dim], got ",
                 shape_str(weight.shape()));
  DILATRON_CHECK(indices.defined() && indices.dtype() == DType::Int64, "embedding: indices must be int64, got ",
                 indices.defined() ? dtype_name(indices.dtype()) : "undefined");
  DILATRON_CHECK(indices.device() == weight.device(), "embedding: indices on ", indices.device().str(),
                 " but weight on ", weight.device().str());
  return EmbeddingLookup::apply(weight, indices);
}

Tensor dropout(const Tensor& x, double p, bool training, uint64_t seed, uint32_t offset) {
  check_floating("dropout", "input", x);
  DILATRON_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  if (!training || p == 0.0) return x;
  return DropoutMask::apply(x, p, seed, offset);
}

Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  check_floating("rotary", "input", x);
  DILATRON_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rotary: x must be [B, N, H, D] with D even, got ",
                 shape_str(x.shape()));
  const Shape table{x.size(1), x.size(3) / 2};
  check_floating("rotary", "cos", cos);
  check_floating("rotary", "sin", sin);
  // float32 tables for bf16 x keep the angles and scales unrounded; the output is rounded once.
  const DType wide = compute_dtype(x.dtype());
  const std::string dtypes =
      wide == x.dtype() ? std::string(dtype_name(wide)) : std::string(dtype_name(x.dtype())) + " or " + dtype_name(wide);
  for (const Tensor* t : {&cos, &sin}) {
    DILATRON_CHECK(t->shape() == table && (t->dtype() == x.dtype() || t->dtype() == wide) &&
                       t->device() == x.device(),
                   "rotary: cos and sin must be ", dtypes, " ", shape_str(table), " on ",
                   x.device().str(), " for x ", shape_str(x.shape()), ", got ", dtype_name(t->dtype()), " ",
                   shape_str(t->shape()), " on ", t->device().str());
    DILATRON_CHECK(!t->requires_grad(), "rotary: cos and sin are constant tables and take no gradient");
  }
  return RotaryFn::apply(x, cos.contiguous(), sin.contiguous());
}

}  // namespace dilatron
