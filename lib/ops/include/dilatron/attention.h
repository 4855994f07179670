// Flash dilated attention (LongNet): the op, its schedule helpers and the relative-position bias
// buckets. The function is defined in docs/attention-contract.md (the contract).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dilatron/kernels/dilated_attention.h"
#include "dilatron/tensor.h"

namespace dilatron {

using kernels::AttentionBranch;
using kernels::BranchKind;

struct DilatedAttentionOptions {
  std::vector<AttentionBranch> schedule;  // 1..16 branches (w_i, r_i, kind_i)
  bool causal = false;
  std::optional<double> scale;            // default 1/sqrt(D)
  double dropout = 0.0;                   // on attention probabilities, in [0, 1)
  uint64_t seed = 0;                      // dropout bits: read only when dropout > 0
  uint32_t offset = 0;
  int64_t bias_num_buckets = 32;          // relative-position bias, used when a bias table is given
  int64_t bias_max_distance = 128;
};

// q, k, v [B, N, H, D] (same dtype and device); bias: undefined, or the learned table
// [H, bias_num_buckets]. Returns o [B, N, H, D]. Differentiable in q, k, v and bias.
Tensor dilated_attention(const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionOptions& opts,
                         const Tensor& bias = Tensor());

// The same, with the log-sum-exp of each query's scores, lse [B, H, N] (no gradient; -inf for a
// query on no branch's grid). lse is float32 for float32 inputs and float64 for float64 inputs
// (a float32 lse would cap the float64 backward at float32 accuracy).
struct AttentionOutput {
  Tensor o, lse;
};
AttentionOutput dilated_attention_with_lse(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const DilatedAttentionOptions& opts, const Tensor& bias = Tensor());

// The kernel parameters the op passes its backend for these arguments, after every check of the
// contract (an Error names what is rejected): for code that calls the backend itself (the
// sequence-parallel op, lib/dist).
kernels::AttentionParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const DilatedAttentionOptions& opts, const Tensor& bias = Tensor());

// ---- schedules ----

// "2048:1,4096:2" -> {{2048, 1}, {4096, 2}} (segment:dilation, comma separated), validated; a
// trailing k makes a key-dilated branch ("2048:8k": every query, keys on the grid).
std::vector<AttentionBranch> parse_schedule(const std::string& text);
// The inverse of parse_schedule.
std::string format_schedule(const std::vector<AttentionBranch>& schedule);
// Throws an Error naming the problem: empty, more than 16 branches, or a branch with w < 1, r < 1
// or r > w (naming the branch index and its values).
void validate_schedule(const std::vector<AttentionBranch>& schedule);

// The schedule as it acts on H heads of length N, as the op runs it: w and r at most max(N, H, 1)
// (the same key sets).
std::vector<AttentionBranch> bounded_schedule(std::vector<AttentionBranch> schedule, int64_t H, int64_t N);

// Whether every (query t, head h) has a key in some branch (for a dilated branch: t lies on its
// grid; for a key-dilated one: t's segment has a grid key, at or before t when causal); if not,
// the first uncovered pair in (t, then h) order (both -1 when full).
struct Coverage {
  bool full = true;
  int64_t first_uncovered_t = -1;
  int64_t first_uncovered_h = -1;
};
Coverage schedule_coverage(const std::vector<AttentionBranch>& schedule, int64_t H, int64_t N, bool causal);

// The exact number of (query, key) score evaluations of one batch element, summed over heads and
// branches (a key in two branches counts twice): the work the kernels do, for FLOP counting.
int64_t visited_pairs(const std::vector<AttentionBranch>& schedule, int64_t H, int64_t N, bool causal);

// Floating-point operations of one call on [B, N, H, D] inputs, counted over the visited pairs: 4*D
// per pair forward (2*D for the score q.k, 2*D for adding p*v) and 2.5x that backward (the
// recomputed score, dp = do.v, and the dv, dq, dk updates: five D-long products per pair instead of
// two; FlashAttention's convention), so forward+backward is 3.5x the forward. Benchmarks divide it
// by time for an effective FLOP/s.
struct AttentionFlops {
  double forward = 0.0, backward = 0.0;
  double forward_backward() const { return forward + backward; }
};
AttentionFlops attention_flops(const std::vector<AttentionBranch>& schedule, int64_t B, int64_t H, int64_t N,
                               int64_t D, bool causal);

// ---- relative-position bias ----

// The T5 bucket of every distance n = t - j in [-(N-1), N-1], entry n + N - 1 (the contract's
// formula, thresholds in double). Rejects num_buckets / max_distance that leave the formula
// undefined (max_exact < 1, max_distance <= max_exact) and, bidirectional, an odd num_buckets
// (its last bucket could never be used).
std::vector<int32_t> relative_position_buckets(int64_t N, bool causal, int64_t num_buckets, int64_t max_distance);

// ---- incremental decoding ----

// What later queries of one causal attention layer can still reach: per branch i and head h, the
// keys and values on the grid of (i, h) in the segment of the latest position, at most
// ceil(w_i / r_i) of them, so the memory is bounded by the schedule, not by the context length.
class AttentionCache {
 public:
  AttentionCache() = default;
  // For keys and values [B, T, H, D] of these options (dtype, device).
  AttentionCache(std::vector<AttentionBranch> schedule, int64_t B, int64_t H, int64_t D, TensorOptions options);
  int64_t length() const { return length_; }  // positions appended so far
  int64_t bytes() const;                      // of the keys and values held
  // Keys and values [B, T, H, D] of positions length() .. length() + T - 1, keys as the scores see
  // them (position encoding applied).
  void append(const Tensor& k, const Tensor& v);

  const std::vector<AttentionBranch>& schedule() const { return schedule_; }
  const std::vector<Tensor>& keys() const { return keys_; }      // per branch [B, H, capacity, D]
  const std::vector<Tensor>& values() const { return values_; }  // the same

 private:
  std::vector<AttentionBranch> schedule_;
  std::vector<Tensor> keys_, values_;
  int64_t length_ = 0;
};

// The causal output for the query q [B, 1, H, D] at position cache.length() - 1 (its key and value
// already appended): the contract's o at that position for opts (causal; dropout off), computed from
// the cache alone. Inference only (no gradient).
Tensor dilated_attention_decode(const Tensor& q, const AttentionCache& cache, const DilatedAttentionOptions& opts,
                                const Tensor& bias = Tensor());

}  // namespace dilatron
