// Incremental decoding: the attention cache and decode kernel against the literal contract
// (attention_reference.h) at every position, the model's cached logits against its full forward,
// the cache's memory bound, and `dilatron sample` with and without the cache.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "attention_reference.h"
#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/model.h"
#include "dilatron/ops.h"
#include "dilatron/random.h"
#include "test_helpers.h"

using namespace dilatron;
namespace ref = dilatron::attention_reference;
namespace fs = std::filesystem;

namespace {

struct DecodeCase {
  const char* name;
  int64_t B, N, H, D;
  const char* schedule;
  bool bias;
};

// Causal only (decoding is): ragged last segments (N = 97, 100), queries on no grid, key-dilated
// branches alone and mixed, a segment longer than N, r above and below H.
const std::vector<DecodeCase> kDecodeCases = {
    {"one_dense_branch", 1, 97, 2, 16, "97:1", false},
    {"three_branches_bias", 2, 97, 4, 8, "16:1,40:3,97:5", true},
    {"uncovered_queries", 1, 100, 3, 8, "32:2,64:4", false},
    {"key_dilated_ragged_bias", 2, 97, 3, 16, "10:1,33:4k", true},
    {"key_dilated_mixed", 1, 100, 5, 8, "7:1,64:8k,30:3", true},
    {"segment_above_n", 1, 97, 2, 8, "128:1,4:4", false},
};

void PrintTo(const DecodeCase& c, std::ostream* os) { *os << c.name; }

class AttentionDecode : public ::testing::TestWithParam<DecodeCase> {};

// Each position t decoded from a cache holding positions 0..t equals the reference's o[t]; the
// cache is filled by a prompt of P positions at once (prefill), then one position at a time.
TEST_P(AttentionDecode, MatchesTheContractAtEveryPosition) {
  const DecodeCase& c = GetParam();
  const Shape shape{c.B, c.N, c.H, c.D};
  Generator gen(4321);
  const TensorOptions f64(DType::Float64);
  const Tensor q = Tensor::randn(shape, gen, f64), k = Tensor::randn(shape, gen, f64), v = Tensor::randn(shape, gen, f64);
  ref::Problem p;
  p.B = c.B, p.N = c.N, p.H = c.H, p.D = c.D;
  p.schedule = parse_schedule(c.schedule);
  p.causal = true;
  p.scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  p.num_buckets = 8;
  p.max_distance = 40;
  p.q = q.to_vector<double>(), p.k = k.to_vector<double>(), p.v = v.to_vector<double>();
  Tensor bias;
  if (c.bias) {
    bias = Tensor::randn({c.H, p.num_buckets}, gen, f64);
    p.bias = bias.to_vector<double>();
  }
  const ref::Forward want = ref::forward(p);

  DilatedAttentionOptions opts;
  opts.schedule = p.schedule;
  opts.causal = true;
  opts.bias_num_buckets = p.num_buckets;
  opts.bias_max_distance = p.max_distance;
  for (const DType dtype : {DType::Float64, DType::Float32}) {
    const double tol = dtype == DType::Float64 ? 1e-12 : 1e-5;
    const Tensor qd = q.to(dtype), kd = k.to(dtype), vd = v.to(dtype), bd = c.bias ? bias.to(dtype) : Tensor();
    for (const int64_t prompt : {int64_t{0}, int64_t{1}, int64_t{13}, c.N / 2}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + ", prompt " + std::to_string(prompt));
      AttentionCache cache(p.schedule, c.B, c.H, c.D, TensorOptions(dtype));
      if (prompt > 0) cache.append(narrow(kd, 1, 0, prompt), narrow(vd, 1, 0, prompt));
      for (int64_t t = prompt; t < c.N; ++t) {
        cache.append(narrow(kd, 1, t, 1), narrow(vd, 1, t, 1));
        ASSERT_EQ(cache.length(), t + 1);
        const std::vector<double> got = dilated_attention_decode(narrow(qd, 1, t, 1), cache, opts, bd).to_vector<double>();
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t d = 0; d < c.D; ++d) {
              const double w = want.o[p.row(b, t, h) + static_cast<size_t>(d)];
              ASSERT_NEAR(got[static_cast<size_t>((b * c.H + h) * c.D + d)], w, tol * (1.0 + std::abs(w)))
                  << "t " << t << " b " << b << " h " << h << " d " << d;
            }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionDecode, ::testing::ValuesIn(kDecodeCases),
                         [](const ::testing::TestParamInfo<DecodeCase>& info) { return std::string(info.param.name); });

// The CUDA decode kernel against the CPU one (itself checked against the contract above), float64
// and float32, through prefill and single steps.
TEST_P(AttentionDecode, CudaMatchesTheCpu) {
  if (kernels::cuda_device_count() == 0)
    GTEST_SKIP() << "no CUDA device: this machine has no GPU or no NVIDIA driver (cudaGetDeviceCount)";
  const DecodeCase& c = GetParam();
  const Shape shape{c.B, c.N, c.H, c.D};
  Generator gen(99);
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule(c.schedule);
  opts.causal = true;
  opts.bias_num_buckets = 8;
  opts.bias_max_distance = 40;
  for (const DType dtype : {DType::Float64, DType::Float32}) {
    SCOPED_TRACE(dtype_name(dtype));
    const double tol = dtype == DType::Float64 ? 1e-12 : 1e-5;
    const TensorOptions cpu(dtype), gpu = TensorOptions(dtype).with_device(Device::cuda());
    const Tensor q = Tensor::randn(shape, gen, cpu), k = Tensor::randn(shape, gen, cpu), v = Tensor::randn(shape, gen, cpu);
    const Tensor bias = c.bias ? Tensor::randn({c.H, 8}, gen, cpu) : Tensor();
    AttentionCache on_cpu(opts.schedule, c.B, c.H, c.D, cpu), on_gpu(opts.schedule, c.B, c.H, c.D, gpu);
    const int64_t prompt = c.N / 3;
    on_cpu.append(narrow(k, 1, 0, prompt), narrow(v, 1, 0, prompt));
    on_gpu.append(narrow(k, 1, 0, prompt).to(Device::cuda()), narrow(v, 1, 0, prompt).to(Device::cuda()));
    for (int64_t t = prompt; t < c.N; ++t) {
      on_cpu.append(narrow(k, 1, t, 1), narrow(v, 1, t, 1));
      on_gpu.append(narrow(k, 1, t, 1).to(Device::cuda()), narrow(v, 1, t, 1).to(Device::cuda()));
      const auto want = dilated_attention_decode(narrow(q, 1, t, 1), on_cpu, opts, bias).to_vector<double>();
      const auto got = dilated_attention_decode(narrow(q, 1, t, 1).to(Device::cuda()), on_gpu, opts,
                                                c.bias ? bias.to(Device::cuda()) : Tensor())
                           .to_vector<double>();
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_NEAR(got[i], want[i], tol * (1.0 + std::abs(want[i]))) << "t " << t << ", element " << i;
    }
    EXPECT_EQ(on_gpu.bytes(), on_cpu.bytes());
  }
}

TEST(AttentionCache, MemoryStopsGrowingAtTheLargestSegment) {
  const auto schedule = parse_schedule("16:1,256:8k,100:4");
  AttentionCache cache(schedule, 1, 4, 8, TensorOptions(DType::Float32));
  Generator gen(1);
  const auto step = [&] {
    cache.append(Tensor::randn({1, 1, 4, 8}, gen), Tensor::randn({1, 1, 4, 8}, gen));
  };
  for (int i = 0; i < 256; ++i) step();
  const int64_t at_segment = cache.bytes();
  // Per branch ceil(w / r) keys and values per head: 16 + 32 + 25.
  EXPECT_EQ(at_segment, (16 + 32 + 25) * 2 * 4 * 8 * 4);
  for (int i = 0; i < 5 * 256 + 37; ++i) step();
  EXPECT_EQ(cache.bytes(), at_segment);
}

TEST(AttentionCache, RefusesWhatItCannotServe) {
  const auto schedule = parse_schedule("16:1");
  AttentionCache cache(schedule, 2, 4, 8, TensorOptions(DType::Float64));
  EXPECT_THROW(cache.append(Tensor::zeros({2, 1, 3, 8}, DType::Float64), Tensor::zeros({2, 1, 3, 8}, DType::Float64)),
               Error);
  DilatedAttentionOptions opts;
  opts.schedule = schedule;
  opts.causal = true;
  const Tensor q = Tensor::zeros({2, 1, 4, 8}, DType::Float64);
  EXPECT_THROW(dilated_attention_decode(q, cache, opts), Error);  // empty
  cache.append(q, q);
  EXPECT_NO_THROW(dilated_attention_decode(q, cache, opts));
  opts.causal = false;
  EXPECT_THROW(dilated_attention_decode(q, cache, opts), Error);
  opts.causal = true;
  opts.schedule = parse_schedule("16:2");
  EXPECT_THROW(dilated_attention_decode(q, cache, opts), Error);
}

// ---------------------------------------------------------------- the model

struct ModelCase {
  const char* name;
  const char* positional;
  bool bias;
  const char* schedule;
};

void PrintTo(const ModelCase& c, std::ostream* os) { *os << c.name; }

class ModelDecode : public ::testing::TestWithParam<ModelCase> {};

// Prompt of P tokens through the cache, then one token at a time: every step's logits equal the full
// forward's last row on all tokens so far (float64 1e-10, float32 1e-5).
TEST_P(ModelDecode, CachedLogitsEqualTheFullForward) {
  const ModelCase& mc = GetParam();
  ModelConfig c;
  c.seq_len = 64;
  c.d_model = 24;
  c.n_layers = 2;
  c.n_heads = 3;
  c.d_ff = 32;
  c.positional = mc.positional;
  c.rel_pos_bias = mc.bias;
  c.bias_buckets = 8;
  c.bias_max_distance = 20;
  c.layer_schedules = {parse_schedule(mc.schedule), parse_schedule("8:1,40:3")};
  const int64_t T = 70;  // past seq_len: segments keep repeating
  Generator gen(5);
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < T; ++i) ids.push_back(static_cast<int64_t>(gen.next_below(259)));
  for (const DType dtype : {DType::Float64, DType::Float32}) {
    const double tol = dtype == DType::Float64 ? 1e-10 : 1e-5;
    TransformerLM model(c, 11, std::make_shared<Generator>(0), TensorOptions(dtype));
    if (mc.bias) {  // a nonzero bias table, so the buckets matter
      autograd::NoGradGuard g;
      Generator bias_gen(3);
      for (auto& block : model.blocks) block->attn->rel_bias.copy_(Tensor::randn({3, 8}, bias_gen, TensorOptions(dtype)));
    }
    model.eval();
    const auto tokens = [&](int64_t from, int64_t n) {
      return Tensor::from_vector(std::vector<int64_t>(ids.begin() + from, ids.begin() + from + n), {1, n});
    };
    for (const int64_t prompt : {int64_t{1}, int64_t{7}, int64_t{41}}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + ", prompt " + std::to_string(prompt));
      KVCache cache;
      const Tensor first = model.forward(tokens(0, prompt), cache);
      const Tensor full_prompt = model.forward(tokens(0, prompt));
      ASSERT_EQ(first.shape(), full_prompt.shape());
      const auto a = first.to_vector<double>(), b = full_prompt.to_vector<double>();
      for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], tol * (1.0 + std::abs(b[i]))) << i;
      for (int64_t t = prompt; t < T; ++t) {
        const auto got = model.forward(tokens(t, 1), cache).to_vector<double>();
        const Tensor full = model.forward(tokens(0, t + 1));
        const auto want = narrow(full, 1, t, 1).to_vector<double>();
        ASSERT_EQ(got.size(), want.size());
        for (size_t i = 0; i < got.size(); ++i)
          ASSERT_NEAR(got[i], want[i], tol * (1.0 + std::abs(want[i]))) << "position " << t << ", logit " << i;
      }
      EXPECT_EQ(cache.length(), T);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, ModelDecode,
                         ::testing::Values(ModelCase{"xpos", "xpos", false, "16:1,64:4k"},
                                           ModelCase{"xpos_bias_ragged", "xpos", true, "10:1,27:3,50:5k"},
                                           ModelCase{"rotary_bias", "rotary", true, "16:1,32:2"},
                                           ModelCase{"no_position", "none", false, "5:1,64:8k"}),
                         [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

TEST(ModelDecode, XposPositionsPastTheirRangeAreRefused) {
  RotaryEmbedding xpos("xpos", 8, 512.0);
  const int64_t limit = xpos.max_decode_positions();
  EXPECT_GT(limit, 60000);  // about 71K at scale_base 512
  const Tensor x = Tensor::ones({1, 1, 2, 8});
  EXPECT_NO_THROW(xpos.apply_at(x, true, limit - 1));
  try {
    xpos.apply_at(x, true, limit);
    FAIL() << "position " << limit << " was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("xpos: position " + std::to_string(limit)), std::string::npos) << e.what();
  }
  // The full forward reaches about as far (its centre is the length's middle).
  EXPECT_NO_THROW(xpos.apply(Tensor::ones({1, limit - 1, 1, 8}), true));
  EXPECT_THROW(xpos.apply(Tensor::ones({1, limit + 2, 1, 8}), true), Error);
}

// ---------------------------------------------------------------- the command

#ifdef DILATRON_CLI

std::string run(const std::string& cmd, int* status) {
  const fs::path log = fs::temp_directory_path() / ("dilatron_test_decode_" + std::to_string(::getpid()) + ".log");
  *status = std::system((cmd + " > " + log.string() + " 2>&1").c_str());
  std::string out = test::read_file(log);
  fs::remove(log);
  return out;
}

TEST(SampleCommand, GreedyGenerationIsTheSameWithAndWithoutTheCache) {
  const fs::path dir = fs::temp_directory_path() / ("dilatron_test_sample_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  const std::string cli = DILATRON_CLI, tiny = std::string(DILATRON_SOURCE_DIR) + "/configs/tiny.toml";
  int status = 0;
  std::string out = run(cli + " train " + tiny + " --set train.steps=6 --out " + dir.string(), &status);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << out;
  // 150 tokens after the prompt: past tiny.toml's seq_len of 128.
  const std::string sample = cli + " sample " + dir.string() + " --prompt 'The pass key is' --tokens 150 --temperature 0";
  const std::string cached = run(sample, &status);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << cached;
  const std::string uncached = run(sample + " --no-cache", &status);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << uncached;
  EXPECT_EQ(cached, uncached);
  EXPECT_GT(cached.size(), std::string("The pass key is").size());
  fs::remove_all(dir);
}

#endif  // DILATRON_CLI

}  // namespace
