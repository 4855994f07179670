// Mixed-precision training (train.dtype = "bfloat16"): the cast's backward, float32 master weights,
// optimizer state and checkpoints, bit-exact determinism and resume on the CPU, and a bf16 run that
// learns and tracks the float32 run (docs/mixed-precision.md derives the tolerance).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <vector>

#include "dilatron/autograd.h"
#include "dilatron/checkpoint.h"
#include "dilatron/config.h"
#include "dilatron/hdf5.h"
#include "dilatron/kernels/cuda.h"
#include "dilatron/nn.h"
#include "dilatron/ops.h"
#include "dilatron/optim.h"
#include "dilatron/trainer.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::error_message;
namespace fs = std::filesystem;

namespace {

constexpr DType kBF16 = DType::BFloat16;
const std::string kTiny = std::string(DILATRON_SOURCE_DIR) + "/configs/tiny.toml";

Tensor randn(const Shape& shape, uint64_t seed, DType dtype = DType::Float32) {
  Generator g(seed);
  return Tensor::randn(shape, g, TensorOptions(DType::Float32)).to(dtype);
}

// [b, t] byte tokens, a fixed pattern.
Tensor tokens(int64_t b, int64_t t) {
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < b * t; ++i) ids.push_back((i * 37 + 11) % 256);
  return Tensor::from_vector(ids, {b, t});
}

std::vector<float> floats(const Tensor& t) {
  EXPECT_EQ(t.dtype(), DType::Float32);
  return t.to_vector<float>();
}

// A run of c in a fresh directory, stopped after `stop` steps (-1: to the end) or resumed there.
TrainResult run(const RunConfig& c, const std::string& name, int64_t stop = -1, bool resume = false) {
  const fs::path dir = fs::temp_directory_path() / ("dilatron_test_mp_" + name + "_" + std::to_string(::getpid()));
  if (!resume) fs::remove_all(dir);
  TrainOptions o;
  o.out_dir = dir.string();
  o.progress = false;
  o.stop_at_step = stop;
  o.resume = resume ? "auto" : "";
  return train(c, o);
}

// How far a bf16 loss may be from the float32 one at loss `loss`: bf16 keeps 8 significant bits, so
// one rounding is off by at most u = 2^-9 relative. Between the float32 parameters and the float32
// loss, a value passes 13 bf16 roundings per layer (the layer norm's cast, the qkv gemm and its bias,
// rotary, attention, the projection and its bias; the cast, gemm and bias of fc, GELU, those of
// fc_out) and 2 more (the final norm's cast, the head). Independent roundings add in quadrature:
// sqrt(n) u relative.
double mixed_precision_tolerance(const ModelConfig& m, double loss) {
  const double roundings = 13.0 * static_cast<double>(m.n_layers) + 2.0;
  return std::sqrt(roundings) * std::ldexp(1.0, -9) * loss;
}

// Every dataset of a checkpoint (the model's float32 weights, AdamW's float32 moments), in order.
std::vector<std::vector<float>> datasets_of(const std::string& ckpt) {
  const h5::File f = h5::File::open(ckpt);
  std::vector<std::vector<float>> out;
  for (const std::string& d : f.list("/", /*recursive=*/true)) out.push_back(f.read(d).to_vector<float>());
  return out;
}

RunConfig tiny(std::vector<std::string> overrides) { return load_config(kTiny, overrides); }

double mean_of(const std::vector<double>& v, size_t first, size_t count) {
  double s = 0.0;
  for (size_t i = first; i < first + count; ++i) s += v[i];
  return s / static_cast<double>(count);
}

}  // namespace

// The cast to bf16 is Tensor::to: its backward is the exact float32 cast of the bf16 upstream
// gradient, and gradients from several casts of one parameter add up in float32.
TEST(MixedPrecision, CastBackwardIsTheFloat32CastOfTheGradientAndAccumulates) {
  Tensor w = randn({5, 7}, 1).requires_grad_();
  const Tensor g1 = randn({5, 7}, 2, kBF16), g2 = randn({5, 7}, 3, kBF16);
  const Tensor wb = w.to(kBF16);
  EXPECT_EQ(wb.dtype(), kBF16);
  wb.backward(g1);
  EXPECT_EQ(floats(w.grad()), g1.to(DType::Float32).to_vector<float>());
  w.to(kBF16).backward(g2);
  // The float32 sum, not a bf16 one: 1 + 2^-9 would round back to 1 in bf16.
  EXPECT_EQ(floats(w.grad()), add(g1.to(DType::Float32), g2.to(DType::Float32)).to_vector<float>());
}

// nn::Linear on a bf16 input computes on bf16 copies of its float32 parameters: the output is the
// bf16 product, the parameter gradients the bf16 gradients cast to float32.
TEST(MixedPrecision, LinearOnBf16InputKeepsFloat32ParametersAndGradients) {
  Generator init(4);
  nn::Linear lin(6, 3, init);
  const Tensor x = randn({4, 6}, 5, kBF16), dy = randn({4, 3}, 6, kBF16);
  const Tensor y = lin.forward(x);
  EXPECT_EQ(y.dtype(), kBF16);
  const Tensor wb = lin.weight.detach().to(kBF16), bb = lin.bias.detach().to(kBF16);
  EXPECT_EQ(y.to_vector<float>(), add(matmul(x, transpose(wb, 0, 1)), bb).to_vector<float>());
  y.backward(dy);
  EXPECT_EQ(lin.weight.dtype(), DType::Float32);
  EXPECT_EQ(floats(lin.weight.grad()), matmul(transpose(dy, 0, 1), x).to(DType::Float32).to_vector<float>());
  EXPECT_EQ(floats(lin.bias.grad()), sum(dy, {0}).to(DType::Float32).to_vector<float>());
}

// float32 rotary tables for bf16 x: the float32 rotation of the same x, rounded once.
TEST(MixedPrecision, RotaryTakesFloat32TablesForBf16Input) {
  const Tensor x = randn({1, 3, 2, 4}, 7, kBF16), cos = randn({3, 2}, 8), sin = randn({3, 2}, 9);
  EXPECT_EQ(rotary(x, cos, sin).to_vector<float>(),
            rotary(x.to(DType::Float32), cos, sin).to(kBF16).to_vector<float>());
  const std::string msg = error_message([&] { rotary(x, cos.to(DType::Float64), sin.to(DType::Float64)); });
  EXPECT_NE(msg.find("bfloat16 or float32"), std::string::npos) << msg;
}

TEST(MixedPrecision, ModelComputesInBf16OverFloat32Parameters) {
  const RunConfig c = tiny({"train.dtype=\"bfloat16\""});
  auto model = build_model(c, std::make_shared<Generator>(0));
  EXPECT_EQ(model->compute_dtype(), DType::Float32);  // until training asks for bf16: eval and sample
  model->set_compute_dtype(kBF16);
  const Tensor batch = tokens(2, 33);
  EXPECT_EQ(model->forward(narrow(batch, 1, 0, 32)).dtype(), kBF16);
  const Tensor loss = model->loss(batch);
  EXPECT_EQ(loss.dtype(), DType::Float32);
  loss.backward();
  for (const auto& [name, p] : model->named_parameters()) {
    EXPECT_EQ(p.dtype(), DType::Float32) << name;
    ASSERT_TRUE(p.grad().defined()) << name;
    EXPECT_EQ(p.grad().dtype(), DType::Float32) << name;
  }
  // Decoding keeps a bf16 cache: the prefill is the forward, and the next token continues it.
  model->eval();
  KVCache cache;
  const Tensor prompt = tokens(1, 16);
  EXPECT_EQ(model->forward(prompt, cache).to_vector<float>(), model->forward(prompt).to_vector<float>());
  EXPECT_EQ(model->forward(narrow(tokens(1, 17), 1, 16, 1), cache).dtype(), kBF16);
  const std::string msg = error_message([&] { model->set_compute_dtype(DType::Float64); });
  EXPECT_NE(msg.find("compute dtype float64 over float32 parameters"), std::string::npos) << msg;
}

TEST(MixedPrecision, BadDtypeNamesTheFileKeyAndValue) {
  const std::string msg = error_message([] { tiny({"train.dtype=\"float16\""}); });
  for (const std::string part : {"tiny.toml", "train.dtype", "\"float16\"", "bfloat16"})
    EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
}

// The optimizer state and the checkpoint hold float32 only; the checkpoint loads into a float32
// model, which evaluates it in float32.
TEST(MixedPrecisionTraining, MasterWeightsOptimizerStateAndCheckpointStayFloat32) {
  const RunConfig c = tiny({"train.dtype=\"bfloat16\"", "train.steps=3"});
  const TrainResult r = run(c, "f32state");
  const h5::File f = h5::File::open(r.last_checkpoint);
  const std::vector<std::string> datasets = f.list("/", /*recursive=*/true);
  size_t model = 0, optimizer = 0;
  for (const std::string& d : datasets) {
    EXPECT_EQ(f.info(d).dtype, "float32") << d;
    model += d.starts_with("model/");
    optimizer += d.starts_with("optimizer/");
  }
  auto m = build_model(c, std::make_shared<Generator>(0));
  optim::AdamW opt(m->named_parameters());
  load_checkpoint(r.last_checkpoint, *m, &opt);
  EXPECT_EQ(model, m->named_parameters().size());
  EXPECT_EQ(optimizer, 2 * model);
  for (const auto& [name, p] : m->named_parameters()) {
    EXPECT_EQ(p.dtype(), DType::Float32) << name;
    EXPECT_EQ(opt.state(name, "m").dtype(), DType::Float32) << name;
    EXPECT_EQ(opt.state(name, "v").dtype(), DType::Float32) << name;
  }
  m->eval();
  EXPECT_EQ(m->forward(tokens(1, 16)).dtype(), DType::Float32);
  const PasskeyReport rep = evaluate_passkey(*m, {c.model.seq_len}, 4, 1, passkey_options(c, true), 4);
  EXPECT_EQ(rep.by_length.at(c.model.seq_len).total, 4);
}

TEST(MixedPrecisionTraining, SameSeedIsBitIdenticalAndResumeIsExact) {
  const RunConfig c = tiny({"train.dtype=\"bfloat16\"", "train.steps=6", "train.checkpoint_every=0",
                            "model.dropout=0.1", "model.attn_dropout=0.1", "model.rel_pos_bias=true"});
  const TrainResult a = run(c, "det_a"), b = run(c, "det_b");
  EXPECT_EQ(a.losses, b.losses);
  EXPECT_EQ(datasets_of(a.last_checkpoint), datasets_of(b.last_checkpoint));
  const TrainResult part1 = run(c, "split", 3), part2 = run(c, "split", -1, /*resume=*/true);
  EXPECT_EQ(part2.first_step, 3);
  std::vector<double> joined = part1.losses;
  joined.insert(joined.end(), part2.losses.begin(), part2.losses.end());
  EXPECT_EQ(joined, a.losses);  // bit-identical doubles
  EXPECT_EQ(datasets_of(part2.last_checkpoint), datasets_of(a.last_checkpoint));
}

// 30 steps of the tiny config in float32 and in bf16 from the same seed. The bf16 run must learn (as
// Training.LossGoesDownOnTinyConfig asks of float32) and stay near the float32 losses: within
// mixed_precision_tolerance (docs/mixed-precision.md derives it) at every step.
TEST(MixedPrecisionTraining, TracksTheFloat32RunAndLearns) {
  const std::vector<std::string> base{"train.steps=30", "train.checkpoint_every=0"};
  std::vector<std::string> bf16 = base;
  bf16.push_back("train.dtype=\"bfloat16\"");
  const RunConfig c = tiny(bf16);
  const TrainResult f = run(tiny(base), "track_f32"), h = run(c, "track_bf16");
  ASSERT_EQ(h.losses.size(), 30u);
  EXPECT_LT(mean_of(h.losses, 25, 5), 0.8 * mean_of(h.losses, 0, 5));
  EXPECT_NE(h.losses, f.losses);  // bf16 did run
  for (size_t i = 0; i < f.losses.size(); ++i)
    EXPECT_LE(std::abs(h.losses[i] - f.losses[i]), mixed_precision_tolerance(c.model, f.losses[i])) << "step " << i + 1;
}

// The same bf16 run on the GPU (cuBLAS's bf16 gemm; the other ops' float32 kernels on converted
// copies) against the CPU's: their roundings differ by at most a step where the float32 sums do, so
// within the same tolerance. Skips without a GPU.
TEST(CudaMixedPrecision, TinyRunTracksTheCpu) {
  if (kernels::cuda_device_count() == 0)
    GTEST_SKIP() << "no CUDA device: this machine has no GPU or no NVIDIA driver (cudaGetDeviceCount)";
  const std::vector<std::string> base{"train.steps=20", "train.checkpoint_every=0", "train.dtype=\"bfloat16\""};
  std::vector<std::string> gpu = base;
  gpu.push_back("train.device=\"cuda\"");
  const RunConfig c = tiny(base);
  const TrainResult on_cpu = run(c, "cpu_bf16"), on_gpu = run(tiny(gpu), "cuda_bf16");
  ASSERT_EQ(on_gpu.losses.size(), on_cpu.losses.size());
  for (size_t i = 0; i < on_cpu.losses.size(); ++i)
    EXPECT_LE(std::abs(on_gpu.losses[i] - on_cpu.losses[i]), mixed_precision_tolerance(c.model, on_cpu.losses[i]))
        << "step " << i + 1;
  const h5::File f = h5::File::open(on_gpu.last_checkpoint);
  for (const std::string& d : f.list("/", /*recursive=*/true)) EXPECT_EQ(f.info(d).dtype, "float32") << d;
}
