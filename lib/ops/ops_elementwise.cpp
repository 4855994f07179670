// Elementwise ops. Binary ops broadcast like PyTorch: inputs reach the kernel as stride-0 views of
// the output's shape, and gradients are summed back to each input's shape.
#include <algorithm>

#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron {
namespace {

using autograd::Context;
using kernels::BinaryOp;
using kernels::UnaryOp;

void check_float(const char* what, const Tensor& x) {
  DILATRON_CHECK(is_floating(x.dtype()), what, ": expected a float tensor, got ", dtype_name(x.dtype()));
}

void check_same_kind(const char* what, const Tensor& a, const Tensor& b) {
  DILATRON_CHECK(a.dtype() == b.dtype(), what, ": dtype mismatch, ", dtype_name(a.dtype()), " and ",
                 dtype_name(b.dtype()));
  DILATRON_CHECK(a.device() == b.device(), what, ": tensors on ", a.device().str(), " and ", b.device().str());
}

// op(a, b) broadcast to their common shape (no autograd).
Tensor binary_forward(const char* what, BinaryOp op, const Tensor& a, const Tensor& b, DType out_dtype) {
  check_same_kind(what, a, b);
  autograd::NoGradGuard no_grad;  // the broadcast views need no graph
  const Shape shape = broadcast_shapes(a.shape(), b.shape());
  Tensor out = Tensor::empty(shape, a.options().with_dtype(out_dtype));
  kernels::backend(a.device()).binary(op, out, expand(a, shape), expand(b, shape));
  return out;
}

Tensor unary_forward(UnaryOp op, const Tensor& x) {
  Tensor out = Tensor::empty(x.shape(), x.options());
  kernels::backend(x.device()).unary(op, out, x);
  return out;
}

Tensor compare_scalar(BinaryOp op, const Tensor& x, double s) {
  Tensor out = Tensor::empty(x.shape(), x.options().with_dtype(DType::Bool));
  kernels::backend(x.device()).binary_scalar(op, out, x, s, false);
  return out;
}

// sign(x) in x's dtype, 0 at 0.
Tensor sign(const Tensor& x) {
  return sub(compare_scalar(BinaryOp::Gt, x, 0.0).to(x.dtype()), compare_scalar(BinaryOp::Lt, x, 0.0).to(x.dtype()));
}

constexpr const char* unary_name(UnaryOp op) {
  switch (op) {
    case UnaryOp::Neg: return "neg";
    case UnaryOp::Exp: return "exp";
    case UnaryOp::Log: return "log";
    case UnaryOp::Tanh: return "tanh";
    case UnaryOp::Sqrt: return "sqrt";
    case UnaryOp::Rsqrt: return "rsqrt";
    case UnaryOp::Relu: return "relu";
    case UnaryOp::Gelu: return "gelu";
    case UnaryOp::GeluTanh: return "gelu_tanh";
    case UnaryOp::Abs: return "abs";
    case UnaryOp::Square: return "square";
    case UnaryOp::Reciprocal: return "reciprocal";
    case UnaryOp::Sigmoid: return "sigmoid";
  }
  return "unary";
}

// What a unary op's backward reads: its input, its output, or nothing.
enum class Saves { Nothing, Input, Output };
constexpr Saves unary_saves(UnaryOp op) {
  switch (op) {
    case UnaryOp::Neg: return Saves::Nothing;
    case UnaryOp::Log: case UnaryOp::Abs: case UnaryOp::Gelu: case UnaryOp::GeluTanh: return Saves::Input;
    default: return Saves::Output;
  }
}

template <UnaryOp Op>
struct UnaryFn : autograd::Function<UnaryFn<Op>> {
  static const char* name() { return unary_name(Op); }
  static Tensor forward(Context& ctx, const Tensor& x) {
    check_float(name(), x);
    Tensor y = unary_forward(Op, x);
    if constexpr (unary_saves(Op) == Saves::Input) ctx.save_for_backward({x});
    if constexpr (unary_saves(Op) == Saves::Output) ctx.save_for_backward({y});
    return y;
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& g = grads[0];
    if constexpr (Op == UnaryOp::Neg) return {neg(g)};
    else {
      const Tensor& s = ctx.saved()[0];  // x or y, as unary_saves says
      if constexpr (Op == UnaryOp::Exp) return {mul(g, s)};
      else if constexpr (Op == UnaryOp::Log) return {div(g, s)};
      else if constexpr (Op == UnaryOp::Tanh) return {mul(g, rsub(mul(s, s), 1.0))};
      else if constexpr (Op == UnaryOp::Sigmoid) return {mul(g, mul(s, rsub(s, 1.0)))};
      else if constexpr (Op == UnaryOp::Sqrt) return {div(g, mul(s, 2.0))};
      else if constexpr (Op == UnaryOp::Rsqrt) return {mul(g, mul(pow(s, 3.0), -0.5))};  // d x^-1/2 = -1/2 y^3
      else if constexpr (Op == UnaryOp::Abs) return {mul(g, sign(s))};
      // relu keeps y, which is > 0 exactly where x is.
      else if constexpr (Op == UnaryOp::Relu) return {binary_forward(name(), BinaryOp::ReluBackward, g, s, g.dtype())};
      else if constexpr (Op == UnaryOp::Gelu) return {binary_forward(name(), BinaryOp::GeluBackward, g, s, g.dtype())};
      else {
        static_assert(Op == UnaryOp::GeluTanh);
        return {binary_forward(name(), BinaryOp::GeluTanhBackward, g, s, g.dtype())};
      }
    }
  }
};

constexpr const char* binary_name(BinaryOp op) {
  switch (op) {
    case BinaryOp::Add: return "add";
    case BinaryOp::Sub: return "sub";
    case BinaryOp::Mul: return "mul";
    case BinaryOp::Div: return "div";
    case BinaryOp::Max: return "maximum";
    case BinaryOp::Pow: return "pow";
    case BinaryOp::Eq: return "eq";
    case BinaryOp::Ne: return "ne";
    case BinaryOp::Lt: return "lt";
    case BinaryOp::Le: return "le";
    case BinaryOp::Gt: return "gt";
    case BinaryOp::Ge: return "ge";
    default: return "binary";
  }
}

// Tensor-tensor arithmetic: Add, Sub, Mul, Div, Max.
template <BinaryOp Op>
struct BinaryFn : autograd::Function<BinaryFn<Op>> {
  static const char* name() { return binary_name(Op); }
  static Tensor forward(Context& ctx, const Tensor& a, const Tensor& b) {
    check_float(name(), a);
    Tensor out = binary_forward(name(), Op, a, b, a.dtype());
    ctx.set("a_shape", a.shape());
    ctx.set("b_shape", b.shape());
    if constexpr (Op == BinaryOp::Mul || Op == BinaryOp::Max) ctx.save_for_backward({a, b});
    if constexpr (Op == BinaryOp::Div) ctx.save_for_backward({b, out});
    return out;
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& g = grads[0];
    const bool need_a = ctx.needs_input_grad[0], need_b = ctx.needs_input_grad[1];
    Tensor ga, gb;
    if constexpr (Op == BinaryOp::Add) {
      ga = g;
      gb = g;
    } else if constexpr (Op == BinaryOp::Sub) {
      ga = g;
      if (need_b) gb = neg(g);
    } else if constexpr (Op == BinaryOp::Mul) {
      const auto& s = ctx.saved();
      if (need_a) ga = mul(g, s[1]);
      if (need_b) gb = mul(g, s[0]);
    } else if constexpr (Op == BinaryOp::Div) {
      const auto& s = ctx.saved();  // b, out = a / b
      if (need_a) ga = div(g, s[0]);
      if (need_b) gb = neg(div(mul(g, s[1]), s[0]));
    } else {
      static_assert(Op == BinaryOp::Max);
      const auto& s = ctx.saved();
      const Tensor a_wins = ge(s[0], s[1]);  // ties go to a
      const Tensor zero = Tensor::zeros({}, g.options());
      if (need_a) ga = where(a_wins, g, zero);
      if (need_b) gb = where(a_wins, zero, g);
    }
    return {need_a ? sum_to(ga, ctx.get<Shape>("a_shape")) : Tensor(),
            need_b ? sum_to(gb, ctx.get<Shape>("b_shape")) : Tensor()};
  }
};

// op(x, s), or op(s, x) when ScalarFirst: Add, Sub, Mul, Div, Pow.
template <BinaryOp Op, bool ScalarFirst>
struct ScalarFn : autograd::Function<ScalarFn<Op, ScalarFirst>> {
  static const char* name() {
    if constexpr (ScalarFirst) return Op == BinaryOp::Sub ? "rsub" : "rdiv";
    return binary_name(Op);
  }
  static Tensor forward(Context& ctx, const Tensor& x, double s) {
    check_float(name(), x);
    Tensor out = Tensor::empty(x.shape(), x.options());
    kernels::backend(x.device()).binary_scalar(Op, out, x, s, ScalarFirst);
    ctx.set("s", s);
    if constexpr (Op == BinaryOp::Pow) ctx.save_for_backward({x});
    if constexpr (Op == BinaryOp::Div && ScalarFirst) ctx.save_for_backward({x, out});
    return out;
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& g = grads[0];
    const auto s = ctx.get<double>("s");
    if constexpr (Op == BinaryOp::Add) return {g};
    else if constexpr (Op == BinaryOp::Sub) return {ScalarFirst ? neg(g) : g};
    else if constexpr (Op == BinaryOp::Mul) return {mul(g, s)};
    else if constexpr (Op == BinaryOp::Div && !ScalarFirst) return {div(g, s)};
    else if constexpr (Op == BinaryOp::Div) return {neg(div(mul(g, ctx.saved()[1]), ctx.saved()[0]))};  // s/x: -y/x
    else {
      static_assert(Op == BinaryOp::Pow && !ScalarFirst);
      if (s == 0.0) return {Tensor::zeros(g.shape(), g.options())};
      return {mul(g, mul(pow(ctx.saved()[0], s - 1.0), s))};
    }
  }
};

struct WhereFn : autograd::Function<WhereFn> {
  static const char* name() { return "where"; }
  static Tensor forward(Context& ctx, const Tensor& cond, const Tensor& a, const Tensor& b) {
    DILATRON_CHECK(cond.dtype() == DType::Bool, "where: the condition must be bool, got ", dtype_name(cond.dtype()));
    check_same_kind("where", a, b);
    DILATRON_CHECK(cond.device() == a.device(), "where: condition on ", cond.device().str(), ", values on ",
                   a.device().str());
    const Shape shape = broadcast_shapes(broadcast_shapes(cond.shape(), a.shape()), b.shape());
    Tensor out = Tensor::empty(shape, a.options());
    kernels::backend(a.device()).where(out, expand(cond, shape), expand(a, shape), expand(b, shape));
    ctx.save_for_backward({cond});
    ctx.set("a_shape", a.shape());
    ctx.set("b_shape", b.shape());
    return out;
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& g = grads[0];
    const Tensor& cond = ctx.saved()[0];
    const Tensor zero = Tensor::zeros({}, g.options());
    return {Tensor(),
            ctx.needs_input_grad[1] ? sum_to(where(cond, g, zero), ctx.get<Shape>("a_shape")) : Tensor(),
            ctx.needs_input_grad[2] ? sum_to(where(cond, zero, g), ctx.get<Shape>("b_shape")) : Tensor()};
  }
};

Tensor compare(BinaryOp op, const Tensor& a, const Tensor& b) {
  return binary_forward(binary_name(op), op, a, b, DType::Bool);
}

}  // namespace

Shape broadcast_shapes(const Shape& a, const Shape& b) {
  Shape out(std::max(a.size(), b.size()));
  for (size_t i = 0; i < out.size(); ++i) {  // i counts from the last dim
    const int64_t da = i < a.size() ? a[a.size() - 1 - i] : 1;
    const int64_t db = i < b.size() ? b[b.size() - 1 - i] : 1;
    DILATRON_CHECK(da == db || da == 1 || db == 1, "shapes ", shape_str(a), " and ", shape_str(b),
                   " cannot be broadcast together (dim -", i + 1, ": ", da, " vs ", db, ")");
    out[out.size() - 1 - i] = da == 1 ? db : da;
  }
  return out;
}

Tensor add(const Tensor& a, const Tensor& b) { return BinaryFn<BinaryOp::Add>::apply(a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return BinaryFn<BinaryOp::Sub>::apply(a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return BinaryFn<BinaryOp::Mul>::apply(a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return BinaryFn<BinaryOp::Div>::apply(a, b); }
Tensor maximum(const Tensor& a, const Tensor& b) { return BinaryFn<BinaryOp::Max>::apply(a, b); }

Tensor add(const Tensor& a, double s) { return ScalarFn<BinaryOp::Add, false>::apply(a, s); }
Tensor sub(const Tensor& a, double s) { return ScalarFn<BinaryOp::Sub, false>::apply(a, s); }
Tensor rsub(const Tensor& a, double s) { return ScalarFn<BinaryOp::Sub, true>::apply(a, s); }
Tensor mul(const Tensor& a, double s) { return ScalarFn<BinaryOp::Mul, false>::apply(a, s); }
Tensor div(const Tensor& a, double s) { return ScalarFn<BinaryOp::Div, false>::apply(a, s); }
Tensor rdiv(const Tensor& a, double s) { return ScalarFn<BinaryOp::Div, true>::apply(a, s); }
Tensor pow(const Tensor& a, double exponent) { return ScalarFn<BinaryOp::Pow, false>::apply(a, exponent); }

Tensor neg(const Tensor& x) { return UnaryFn<UnaryOp::Neg>::apply(x); }
Tensor exp(const Tensor& x) { return UnaryFn<UnaryOp::Exp>::apply(x); }
Tensor log(const Tensor& x) { return UnaryFn<UnaryOp::Log>::apply(x); }
Tensor tanh(const Tensor& x) { return UnaryFn<UnaryOp::Tanh>::apply(x); }
Tensor sigmoid(const Tensor& x) { return UnaryFn<UnaryOp::Sigmoid>::apply(x); }
Tensor sqrt(const Tensor& x) { return UnaryFn<UnaryOp::Sqrt>::apply(x); }
Tensor rsqrt(const Tensor& x) { return UnaryFn<UnaryOp::Rsqrt>::apply(x); }
Tensor abs(const Tensor& x) { return UnaryFn<UnaryOp::Abs>::apply(x); }
Tensor relu(const Tensor& x) { return UnaryFn<UnaryOp::Relu>::apply(x); }

Tensor gelu(const Tensor& x, const std::string& approximate) {
  if (approximate == "none") return UnaryFn<UnaryOp::Gelu>::apply(x);
  if (approximate == "tanh") return UnaryFn<UnaryOp::GeluTanh>::apply(x);
  throw Error(detail::concat("gelu: approximate must be \"none\" or \"tanh\", got \"", approximate, "\""));
}

Tensor eq(const Tensor& a, const Tensor& b) { return compare(BinaryOp::Eq, a, b); }
Tensor ne(const Tensor& a, const Tensor& b) { return compare(BinaryOp::Ne, a, b); }
Tensor lt(const Tensor& a, const Tensor& b) { return compare(BinaryOp::Lt, a, b); }
Tensor le(const Tensor& a, const Tensor& b) { return compare(BinaryOp::Le, a, b); }
Tensor gt(const Tensor& a, const Tensor& b) { return compare(BinaryOp::Gt, a, b); }
Tensor ge(const Tensor& a, const Tensor& b) { return compare(BinaryOp::Ge, a, b); }

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) { return WhereFn::apply(cond, a, b); }

Tensor masked_fill(const Tensor& x, const Tensor& mask, double value) {
  DILATRON_CHECK(broadcast_shapes(x.shape(), mask.shape()) == x.shape(), "masked_fill: mask shape ",
                 shape_str(mask.shape()), " does not broadcast to the input shape ", shape_str(x.shape()));
  return where(mask, Tensor::scalar(value, x.options()), x);
}

}  // namespace dilatron
