// Core ops (elementwise, shape, reductions, matmul) and the autograd behaviour around them:
// float64 gradchecks on awkward shapes, forward values against naive loops, error messages.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <limits>

#include "dilatron/autograd.h"
#include "dilatron/gradcheck.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"
#include "dilatron/random.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::error_message;

namespace {

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

const TensorOptions kF64 = TensorOptions(DType::Float64);

Tensor randn(const Shape& shape, uint64_t seed, TensorOptions opts = kF64.with_requires_grad()) {
  Generator gen(seed);
  return Tensor::randn(shape, gen, opts);
}

// Values in [low, high): for ops defined on positive numbers, and divisors kept away from 0.
Tensor uniform(const Shape& shape, uint64_t seed, double low, double high,
               TensorOptions opts = kF64.with_requires_grad()) {
  Generator gen(seed);
  return Tensor::uniform(shape, low, high, gen, opts);
}

void expect_gradcheck(const Fn& f, const std::vector<Tensor>& inputs, const std::string& what) {
  const GradcheckResult r = gradcheck(f, inputs);
  EXPECT_TRUE(r.ok) << what << ": " << r.message << " (max abs error " << r.max_abs_error << ")";
}

// Row-major index -> index into a tensor of `shape` broadcast to `out_shape`.
int64_t broadcast_index(int64_t linear, const Shape& out_shape, const Shape& shape) {
  int64_t index = 0, stride = 1;
  for (size_t i = 0; i < out_shape.size(); ++i) {
    const size_t od = out_shape.size() - 1 - i;
    const int64_t coord = linear % out_shape[od];
    linear /= out_shape[od];
    if (i < shape.size()) {
      const size_t d = shape.size() - 1 - i;
      if (shape[d] != 1) index += coord * stride;
      stride *= shape[d];
    }
  }
  return index;
}

double gelu_exact_ref(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double gelu_tanh_ref(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

// ---------------------------------------------------------------- elementwise

TEST(OpsCoreElementwise, BinaryGradcheckWithBroadcasting) {
  const Tensor a = randn({3, 1, 5}, 1), b = randn({4, 1}, 2);
  const Tensor divisor = uniform({4, 1}, 3, 0.5, 2.0);
  expect_gradcheck([](const auto& x) { return add(x[0], x[1]); }, {a, b}, "add");
  expect_gradcheck([](const auto& x) { return sub(x[0], x[1]); }, {a, b}, "sub");
  expect_gradcheck([](const auto& x) { return mul(x[0], x[1]); }, {a, b}, "mul");
  expect_gradcheck([](const auto& x) { return div(x[0], x[1]); }, {a, divisor}, "div");
  expect_gradcheck([](const auto& x) { return maximum(x[0], x[1]); }, {a, b}, "maximum");
  // Same shapes, a 0-d operand, and one side not requiring grad.
  const Tensor c = randn({3, 5, 7}, 4), d = randn({3, 5, 7}, 5), s = randn({}, 6);
  expect_gradcheck([](const auto& x) { return mul(x[0], x[1]); }, {c, d}, "mul same shape");
  expect_gradcheck([](const auto& x) { return div(x[0], x[1]); }, {c, uniform({}, 7, 1.0, 2.0)}, "div by 0-d");
  expect_gradcheck([](const auto& x) { return sub(x[1], x[0]); }, {s, c}, "sub 0-d");
  expect_gradcheck([](const auto& x) { return mul(x[0], x[1]); }, {c, d.detach()}, "mul, one input constant");
}

TEST(OpsCoreElementwise, ScalarFormsGradcheck) {
  const Tensor x = randn({3, 5, 7}, 11);
  const Tensor pos = uniform({3, 5, 7}, 12, 0.5, 2.0);
  expect_gradcheck([](const auto& v) { return add(v[0], 1.5); }, {x}, "add scalar");
  expect_gradcheck([](const auto& v) { return sub(v[0], 1.5); }, {x}, "sub scalar");
  expect_gradcheck([](const auto& v) { return rsub(v[0], 1.5); }, {x}, "rsub");
  expect_gradcheck([](const auto& v) { return mul(v[0], -2.5); }, {x}, "mul scalar");
  expect_gradcheck([](const auto& v) { return div(v[0], 3.0); }, {x}, "div scalar");
  expect_gradcheck([](const auto& v) { return rdiv(v[0], 3.0); }, {pos}, "rdiv");
  expect_gradcheck([](const auto& v) { return 2.0 - v[0] * 3.0 / 4.0 + 1.0; }, {x}, "operators");
  expect_gradcheck([](const auto& v) { return pow(v[0], 3.0); }, {x}, "pow 3");
  expect_gradcheck([](const auto& v) { return pow(v[0], 2.0); }, {x}, "pow 2");
  expect_gradcheck([](const auto& v) { return pow(v[0], 0.5); }, {pos}, "pow 0.5");
  expect_gradcheck([](const auto& v) { return pow(v[0], -1.5); }, {pos}, "pow -1.5");
  expect_gradcheck([](const auto& v) { return add(pow(v[0], 0.0), v[0]); }, {x}, "pow 0");
}

TEST(OpsCoreElementwise, UnaryGradcheck) {
  const Tensor x = randn({3, 5, 7}, 21);
  const Tensor pos = uniform({3, 5, 7}, 22, 0.5, 2.0);
  expect_gradcheck([](const auto& v) { return neg(v[0]); }, {x}, "neg");
  expect_gradcheck([](const auto& v) { return exp(v[0]); }, {x}, "exp");
  expect_gradcheck([](const auto& v) { return log(v[0]); }, {pos}, "log");
  expect_gradcheck([](const auto& v) { return tanh(v[0]); }, {x}, "tanh");
  expect_gradcheck([](const auto& v) { return sigmoid(v[0]); }, {x}, "sigmoid");
  expect_gradcheck([](const auto& v) { return sqrt(v[0]); }, {pos}, "sqrt");
  expect_gradcheck([](const auto& v) { return rsqrt(v[0]); }, {pos}, "rsqrt");
  expect_gradcheck([](const auto& v) { return abs(v[0]); }, {x}, "abs");
  expect_gradcheck([](const auto& v) { return relu(v[0]); }, {x}, "relu");
  expect_gradcheck([](const auto& v) { return gelu(v[0]); }, {x}, "gelu");
  expect_gradcheck([](const auto& v) { return gelu(v[0], "tanh"); }, {x}, "gelu tanh");
  // A strided (transposed) input takes the kernels' non-contiguous path.
  expect_gradcheck([](const auto& v) { return gelu(transpose(v[0], 0, 2)); }, {x}, "gelu of a transposed view");
  expect_gradcheck([](const auto& v) { return exp(transpose(v[0], 0, 1)); }, {x}, "exp of a transposed view");
}

TEST(OpsCoreElementwise, WhereAndMaskedFillGradcheck) {
  Generator gen(31);
  const Tensor cond = lt(Tensor::rand({3, 1}, gen, kF64), Tensor::full({1}, 0.5, kF64));
  const Tensor mask = gt(randn({1, 4}, 32, kF64), Tensor::zeros({}, kF64));
  const Tensor a = randn({1, 4}, 33), b = randn({3, 4}, 34);
  expect_gradcheck([&](const auto& v) { return where(cond, v[0], v[1]); }, {a, b}, "where");
  expect_gradcheck([&](const auto& v) { return masked_fill(v[0], mask, -3.0); }, {b}, "masked_fill");
}

TEST(OpsCoreElementwise, BroadcastForwardMatchesNaiveLoops) {
  const Shape sa{2, 3, 4}, sb{3, 1};
  const Tensor a = randn(sa, 41, kF64), b = randn(sb, 42, kF64);
  const std::vector<double> va = a.to_vector<double>(), vb = b.to_vector<double>();
  struct Case {
    const char* name;
    std::function<Tensor(const Tensor&, const Tensor&)> op;
    std::function<double(double, double)> ref;
  };
  const std::vector<Case> cases = {
      {"add", [](auto& x, auto& y) { return add(x, y); }, [](double x, double y) { return x + y; }},
      {"sub", [](auto& x, auto& y) { return sub(x, y); }, [](double x, double y) { return x - y; }},
      {"mul", [](auto& x, auto& y) { return mul(x, y); }, [](double x, double y) { return x * y; }},
      {"div", [](auto& x, auto& y) { return div(x, y); }, [](double x, double y) { return x / y; }},
      {"maximum", [](auto& x, auto& y) { return maximum(x, y); }, [](double x, double y) { return std::max(x, y); }},
      {"lt", [](auto& x, auto& y) { return lt(x, y).to(DType::Float64); },
       [](double x, double y) { return double(x < y); }},
      {"ge", [](auto& x, auto& y) { return ge(x, y).to(DType::Float64); },
       [](double x, double y) { return double(x >= y); }},
  };
  for (const Case& c : cases) {
    const Tensor out = c.op(a, b);
    ASSERT_EQ(out.shape(), sa) << c.name;
    const std::vector<double> v = out.to_vector<double>();
    for (int64_t i = 0; i < out.numel(); ++i)
      EXPECT_EQ(v[static_cast<size_t>(i)], c.ref(va[static_cast<size_t>(broadcast_index(i, sa, sa))],
                                                 vb[static_cast<size_t>(broadcast_index(i, sa, sb))]))
          << c.name << " element " << i;
  }
}

TEST(OpsCoreElementwise, UnaryForwardMatchesFormulas) {
  const Tensor x = randn({257}, 51, kF64);
  const std::vector<double> v = x.to_vector<double>();
  const std::vector<double> g = gelu(x).to_vector<double>(), gt_ = gelu(x, "tanh").to_vector<double>();
  const std::vector<double> s = sigmoid(x).to_vector<double>(), r = relu(x).to_vector<double>();
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_NEAR(g[i], gelu_exact_ref(v[i]), 1e-15) << v[i];
    EXPECT_NEAR(gt_[i], gelu_tanh_ref(v[i]), 1e-14) << v[i];
    EXPECT_NEAR(s[i], 1.0 / (1.0 + std::exp(-v[i])), 1e-15) << v[i];
    EXPECT_EQ(r[i], v[i] > 0 ? v[i] : 0.0);
  }
  // The formulas at 1.0, evaluated independently (Python's math.erf / math.tanh).
  EXPECT_NEAR(gelu(Tensor::scalar(1.0, kF64)).item(), 0.8413447460685429, 1e-15);
  EXPECT_NEAR(gelu(Tensor::scalar(1.0, kF64), "tanh").item(), 0.8411919906082768, 1e-14);
  EXPECT_TRUE(std::isnan(relu(Tensor::scalar(std::nan(""), kF64)).item()));
}

TEST(OpsCoreElementwise, WhereMaskedFillAndComparisonsForward) {
  const Tensor x = Tensor::from_vector<double>({1, -2, 3, -4, 5, -6}, {2, 3});
  const Tensor mask = lt(x, Tensor::zeros({}, kF64));
  EXPECT_EQ(mask.dtype(), DType::Bool);
  EXPECT_EQ(masked_fill(x, mask, 0.5).to_vector<double>(), (std::vector<double>{1, 0.5, 3, 0.5, 5, 0.5}));
  const Tensor cols = Tensor::from_vector<int64_t>({1, 0, 1}, {3}).to(DType::Bool);
  EXPECT_EQ(where(cols, x, Tensor::full({2, 1}, 9.0, kF64)).to_vector<double>(),
            (std::vector<double>{1, 9, 3, -4, 9, -6}));
  // Comparisons work on int64 too.
  const Tensor i = Tensor::from_vector<int64_t>({3, 1, 2}, {3});
  EXPECT_EQ(eq(i, Tensor::from_vector<int64_t>({2}, {1})).to_vector<int64_t>(), (std::vector<int64_t>{0, 0, 1}));
  EXPECT_EQ(ne(i, i).to_vector<int64_t>(), (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(le(i, i).to_vector<int64_t>(), (std::vector<int64_t>{1, 1, 1}));
  EXPECT_EQ(gt(i, Tensor::from_vector<int64_t>({1}, {1})).to_vector<int64_t>(), (std::vector<int64_t>{1, 0, 1}));
  EXPECT_FALSE(gt(randn({3}, 52), randn({3}, 53)).requires_grad());
}

TEST(OpsCoreElementwise, LargeStridedInputsMatchNaiveLoops) {
  // Big enough for several threads; a transposed view and a stride-0 broadcast take the strided paths.
  const Tensor base = randn({301, 203}, 61, kF64);
  const Tensor xt = transpose(base, 0, 1);  // [203, 301]
  const Tensor row = randn({301}, 62, kF64);
  const Tensor out = mul(xt, row);
  const std::vector<double> vb = base.to_vector<double>(), vr = row.to_vector<double>(), vo = out.to_vector<double>();
  for (int64_t i = 0; i < 203; ++i)
    for (int64_t j = 0; j < 301; ++j)
      ASSERT_EQ(vo[static_cast<size_t>(i * 301 + j)],
                vb[static_cast<size_t>(j * 203 + i)] * vr[static_cast<size_t>(j)]);
  const std::vector<double> vt = tanh(xt).to_vector<double>();
  for (int64_t i = 0; i < 203; ++i)
    for (int64_t j = 0; j < 301; ++j)
      ASSERT_EQ(vt[static_cast<size_t>(i * 301 + j)], std::tanh(vb[static_cast<size_t>(j * 203 + i)]));
}

TEST(OpsCoreElementwise, Float32MatchesFloat64) {
  const Tensor a = randn({4, 33}, 71, kF64), b = uniform({33}, 72, 0.5, 2.0, kF64);
  auto f = [](const Tensor& x, const Tensor& y) {
    return add(mul(gelu(x), sigmoid(y)), div(tanh(x), y)) + sqrt(y) - gelu(x, "tanh") * pow(y, 1.5) + exp(x * 0.1);
  };
  const std::vector<double> ref = f(a, b).to_vector<double>();
  const Tensor out32 = f(a.to(DType::Float32), b.to(DType::Float32));
  EXPECT_EQ(out32.dtype(), DType::Float32);
  const std::vector<double> got = out32.to_vector<double>();
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-5 * (1 + std::abs(ref[i])));
}

// Float32 gelu and its gradient keep their relative accuracy out to x = -11, where 1 + erf(x / sqrt2)
// would have cancelled to nothing (the outputs there are ~1e-28), and stay exact at the edges.
TEST(OpsCoreElementwise, Float32GeluIsRelativelyAccurateIntoTheNegativeTail) {
  std::vector<float> xs;
  for (int i = -11000; i <= 11000; ++i) xs.push_back(static_cast<float>(i) * 0.001f);
  const auto n = static_cast<int64_t>(xs.size());
  Tensor x = Tensor::from_vector(xs, {n}).requires_grad_();
  const Tensor y = gelu(x);
  sum(y).backward();
  const std::vector<float> yv = y.to_vector<float>(), dv = x.grad().to_vector<float>();
  for (size_t i = 0; i < xs.size(); ++i) {
    const double v = xs[i], cdf = 0.5 * std::erfc(-v * M_SQRT1_2), pdf = std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI);
    // Rounding x^2 in float costs ~1e-7 x^2 of relative accuracy in the tail.
    const double tol = 1e-6 * (1 + v * v);
    ASSERT_LE(std::abs(yv[i] - v * cdf), tol * std::abs(v * cdf)) << "gelu at " << v;
    ASSERT_LE(std::abs(dv[i] - (cdf + v * pdf)), tol * (cdf + std::abs(v) * pdf)) << "gelu' at " << v;
  }
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> edge = gelu(Tensor::from_vector<float>({inf, -100.0f, 100.0f, NAN}, {4})).to_vector<float>();
  EXPECT_EQ(edge[0], inf);
  EXPECT_EQ(edge[1], 0.0f);
  EXPECT_EQ(edge[2], 100.0f);
  EXPECT_TRUE(std::isnan(edge[3]));
}

TEST(OpsCoreElementwise, ErrorsNameShapesAndValues) {
  const Tensor a = Tensor::zeros({3, 4}), b = Tensor::zeros({5});
  std::string msg = error_message([&] { add(a, b); });
  EXPECT_NE(msg.find("[3, 4]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[5]"), std::string::npos) << msg;
  msg = error_message([&] { broadcast_shapes({2, 3}, {4, 1, 2}); });
  EXPECT_NE(msg.find("[2, 3]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[4, 1, 2]"), std::string::npos) << msg;
  EXPECT_EQ(broadcast_shapes({3, 1, 5}, {4, 1}), (Shape{3, 4, 5}));
  msg = error_message([&] { gelu(a, "erf"); });
  EXPECT_NE(msg.find("\"erf\""), std::string::npos) << msg;
  msg = error_message([&] { mul(a, Tensor::zeros({3, 4}, kF64)); });
  EXPECT_NE(msg.find("float64"), std::string::npos) << msg;
  msg = error_message([&] { exp(Tensor::from_vector<int64_t>({1}, {1})); });
  EXPECT_NE(msg.find("exp"), std::string::npos) << msg;
  msg = error_message([&] { masked_fill(a, Tensor::zeros({2, 4}).to(DType::Bool), 0.0); });
  EXPECT_NE(msg.find("[2, 4]"), std::string::npos) << msg;
  EXPECT_NE(error_message([&] { where(a, a, a); }).find("bool"), std::string::npos);
}

// ---------------------------------------------------------------- shape

TEST(OpsCoreShape, ViewsShareStorageAndReshapeInfers) {
  const Tensor x = Tensor::arange(0, 24, 1, kF64);
  const Tensor v = reshape(x, {2, -1, 4});
  EXPECT_EQ(v.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(v.storage(), x.storage());
  const Tensor t = transpose(v, 0, 2);
  EXPECT_EQ(t.storage(), x.storage());
  EXPECT_EQ(t.at({3, 1, 1}), 1 * 12 + 1 * 4 + 3);
  const Tensor n = narrow(v, 1, 1, 2);
  EXPECT_EQ(n.storage(), x.storage());
  EXPECT_EQ(n.at({1, 0, 2}), 12 + 4 + 2);
  // Merging dims that are not contiguous with each other copies.
  const Tensor flat = reshape(t, {-1});
  EXPECT_NE(flat.storage(), x.storage());
  EXPECT_EQ(flat.to_vector<double>()[1], 12.0);
  // A view of a view where it is possible: split a permuted dim.
  const Tensor p = permute(reshape(x, {4, 6}), {1, 0});  // [6, 4] strides [1, 6]
  const Tensor pv = view(p, {2, 3, 4});
  EXPECT_EQ(pv.storage(), x.storage());
  EXPECT_EQ(pv.at({1, 2, 3}), 3 * 6 + 5);
  EXPECT_EQ(flatten(randn({2, 3, 4, 5}, 81, kF64), 1, 2).shape(), (Shape{2, 12, 5}));
  EXPECT_EQ(unsqueeze(x, -1).shape(), (Shape{24, 1}));
  EXPECT_EQ(squeeze(unsqueeze(x, 0), 0).shape(), (Shape{24}));
  EXPECT_EQ(squeeze(x, 0).shape(), (Shape{24}));  // not size 1: unchanged, as torch
  EXPECT_TRUE(contiguous(x).same(x));
  EXPECT_TRUE(contiguous(t).is_contiguous());
  EXPECT_EQ(contiguous(t).to_vector<double>(), flat.to_vector<double>());
}

TEST(OpsCoreShape, ViewImpossibleAndBadDimsError) {
  const Tensor t = transpose(Tensor::zeros({3, 4}), 0, 1);
  std::string msg = error_message([&] { view(t, {12}); });
  EXPECT_NE(msg.find("[4, 3]"), std::string::npos) << msg;  // the shape
  EXPECT_NE(msg.find("[1, 4]"), std::string::npos) << msg;  // the strides
  EXPECT_NE(msg.find("reshape"), std::string::npos) << msg;
  msg = error_message([&] { reshape(t, {5, -1}); });
  EXPECT_NE(msg.find("[5, -1]"), std::string::npos) << msg;
  msg = error_message([&] { transpose(t, 0, 2); });
  EXPECT_NE(msg.find("dim 2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rank 2"), std::string::npos) << msg;
  msg = error_message([&] { wrap_dim(-4, 3); });
  EXPECT_NE(msg.find("-4"), std::string::npos) << msg;
  EXPECT_EQ(wrap_dim(-1, 3), 2);
  msg = error_message([&] { narrow(t, 1, 2, 2); });
  EXPECT_NE(msg.find("dim 1"), std::string::npos) << msg;
  msg = error_message([&] { permute(t, {0, 0}); });
  EXPECT_NE(msg.find("[0, 0]"), std::string::npos) << msg;
  msg = error_message([&] { expand(Tensor::zeros({3, 2}), {3, 4}); });
  EXPECT_NE(msg.find("[3, 2]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[3, 4]"), std::string::npos) << msg;
  msg = error_message([&] { cat({Tensor::zeros({2, 3}), Tensor::zeros({3, 3})}, 1); });
  EXPECT_NE(msg.find("[2, 3]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[3, 3]"), std::string::npos) << msg;
  msg = error_message([&] { split(Tensor::zeros({2, 5}), std::vector<int64_t>{2, 2}, 1); });
  EXPECT_NE(msg.find("[2, 2]"), std::string::npos) << msg;
}

TEST(OpsCoreShape, ViewOpsGradcheck) {
  const Tensor x = randn({3, 5, 7}, 91);
  const Tensor x4 = randn({2, 3, 4, 5}, 92);
  expect_gradcheck([](const auto& v) { return reshape(v[0], {5, -1}); }, {x}, "reshape");
  expect_gradcheck([](const auto& v) { return view(v[0], {15, 7}); }, {x}, "view");
  expect_gradcheck([](const auto& v) { return reshape(transpose(v[0], 0, 1), {5, 21}); }, {x}, "reshape copy");
  expect_gradcheck([](const auto& v) { return permute(v[0], {2, 0, 3, 1}); }, {x4}, "permute 4-D");
  expect_gradcheck([](const auto& v) { return transpose(v[0], -1, 0); }, {x}, "transpose");
  expect_gradcheck([](const auto& v) { return contiguous(transpose(v[0], 1, 2)); }, {x}, "contiguous");
  expect_gradcheck([](const auto& v) { return narrow(v[0], 1, 1, 3); }, {x}, "narrow middle");
  expect_gradcheck([](const auto& v) { return slice(v[0], -1, 2, -1); }, {x}, "slice");
  expect_gradcheck([](const auto& v) { return unsqueeze(v[0], 1); }, {x}, "unsqueeze");
  expect_gradcheck([](const auto& v) { return squeeze(v[0], 1); }, {randn({3, 1, 4}, 93)}, "squeeze");
  expect_gradcheck([](const auto& v) { return flatten(v[0], 1); }, {x4}, "flatten");
  expect_gradcheck([](const auto& v) { return expand(v[0], {2, 3, 4, 5}); }, {randn({3, 1, 5}, 94)}, "expand");
  expect_gradcheck([](const auto& v) { return mul(expand(v[0], {4, -1}), v[1]); }, {randn({3}, 95), randn({4, 3}, 96)},
                   "expand with -1");
}

TEST(OpsCoreShape, CatSplitChunkGradcheckAndValues) {
  const Tensor a = randn({2, 3, 4}, 101), b = randn({2, 1, 4}, 102), c = randn({2, 5, 4}, 103);
  const Tensor out = cat({a, b, c}, 1);
  ASSERT_EQ(out.shape(), (Shape{2, 9, 4}));
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t k = 0; k < 4; ++k) {
      EXPECT_EQ(out.at({i, 2, k}), a.at({i, 2, k}));
      EXPECT_EQ(out.at({i, 3, k}), b.at({i, 0, k}));
      EXPECT_EQ(out.at({i, 8, k}), c.at({i, 4, k}));
    }
  expect_gradcheck([](const auto& v) { return cat(v, 1); }, {a, b, c}, "cat middle");
  expect_gradcheck([](const auto& v) { return cat(v, -1); }, {a, randn({2, 3, 1}, 104)}, "cat last");
  expect_gradcheck([](const auto& v) { return cat(v, 0); }, {a, randn({1, 3, 4}, 105)}, "cat first");
  expect_gradcheck([&](const auto& v) { return cat({v[0], b.detach()}, 1); }, {a}, "cat with a constant");

  const Tensor x = randn({3, 7, 2}, 106);
  const std::vector<Tensor> parts = split(x, 3, 1);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[2].shape(), (Shape{3, 1, 2}));
  EXPECT_EQ(parts[1].storage(), x.storage());
  EXPECT_EQ(parts[1].at({2, 1, 1}), x.at({2, 4, 1}));
  EXPECT_EQ(chunk(x, 3, 1).size(), 3u);
  EXPECT_EQ(chunk(x, 3, 1)[0].shape(), (Shape{3, 3, 2}));
  EXPECT_EQ(chunk(x, 4, 1)[3].shape(), (Shape{3, 1, 2}));
  // Outputs left out of the loss get zero gradients.
  expect_gradcheck([](const auto& v) {
    auto p = split(v[0], std::vector<int64_t>{2, 4, 1}, 1);
    return add(mul(p[0], 2.0), narrow(p[1], 1, 1, 2));
  }, {x}, "split sizes");
  expect_gradcheck([](const auto& v) { return chunk(v[0], 2, -1)[1]; }, {x}, "chunk");
  expect_gradcheck([](const auto& v) { return split(v[0], 3, 1)[2]; }, {x}, "split size");
}

// Copies write into strided views (cat and the narrow/split backward rely on it), converting dtypes,
// on sizes where each thread's share starts and ends inside a row.
TEST(OpsCoreShape, CopyBetweenStridedViewsAndCatOfViews) {
  const Tensor src_full = randn({29, 37, 23}, 111, kF64);
  const Tensor src = transpose(src_full, 0, 1);  // [37, 29, 23]
  for (DType dt : {DType::Float64, DType::Float32}) {
    SCOPED_TRACE(dtype_name(dt));
    const Tensor big = Tensor::zeros({23, 40, 37}, dt);
    Tensor dst = narrow(permute(big, {2, 1, 0}), 1, 5, 29);  // [37, 29, 23], every stride non-unit but one
    kernels::backend(Device::cpu()).copy(dst, src);
    for (int64_t k = 0; k < 23; ++k)
      for (int64_t j = 0; j < 40; ++j)
        for (int64_t i = 0; i < 37; ++i) {
          const double expected = j >= 5 && j < 34 ? static_cast<double>(static_cast<float>(src_full.at({j - 5, i, k})))
                                                   : 0.0;
          if (dt == DType::Float64 && j >= 5 && j < 34) ASSERT_EQ(big.at({k, j, i}), src_full.at({j - 5, i, k}));
          else ASSERT_EQ(big.at({k, j, i}), expected) << k << " " << j << " " << i;
        }
  }
  // Rows of a contiguous source land in a narrow view of a wider row-major tensor.
  const Tensor rows = randn({41, 3, 211}, 112, kF64);
  const Tensor wide = Tensor::zeros({41, 6, 211}, kF64);
  narrow(wide, 1, 2, 3).copy_(rows);
  EXPECT_EQ(narrow(wide, 1, 2, 3).contiguous().to_vector<double>(), rows.to_vector<double>());
  EXPECT_EQ(sum(abs(narrow(wide, 1, 0, 2))).item(), 0.0);
  EXPECT_EQ(sum(abs(narrow(wide, 1, 5, 1))).item(), 0.0);

  const Tensor a = randn({4, 3, 5}, 113), b = randn({5, 4, 2}, 114);
  const Tensor out = cat({transpose(a, 0, 2), permute(b, {0, 2, 1})}, 1);  // [5, 3, 4] and [5, 2, 4]
  ASSERT_EQ(out.shape(), (Shape{5, 5, 4}));
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t k = 0; k < 4; ++k) {
      for (int64_t j = 0; j < 3; ++j) EXPECT_EQ(out.at({i, j, k}), a.at({k, j, i}));
      for (int64_t j = 0; j < 2; ++j) EXPECT_EQ(out.at({i, 3 + j, k}), b.at({i, k, j}));
    }
  expect_gradcheck([](const auto& v) { return cat({transpose(v[0], 0, 2), permute(v[1], {0, 2, 1})}, 1); }, {a, b},
                   "cat of strided views");
}

// ---------------------------------------------------------------- reductions

TEST(OpsCoreReduce, SumAndMeanGradcheck) {
  const Tensor x = randn({3, 4, 5}, 111);
  for (bool keepdim : {false, true}) {
    for (const std::vector<int64_t>& dims : std::vector<std::vector<int64_t>>{{0}, {1}, {-1}, {0, 2}, {2, 0, 1}}) {
      const std::string what = "dims " + shape_str(dims) + (keepdim ? " keepdim" : "");
      expect_gradcheck([&](const auto& v) { return sum(v[0], dims, keepdim); }, {x}, "sum " + what);
      expect_gradcheck([&](const auto& v) { return mean(v[0], dims, keepdim); }, {x}, "mean " + what);
    }
  }
  expect_gradcheck([](const auto& v) { return sum(v[0]); }, {x}, "sum all");
  expect_gradcheck([](const auto& v) { return mean(v[0]); }, {x}, "mean all");
  expect_gradcheck([](const auto& v) { return sum(transpose(v[0], 0, 2), {1}); }, {x}, "sum of a strided view");
  expect_gradcheck([](const auto& v) { return sum_to(v[0], {4, 1}); }, {x}, "sum_to");
  expect_gradcheck([](const auto& v) { return sum_to(v[0], {1, 5}); }, {x}, "sum_to leading");
}

TEST(OpsCoreReduce, SumMatchesNaiveLoopsForEveryDimSet) {
  const Shape s{3, 4, 5, 2};
  const Tensor x = randn(s, 121, kF64);
  const std::vector<double> v = x.to_vector<double>();
  for (int mask = 1; mask < 16; ++mask) {
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < 4; ++d)
      if (mask & (1 << d)) dims.push_back(d);
    const Tensor out = sum(x, dims, true);
    std::vector<double> ref(static_cast<size_t>(out.numel()), 0.0);
    Shape out_shape = s;
    for (int64_t d : dims) out_shape[static_cast<size_t>(d)] = 1;
    ASSERT_EQ(out.shape(), out_shape);
    for (int64_t i = 0; i < x.numel(); ++i)
      ref[static_cast<size_t>(broadcast_index(i, s, out_shape))] += v[static_cast<size_t>(i)];
    const std::vector<double> got = out.to_vector<double>();
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-12) << "dims " << shape_str(dims);
  }
  EXPECT_EQ(sum(x, {1, 3}).shape(), (Shape{3, 5}));
  EXPECT_EQ(sum(x).shape(), Shape{});
  EXPECT_NEAR(mean(x).item(), sum(x).item() / 120.0, 1e-14);
  // Non-contiguous input with a trailing reduced dim.
  const Tensor t = transpose(x, 0, 3);
  EXPECT_NEAR(sum(t, {3}).at({1, 2, 3}), x.at({0, 2, 3, 1}) + x.at({1, 2, 3, 1}) + x.at({2, 2, 3, 1}), 1e-14);
  const std::string msg = error_message([&] { sum(x, {1, -3}); });
  EXPECT_NE(msg.find("dim -3"), std::string::npos) << msg;
  EXPECT_NE(error_message([&] { sum(x, {4}); }).find("dim 4"), std::string::npos);
  EXPECT_NE(error_message([&] { sum_to(x, {4, 5}); }).find("[4, 5]"), std::string::npos);
}

TEST(OpsCoreReduce, MaxValuesAndIndices) {
  const Tensor x = Tensor::from_vector<double>({1, 7, 7, -2, 3, 0, 5, 5, 9, 9, -1, 4}, {2, 3, 2});
  const MaxResult m1 = max(x, 1);
  EXPECT_EQ(m1.values.shape(), (Shape{2, 2}));
  EXPECT_EQ(m1.values.to_vector<double>(), (std::vector<double>{7, 7, 9, 9}));
  EXPECT_EQ(m1.indices.to_vector<int64_t>(), (std::vector<int64_t>{1, 0, 1, 1}));  // first max wins
  const MaxResult m2 = max(x, -1, true);
  EXPECT_EQ(m2.values.shape(), (Shape{2, 3, 1}));
  EXPECT_EQ(m2.values.to_vector<double>(), (std::vector<double>{7, 7, 3, 5, 9, 4}));
  EXPECT_EQ(m2.indices.to_vector<int64_t>(), (std::vector<int64_t>{1, 0, 0, 0, 0, 1}));
  EXPECT_EQ(max(x).item(), 9.0);
  EXPECT_EQ(max(transpose(x, 0, 2)).item(), 9.0);
  const Tensor r = randn({4, 3}, 131);
  EXPECT_FALSE(max(r, 0).values.requires_grad());
  EXPECT_FALSE(max(r).requires_grad());
  const Tensor with_nan = Tensor::from_vector<double>({1, std::nan(""), 3}, {3});
  EXPECT_TRUE(std::isnan(max(with_nan).item()));
  EXPECT_NE(error_message([&] { max(Tensor::zeros({2, 0}), 1); }).find("[2, 0]"), std::string::npos);
}

TEST(OpsCoreReduce, LargeFloat32SumsAreAccurateAndDeterministic) {
  // Many rows (row-parallel), one long row (block-parallel) and a leading-dim sum (column-parallel).
  Generator gen(141);
  const Tensor x = Tensor::uniform({3, 200001}, 0.0, 1.0, gen);
  const std::vector<double> v = x.to_vector<double>();
  const Tensor s1 = sum(x, {1});
  const Tensor s_all = sum(x);
  const Tensor s0 = sum(reshape(x, {200001, 3}), {0});
  double total = 0;
  std::vector<double> rows(3, 0.0), cols(3, 0.0);
  for (size_t i = 0; i < v.size(); ++i) {
    total += v[i];
    rows[i / 200001] += v[i];
    cols[i % 3] += v[i];
  }
  for (int64_t r = 0; r < 3; ++r) {
    EXPECT_NEAR(s1.at({r}), rows[static_cast<size_t>(r)], 1e-7 * rows[static_cast<size_t>(r)]);
    EXPECT_NEAR(s0.at({r}), cols[static_cast<size_t>(r)], 1e-7 * cols[static_cast<size_t>(r)]);
  }
  EXPECT_NEAR(s_all.item(), total, 1e-7 * total);
  // The summation order depends on the shape only, not on how many threads share the work.
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<float> serial_all = sum(x).to_vector<float>(), serial_rows = sum(x, {1}).to_vector<float>();
  const std::vector<float> serial_cols = sum(reshape(x, {200001, 3}), {0}).to_vector<float>();
  omp_set_num_threads(threads);
  EXPECT_EQ(serial_all, s_all.to_vector<float>());
  EXPECT_EQ(serial_rows, s1.to_vector<float>());
  EXPECT_EQ(serial_cols, s0.to_vector<float>());
  double squares = 0;
  for (double e : v) squares += e * e;
  EXPECT_NEAR(kernels::cpu_backend().sum_squares(x), squares, 1e-10 * squares);
}

// ---------------------------------------------------------------- matmul

TEST(OpsCoreMatmul, GradcheckAllOperandRanks) {
  struct Case {
    Shape a, b;
  };
  const std::vector<Case> cases = {
      {{3, 4}, {4, 5}},          {{2, 3, 4}, {2, 4, 5}}, {{2, 1, 3, 4}, {5, 4, 6}}, {{4}, {4}},
      {{4}, {4, 3}},             {{3, 4}, {4}},          {{2, 3, 4}, {4, 5}},       {{3, 4}, {2, 4, 5}},
      {{4}, {2, 4, 3}},          {{2, 3, 4}, {4}},       {{2, 3, 4}, {1, 4, 2}},    {{1, 3, 4}, {2, 4, 2}},
  };
  uint64_t seed = 150;
  for (const Case& c : cases) {
    expect_gradcheck([](const auto& v) { return matmul(v[0], v[1]); }, {randn(c.a, seed), randn(c.b, seed + 1)},
                     "matmul " + shape_str(c.a) + " @ " + shape_str(c.b));
    seed += 2;
  }
  // Transposed views reach gemm as trans flags.
  expect_gradcheck([](const auto& v) { return matmul(transpose(v[0], -1, -2), transpose(v[1], -1, -2)); },
                   {randn({2, 4, 3}, 170), randn({2, 5, 4}, 171)}, "matmul of transposed views");
  expect_gradcheck([](const auto& v) { return matmul(v[0], transpose(v[0], 0, 1)); }, {randn({3, 5}, 172)},
                   "x @ x^T");
}

TEST(OpsCoreMatmul, ForwardMatchesNaiveLoops) {
  // [2, 1, 3, 4] @ [5, 4, 6] -> [2, 5, 3, 6]
  const Tensor a = randn({2, 1, 3, 4}, 181, kF64), b = randn({5, 4, 6}, 182, kF64);
  const Tensor out = matmul(a, b);
  ASSERT_EQ(out.shape(), (Shape{2, 5, 3, 6}));
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0; j < 5; ++j)
      for (int64_t m = 0; m < 3; ++m)
        for (int64_t n = 0; n < 6; ++n) {
          double ref = 0;
          for (int64_t k = 0; k < 4; ++k) ref += a.at({i, 0, m, k}) * b.at({j, k, n});
          EXPECT_NEAR(out.at({i, j, m, n}), ref, 1e-12);
        }
  const Tensor v = randn({4}, 183, kF64);
  double dot = 0;
  for (int64_t k = 0; k < 4; ++k) dot += v.at({k}) * v.at({k});
  EXPECT_EQ(matmul(v, v).shape(), Shape{});
  EXPECT_NEAR(matmul(v, v).item(), dot, 1e-12);
  EXPECT_EQ(matmul(v, b).shape(), (Shape{5, 6}));
  EXPECT_EQ(matmul(b, randn({6}, 184, kF64)).shape(), (Shape{5, 4}));
  EXPECT_NEAR(matmul(v, b).at({2, 3}), matmul(unsqueeze(v, 0), b).at({2, 0, 3}), 1e-12);
}

TEST(OpsCoreMatmul, Float32MatchesFloat64AndShapeErrors) {
  const Tensor a = randn({3, 17, 33}, 191, kF64), b = randn({33, 9}, 192, kF64);
  const std::vector<double> ref = matmul(a, b).to_vector<double>();
  const std::vector<double> got = matmul(a.to(DType::Float32), b.to(DType::Float32)).to_vector<double>();
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-4);
  const std::string msg = error_message([&] { matmul(Tensor::zeros({2, 3}), Tensor::zeros({4, 5})); });
  EXPECT_NE(msg.find("[2, 3]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[4, 5]"), std::string::npos) << msg;
  const std::string batch_msg = error_message([&] { matmul(Tensor::zeros({2, 3, 4}), Tensor::zeros({3, 4, 5})); });
  EXPECT_NE(batch_msg.find("[2, 3, 4]"), std::string::npos) << batch_msg;
  EXPECT_NE(batch_msg.find("[3, 4, 5]"), std::string::npos) << batch_msg;
  EXPECT_NE(error_message([&] { matmul(Tensor::zeros({2}), Tensor::zeros({2}, kF64)); }).find("float64"), std::string::npos);
}

// OpenBLAS's own threading makes results depend on the thread count; the CPU gemm must not.
TEST(OpsCoreMatmul, Float32ResultsAreBitwiseIndependentOfThreadCount) {
  const Tensor x = randn({1000, 96}, 121, TensorOptions(DType::Float32));
  const Tensor w = randn({200, 96}, 122, TensorOptions(DType::Float32));
  const Tensor g = randn({1000, 200}, 123, TensorOptions(DType::Float32));
  const int threads = omp_get_max_threads();
  std::vector<std::vector<float>> results[2];
  for (int t : {1, 2}) {
    omp_set_num_threads(t);
    auto& r = results[t - 1];
    r.push_back(matmul(x, transpose(w, 0, 1)).to_vector<float>());  // a linear layer
    r.push_back(matmul(transpose(g, 0, 1), x).to_vector<float>());  // its weight gradient: long K
    r.push_back(matmul(g, w).to_vector<float>());                   // its input gradient
  }
  omp_set_num_threads(threads);
  for (size_t i = 0; i < results[0].size(); ++i) EXPECT_EQ(results[0][i], results[1][i]) << "product " << i;
}

TEST(OpsCoreMatmul, GemmKernelAlphaBetaBroadcastAndEdges) {
  kernels::Backend& be = kernels::cpu_backend();
  const Tensor a = randn({6, 5, 7}, 201, kF64), b = randn({1, 7, 3}, 202, kF64);
  // beta = 0 must not read out (NaN stays out of the result); batch 1 of b broadcasts.
  Tensor out = Tensor::full({6, 5, 3}, std::numeric_limits<double>::quiet_NaN(), kF64);
  be.gemm(out, a, b, false, false, 2.0, 0.0);
  const Tensor ref = mul(matmul(a, b), 2.0);
  const std::vector<double> got = out.to_vector<double>(), r2 = ref.to_vector<double>();
  for (size_t i = 0; i < r2.size(); ++i) EXPECT_NEAR(got[i], r2[i], 1e-12);
  // beta = 1 accumulates; trans flags read the stored transposes.
  const Tensor at = contiguous(transpose(a, 1, 2)), bt = contiguous(transpose(b, 1, 2));
  be.gemm(out, at, bt, true, true, 1.0, 1.0);
  const std::vector<double> acc = out.to_vector<double>(), r3 = mul(ref, 1.5).to_vector<double>();
  for (size_t i = 0; i < acc.size(); ++i) EXPECT_NEAR(acc[i], r3[i], 1e-12);
  // K = 0 gives zeros; many small batches (the batch-parallel path) match one call per batch.
  Tensor zk = Tensor::full({2, 3, 4}, 5.0, kF64);
  be.gemm(zk, Tensor::zeros({2, 3, 0}, kF64), Tensor::zeros({2, 0, 4}, kF64), false, false, 1.0, 0.0);
  EXPECT_EQ(zk.to_vector<double>(), std::vector<double>(24, 0.0));
  const Tensor sa = randn({64, 4, 5}, 203, kF64), sb = randn({64, 5, 2}, 204, kF64);
  const Tensor batched = matmul(sa, sb);
  for (int64_t i = 0; i < 64; i += 9) {
    const Tensor one = matmul(narrow(sa, 0, i, 1), narrow(sb, 0, i, 1));
    EXPECT_EQ(narrow(batched, 0, i, 1).to_vector<double>(), one.to_vector<double>()) << "batch " << i;
  }
}

// ---------------------------------------------------------------- autograd around the ops

TEST(OpsCoreAutograd, BackwardFromNonScalarNeedsAGradient) {
  const Tensor x = randn({2, 3}, 211);
  const Tensor y = mul(x, 2.0);
  const std::string msg = error_message([&] { y.backward(); });
  EXPECT_NE(msg.find("[2, 3]"), std::string::npos) << msg;
  y.backward(Tensor::ones({2, 3}, kF64));
  EXPECT_EQ(x.grad().to_vector<double>(), std::vector<double>(6, 2.0));
}

TEST(OpsCoreAutograd, SecondBackwardThroughAFreedGraphErrors) {
  const Tensor x = randn({3}, 221);
  const Tensor loss = sum(mul(exp(x), x));
  loss.backward();
  const std::string msg = error_message([&] { loss.backward(); });
  EXPECT_NE(msg.find("second time"), std::string::npos) << msg;
  // With retain_graph the second pass works and accumulates.
  const Tensor y = randn({3}, 222);
  const Tensor l2 = sum(mul(y, y));
  l2.backward(Tensor(), true);
  l2.backward();
  const std::vector<double> g = y.grad().to_vector<double>(), v = y.to_vector<double>();
  for (size_t i = 0; i < g.size(); ++i) EXPECT_NEAR(g[i], 4.0 * v[i], 1e-14);
}

TEST(OpsCoreAutograd, NoGradScopeRecordsNothingAndDetachCutsTheGraph) {
  const Tensor x = randn({2, 3}, 231);
  {
    autograd::NoGradGuard no_grad;
    const Tensor y = sum(matmul(x, transpose(x, 0, 1)) + x.sum());
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
  }
  const Tensor d = x.detach();
  EXPECT_FALSE(d.requires_grad());
  EXPECT_EQ(d.storage(), x.storage());
  const Tensor loss = sum(mul(x, d));  // the gradient flows only through the first factor
  loss.backward();
  EXPECT_EQ(x.grad().to_vector<double>(), x.to_vector<double>());
}

TEST(OpsCoreAutograd, GradientsAccumulateOverBackwardsAndFanIn) {
  const Tensor x = randn({4}, 241);
  sum(mul(x, 3.0)).backward();
  sum(add(x, x)).backward();  // x used twice in one graph: 1 + 1
  EXPECT_EQ(x.grad().to_vector<double>(), std::vector<double>(4, 5.0));
}

}  // namespace
