// Flash dilated attention: the kernels against the literal float64 reference (attention_reference.h)
// over a grid of shapes and options, gradchecks, equivalences with ordinary attention, dropout
// bits, input validation, memory use, and the schedule / bias-bucket helpers.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "attention_cases.h"
#include "attention_reference.h"
#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/gradcheck.h"
#include "dilatron/ops.h"
#include "dilatron/philox.h"
#include "dilatron/random.h"
#include "dilatron/storage.h"

#ifdef DILATRON_WITH_CUDA
#include <curand.h>
#endif

using namespace dilatron;
namespace ref = dilatron::attention_reference;
using dilatron::test::AttentionCase;
using dilatron::test::max_error;

namespace {

// Runs f and checks that it throws a dilatron::Error whose message contains every part.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown; expected one mentioning \"" << parts.front() << "\"";
  } catch (const Error& e) {
    for (const auto& part : parts)
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "error message \"" << e.what() << "\" does not mention \"" << part << "\"";
  }
}

Tensor from_values(const std::vector<double>& values, const Shape& shape, DType dtype, bool requires_grad = false) {
  return Tensor::from_vector(values, shape, TensorOptions(dtype).with_requires_grad(requires_grad));
}

// One forward and backward (of dout) through fresh leaf copies of q, k, v and bias, as doubles
// (exact for float32 too).
struct ForwardBackward {
  std::vector<double> lse;
  std::vector<std::vector<double>> o_and_grads;  // o, then the gradients of q, k, v and bias
};

ForwardBackward forward_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias,
                                 const Tensor& dout, const DilatedAttentionOptions& opts) {
  Tensor qr = q.clone().requires_grad_(), kr = k.clone().requires_grad_(), vr = v.clone().requires_grad_(),
         br = bias.clone().requires_grad_();
  const AttentionOutput out = dilated_attention_with_lse(qr, kr, vr, opts, br);
  out.o.backward(dout);
  return {out.lse.to_vector<double>(),
          {out.o.to_vector<double>(), qr.grad().to_vector<double>(), kr.grad().to_vector<double>(),
           vr.grad().to_vector<double>(), br.grad().to_vector<double>()}};
}

std::vector<double> random_values(const Shape& shape, Generator& gen, double std = 1.0) {
  // Drawn in float32 so that float32 and float64 runs see the same inputs.
  return Tensor::randn(shape, gen, DType::Float32, 0.0, std).to_vector<double>();
}

// Naive dense attention of head h (B = 1) over the positions `pos` (ascending): query pos[a] takes
// a softmax over the keys pos[c] (c <= a when causal). Returns [N, H, D], zero outside head h's
// rows at `pos`.
std::vector<double> naive_attention(const std::vector<double>& q, const std::vector<double>& k,
                                    const std::vector<double>& v, int64_t N, int64_t H, int64_t D, int64_t h,
                                    const std::vector<int64_t>& pos, bool causal) {
  std::vector<double> o(static_cast<size_t>(N * H * D), 0.0);
  auto row = [&](int64_t t) { return static_cast<size_t>((t * H + h) * D); };
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (size_t a = 0; a < pos.size(); ++a) {
    const size_t keys = causal ? a + 1 : pos.size();
    std::vector<double> s(keys);
    for (size_t c = 0; c < keys; ++c) {
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += q[row(pos[a]) + d] * k[row(pos[c]) + d];
      s[c] = dot * scale;
    }
    const double mx = *std::max_element(s.begin(), s.end());
    double Z = 0.0;
    for (double x : s) Z += std::exp(x - mx);
    for (size_t c = 0; c < keys; ++c)
      for (int64_t d = 0; d < D; ++d) o[row(pos[a]) + d] += std::exp(s[c] - mx) / Z * v[row(pos[c]) + d];
  }
  return o;
}

// ---------------------------------------------------------------- kernels vs reference

// Every case of the shared table (attention_cases.h), in float64 (to 1e-12) and float32 (to the
// contract's 1e-5), against the float64 oracle. float32 dbias is measured against its table's
// scale, as on the GPU: its entries cancel over up to N^2 terms (per element, the H = 8, N = 1025
// case is 1.03e-5 off).
class AttentionVsOracle : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionVsOracle, ForwardAndBackward) {
  const AttentionCase& c = GetParam();
  const test::OracleRun run = test::oracle_run(c);
  test::expect_matches_oracle(c, run, DType::Float64, Device::cpu(), 1e-12);
  test::expect_matches_oracle(c, run, DType::Float32, Device::cpu(), 1e-5, /*table_scaled_dbias=*/true);
}

INSTANTIATE_TEST_SUITE_P(Cpu, AttentionVsOracle, ::testing::ValuesIn(test::kAttentionCases), test::case_name);

TEST(DilatedAttention, UncoveredQueriesGetZeroOutputAndNoGradient) {
  // H = 1, r = 2: odd positions are on no grid.
  Generator gen(5);
  const Shape shape{1, 10, 1, 4};
  Tensor q = Tensor::randn(shape, gen, DType::Float64).requires_grad_();
  Tensor k = Tensor::randn(shape, gen, DType::Float64).requires_grad_();
  Tensor v = Tensor::randn(shape, gen, DType::Float64).requires_grad_();
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("10:2");
  const AttentionOutput out = dilated_attention_with_lse(q, k, v, opts);
  out.o.sum().backward();
  for (int64_t t = 0; t < 10; ++t) {
    const bool covered = t % 2 == 0;
    EXPECT_EQ(std::isinf(out.lse.at({0, 0, t})), !covered) << t;
    for (int64_t d = 0; d < 4; ++d) {
      if (covered) continue;
      EXPECT_EQ(out.o.at({0, t, 0, d}), 0.0);
      EXPECT_EQ(q.grad().at({0, t, 0, d}), 0.0);
      EXPECT_EQ(k.grad().at({0, t, 0, d}), 0.0);
      EXPECT_EQ(v.grad().at({0, t, 0, d}), 0.0);
    }
  }
}

TEST(DilatedAttention, DeterministicAcrossRuns) {
  Generator gen(11);
  const Shape shape{2, 300, 3, 16};
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("64:1,128:2,300:3");
  opts.causal = true;
  opts.dropout = 0.2;
  Tensor q = Tensor::randn(shape, gen), k = Tensor::randn(shape, gen), v = Tensor::randn(shape, gen);
  Tensor bias = Tensor::randn({3, 32}, gen);
  const Tensor dout = Tensor::randn(shape, gen);
  std::vector<std::vector<double>> first;
  for (int run = 0; run < 2; ++run) {
    const std::vector<std::vector<double>> got = forward_backward(q, k, v, bias, dout, opts).o_and_grads;
    if (run == 0) first = got;
    else EXPECT_EQ(got, first);
  }
}

// The CPU kernel's results do not depend on the thread count. It also covers both ways the kernel
// reads a segment's rows: with one thread each thread's contiguous copy of its segment's rows
// (forward: k, v; backward: q, do, dq) fits the budget of 1/16 of q's size; with eight it does not,
// and tiles are packed from the strided rows one at a time.
TEST(DilatedAttention, SameBitsForAnyThreadCount) {
  Generator gen(12);
  const Shape shape{1, 2048, 4, 32};
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("128:1,512:4");
  opts.causal = true;
  opts.dropout = 0.2;
  const int threads = omp_get_max_threads();
  for (DType dtype : {DType::Float32, DType::Float64}) {
    SCOPED_TRACE(dtype_name(dtype));
    const Tensor q = Tensor::randn(shape, gen, dtype), k = Tensor::randn(shape, gen, dtype),
                 v = Tensor::randn(shape, gen, dtype), bias = Tensor::randn({4, 32}, gen, dtype),
                 dout = Tensor::randn(shape, gen, dtype);
    std::vector<std::vector<double>> first;
    for (int t : {1, 8}) {
      omp_set_num_threads(t);
      const std::vector<std::vector<double>> got = forward_backward(q, k, v, bias, dout, opts).o_and_grads;
      if (first.empty()) first = got;
      else EXPECT_EQ(got, first) << t << " threads";
    }
  }
  omp_set_num_threads(threads);
}

// ---------------------------------------------------------------- gradcheck

TEST(DilatedAttentionGradcheck, QKVAndBias) {
  struct Options {
    const char* schedule;
    bool causal;
    double dropout;
  };
  for (const Options& c : {Options{"4:1,6:2", false, 0.0}, Options{"4:1,9:3", true, 0.0},
                           Options{"5:1,6:2", false, 0.3}, Options{"3:1,9:2", true, 0.3},
                           Options{"9:3k", true, 0.3}, Options{"4:2k,6:3", false, 0.0},
                           Options{"3:1,7:2k", true, 0.0}}) {
    SCOPED_TRACE(c.schedule);
    Generator gen(21);
    const Shape shape{2, 9, 2, 3};
    DilatedAttentionOptions opts;
    opts.schedule = parse_schedule(c.schedule);
    opts.causal = c.causal;
    opts.dropout = c.dropout;
    opts.seed = 99;
    opts.bias_num_buckets = 6;
    opts.bias_max_distance = 8;
    const TensorOptions f64 = TensorOptions(DType::Float64).with_requires_grad();
    const std::vector<Tensor> inputs = {Tensor::randn(shape, gen, f64), Tensor::randn(shape, gen, f64),
                                        Tensor::randn(shape, gen, f64), Tensor::randn({2, 6}, gen, f64)};
    const GradcheckResult r = gradcheck(
        [&](const std::vector<Tensor>& x) { return dilated_attention(x[0], x[1], x[2], opts, x[3]); }, inputs);
    EXPECT_TRUE(r.ok) << r.message;
  }
}

// ---------------------------------------------------------------- equivalences

struct QKV {
  std::vector<double> q, k, v;
  Tensor tq, tk, tv;
};
QKV random_qkv(const Shape& shape, uint64_t seed) {
  Generator gen(seed);
  QKV x;
  x.q = random_values(shape, gen), x.k = random_values(shape, gen), x.v = random_values(shape, gen);
  x.tq = from_values(x.q, shape, DType::Float64), x.tk = from_values(x.k, shape, DType::Float64);
  x.tv = from_values(x.v, shape, DType::Float64);
  return x;
}

TEST(DilatedAttentionEquivalence, OneDenseBranchIsOrdinaryAttention) {
  const int64_t N = 70, H = 2, D = 8;
  const QKV x = random_qkv({1, N, H, D}, 3);
  std::vector<int64_t> all(N);
  for (int64_t t = 0; t < N; ++t) all[static_cast<size_t>(t)] = t;
  for (bool causal : {false, true}) {
    for (int64_t w : {N, 2 * N}) {
      DilatedAttentionOptions opts;
      opts.schedule = {{w, 1}};
      opts.causal = causal;
      const std::vector<double> got = dilated_attention(x.tq, x.tk, x.tv, opts).to_vector<double>();
      std::vector<double> want(got.size(), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        const std::vector<double> o = naive_attention(x.q, x.k, x.v, N, H, D, h, all, causal);
        for (size_t i = 0; i < want.size(); ++i) want[i] += o[i];  // o is zero outside head h
      }
      EXPECT_LE(max_error(got, want), 1e-12) << "causal " << causal << ", w " << w;
    }
  }
}

TEST(DilatedAttentionEquivalence, DilationTwoIsAttentionOverTheHeadsResidue) {
  const int64_t N = 71, H = 3, D = 8;
  const QKV x = random_qkv({1, N, H, D}, 4);
  for (bool causal : {false, true}) {
    DilatedAttentionOptions opts;
    opts.schedule = {{N, 2}};
    opts.causal = causal;
    const std::vector<double> got = dilated_attention(x.tq, x.tk, x.tv, opts).to_vector<double>();
    std::vector<double> want(got.size(), 0.0);
    for (int64_t h = 0; h < H; ++h) {
      std::vector<int64_t> residue;  // the positions t = h (mod 2)
      for (int64_t t = h % 2; t < N; t += 2) residue.push_back(t);
      const std::vector<double> o = naive_attention(x.q, x.k, x.v, N, H, D, h, residue, causal);
      for (size_t i = 0; i < want.size(); ++i) want[i] += o[i];  // o is zero outside head h
    }
    EXPECT_LE(max_error(got, want), 1e-12) << "causal " << causal;
  }
}

TEST(DilatedAttentionEquivalence, KeyDilatedWithDilationOneIsTheDilatedBranch) {
  const int64_t N = 97, H = 3, D = 8;
  const QKV x = random_qkv({2, N, H, D}, 6);
  for (bool causal : {false, true}) {
    DilatedAttentionOptions dilated, key_dilated;
    dilated.schedule = parse_schedule("40:1,97:3");
    key_dilated.schedule = parse_schedule("40:1k,97:3");
    dilated.causal = key_dilated.causal = causal;
    dilated.dropout = key_dilated.dropout = 0.25;  // same branch index, so the same dropout bits
    const Tensor a = dilated_attention(x.tq, x.tk, x.tv, dilated), b = dilated_attention(x.tq, x.tk, x.tv, key_dilated);
    EXPECT_EQ(a.to_vector<double>(), b.to_vector<double>()) << "causal " << causal;
  }
}

// A key-dilated branch alone: every query t takes a softmax over the keys of its head's residue in
// its segment (up to t when causal), here checked against naive attention per query.
TEST(DilatedAttentionEquivalence, KeyDilatedIsAttentionOverTheHeadsResidueKeys) {
  const int64_t N = 61, H = 3, D = 8, r = 3;
  const QKV x = random_qkv({1, N, H, D}, 7);
  for (bool causal : {false, true}) {
    DilatedAttentionOptions opts;
    opts.schedule = {{N, r, BranchKind::key_dilated}};
    opts.causal = causal;
    const std::vector<double> got = dilated_attention(x.tq, x.tk, x.tv, opts).to_vector<double>();
    std::vector<double> want(got.size(), 0.0);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < N; ++t) {
        std::vector<int64_t> pos;  // the keys of t, then t itself as the last "query" position
        for (int64_t j = h % r; j < N && (!causal || j <= t); j += r) pos.push_back(j);
        if (pos.empty()) continue;  // no key: o = 0
        // naive_attention's query pos[a] sees keys pos[0..a] (causal); put t's q at the last key slot.
        std::vector<double> q = x.q;
        const size_t last = static_cast<size_t>((pos.back() * H + h) * D), row = static_cast<size_t>((t * H + h) * D);
        for (int64_t d = 0; d < D; ++d) q[last + d] = x.q[row + d];
        const std::vector<double> o = naive_attention(q, x.k, x.v, N, H, D, h, pos, true);
        for (int64_t d = 0; d < D; ++d) want[row + d] = o[last + d];
      }
    }
    EXPECT_LE(max_error(got, want), 1e-12) << "causal " << causal;
  }
}

TEST(DilatedAttentionEquivalence, HalfLengthSegmentsAreTwoIndependentHalves) {
  const int64_t N = 96, H = 3, D = 8;
  const QKV x = random_qkv({2, N, H, D}, 5);
  DilatedAttentionOptions opts;
  opts.schedule = {{N / 2, 1}, {N / 2, 2}};
  opts.causal = true;
  const Tensor whole = dilated_attention(x.tq, x.tk, x.tv, opts);
  for (int64_t half = 0; half < 2; ++half) {
    auto part = [&](const Tensor& t) { return t.narrow(1, half * N / 2, N / 2).contiguous(); };
    const Tensor o = dilated_attention(part(x.tq), part(x.tk), part(x.tv), opts);
    EXPECT_LE(max_error(part(whole).to_vector<double>(), o.to_vector<double>()), 1e-12) << "half " << half;
  }
}

// ---------------------------------------------------------------- dropout

TEST(DilatedAttentionDropout, SameSeedAndOffsetSameMaskOtherwiseDifferent) {
  Generator gen(8);
  const Shape shape{1, 128, 2, 8};
  Tensor q = Tensor::randn(shape, gen), k = Tensor::randn(shape, gen), v = Tensor::randn(shape, gen);
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("64:1,128:2");
  opts.dropout = 0.3;
  opts.seed = 42;
  opts.offset = 3;
  auto run = [&](uint64_t seed, uint32_t offset) {
    DilatedAttentionOptions o = opts;
    o.seed = seed, o.offset = offset;
    return dilated_attention(q, k, v, o).to_vector<float>();
  };
  const std::vector<float> base = run(42, 3);
  EXPECT_EQ(run(42, 3), base);
  EXPECT_NE(run(42, 4), base);
  EXPECT_NE(run(43, 3), base);
  opts.dropout = 0.0;
  const std::vector<float> no_dropout = dilated_attention(q, k, v, opts).to_vector<float>();
  EXPECT_NE(no_dropout, base);
}

TEST(DilatedAttentionDropout, KeptFractionIsOneMinusP) {
  // q = k = 0 makes every probability 1/N, and v = 1 with D = 1 makes o[t] = kept(t) / (N (1 - p)):
  // the mean of o * (1 - p) is the kept fraction over all B*H*N*N (query, key) pairs.
  const int64_t N = 2048, H = 2;
  const Shape shape{1, N, H, 1};
  const Tensor zeros = Tensor::zeros(shape), ones = Tensor::ones(shape);
  for (double p : {0.3, 0.75}) {
    DilatedAttentionOptions opts;
    opts.schedule = {{N, 1}};
    opts.dropout = p;
    opts.seed = 2024;
    const std::vector<double> o = dilated_attention(zeros, zeros, ones, opts).to_vector<double>();
    double mean = 0.0;
    for (double x : o) mean += x;
    mean /= static_cast<double>(o.size());
    EXPECT_NEAR(mean * (1.0 - p), 1.0 - p, 0.005) << "p = " << p;
  }
}

#ifdef DILATRON_WITH_CUDA
TEST(DilatedAttentionDropout, PhiloxMatchesCurandHostGenerator) {
  curandGenerator_t gen;
  const curandStatus_t status = curandCreateGeneratorHost(&gen, CURAND_RNG_PSEUDO_PHILOX4_32_10);
  if (status != CURAND_STATUS_SUCCESS) GTEST_SKIP() << "curandCreateGeneratorHost failed: curandStatus " << status;
  const uint64_t seed = 0x0123456789abcdefULL;
  ASSERT_EQ(curandSetPseudoRandomGeneratorSeed(gen, seed), CURAND_STATUS_SUCCESS);
  constexpr size_t n = size_t{1} << 21;  // 8 blocks of each of the 65536 subsequences
  std::vector<uint32_t> words(n);
  ASSERT_EQ(curandGenerate(gen, words.data(), n), CURAND_STATUS_SUCCESS);
  curandDestroyGenerator(gen);
  // cuRAND's host Philox stream (default ordering) interleaves 65536 subsequences one 4-word block
  // at a time: block b of the stream is step b / 65536 of subsequence b % 65536, whose counter is
  // {step lo, step hi, subsequence lo, subsequence hi} with key {seed lo, seed hi}; that is
  // philox_word(seed, offset = subsequence, 4 * step + word).
  size_t mismatches = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t block = i / 4, subsequence = block % 65536, step = block / 65536;
    if (philox_word(seed, subsequence, 4 * step + i % 4) != words[i] && mismatches++ == 0)
      ADD_FAILURE() << "first mismatch at word " << i;
  }
  EXPECT_EQ(mismatches, 0u);
}
#endif

// ---------------------------------------------------------------- bad input

TEST(DilatedAttentionValidation, RejectsEveryInvalidInputNamingTheValue) {
  Generator gen(1);
  const Shape shape{1, 8, 2, 4};
  const Tensor q = Tensor::randn(shape, gen), k = Tensor::randn(shape, gen), v = Tensor::randn(shape, gen);
  DilatedAttentionOptions good;
  good.schedule = parse_schedule("4:1,8:2");
  auto run = [&](const DilatedAttentionOptions& o, const Tensor& qq, const Tensor& kk, const Tensor& vv,
                 const Tensor& bias = Tensor()) { return [=] { dilated_attention(qq, kk, vv, o, bias); }; };
  auto with = [&](const std::function<void(DilatedAttentionOptions&)>& edit) {
    DilatedAttentionOptions o = good;
    edit(o);
    return o;
  };

  expect_error(run(with([](auto& o) { o.schedule.clear(); }), q, k, v), {"empty"});
  expect_error(run(with([](auto& o) { o.schedule.assign(17, {8, 1}); }), q, k, v), {"17 branches", "16"});
  expect_error(run(with([](auto& o) { o.schedule[1] = {0, 1}; }), q, k, v), {"branch 1", "w = 0"});
  expect_error(run(with([](auto& o) { o.schedule[0] = {4, 0}; }), q, k, v), {"branch 0", "r = 0"});
  expect_error(run(with([](auto& o) { o.schedule[1] = {4, 8}; }), q, k, v), {"branch 1", "r = 8", "w = 4"});
  expect_error(run(good, q, Tensor::randn({1, 9, 2, 4}, gen), v), {"[1, 8, 2, 4]", "[1, 9, 2, 4]"});
  expect_error(run(good, q, k, Tensor::randn({1, 8, 2, 5}, gen)), {"[1, 8, 2, 5]"});
  expect_error(run(good, Tensor::randn({8, 2, 4}, gen), k, v), {"4-D", "[8, 2, 4]"});
  expect_error(run(good, q, k.to(DType::Float64), v), {"float64"});
  expect_error(run(with([](auto& o) { o.scale = std::numeric_limits<double>::infinity(); }), q, k, v),
               {"scale", "inf"});
  expect_error(run(with([](auto& o) { o.scale = std::nan(""); }), q, k, v), {"scale", "nan"});
  expect_error(run(with([](auto& o) { o.dropout = 1.0; }), q, k, v), {"dropout", "1"});
  expect_error(run(with([](auto& o) { o.dropout = -0.25; }), q, k, v), {"dropout", "-0.25"});
  // Sizes at the limits, as stride-0 views (nothing is allocated before the check).
  const Tensor one = Tensor::zeros({1, 1, 1, 1});
  const Tensor many_heads = expand(one, {int64_t{1} << 14, 1, int64_t{1} << 14, 1});
  expect_error(run(good, many_heads, many_heads, many_heads), {"B*H", "268435456"});
  const Tensor long_seq = expand(one, {1, int64_t{1} << 31, 1, 1});
  expect_error(run(good, long_seq, long_seq, long_seq), {"N = 2147483648"});
  // Relative-position bias table and options.
  expect_error(run(good, q, k, v, Tensor::zeros({2, 31})), {"[2, 31]", "[2, 32]"});
  expect_error(run(good, q, k, v, Tensor::zeros({2, 32}, DType::Float64)), {"bias", "float64"});
  expect_error(run(with([](auto& o) { o.bias_num_buckets = 33; }), q, k, v, Tensor::zeros({2, 33})),
               {"even", "33"});
  expect_error(run(with([](auto& o) { o.bias_num_buckets = 2; }), q, k, v, Tensor::zeros({2, 2})),
               {"num_buckets = 2"});
  expect_error(run(with([](auto& o) { o.bias_max_distance = 8; }), q, k, v, Tensor::zeros({2, 32})),
               {"max_distance = 8", "max_exact = 8"});
}

TEST(DilatedAttentionValidation, ParseScheduleNamesTheBadToken) {
  EXPECT_EQ(parse_schedule("2048:1,4096:2"), (std::vector<AttentionBranch>{{2048, 1}, {4096, 2}}));
  EXPECT_EQ(parse_schedule(" 16:1 , 32:4 "), (std::vector<AttentionBranch>{{16, 1}, {32, 4}}));
  expect_error([] { parse_schedule("2048:1,abc"); }, {"\"abc\"", "branch 1"});
  expect_error([] { parse_schedule("2048"); }, {"\"2048\""});
  expect_error([] { parse_schedule("2048:1,"); }, {"branch 1"});
  expect_error([] { parse_schedule("16:1x"); }, {"\"16:1x\""});
  expect_error([] { parse_schedule("16:32"); }, {"r = 32", "w = 16"});
  EXPECT_EQ(parse_schedule("256:1,2048:8k"),
            (std::vector<AttentionBranch>{{256, 1}, {2048, 8, BranchKind::key_dilated}}));
  expect_error([] { parse_schedule("16:4kk"); }, {"\"16:4kk\""});
  expect_error([] { parse_schedule("16:k"); }, {"\"16:k\""});
  expect_error([] { parse_schedule("16k:4"); }, {"\"16k:4\""});
  expect_error([] { parse_schedule("16:32k"); }, {"r = 32", "w = 16"});
}

// ---------------------------------------------------------------- memory

TEST(DilatedAttentionMemory, ForwardBackwardExtraMemoryIsLinearInN) {
  const int64_t B = 1, N = 65536, H = 2, D = 16;
  const Shape shape{B, N, H, D};
  Generator gen(9);
  Tensor q = Tensor::randn(shape, gen).requires_grad_(), k = Tensor::randn(shape, gen).requires_grad_(),
         v = Tensor::randn(shape, gen).requires_grad_();
  const Tensor dout = Tensor::randn(shape, gen);
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("1024:1,4096:4");
  opts.causal = true;
  const int64_t baseline = memory_stats().current_bytes;
  reset_peak_memory_stats();
  {
    Tensor o = dilated_attention(q, k, v, opts);
    o.backward(dout);
  }
  const int64_t extra = memory_stats().peak_bytes - baseline;
  // The outputs o, dq, dk, dv (X bytes each), three [B, H, N] rows (lse, Dt, and the zero gradient
  // the autograd engine makes for the unused lse output), per-thread tile scratch (under 160 KiB a
  // thread at D = 16) and the per-thread segment copies (capped by the kernel at X / 16 in all).
  // Measured: exactly 4 X + 3 L + 504 KiB (2 threads: 2 x 60 KiB tiles, 2 x 192 KiB copies).
  // Dense per-segment scores would take N * w floats = 2^30 bytes for w = 4096.
  const int64_t X = B * N * H * D * static_cast<int64_t>(sizeof(float));
  const int64_t L = B * H * N * static_cast<int64_t>(sizeof(float));
  const int64_t threads = omp_get_max_threads();
  RecordProperty("extra_bytes", std::to_string(extra));
  EXPECT_LE(extra, 4 * X + 3 * L + X / 16 + threads * (160 << 10) + (256 << 10)) << "extra " << extra
                                                                                 << " bytes, X = " << X;
}

// A segment or dilation far past N (up to INT64_MAX, where (N + w - 1) / w overflowed and every query
// was masked) acts as one of length N: same outputs, lse and gradients, with dropout and the bias on.
TEST(DilatedAttention, HugeSegmentsAndDilationsActAsTheSequenceLength) {
  const std::string max = std::to_string(std::numeric_limits<int64_t>::max());
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"9223372036854775777:1", "32:1"}, {max + ":1", "32:1"}, {"4:1," + max + ":" + max, "4:1,32:32"},
      {"4:1," + max + ":" + max + "k", "4:1,32:32k"}, {"4:1," + max + ":3k", "4:1,32:3k"}};
  Generator gen(3);
  const Shape shape{2, 32, 3, 8};
  const Tensor q = Tensor::randn(shape, gen, DType::Float64), k = Tensor::randn(shape, gen, DType::Float64),
               v = Tensor::randn(shape, gen, DType::Float64), bias = Tensor::randn({3, 32}, gen, DType::Float64),
               dout = Tensor::randn(shape, gen, DType::Float64);
  for (const auto& [huge, plain] : cases) {
    for (bool causal : {false, true}) {
      SCOPED_TRACE(huge + (causal ? " causal" : ""));
      ForwardBackward results[2];
      for (int i = 0; i < 2; ++i) {
        DilatedAttentionOptions opts;
        opts.schedule = parse_schedule(i == 0 ? huge : plain);
        opts.causal = causal;
        opts.dropout = 0.25;
        opts.seed = 9;
        results[i] = forward_backward(q, k, v, bias, dout, opts);
      }
      EXPECT_EQ(results[0].o_and_grads, results[1].o_and_grads);
      EXPECT_EQ(results[0].lse, results[1].lse);
      if (huge.find(':') == huge.rfind(':')) {  // one dense branch: every query attends
        for (double l : results[0].lse) EXPECT_TRUE(std::isfinite(l));
      }
    }
  }
}

// ---------------------------------------------------------------- schedule helpers

TEST(DilatedAttentionSchedule, CoverageAndVisitedPairsMatchBruteForce) {
  const std::vector<std::string> schedules = {"4:1", "6:2", "6:2,9:3", "5:2,10:4", "8:3,3:3", "7:5,12:2,3:2",
                                              "16:4,16:2", "6:2k", "8:3k,3:3", "7:5k,12:2", "4:1k,9:4k"};
  for (const auto& text : schedules) {
    const auto schedule = parse_schedule(text);
    EXPECT_EQ(format_schedule(schedule), text);
    for (int64_t H : {1, 2, 3, 5}) {
      for (int64_t N : {1, 7, 16, 31}) {
        for (bool causal : {false, true}) {
          SCOPED_TRACE(text + " H=" + std::to_string(H) + " N=" + std::to_string(N) + " causal " +
                       std::to_string(causal));
          ref::Problem p;
          p.N = N, p.H = H, p.schedule = schedule, p.causal = causal;
          std::vector<std::vector<char>> masks;  // [h * branches + i]
          for (int64_t h = 0; h < H; ++h)
            for (size_t i = 0; i < schedule.size(); ++i) masks.push_back(ref::key_mask(p, i, h));
          int64_t pairs = 0;
          for (const auto& mask : masks)
            for (char m : mask) pairs += m;
          EXPECT_EQ(visited_pairs(schedule, H, N, causal), pairs);
          Coverage want;  // a query is covered when some branch gives it a key
          for (int64_t t = 0; t < N && want.full; ++t)
            for (int64_t h = 0; h < H && want.full; ++h) {
              bool covered = false;
              for (size_t i = 0; i < schedule.size(); ++i)
                for (int64_t j = 0; j < N; ++j) covered = covered || masks[h * schedule.size() + i][t * N + j];
              if (!covered) want = {false, t, h};
            }
          const Coverage got = schedule_coverage(schedule, H, N, causal);
          EXPECT_EQ(got.full, want.full);
          EXPECT_EQ(got.first_uncovered_t, want.first_uncovered_t);
          EXPECT_EQ(got.first_uncovered_h, want.first_uncovered_h);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- relative-position buckets

// visited_pairs with w and r near INT64_MAX (r sub-problems per key-dilated segment hung it): one
// segment; a dilation of at least max(N, H) gives head h < N the one grid point h.
TEST(DilatedAttentionSchedule, VisitedPairsOfHugeSegmentsAndDilations) {
  const std::string max = std::to_string(std::numeric_limits<int64_t>::max());
  for (int64_t H : {3, 40}) {
    for (bool causal : {false, true}) {
      const int64_t N = 32, heads = std::min(H, N);
      SCOPED_TRACE("H=" + std::to_string(H) + (causal ? " causal" : ""));
      EXPECT_EQ(visited_pairs(parse_schedule(max + ":1"), H, N, causal), (causal ? N * (N + 1) / 2 : N * N) * H);
      EXPECT_EQ(visited_pairs(parse_schedule("9223372036854775777:1"), H, N, causal),
                visited_pairs(parse_schedule("32:1"), H, N, causal));
      EXPECT_EQ(visited_pairs(parse_schedule(max + ":" + max), H, N, causal), heads);
      // Key-dilated: the one key h, for every query (causal: every query at or after h).
      EXPECT_EQ(visited_pairs(parse_schedule(max + ":" + max + "k"), H, N, causal),
                causal ? heads * N - heads * (heads - 1) / 2 : heads * N);
      EXPECT_TRUE(schedule_coverage(parse_schedule(max + ":1"), H, N, causal).full);
    }
  }
}

TEST(DilatedAttentionBias, BucketsMatchTheContractFormula) {
  struct Config {
    bool causal;
    int64_t num_buckets, max_distance;
  };
  const int64_t N = 400;
  for (const Config& c : {Config{true, 32, 128}, Config{false, 32, 128}, Config{true, 8, 40}, Config{false, 6, 8},
                          Config{false, 64, 300}}) {
    const std::vector<int32_t> table = relative_position_buckets(N, c.causal, c.num_buckets, c.max_distance);
    ASSERT_EQ(table.size(), static_cast<size_t>(2 * N - 1));
    for (int64_t n = -(N - 1); n < N; ++n)
      ASSERT_EQ(table[static_cast<size_t>(n + N - 1)], ref::bucket(n, c.causal, c.num_buckets, c.max_distance))
          << "n = " << n << ", causal " << c.causal << ", buckets " << c.num_buckets;
  }
}

TEST(DilatedAttentionBias, KnownT5Buckets) {
  // torchscale's RelativePositionBias defaults (32 buckets, max distance 128), n = t - j.
  const int64_t N = 1001;
  const std::vector<int32_t> causal = relative_position_buckets(N, true, 32, 128);
  const std::vector<int32_t> bidir = relative_position_buckets(N, false, 32, 128);
  auto at = [N](const std::vector<int32_t>& table, int64_t n) { return table[static_cast<size_t>(n + N - 1)]; };
  const std::vector<std::pair<int64_t, int32_t>> causal_known = {
      {-5, 0}, {0, 0}, {1, 1}, {15, 15}, {16, 16}, {18, 16}, {19, 17}, {22, 18}, {23, 18},
      {30, 20}, {45, 23}, {64, 26}, {100, 30}, {127, 31}, {128, 31}, {1000, 31}};
  for (const auto& [n, b] : causal_known) EXPECT_EQ(at(causal, n), b) << "causal n = " << n;
  const std::vector<std::pair<int64_t, int32_t>> bidir_known = {
      {-1000, 31}, {-127, 31}, {-9, 24}, {-8, 24}, {-7, 23}, {-1, 17}, {0, 0}, {1, 1}, {7, 7},
      {8, 8}, {11, 8}, {12, 9}, {20, 10}, {50, 13}, {100, 15}, {128, 15}};
  for (const auto& [n, b] : bidir_known) EXPECT_EQ(at(bidir, n), b) << "bidirectional n = " << n;
}

}  // namespace
