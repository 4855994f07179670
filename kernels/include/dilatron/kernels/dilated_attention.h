// Flash dilated attention: the parameters every backend's kernels take. The function itself is
// defined in ../shared/specs/dilated-attention.md (the contract); kernels/cpu/dilated_attention.cpp
// and kernels/cuda/dilated_attention.cu implement it.
#pragma once

#include <cstdint>
#include <vector>

namespace dilatron::kernels {

struct AttentionBranch {
  int64_t segment = 0;   // w_i >= 1
  int64_t dilation = 1;  // 1 <= r_i <= w_i
  bool operator==(const AttentionBranch&) const = default;
};

struct AttentionParams {
  std::vector<AttentionBranch> schedule;  // 1..16 branches, validated by the op
  bool causal = false;
  double scale = 0.0;      // resolved (1/sqrt(D) when the user gave none)
  double dropout_p = 0.0;  // on attention probabilities
  uint64_t seed = 0;
  uint32_t offset = 0;
  // Relative-position bias: bucket_of_distance[n + bucket_base] is the bucket of n = t - j,
  // for n in [-(N-1), N-1] (bucket_base = N - 1). Empty when the bias is off.
  std::vector<int32_t> bucket_of_distance;
  int64_t bucket_base = 0;
};

}  // namespace dilatron::kernels
