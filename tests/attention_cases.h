// The dilated attention cases both suites run (tests/test_dilated_attention.cpp on the CPU,
// tests/test_cuda.cpp on the GPU), and the run of one case against the float64 oracle
// (attention_reference.h) on any device.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "attention_reference.h"
#include "dilatron/attention.h"
#include "dilatron/random.h"

namespace dilatron::test {

struct AttentionCase {
  std::string name;
  int64_t B, N, H, D;
  std::string schedule;
  bool causal;
  double dropout;
  bool bias;
  bool quick;  // on the CUDA suite's short list, run under compute-sanitizer (DILATRON_CUDA_TEST_QUICK=1)
};
// gtest (and so ctest's test list) prints a parameter with this instead of its bytes.
inline void PrintTo(const AttentionCase& c, std::ostream* os) { *os << c.name; }
inline std::string case_name(const ::testing::TestParamInfo<AttentionCase>& info) { return info.param.name; }

// Every value of every axis appears at least once: causal or not; 1 to 4 branches; N = 97, 100,
// 1025 (w dividing N and not, w > N); r = 1, 2, 3, 4, 5, 8, 16 with H above and below r (and queries
// on no grid); D = 16, 32, 64, 128 and 8, 48 (padded to a compiled head dim on the GPU); B = 1, 2;
// dropout 0 and 0.3; bias on and off; key-dilated branches alone and merged with dilated ones.
inline const std::vector<AttentionCase> kAttentionCases = {
    {"one_branch_w_eq_n_causal", 1, 97, 2, 16, "97:1", true, 0.0, false, false},
    {"dense_97", 1, 97, 3, 32, "97:1", false, 0.0, false, true},
    {"two_branches_causal_bias", 2, 97, 3, 64, "32:1,64:2", true, 0.0, true, true},
    {"r_above_h_dropout_bias", 1, 97, 5, 16, "16:1,48:4,97:8", false, 0.3, true, true},
    {"uncovered_queries", 2, 97, 2, 32, "64:4", false, 0.0, false, true},
    {"uncovered_queries_dropout_bias", 2, 100, 3, 32, "32:2,64:4", false, 0.3, true, false},
    {"three_branches_causal_dropout_bias", 1, 97, 4, 64, "16:1,40:3,97:5", true, 0.3, true, false},
    {"four_branches_bias", 2, 100, 6, 16, "20:1,25:5,50:2,100:3", false, 0.0, true, false},
    {"short_segments_causal_dropout", 1, 100, 5, 16, "7:1,13:3", true, 0.3, false, false},
    {"w_above_n_and_r_eq_w", 2, 97, 3, 32, "128:1,4:4", false, 0.0, false, false},
    {"segments_dividing_n_causal_bias", 1, 100, 2, 64, "50:1,25:5,10:2", true, 0.0, true, false},
    {"long_ragged_causal_dropout_bias", 1, 1025, 2, 32, "256:1,1024:4", true, 0.3, true, false},
    {"long_dilated_one_head", 1, 1025, 1, 64, "100:2,300:3,1025:5", false, 0.0, false, false},
    {"four_branches_causal_1025", 1, 1025, 2, 64, "256:1,512:2,1024:4,1025:16", true, 0.0, false, false},
    {"d128_causal_dropout_bias_1025", 1, 1025, 4, 128, "1025:1,512:2", true, 0.3, true, false},
    {"ragged_segments_bias_1025", 2, 1025, 4, 32, "100:1,300:3,1025:5", false, 0.0, true, false},
    {"w_above_n_causal_dropout_1025", 1, 1025, 8, 64, "2048:1", true, 0.3, false, false},
    {"r_below_h_1025", 1, 1025, 8, 16, "1025:2,200:3,50:1", false, 0.3, false, false},
    {"four_branches_everything_1025", 1, 1025, 3, 64, "64:1,128:2,256:4,1025:8", true, 0.3, true, false},
    // head dims without their own CUDA kernel, zero-padded to the next one there
    {"d8_padded_causal_dropout_bias", 2, 97, 4, 8, "32:1,97:4", true, 0.3, true, true},
    {"d48_padded_ragged_1025", 1, 1025, 3, 48, "100:1,1025:3", false, 0.0, false, false},
    // key-dilated branches (every query, keys on the grid), alone and merged with dilated ones
    {"key_dilated_causal_dropout_bias", 2, 97, 3, 16, "97:4k", true, 0.3, true, false},
    {"key_dilated_causal_dropout_bias_d32", 2, 97, 3, 32, "97:4k", true, 0.3, true, true},
    {"key_dilated_ragged", 1, 100, 2, 32, "32:5k", false, 0.0, false, false},
    {"key_dilated_uncovered", 2, 97, 2, 64, "64:3k", false, 0.0, false, true},
    {"key_dilated_mixed_causal_dropout_bias_1025", 1, 1025, 5, 32, "64:1,1024:8k,300:3", true, 0.3, true, false},
    {"key_dilated_mixed_h8_causal_dropout_bias_1025", 1, 1025, 8, 64, "256:1,1024:8k,1025:4", true, 0.3, true, false},
    {"key_dilated_mixed_1025", 2, 1025, 3, 16, "1025:2k,128:1k,100:4", false, 0.3, true, false},
    {"key_dilated_ragged_bias_1025", 1, 1025, 3, 16, "300:5k,100:1", false, 0.0, true, false},
};

// max over elements of |got - want| / max(|want|, 1); equal infinities (lse of uncovered queries)
// count as exact, any other non-finite value as an infinite error.
inline double max_error(const std::vector<double>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double worst = 0.0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (got[i] == want[i]) continue;
    const double err = std::abs(got[i] - want[i]) / std::max(std::abs(want[i]), 1.0);
    worst = std::max(worst, std::isfinite(err) ? err : std::numeric_limits<double>::infinity());
  }
  return worst;
}

// The oracle's problem of a case: inputs drawn in float32 and rounded to input_dtype (so the runs in
// input_dtype and in wider types see the same values), a bias table of 8 buckets up to distance 40,
// fixed dropout seed and offset.
struct OracleRun {
  attention_reference::Problem problem;
  std::vector<double> dout;
  attention_reference::Forward want;
  attention_reference::Grads want_grads;
};
inline OracleRun oracle_run(const AttentionCase& c, DType input_dtype = DType::Float32) {
  const Shape shape{c.B, c.N, c.H, c.D};
  Generator gen(1234);
  auto draw = [&](const Shape& s) {
    return Tensor::randn(s, gen, DType::Float32, 0.0, 1.0).to(input_dtype).to_vector<double>();
  };
  OracleRun r;
  attention_reference::Problem& p = r.problem;
  p.B = c.B, p.N = c.N, p.H = c.H, p.D = c.D;
  p.schedule = parse_schedule(c.schedule);
  p.causal = c.causal;
  p.scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  p.p = c.dropout;
  p.seed = 0x9e3779b97f4a7c15ULL;
  p.offset = 7;
  p.num_buckets = 8;
  p.max_distance = 40;
  p.q = draw(shape);
  p.k = draw(shape);
  p.v = draw(shape);
  if (c.bias) p.bias = draw({c.H, p.num_buckets});
  r.dout = draw(shape);
  r.want = attention_reference::forward(p);
  r.want_grads = attention_reference::backward(p, r.want, r.dout);
  return r;
}

// max_error after dividing both by the reference table's scale (max(max |want|, 1)): dbias sums dS
// over up to N^2 pairs per head, so its error is measured against the whole table.
inline double table_scaled_error(std::vector<double> got, std::vector<double> want) {
  double scale = 1.0;
  for (double x : want) scale = std::max(scale, std::abs(x));
  for (double& x : got) x /= scale;
  for (double& x : want) x /= scale;
  return max_error(got, want);
}

// The op's options for the oracle's problem.
inline DilatedAttentionOptions oracle_options(const attention_reference::Problem& p) {
  return {.schedule = p.schedule,
          .causal = p.causal,
          .scale = std::nullopt,  // 1/sqrt(D), as the oracle's problem
          .dropout = p.p,
          .seed = p.seed,
          .offset = p.offset,
          .bias_num_buckets = p.num_buckets,
          .bias_max_distance = p.max_distance};
}

// Forward and backward through the op on `device` in `dtype`, every output and gradient within tol
// of the oracle. dbias sums dS over up to N^2 pairs per head; with table_scaled_dbias its error is
// measured relative to the whole table's scale rather than per element.
inline void expect_matches_oracle(const AttentionCase& c, const OracleRun& run, DType dtype, Device device, double tol,
                                  bool table_scaled_dbias = false) {
  SCOPED_TRACE(std::string(dtype_name(dtype)) + " on " + device.str());
  const attention_reference::Problem& p = run.problem;
  const Shape shape{c.B, c.N, c.H, c.D};
  auto leaf = [&](const std::vector<double>& values, const Shape& s) {
    return Tensor::from_vector(values, s, TensorOptions(dtype)).to(device).requires_grad_();
  };
  Tensor q = leaf(p.q, shape), k = leaf(p.k, shape), v = leaf(p.v, shape);
  Tensor bias = c.bias ? leaf(p.bias, {c.H, p.num_buckets}) : Tensor();
  const AttentionOutput out = dilated_attention_with_lse(q, k, v, oracle_options(p), bias);
  EXPECT_EQ(out.lse.dtype(), dtype);
  EXPECT_EQ(out.lse.shape(), (Shape{c.B, c.H, c.N}));
  EXPECT_LE(max_error(out.o.to_vector<double>(), run.want.o), tol) << "o";
  EXPECT_LE(max_error(out.lse.to_vector<double>(), run.want.lse), tol) << "lse";
  out.o.backward(Tensor::from_vector(run.dout, shape, TensorOptions(dtype)).to(device));
  EXPECT_LE(max_error(q.grad().to_vector<double>(), run.want_grads.dq), tol) << "dq";
  EXPECT_LE(max_error(k.grad().to_vector<double>(), run.want_grads.dk), tol) << "dk";
  EXPECT_LE(max_error(v.grad().to_vector<double>(), run.want_grads.dv), tol) << "dv";
  if (c.bias) {
    const std::vector<double> got = bias.grad().to_vector<double>();
    const std::vector<double>& want = run.want_grads.dbias;
    const double err = table_scaled_dbias ? table_scaled_error(got, want) : max_error(got, want);
    EXPECT_LE(err, tol) << "dbias";
  }
}

}  // namespace dilatron::test
