// One float64 finite-difference check per differentiable op, on shapes that expose indexing bugs:
// odd sizes, broadcasting, batched and non-square matmuls, ragged attention segments.
#include "dilatron/attention.h"
#include "dilatron/gradcheck.h"
#include "dilatron/ops.h"
#include "dilatron/random.h"

namespace dilatron {
namespace {

using Inputs = std::vector<Tensor>;
using Fn = std::function<Tensor(const Inputs&)>;

Tensor input(const Shape& shape, uint64_t seed) {
  Generator gen(seed);
  return Tensor::randn(shape, gen, TensorOptions(DType::Float64).with_requires_grad());
}
// Values bounded away from zero (for log, sqrt, div, abs, relu kinks).
Tensor positive(const Shape& shape, uint64_t seed) {
  Generator gen(seed);
  return Tensor::uniform(shape, 0.5, 2.0, gen, TensorOptions(DType::Float64).with_requires_grad());
}
Tensor away_from_zero(const Shape& shape, uint64_t seed) {
  Generator gen(seed);
  Tensor mag = Tensor::uniform(shape, 0.2, 1.5, gen, DType::Float64);
  Tensor sign = Tensor::uniform(shape, -1.0, 1.0, gen, DType::Float64);
  Tensor x = where(gt(sign, Tensor::scalar(0.0, DType::Float64)), mag, neg(mag)).detach();
  return x.requires_grad_(true);
}
Tensor indices(const std::vector<int64_t>& v) { return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}); }

GradcheckCase make(std::string op, Fn f, std::function<Inputs()> inputs) {
  return {std::move(op), [f = std::move(f), inputs = std::move(inputs)] { return gradcheck(f, inputs()); }};
}

std::vector<GradcheckCase> build_cases() {
  std::vector<GradcheckCase> c;
  auto two = [](const Shape& a, const Shape& b) { return [a, b] { return Inputs{input(a, 1), input(b, 2)}; }; };
  auto one = [](const Shape& a) { return [a] { return Inputs{input(a, 3)}; }; };
  c.push_back(make("add", [](const Inputs& x) { return add(x[0], x[1]); }, two({3, 1, 5}, {4, 1})));
  c.push_back(make("sub", [](const Inputs& x) { return sub(x[0], x[1]); }, two({2, 3}, {3})));
  c.push_back(make("mul", [](const Inputs& x) { return mul(x[0], x[1]); }, two({3, 1, 5}, {4, 5})));
  c.push_back(make("div", [](const Inputs& x) { return div(x[0], x[1]); },
                   [] { return Inputs{input({5, 3}, 1), positive({5, 1}, 2)}; }));
  c.push_back(make("neg", [](const Inputs& x) { return neg(x[0]); }, one({7})));
  c.push_back(make("scalar ops", [](const Inputs& x) { return rsub(mul(add(x[0], 1.5), 0.5), 2.0); }, one({3, 4})));
  c.push_back(make("rdiv", [](const Inputs& x) { return rdiv(x[0], 3.0); }, [] { return Inputs{positive({6}, 4)}; }));
  c.push_back(make("pow", [](const Inputs& x) { return pow(x[0], 2.5); }, [] { return Inputs{positive({2, 5}, 5)}; }));
  c.push_back(make("exp", [](const Inputs& x) { return exp(x[0]); }, one({3, 5})));
  c.push_back(make("log", [](const Inputs& x) { return log(x[0]); }, [] { return Inputs{positive({3, 5}, 6)}; }));
  c.push_back(make("tanh", [](const Inputs& x) { return tanh(x[0]); }, one({3, 5})));
  c.push_back(make("sigmoid", [](const Inputs& x) { return sigmoid(x[0]); }, one({3, 5})));
  c.push_back(make("sqrt", [](const Inputs& x) { return sqrt(x[0]); }, [] { return Inputs{positive({9}, 7)}; }));
  c.push_back(make("rsqrt", [](const Inputs& x) { return rsqrt(x[0]); }, [] { return Inputs{positive({9}, 8)}; }));
  c.push_back(make("abs", [](const Inputs& x) { return abs(x[0]); }, [] { return Inputs{away_from_zero({11}, 9)}; }));
  c.push_back(make("relu", [](const Inputs& x) { return relu(x[0]); }, [] { return Inputs{away_from_zero({11}, 10)}; }));
  c.push_back(make("gelu", [](const Inputs& x) { return gelu(x[0]); }, one({4, 7})));
  c.push_back(make("gelu(tanh)", [](const Inputs& x) { return gelu(x[0], "tanh"); }, one({4, 7})));
  c.push_back(make("maximum", [](const Inputs& x) { return maximum(x[0], x[1]); }, two({3, 4}, {4})));
  c.push_back(make("where", [](const Inputs& x) { return where(gt(x[2], x[1].detach()), x[0], x[1]); },
                   [] { return Inputs{input({3, 5}, 1), input({5}, 2), input({3, 1}, 3).detach()}; }));
  c.push_back(make("masked_fill",
                   [](const Inputs& x) { return masked_fill(x[0], gt(x[1], Tensor::scalar(0.0, DType::Float64)), -2.0); },
                   [] { return Inputs{input({4, 5}, 1), input({5}, 2).detach()}; }));
  c.push_back(make("matmul", [](const Inputs& x) { return matmul(x[0], x[1]); }, two({5, 3}, {3, 7})));
  c.push_back(make("matmul(batched, broadcast)", [](const Inputs& x) { return matmul(x[0], x[1]); },
                   two({2, 1, 3, 4}, {5, 4, 2})));
  c.push_back(make("matmul(1-d)", [](const Inputs& x) { return matmul(x[0], x[1]); }, two({4}, {4, 3})));
  c.push_back(make("transpose", [](const Inputs& x) { return mul(transpose(x[0], 0, 2), x[1]); },
                   two({2, 3, 4}, {4, 3, 2})));
  c.push_back(make("permute", [](const Inputs& x) { return mul(permute(x[0], {2, 0, 3, 1}), 1.0); },
                   one({2, 3, 4, 5})));
  c.push_back(make("reshape", [](const Inputs& x) { return reshape(transpose(x[0], 0, 1), {-1, 5}); }, one({3, 5, 2})));
  c.push_back(make("narrow", [](const Inputs& x) { return narrow(x[0], 1, 1, 3); }, one({3, 5, 2})));
  c.push_back(make("cat", [](const Inputs& x) { return cat({x[0], x[1]}, 1); }, two({2, 3, 4}, {2, 1, 4})));
  c.push_back(make("split", [](const Inputs& x) { auto p = split(x[0], 2, 1); return mul(p[0], p[2].sum()); },
                   one({3, 5})));
  c.push_back(make("expand", [](const Inputs& x) { return expand(x[0], {4, 3, 5}); }, one({3, 1})));
  c.push_back(make("sum", [](const Inputs& x) { return sum(x[0], {0, 2}, true); }, one({3, 4, 5})));
  c.push_back(make("mean", [](const Inputs& x) { return mean(x[0], {-1}); }, one({3, 4, 5})));
  c.push_back(make("softmax", [](const Inputs& x) { return softmax(x[0], 1); }, one({3, 7, 2})));
  c.push_back(make("log_softmax", [](const Inputs& x) { return log_softmax(x[0], -1); }, one({5, 9})));
  c.push_back(make("cross_entropy", [](const Inputs& x) { return cross_entropy(x[0], indices({3, 0, -100, 6, 2}), -100); },
                   one({5, 7})));
  c.push_back(make("cross_entropy(weighted)",
                   [](const Inputs& x) { return cross_entropy(x[0], indices({3, 0, -100, 6, 2}), -100, "mean", x[1]); },
                   [] { return Inputs{input({5, 7}, 3), positive({5}, 4).detach()}; }));
  c.push_back(make("layer_norm", [](const Inputs& x) { return layer_norm(x[0], x[1], x[2]); },
                   [] { return Inputs{input({3, 2, 7}, 1), input({7}, 2), input({7}, 3)}; }));
  c.push_back(make("embedding", [](const Inputs& x) { return embedding(x[0], Tensor::from_vector<int64_t>({4, 1, 4, 0, 2, 4}, {2, 3})); },
                   one({5, 3})));
  c.push_back(make("dropout", [](const Inputs& x) { return dropout(x[0], 0.3, true, 1234, 7); }, one({6, 11})));
  c.push_back(make("rotary", [](const Inputs& x) { return rotary(narrow(x[0], 2, 1, 3), x[1], x[2]); },
                   [] { return Inputs{input({2, 3, 5, 6}, 1), input({3, 3}, 2).detach(), input({3, 3}, 3).detach()}; }));
  c.push_back(make("dilated_attention",
                   [](const Inputs& x) {
                     DilatedAttentionOptions o;
                     o.schedule = {{4, 1}, {8, 2}, {16, 4}};
                     o.causal = true;
                     o.dropout = 0.2;
                     o.seed = 99;
                     o.bias_num_buckets = 6;
                     o.bias_max_distance = 12;
                     return dilated_attention(x[0], x[1], x[2], o, x[3]);
                   },
                   [] { return Inputs{input({1, 13, 3, 4}, 1), input({1, 13, 3, 4}, 2), input({1, 13, 3, 4}, 3),
                                      input({3, 6}, 4)}; }));
  return c;
}

}  // namespace

const std::vector<GradcheckCase>& builtin_gradcheck_cases() {
  static const std::vector<GradcheckCase> cases = build_cases();
  return cases;
}

}  // namespace dilatron
