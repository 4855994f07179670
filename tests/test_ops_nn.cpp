// Fused nn ops: softmax, log_softmax, cross_entropy, layer_norm, embedding, dropout, rotary.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "dilatron/autograd.h"
#include "dilatron/gradcheck.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"
#include "dilatron/philox.h"
#include "dilatron/random.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::error_message;

namespace {

const TensorOptions kF64 = TensorOptions(DType::Float64).with_requires_grad();

void expect_gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Tensor>& inputs) {
  const GradcheckResult r = gradcheck(f, inputs);
  EXPECT_TRUE(r.ok) << r.message << " (max abs error " << r.max_abs_error << ")";
}

Tensor int64_tensor(const std::vector<int64_t>& v, const Shape& shape) { return Tensor::from_vector(v, shape); }

// What `results` returns on one thread equals what it returns on several (at least two); the
// thread count is restored after.
template <typename F>
void expect_same_on_one_and_many_threads(F&& results) {
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto serial = results();
  omp_set_num_threads(std::max(threads, 2));
  const auto parallel = results();
  omp_set_num_threads(threads);
  EXPECT_EQ(serial, parallel);
}

// Naive softmax of every row of a contiguous [M, K] buffer, in double.
std::vector<double> naive_softmax_rows(const std::vector<double>& x, int64_t K) {
  std::vector<double> y(x.size());
  for (size_t r = 0; r < x.size() / static_cast<size_t>(K); ++r) {
    const double* xr = x.data() + r * static_cast<size_t>(K);
    double mx = xr[0];
    for (int64_t k = 1; k < K; ++k) mx = std::max(mx, xr[k]);
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k) s += std::exp(xr[k] - mx);
    for (int64_t k = 0; k < K; ++k) y[r * static_cast<size_t>(K) + static_cast<size_t>(k)] = std::exp(xr[k] - mx) / s;
  }
  return y;
}

}  // namespace

// ---------------------------------------------------------------- softmax / log_softmax

TEST(NnOpsSoftmax, ForwardMatchesNaiveAndIsStableForLargeLogits) {
  Generator gen(1);
  for (DType dt : {DType::Float32, DType::Float64}) {
    // Logits around 1000: exp overflows without the max subtraction.
    Tensor x = Tensor::randn({4, 37}, gen, dt, 1000.0, 5.0);
    const std::vector<double> ref = naive_softmax_rows(x.to_vector<double>(), 37);
    const std::vector<double> y = softmax(x, -1).to_vector<double>();
    const std::vector<double> ly = log_softmax(x, 1).to_vector<double>();
    const double tol = dt == DType::Float32 ? 1e-6 : 1e-14;
    for (size_t i = 0; i < ref.size(); ++i) {
      ASSERT_NEAR(y[i], ref[i], tol) << "element " << i;
      ASSERT_NEAR(ly[i], std::log(ref[i]), dt == DType::Float32 ? 1e-5 * (1.0 - std::log(ref[i])) : 1e-11) << "element " << i;
    }
  }
}

TEST(NnOpsSoftmax, MiddleDimMatchesNaive) {
  Generator gen(2);
  Tensor x = Tensor::randn({3, 5, 4}, gen, DType::Float64);
  Tensor y = softmax(x, 1);
  ASSERT_EQ(y.shape(), (Shape{3, 5, 4}));
  for (int64_t a = 0; a < 3; ++a)
    for (int64_t c = 0; c < 4; ++c) {
      double s = 0.0;
      for (int64_t b = 0; b < 5; ++b) s += std::exp(x.at({a, b, c}));
      for (int64_t b = 0; b < 5; ++b) {
        EXPECT_NEAR(y.at({a, b, c}), std::exp(x.at({a, b, c})) / s, 1e-14);
        EXPECT_NEAR(log_softmax(x, -2).at({a, b, c}), x.at({a, b, c}) - std::log(s), 1e-13);
      }
    }
}

TEST(NnOpsSoftmax, Gradcheck) {
  Generator gen(3);
  Tensor x = Tensor::randn({3, 5, 7}, gen, kF64);
  for (int64_t dim : {-1, 1, 0}) {
    SCOPED_TRACE("dim " + std::to_string(dim));
    // A weighted sum makes every Jacobian entry matter (the plain sum of a softmax is constant).
    Tensor w = Tensor::randn({3, 5, 7}, gen, DType::Float64);
    expect_gradcheck([&](const std::vector<Tensor>& in) { return mul(softmax(in[0], dim), w); }, {x});
    expect_gradcheck([&](const std::vector<Tensor>& in) { return mul(log_softmax(in[0], dim), w); }, {x});
  }
}

// The float32 kernels use their own vectorised exp: check it over its whole range, against
// libm in double, into the subnormals. -inf (a masked logit) gives exactly 0.
TEST(NnOpsSoftmax, Float32ExpIsAccurateOverItsRange) {
  const int64_t K = 4003;  // not a multiple of 4: the row tail runs through the same code
  std::vector<float> x(K);
  for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(k)] = -110.0f + 110.0f * static_cast<float>(k) / (K - 1);
  x[7] = -std::numeric_limits<float>::infinity();
  const std::vector<double> y = softmax(Tensor::from_vector(x, {1, K}), -1).to_vector<double>();
  double s = 0.0;
  for (float v : x) s += std::exp(static_cast<double>(v));
  for (size_t k = 0; k < x.size(); ++k) {
    const double ref = std::exp(static_cast<double>(x[k])) / s;
    ASSERT_NEAR(y[k], ref, 5e-7 * ref + 3e-45) << "x = " << x[k];  // plus a few subnormal steps
  }
  EXPECT_EQ(y[7], 0.0);
}

// Float32 forward and backward of every fused op against the same computation in float64.
TEST(NnOpsFloat32, ForwardAndBackwardMatchFloat64) {
  Generator gen(16);
  const Tensor x64 = Tensor::randn({5, 3, 131}, gen, DType::Float64, 0.0, 3.0);
  const Tensor w64 = Tensor::randn({131}, gen, DType::Float64);
  const Tensor b64 = Tensor::randn({131}, gen, DType::Float64);
  const Tensor dy64 = Tensor::randn({5, 3, 131}, gen, DType::Float64);
  const Tensor targets = int64_tensor({0, 130, 5, -100, 64, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {5, 3});
  const Tensor idx = int64_tensor({0, 4, 4, 2}, {4});
  using Op = std::function<Tensor(const std::vector<Tensor>&)>;
  const std::vector<std::pair<std::string, Op>> ops{
      {"softmax", [](auto& in) { return softmax(in[0], -1); }},
      {"softmax dim 1", [](auto& in) { return softmax(in[0], 1); }},
      {"log_softmax", [](auto& in) { return log_softmax(in[0], -1); }},
      {"cross_entropy", [&](auto& in) { return cross_entropy(in[0], targets, -100, "none"); }},
      {"layer_norm", [](auto& in) { return layer_norm(in[0], in[1], in[2]); }},
      {"embedding", [&](auto& in) { return embedding(reshape(in[0], {15, 131}), idx); }},
      {"dropout", [](auto& in) { return dropout(in[0], 0.25, true, 3, 9); }},
  };
  for (const auto& [name, f] : ops) {
    SCOPED_TRACE(name);
    std::vector<std::vector<double>> results[2];
    for (DType dt : {DType::Float64, DType::Float32}) {
      std::vector<Tensor> in;
      for (const Tensor& t : {x64, w64, b64}) in.push_back(t.detach().to(dt).requires_grad_());
      Tensor y = f(in);
      // Weight the outputs so every gradient entry is exercised.
      sum(mul(y, narrow(reshape(dy64, {-1}), 0, 0, y.numel()).reshape(y.shape()).to(dt))).backward();
      auto& r = results[dt == DType::Float32];
      r.push_back(y.to_vector<double>());
      for (const Tensor& t : in) r.push_back(t.grad().defined() ? t.grad().to_vector<double>() : std::vector<double>{});
    }
    for (size_t i = 0; i < results[0].size(); ++i) {
      ASSERT_EQ(results[0][i].size(), results[1][i].size());
      double scale = 0.0;
      for (double v : results[0][i]) scale = std::max(scale, std::abs(v));
      for (size_t j = 0; j < results[0][i].size(); ++j)
        ASSERT_NEAR(results[1][i][j], results[0][i][j], 2e-6 * scale + 1e-7) << "result " << i << " element " << j;
    }
  }
}

// ---------------------------------------------------------------- cross_entropy

TEST(NnOpsCrossEntropy, ForwardMatchesNaiveForEveryReduction) {
  Generator gen(4);
  const int64_t C = 11;
  Tensor logits = Tensor::randn({2, 3, C}, gen, DType::Float64, 0.0, 3.0);
  Tensor targets = int64_tensor({0, 10, -100, 4, -100, 7}, {2, 3});
  const std::vector<double> x = logits.to_vector<double>();
  const std::vector<int64_t> t = targets.to_vector<int64_t>();
  std::vector<double> ref(6, 0.0);
  double total = 0.0;
  for (size_t m = 0; m < 6; ++m) {
    if (t[m] == -100) continue;
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(x[m * C + static_cast<size_t>(c)]);
    ref[m] = std::log(s) - x[m * C + static_cast<size_t>(t[m])];
    total += ref[m];
  }
  Tensor none = cross_entropy(logits, targets, -100, "none");
  ASSERT_EQ(none.shape(), (Shape{2, 3}));
  const std::vector<double> got = none.to_vector<double>();
  for (size_t m = 0; m < 6; ++m) EXPECT_NEAR(got[m], ref[m], 1e-12) << "row " << m;
  EXPECT_NEAR(cross_entropy(logits, targets, -100, "sum").item(), total, 1e-12);
  EXPECT_NEAR(cross_entropy(logits, targets).item(), total / 4.0, 1e-12);  // 4 non-ignored targets
}

TEST(NnOpsCrossEntropy, GradcheckWithIgnoredTargets) {
  Generator gen(5);
  Tensor logits = Tensor::randn({2, 3, 5}, gen, kF64);
  Tensor targets = int64_tensor({4, 3, 0, 3, 1, 3}, {2, 3});  // ignore_index 3: three rows ignored
  for (const std::string reduction : {"mean", "sum", "none"}) {
    SCOPED_TRACE(reduction);
    expect_gradcheck([&](const std::vector<Tensor>& in) { return cross_entropy(in[0], targets, 3, reduction); },
                     {logits});
  }
  // Ignored rows get exactly zero gradient.
  Tensor l = logits.detach().clone().requires_grad_();
  cross_entropy(l, targets, 3).backward();
  for (int64_t c = 0; c < 5; ++c) EXPECT_EQ(l.grad().at({0, 1, c}), 0.0);
}

TEST(NnOpsCrossEntropy, WeightedLossIsTheWeightedMean) {
  Generator gen(7);
  const int64_t C = 6;
  const Tensor logits = Tensor::randn({5, C}, gen, DType::Float64, 0.0, 2.0);
  const Tensor targets = int64_tensor({1, 5, -100, 0, 3}, {5});
  const Tensor weight = Tensor::from_vector<double>({2.0, 0.5, 7.0, 1.0, 3.0}, {5});
  const std::vector<double> x = logits.to_vector<double>(), w = weight.to_vector<double>();
  const std::vector<int64_t> t = targets.to_vector<int64_t>();
  double weighted = 0.0, total_weight = 0.0;
  std::vector<double> ref(5, 0.0);
  for (size_t m = 0; m < 5; ++m) {
    if (t[m] == -100) continue;  // its weight 7 counts nowhere
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(x[m * C + static_cast<size_t>(c)]);
    ref[m] = w[m] * (std::log(s) - x[m * C + static_cast<size_t>(t[m])]);
    weighted += ref[m];
    total_weight += w[m];
  }
  const std::vector<double> none = cross_entropy(logits, targets, -100, "none", weight).to_vector<double>();
  for (size_t m = 0; m < 5; ++m) EXPECT_NEAR(none[m], ref[m], 1e-12) << "row " << m;
  EXPECT_NEAR(cross_entropy(logits, targets, -100, "sum", weight).item(), weighted, 1e-12);
  EXPECT_NEAR(cross_entropy(logits, targets, -100, "mean", weight).item(), weighted / total_weight, 1e-12);
  // Unit weights are the unweighted loss, bit for bit, with the same gradient.
  Tensor a = logits.detach().clone().requires_grad_(), b = logits.detach().clone().requires_grad_();
  Tensor la = cross_entropy(a, targets), lb = cross_entropy(b, targets, -100, "mean", Tensor::ones({5}, DType::Float64));
  EXPECT_EQ(la.item(), lb.item());
  la.backward();
  lb.backward();
  EXPECT_EQ(a.grad().to_vector<double>(), b.grad().to_vector<double>());
  for (const std::string reduction : {"mean", "sum", "none"}) {
    SCOPED_TRACE(reduction);
    expect_gradcheck(
        [&](const std::vector<Tensor>& in) { return cross_entropy(in[0], targets, -100, reduction, weight); },
        {logits.detach().clone().requires_grad_()});
  }
  // All weight on ignored or zero-weight targets: 0, as for a fully ignored batch.
  EXPECT_EQ(cross_entropy(logits, targets, -100, "mean", Tensor::zeros({5}, DType::Float64)).item(), 0.0);
}

TEST(NnOpsCrossEntropy, WeightErrorsNameTheProblem) {
  const Tensor logits = Tensor::zeros({2, 3, 5}, DType::Float64);
  const Tensor targets = int64_tensor({0, 1, 2, 3, 4, 0}, {2, 3});
  std::string msg = error_message([&] { cross_entropy(logits, targets, -100, "mean", Tensor::ones({6}, DType::Float64)); });
  EXPECT_NE(msg.find("[2, 3]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[6]"), std::string::npos) << msg;
  msg = error_message([&] { cross_entropy(logits, targets, -100, "mean", Tensor::ones({2, 3}, DType::Float32)); });
  EXPECT_NE(msg.find("float32"), std::string::npos) << msg;
  msg = error_message([&] {
    cross_entropy(logits, targets, -100, "mean", Tensor::from_vector<double>({1, 1, 1, 1, -2, 1}, {2, 3}));
  });
  EXPECT_NE(msg.find("weight -2 at position 4"), std::string::npos) << msg;
  msg = error_message([&] { cross_entropy(logits, targets, -100, "mean", Tensor::ones({2, 3}, kF64)); });
  EXPECT_NE(msg.find("no gradient"), std::string::npos) << msg;
}

TEST(NnOpsCrossEntropy, AllIgnoredMeanIsZero) {
  Tensor logits = Tensor::zeros({3, 4}, kF64);
  Tensor loss = cross_entropy(logits, int64_tensor({-100, -100, -100}, {3}));
  EXPECT_EQ(loss.item(), 0.0);
  loss.backward();
  for (double g : logits.grad().to_vector<double>()) EXPECT_EQ(g, 0.0);
}

TEST(NnOpsCrossEntropy, Float32LargeVocabularyIsAccurate) {
  Generator gen(6);
  Tensor logits = Tensor::randn({3, 50257}, gen, DType::Float32, 0.0, 4.0);
  Tensor targets = int64_tensor({17, 50256, 0}, {3});
  const std::vector<double> got = cross_entropy(logits, targets, -100, "none").to_vector<double>();
  const std::vector<double> ref = cross_entropy(logits.to(DType::Float64), targets, -100, "none").to_vector<double>();
  for (size_t m = 0; m < 3; ++m) EXPECT_NEAR(got[m], ref[m], 1e-5 * std::abs(ref[m]) + 1e-5);
}

TEST(NnOpsCrossEntropy, ErrorsNameTheOffendingTarget) {
  Tensor logits = Tensor::zeros({2, 3, 5});
  const std::string msg = error_message([&] { cross_entropy(logits, int64_tensor({0, 1, 2, 3, 7, 4}, {2, 3})); });
  EXPECT_NE(msg.find("target 7"), std::string::npos) << msg;
  EXPECT_NE(msg.find("position 4"), std::string::npos) << msg;
  EXPECT_NE(error_message([&] { cross_entropy(logits, int64_tensor({0, -1, 0, 0, 0, 0}, {2, 3})); }).find("target -1"),
            std::string::npos);
  EXPECT_NE(error_message([&] { cross_entropy(logits, int64_tensor({0, 0}, {2})); }).find("[2, 3, 5]"), std::string::npos);
  EXPECT_NE(error_message([&] { cross_entropy(logits, int64_tensor({0, 0, 0, 0, 0, 0}, {2, 3}), -100, "avg"); })
                .find("avg"),
            std::string::npos);
}

// ---------------------------------------------------------------- layer_norm

TEST(NnOpsLayerNorm, ForwardMatchesNaive) {
  Generator gen(7);
  const int64_t K = 33;
  Tensor x = Tensor::randn({2, 3, K}, gen, DType::Float64, 5.0, 2.0);
  Tensor w = Tensor::randn({K}, gen, DType::Float64);
  Tensor b = Tensor::randn({K}, gen, DType::Float64);
  const std::vector<double> xv = x.to_vector<double>(), wv = w.to_vector<double>(), bv = b.to_vector<double>();
  const std::vector<double> y = layer_norm(x, w, b, 1e-5).to_vector<double>();
  const std::vector<double> y_plain = layer_norm(x, Tensor(), Tensor(), 1e-5).to_vector<double>();
  for (size_t r = 0; r < 6; ++r) {
    const double* xr = xv.data() + r * K;
    double mean = 0.0, var = 0.0;
    for (int64_t k = 0; k < K; ++k) mean += xr[k] / K;
    for (int64_t k = 0; k < K; ++k) var += (xr[k] - mean) * (xr[k] - mean) / K;
    for (int64_t k = 0; k < K; ++k) {
      const double xhat = (xr[k] - mean) / std::sqrt(var + 1e-5);
      EXPECT_NEAR(y[r * K + k], xhat * wv[k] + bv[k], 1e-12);
      EXPECT_NEAR(y_plain[r * K + k], xhat, 1e-12);
    }
  }
}

TEST(NnOpsLayerNorm, Gradcheck) {
  Generator gen(8);
  for (const Shape& shape : {Shape{2, 3, 7}, Shape{2, 33}}) {
    SCOPED_TRACE("shape " + shape_str(shape));
    const int64_t K = shape.back();
    Tensor x = Tensor::randn(shape, gen, kF64);
    Tensor w = Tensor::randn({K}, gen, kF64);
    Tensor b = Tensor::randn({K}, gen, kF64);
    expect_gradcheck([](const std::vector<Tensor>& in) { return layer_norm(in[0], in[1], in[2]); }, {x, w, b});
    expect_gradcheck([](const std::vector<Tensor>& in) { return layer_norm(in[0], Tensor(), Tensor()); }, {x});
    expect_gradcheck([](const std::vector<Tensor>& in) { return layer_norm(in[0], in[1], Tensor()); }, {x, w});
  }
}

// dweight/dbias are column sums over rows: the same bits on one thread and on several.
TEST(NnOpsLayerNorm, BackwardIsBitwiseIndependentOfThreadCount) {
  Generator gen(9);
  Tensor x = Tensor::randn({1001, 96}, gen, DType::Float32);
  Tensor w = Tensor::randn({96}, gen, DType::Float32);
  Tensor b = Tensor::randn({96}, gen, DType::Float32);
  Tensor dy = Tensor::randn({1001, 96}, gen, DType::Float32);
  expect_same_on_one_and_many_threads([&] {
    std::vector<Tensor> ps{x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(),
                           b.detach().clone().requires_grad_()};
    layer_norm(ps[0], ps[1], ps[2]).backward(dy);
    std::vector<std::vector<float>> out;
    for (auto& p : ps) out.push_back(p.grad().to_vector<float>());
    return out;
  });
}

// ---------------------------------------------------------------- embedding

TEST(NnOpsEmbedding, ForwardGathersRows) {
  Generator gen(10);
  Tensor w = Tensor::randn({6, 5}, gen, DType::Float32);
  Tensor idx = int64_tensor({5, 0, 5, 2}, {2, 2});
  Tensor y = embedding(w, idx);
  ASSERT_EQ(y.shape(), (Shape{2, 2, 5}));
  const std::vector<int64_t> iv = idx.to_vector<int64_t>();
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t e = 0; e < 5; ++e) EXPECT_EQ(y.at({i / 2, i % 2, e}), w.at({iv[static_cast<size_t>(i)], e}));
}

TEST(NnOpsEmbedding, GradcheckWithRepeatedIndices) {
  Generator gen(11);
  Tensor w = Tensor::randn({7, 3}, gen, kF64);
  Tensor idx = int64_tensor({1, 4, 1, 6, 1, 4, 0, 2, 2}, {3, 3});
  expect_gradcheck([&](const std::vector<Tensor>& in) { return embedding(in[0], idx); }, {w});
  // Scatter-add: row 1 appears three times, row 3 never.
  Tensor wl = w.detach().clone().requires_grad_();
  embedding(wl, idx).backward(Tensor::ones({3, 3, 3}, DType::Float64));
  EXPECT_EQ(wl.grad().at({1, 0}), 3.0);
  EXPECT_EQ(wl.grad().at({3, 2}), 0.0);
}

TEST(NnOpsEmbedding, BackwardIsBitwiseIndependentOfThreadCount) {
  Generator gen(12);
  Tensor w = Tensor::randn({50, 160}, gen, DType::Float32).requires_grad_();
  std::vector<int64_t> iv(4000);
  for (auto& i : iv) i = static_cast<int64_t>(gen.next_below(50));
  Tensor idx = int64_tensor(iv, {4000});
  Tensor dy = Tensor::randn({4000, 160}, gen, DType::Float32);
  expect_same_on_one_and_many_threads([&] {
    w.set_grad(Tensor());
    embedding(w, idx).backward(dy);
    return w.grad().to_vector<float>();
  });
}

TEST(NnOpsEmbedding, ErrorsNameTheOffendingIndex) {
  Tensor w = Tensor::zeros({4, 2});
  const std::string msg = error_message([&] { embedding(w, int64_tensor({0, 3, 4}, {3})); });
  EXPECT_NE(msg.find("index 4"), std::string::npos) << msg;
  EXPECT_NE(msg.find("position 2"), std::string::npos) << msg;
  EXPECT_NE(error_message([&] { embedding(w, int64_tensor({-2}, {1})); }).find("index -2"), std::string::npos);
  EXPECT_NE(error_message([&] { embedding(w, Tensor::zeros({3})); }).find("int64"), std::string::npos);
}

// ---------------------------------------------------------------- dropout

TEST(NnOpsDropout, MaskIsPhiloxWordPerElement) {
  Generator gen(13);
  const double p = 0.3;
  Tensor x = Tensor::randn({3, 67}, gen, DType::Float64);
  const uint64_t seed = 0x0123456789abcdefull;
  const uint32_t offset = 77;
  const std::vector<double> xv = x.to_vector<double>();
  const std::vector<double> y = dropout(x, p, true, seed, offset).to_vector<double>();
  for (size_t i = 0; i < xv.size(); ++i) {
    const bool keep = philox_word(seed, offset, i) >= dropout_threshold(p);
    EXPECT_EQ(y[i], keep ? xv[i] * (1.0 / (1.0 - p)) : 0.0) << "element " << i;
  }
}

TEST(NnOpsDropout, SameSeedAndOffsetRepeatDifferentOffsetDiffers) {
  Generator gen(14);
  Tensor x = Tensor::ones({1000});
  const std::vector<float> a = dropout(x, 0.5, true, 42, 3).to_vector<float>();
  EXPECT_EQ(a, dropout(x, 0.5, true, 42, 3).to_vector<float>());
  EXPECT_NE(a, dropout(x, 0.5, true, 42, 4).to_vector<float>());
  EXPECT_NE(a, dropout(x, 0.5, true, 43, 3).to_vector<float>());
}

TEST(NnOpsDropout, KeptFractionIsOneMinusP) {
  const double p = 0.3;
  const int64_t n = 1000000;
  const std::vector<float> y = dropout(Tensor::ones({n}), p, true, 7, 0).to_vector<float>();
  int64_t kept = 0;
  for (float v : y) {
    if (v != 0.0f) {
      ASSERT_FLOAT_EQ(v, static_cast<float>(1.0 / (1.0 - p)));
      ++kept;
    }
  }
  EXPECT_NEAR(static_cast<double>(kept) / n, 1.0 - p, 0.005);
}

TEST(NnOpsDropout, IdentityWhenEvaluatingOrPZero) {
  Tensor x = Tensor::ones({5});
  EXPECT_TRUE(dropout(x, 0.5, false, 1, 1).same(x));
  EXPECT_TRUE(dropout(x, 0.0, true, 1, 1).same(x));
  EXPECT_NE(error_message([&] { dropout(x, 1.0, true, 1, 1); }).find("p must be in [0, 1)"), std::string::npos);
}

TEST(NnOpsDropout, Gradcheck) {
  Generator gen(15);
  Tensor x = Tensor::randn({4, 9}, gen, kF64);
  // The mask is a pure function of (seed, offset), so finite differences see the same mask.
  expect_gradcheck([](const std::vector<Tensor>& in) { return dropout(in[0], 0.3, true, 99, 5); }, {x});
}

// ---------------------------------------------------------------- rotary

// x as the model passes k: a strided [B, N, H, D] view of a fused [B, N, 3, H, D] projection.
Tensor middle_of_fused(const Tensor& fused) {
  return reshape(narrow(fused, 2, 1, 1), {fused.size(0), fused.size(1), fused.size(3), fused.size(4)});
}

TEST(NnOpsRotary, ForwardOnAStridedViewMatchesNaive) {
  // B * N rows are enough for both threads to take a share.
  const int64_t B = 3, N = 67, H = 3, D = 6;
  for (DType dt : {DType::Float64, DType::Float32}) {
    SCOPED_TRACE(dtype_name(dt));
    Generator gen(21);
    const Tensor fused = Tensor::randn({B, N, 3, H, D}, gen, dt);
    const Tensor cos = Tensor::randn({N, D / 2}, gen, dt), sin = Tensor::randn({N, D / 2}, gen, dt);
    const Tensor x = middle_of_fused(fused);
    ASSERT_FALSE(x.is_contiguous());
    const Tensor y = rotary(x, cos, sin);
    ASSERT_TRUE(y.is_contiguous());
    ASSERT_EQ(y.shape(), x.shape());
    const double tol = dt == DType::Float64 ? 1e-14 : 1e-5;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < N; ++t)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < D / 2; ++i) {
            const double x0 = x.at({b, t, h, 2 * i}), x1 = x.at({b, t, h, 2 * i + 1});
            const double c = cos.at({t, i}), s = sin.at({t, i});
            ASSERT_NEAR(y.at({b, t, h, 2 * i}), x0 * c - x1 * s, tol * (1 + std::abs(x0 * c) + std::abs(x1 * s)));
            ASSERT_NEAR(y.at({b, t, h, 2 * i + 1}), x1 * c + x0 * s, tol * (1 + std::abs(x1 * c) + std::abs(x0 * s)));
          }
  }
}

TEST(NnOpsRotary, GradcheckThroughAStridedView) {
  Generator gen(22);
  const Tensor fused = Tensor::randn({2, 5, 3, 3, 4}, gen, kF64);
  // Independent (cos, sin) entries are scaled rotations, as XPOS folds a scale into both tables:
  // the adjoint must keep the scale and negate only the angle.
  const Tensor cos = Tensor::randn({5, 2}, gen, DType::Float64), sin = Tensor::randn({5, 2}, gen, DType::Float64);
  expect_gradcheck([&](const std::vector<Tensor>& in) { return rotary(middle_of_fused(in[0]), cos, sin); }, {fused});
  expect_gradcheck([&](const std::vector<Tensor>& in) { return rotary(in[0], cos, sin); },
                   {Tensor::randn({1, 5, 2, 4}, gen, kF64)});
}

TEST(NnOpsRotary, ErrorsNameTheTablesAndShapes) {
  Generator gen(23);
  const Tensor x = Tensor::randn({2, 5, 3, 4}, gen, DType::Float64);
  const Tensor table = Tensor::randn({5, 2}, gen, DType::Float64);
  std::string msg = error_message([&] { rotary(x, Tensor::randn({4, 2}, gen, DType::Float64), table); });
  EXPECT_NE(msg.find("[5, 2]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[4, 2]"), std::string::npos) << msg;
  msg = error_message([&] { rotary(Tensor::randn({2, 5, 3, 3}, gen, DType::Float64), table, table); });
  EXPECT_NE(msg.find("D even"), std::string::npos) << msg;
  msg = error_message([&] { rotary(x, table.detach().requires_grad_(), table); });
  EXPECT_NE(msg.find("no gradient"), std::string::npos) << msg;
}
