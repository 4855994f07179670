// Modules (naming, modes, layers), optimizers, gradient clipping, LR schedules, and a small
// end-to-end training run.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <numbers>
#include <string>
#include <vector>

#include "dilatron/autograd.h"
#include "dilatron/nn.h"
#include "dilatron/ops.h"
#include "dilatron/optim.h"
#include "dilatron/random.h"

using namespace dilatron;

namespace {

std::vector<std::string> names_of(const nn::NamedParameters& params) {
  std::vector<std::string> names;
  for (const auto& [name, p] : params) names.push_back(name);
  return names;
}

struct Attention : nn::Module {
  std::shared_ptr<nn::Linear> qkv, proj;
  Attention(Generator& gen) {
    qkv = register_module("qkv", std::make_shared<nn::Linear>(4, 12, gen));
    proj = register_module("proj", std::make_shared<nn::Linear>(4, 4, gen, false));
  }
};

struct Block : nn::Module {
  std::shared_ptr<nn::LayerNorm> ln;
  std::shared_ptr<Attention> attn;
  std::shared_ptr<nn::Dropout> drop;
  Tensor scale;
  Block(Generator& gen, std::shared_ptr<Generator> dropout_gen) {
    ln = register_module("ln", std::make_shared<nn::LayerNorm>(4));
    attn = register_module("attn", std::make_shared<Attention>(gen));
    scale = register_parameter("scale", Tensor::ones({1}));  // own parameters list before children
    drop = register_module("drop", std::make_shared<nn::Dropout>(0.5, std::move(dropout_gen)));
  }
};

struct Model : nn::Module {
  std::shared_ptr<nn::Embedding> tok;
  std::vector<std::shared_ptr<Block>> blocks;
  Model(Generator& gen, std::shared_ptr<Generator> dropout_gen) {
    tok = register_module("tok", std::make_shared<nn::Embedding>(10, 4, gen, 0.02));
    auto list = register_module("blocks", std::make_shared<nn::Module>());
    for (int i = 0; i < 2; ++i)
      blocks.push_back(list->register_module(std::to_string(i), std::make_shared<Block>(gen, dropout_gen)));
  }
};

// Sets p.grad to the given values (p's shape and dtype).
void set_grad(Tensor p, const std::vector<double>& g) { p.set_grad(Tensor::from_vector(g, p.shape(), p.dtype())); }

}  // namespace

// ---------------------------------------------------------------- modules

TEST(NnModule, HierarchicalNamesInRegistrationOrder) {
  Generator gen(1);
  Model model(gen, std::make_shared<Generator>(2));
  const std::vector<std::string> expected{
      "tok.weight",
      "blocks.0.scale", "blocks.0.ln.weight", "blocks.0.ln.bias",
      "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
      "blocks.1.scale", "blocks.1.ln.weight", "blocks.1.ln.bias",
      "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight"};
  EXPECT_EQ(names_of(model.named_parameters()), expected);
  EXPECT_EQ(model.num_parameters(), 10 * 4 + 2 * (1 + 4 + 4 + 48 + 12 + 16));
  const auto params = model.parameters();
  ASSERT_EQ(params.size(), expected.size());
  EXPECT_TRUE(params[4].same(model.blocks[0]->attn->qkv->weight));
  for (const auto& p : params) EXPECT_TRUE(p.requires_grad() && p.is_leaf());
}

TEST(NnModule, RejectsDuplicateAndDottedNames) {
  nn::Module m;
  m.register_parameter("w", Tensor::zeros({2}));
  EXPECT_THROW(m.register_parameter("w", Tensor::zeros({2})), Error);
  EXPECT_THROW(m.register_module("w", std::make_shared<nn::Module>()), Error);
  EXPECT_THROW(m.register_parameter("a.b", Tensor::zeros({2})), Error);
}

TEST(NnModule, TrainEvalIsRecursive) {
  Generator gen(3);
  Model model(gen, std::make_shared<Generator>(4));
  EXPECT_TRUE(model.blocks[1]->drop->is_training());
  model.eval();
  EXPECT_FALSE(model.is_training());
  EXPECT_FALSE(model.blocks[1]->drop->is_training());
  EXPECT_FALSE(model.blocks[0]->attn->qkv->is_training());
  model.train();
  EXPECT_TRUE(model.blocks[0]->attn->proj->is_training());
}

TEST(NnModule, ZeroGradDropsEveryGradient) {
  Generator gen(5);
  nn::Linear lin(3, 2, gen);
  sum(lin.forward(Tensor::ones({4, 3}))).backward();
  EXPECT_TRUE(lin.weight.grad().defined() && lin.bias.grad().defined());
  lin.zero_grad();
  EXPECT_FALSE(lin.weight.grad().defined() || lin.bias.grad().defined());
}

TEST(NnModule, LinearMatchesNaiveAndPyTorchInit) {
  Generator gen(6);
  nn::Linear lin(5, 3, gen, true, DType::Float64);
  EXPECT_EQ(lin.weight.shape(), (Shape{3, 5}));
  const double bound = 1.0 / std::sqrt(5.0);
  for (double w : lin.weight.to_vector<double>()) EXPECT_LE(std::abs(w), bound);
  for (double b : lin.bias.to_vector<double>()) EXPECT_LE(std::abs(b), bound);
  Tensor x = Tensor::randn({2, 4, 5}, gen, DType::Float64);
  Tensor y = lin.forward(x);
  ASSERT_EQ(y.shape(), (Shape{2, 4, 3}));
  for (int64_t a = 0; a < 2; ++a)
    for (int64_t t = 0; t < 4; ++t)
      for (int64_t o = 0; o < 3; ++o) {
        double ref = lin.bias.at({o});
        for (int64_t i = 0; i < 5; ++i) ref += x.at({a, t, i}) * lin.weight.at({o, i});
        EXPECT_NEAR(y.at({a, t, o}), ref, 1e-12);
      }
}

TEST(NnModule, EmbeddingInitStd) {
  Generator gen(7);
  nn::Embedding emb(1000, 64, gen, 0.02);
  const std::vector<double> w = emb.weight.to_vector<double>();
  double ss = 0.0;
  for (double v : w) ss += v * v;
  EXPECT_NEAR(std::sqrt(ss / static_cast<double>(w.size())), 0.02, 0.001);
}

TEST(NnModule, DropoutTakesOneOffsetPerTrainingCall) {
  auto dgen = std::make_shared<Generator>(8);
  nn::Dropout drop(0.5, dgen);
  Tensor x = Tensor::ones({256});
  const std::vector<float> a = drop.forward(x).to_vector<float>();
  EXPECT_EQ(dgen->offset(), 1u);
  EXPECT_EQ(a, dropout(x, 0.5, true, 8, 0).to_vector<float>());
  EXPECT_NE(a, drop.forward(x).to_vector<float>());  // offset 1: a new mask
  drop.eval();
  EXPECT_TRUE(drop.forward(x).same(x));
  EXPECT_EQ(dgen->offset(), 2u);
}

TEST(NnModule, SequentialNamesLayersByIndex) {
  Generator gen(9);
  nn::Sequential seq;
  seq.append(std::make_shared<nn::Linear>(2, 8, gen))
      .append([](const Tensor& x) { return relu(x); })
      .append(std::make_shared<nn::Linear>(8, 3, gen));
  EXPECT_EQ(names_of(seq.named_parameters()), (std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"}));
  EXPECT_EQ(seq.forward(Tensor::ones({5, 2})).shape(), (Shape{5, 3}));
}

// ---------------------------------------------------------------- optimizers

TEST(Optim, AdamWMatchesHandComputedReference) {
  const double lr = 0.1, b1 = 0.9, b2 = 0.99, eps = 1e-8, wd = 0.05;
  const std::vector<double> p0{0.5, -1.0, 2.0};
  const std::vector<std::vector<double>> grads{{0.1, -0.2, 0.3}, {0.4, 0.1, -0.5}, {-0.3, 0.2, 0.05}};
  for (DType dt : {DType::Float64, DType::Float32}) {
    Tensor p = Tensor::from_vector(p0, {3}, TensorOptions(dt).with_requires_grad());
    optim::AdamW opt({{"p", p}}, {lr, b1, b2, eps, wd});
    std::vector<double> ref = p0, m(3, 0.0), v(3, 0.0);
    for (int t = 1; t <= 3; ++t) {
      set_grad(p, grads[static_cast<size_t>(t - 1)]);
      opt.step();
      for (size_t i = 0; i < 3; ++i) {
        const double g = grads[static_cast<size_t>(t - 1)][i];
        ref[i] -= lr * wd * ref[i];
        m[i] = b1 * m[i] + (1 - b1) * g;
        v[i] = b2 * v[i] + (1 - b2) * g * g;
        const double mhat = m[i] / (1 - std::pow(b1, t)), vhat = v[i] / (1 - std::pow(b2, t));
        ref[i] -= lr * mhat / (std::sqrt(vhat) + eps);
      }
      const std::vector<double> got = p.to_vector<double>();
      for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(got[i], ref[i], dt == DType::Float64 ? 1e-12 : 1e-6) << "step " << t;
    }
    EXPECT_EQ(opt.step_count(), 3);
    const std::vector<double> got_m = opt.state("p", "m").to_vector<double>();
    for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(got_m[i], m[i], 1e-7);
  }
}

TEST(Optim, WeightDecayGroupsSkipVectors) {
  Generator gen(10);
  nn::Linear lin(4, 3, gen);
  nn::LayerNorm ln(3);
  nn::NamedParameters params = lin.named_parameters();
  for (auto& [name, p] : ln.named_parameters()) params.emplace_back("ln." + name, p);
  const auto groups = optim::weight_decay_groups(params, 0.1, 0.5);
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(names_of(groups[0].params), (std::vector<std::string>{"weight"}));
  EXPECT_EQ(names_of(groups[1].params), (std::vector<std::string>{"bias", "ln.weight", "ln.bias"}));
  EXPECT_EQ(groups[1].weight_decay, 0.0);

  // With zero gradients AdamW moves a parameter only through its weight decay.
  const std::vector<double> w0 = lin.weight.to_vector<double>(), b0 = lin.bias.to_vector<double>();
  optim::AdamW opt(groups);
  for (auto& [name, p] : params) p.set_grad(Tensor::zeros(p.shape()));
  opt.step();
  const std::vector<double> w1 = lin.weight.to_vector<double>(), b1 = lin.bias.to_vector<double>();
  for (size_t i = 0; i < w0.size(); ++i) EXPECT_NEAR(w1[i], w0[i] * (1.0 - 0.1 * 0.5), 1e-7);
  EXPECT_EQ(b1, b0);
}

TEST(Optim, SGDMomentumAndNesterovMatchReference) {
  const double lr = 0.1, mu = 0.9, wd = 0.01;
  const std::vector<std::vector<double>> grads{{1.0, -2.0}, {0.5, 0.5}, {-1.0, 0.25}};
  for (bool nesterov : {false, true}) {
    Tensor p = Tensor::from_vector(std::vector<double>{1.0, 2.0}, {2}, TensorOptions(DType::Float64).with_requires_grad());
    optim::SGD opt({{"p", p}}, {lr, mu, wd, nesterov});
    std::vector<double> ref{1.0, 2.0}, buf(2, 0.0);
    for (const auto& g : grads) {
      set_grad(p, g);
      opt.step();
      for (size_t i = 0; i < 2; ++i) {
        const double d = g[i] + wd * ref[i];
        buf[i] = mu * buf[i] + d;
        ref[i] -= lr * (nesterov ? d + mu * buf[i] : buf[i]);
      }
    }
    const std::vector<double> got = p.to_vector<double>();
    for (size_t i = 0; i < 2; ++i) EXPECT_NEAR(got[i], ref[i], 1e-12) << (nesterov ? "nesterov" : "momentum");
  }
}

TEST(Optim, StateIsAddressedByParameterName) {
  Tensor a = Tensor::zeros({2, 3}).requires_grad_();
  optim::AdamW opt({{"a", a}});
  EXPECT_EQ(opt.state_keys(), (std::vector<std::string>{"m", "v"}));
  EXPECT_EQ(opt.state("a", "v").shape(), (Shape{2, 3}));
  // A restored checkpoint copies into the state tensors in place.
  opt.state("a", "m").fill_(1.5);
  EXPECT_EQ(opt.state("a", "m").at({1, 2}), 1.5);
  opt.set_step_count(41);
  EXPECT_EQ(opt.step_count(), 41);
  EXPECT_THROW(opt.state("b", "m"), Error);
  EXPECT_THROW(opt.state("a", "momentum"), Error);
  EXPECT_THROW(optim::AdamW(std::vector<optim::ParamGroup>{{{{"a", a}}, 0.1, 0.0}, {{{"a", a}}, 0.1, 0.0}}), Error);
}

TEST(Optim, ClipGradNormScalesOnlyAboveTheLimit) {
  Tensor a = Tensor::zeros({2}, DType::Float64).requires_grad_();
  Tensor b = Tensor::zeros({1}, DType::Float64).requires_grad_();
  Tensor c = Tensor::zeros({1}, DType::Float64).requires_grad_();  // no gradient: skipped
  set_grad(a, {3.0, 0.0});
  set_grad(b, {4.0});
  EXPECT_DOUBLE_EQ(optim::clip_grad_norm_({a, b, c}, 10.0), 5.0);
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{3.0, 0.0}));
  EXPECT_DOUBLE_EQ(optim::clip_grad_norm_({a, b, c}, 1.0), 5.0);
  const double scale = 1.0 / (5.0 + 1e-6);
  EXPECT_DOUBLE_EQ(a.grad().at({0}), 3.0 * scale);
  EXPECT_DOUBLE_EQ(b.grad().at({0}), 4.0 * scale);
  EXPECT_FALSE(c.grad().defined());
}

TEST(Optim, Schedules) {
  EXPECT_EQ(optim::ConstantLR(3e-4).lr_at(12345), 3e-4);
  const optim::WarmupCosine s(1.0, 10, 110, 0.1);
  EXPECT_DOUBLE_EQ(s.lr_at(0), 0.1);
  EXPECT_DOUBLE_EQ(s.lr_at(4), 0.5);
  EXPECT_DOUBLE_EQ(s.lr_at(9), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_at(10), 1.0);
  EXPECT_NEAR(s.lr_at(60), 0.55, 1e-12);  // halfway: the mean of base and min
  EXPECT_NEAR(s.lr_at(35), 0.1 + 0.45 * (1.0 + std::cos(std::numbers::pi / 4.0)), 1e-12);
  EXPECT_DOUBLE_EQ(s.lr_at(110), 0.1);
  EXPECT_DOUBLE_EQ(s.lr_at(1000), 0.1);
  EXPECT_DOUBLE_EQ(optim::WarmupCosine(1.0, 20, 10).lr_at(14), 0.75);  // shorter than its warmup
  EXPECT_THROW(optim::WarmupCosine(1.0, -1, 10), Error);
}

// ---------------------------------------------------------------- end to end

namespace {

// Three interleaved 2-D spirals (the cs231n toy problem), 64 points each, with seeded noise.
// Small enough that every op runs on one thread: the timing does not depend on machine load.
struct Spiral {
  Tensor x, y;
};
Spiral make_spiral(Generator& gen) {
  const int64_t per_class = 64, classes = 3;
  const std::vector<double> noise = Tensor::randn({per_class * classes}, gen, DType::Float64, 0.0, 0.2).to_vector<double>();
  std::vector<float> x;
  std::vector<int64_t> y;
  for (int64_t c = 0; c < classes; ++c)
    for (int64_t i = 0; i < per_class; ++i) {
      const double r = static_cast<double>(i) / per_class;
      const double theta = 4.0 * static_cast<double>(c) + 4.0 * r + noise[static_cast<size_t>(c * per_class + i)];
      x.push_back(static_cast<float>(r * std::sin(theta)));
      x.push_back(static_cast<float>(r * std::cos(theta)));
      y.push_back(c);
    }
  return {Tensor::from_vector(x, {per_class * classes, 2}), Tensor::from_vector(y, {per_class * classes})};
}

// Full-batch AdamW on an MLP 2 -> 32 -> 32 -> 3 with tanh; returns the loss of every step.
std::vector<double> train_spiral(int steps) {
  Generator gen(2024);
  const Spiral data = make_spiral(gen);
  nn::Sequential mlp;
  mlp.append(std::make_shared<nn::Linear>(2, 32, gen))
      .append([](const Tensor& x) { return tanh(x); })
      .append(std::make_shared<nn::Linear>(32, 32, gen))
      .append([](const Tensor& x) { return tanh(x); })
      .append(std::make_shared<nn::Linear>(32, 3, gen));
  optim::AdamW opt(optim::weight_decay_groups(mlp.named_parameters(), 0.0, 1e-4), {.beta2 = 0.99});
  const optim::WarmupCosine schedule(0.02, 20, steps, 0.002);
  std::vector<double> losses;
  for (int step = 0; step < steps; ++step) {
    opt.set_lr(schedule.lr_at(step));
    opt.zero_grad();
    Tensor loss = cross_entropy(mlp.forward(data.x), data.y);
    loss.backward();
    optim::clip_grad_norm_(mlp.parameters(), 1.0);
    opt.step();
    losses.push_back(loss.item());
  }
  return losses;
}

}  // namespace

TEST(OptimTraining, MlpLearnsSpiralDeterministically) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<double> losses = train_spiral(400);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_NEAR(losses.front(), std::log(3.0), 0.2);
  EXPECT_LT(losses.back(), 0.1) << "after " << losses.size() << " steps";
  EXPECT_LT(seconds, 5.0);
  // Same seed, same bits: compared as exact doubles.
  EXPECT_EQ(losses, train_spiral(400));
}
