// Flash dilated attention: the parameters every backend's kernels take, and the one home of the
// contract's rules (docs/attention-contract.md), host and device: the limits the op validates,
// the grid geometry, the dropout stream and keep test, and the bias bucket lookup.
// kernels/cpu/dilated_attention.cpp and kernels/cuda/dilated_attention.cu implement the function.
#pragma once

#include <cstdint>
#include <vector>

#include "dilatron/host_device.h"
#include "dilatron/philox.h"

namespace dilatron::kernels {

// dilated: LongNet's branch, queries and keys on the grid. key_dilated: every query of the
// segment, keys on the grid (schedule syntax "w:rk").
enum class BranchKind : int { dilated, key_dilated };

struct AttentionBranch {
  int64_t segment = 0;   // w_i >= 1
  int64_t dilation = 1;  // 1 <= r_i <= w_i
  BranchKind kind = BranchKind::dilated;
  bool operator==(const AttentionBranch&) const = default;
};

// ---- limits: the op (lib/ops/attention.cpp) rejects what exceeds them, the backends rely on them ----
// The dropout stream packs the branch index into 4 bits and (b*H + h) into the 28 above them.
constexpr int64_t kMaxBranches = 16;
constexpr int64_t kMaxBatchHeads = int64_t{1} << 28;  // B * H below this
constexpr int64_t kMaxSequence = int64_t{1} << 31;    // N below this: positions fit the 32-bit counter word

// The op's parameters resolved for the kernels (the op's attention_params builds them).
struct AttentionParams {
  std::vector<AttentionBranch> schedule;  // 1..kMaxBranches branches, validated by the op
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

// ---- grid geometry: the one home of the contract's "which query sees which key" ----
//
// Every branch splits, per (head h, segment s), into sub-problems that are dense attention between
// a query grid and a key grid with the same stride r: query a at qfirst + a*r, key c at
// kfirst + c*r, and causal visibility is exactly c <= a. A dilated branch has one sub-problem
// (both grids: offset o = h mod r). A key-dilated branch has r, one per query residue o' of the
// segment (keys: offset o). Causal, a residue o' < o starts one stride later: its first position
// has no key at or before it, and with 0 <= qfirst - kfirst < r the mask stays c <= a.

struct GridSpan {
  int64_t first = 0, stride = 1, count = 0;  // positions first + a * stride, a < count
  DILATRON_HOST_DEVICE int64_t position(int64_t a) const { return first + a * stride; }
};

// (N - 1) / w + 1 rather than (N + w - 1) / w, which overflows for w near INT64_MAX.
DILATRON_HOST_DEVICE int64_t num_segments(int64_t w, int64_t N) { return N > 0 ? (N - 1) / w + 1 : 0; }

// Positions start + u with u >= o, u = o (mod r), u < len.
DILATRON_HOST_DEVICE GridSpan residue_span(int64_t start, int64_t len, int64_t r, int64_t o) {
  return {start + o, r, len > o ? (len - o - 1) / r + 1 : 0};
}

DILATRON_HOST_DEVICE int64_t subproblems(BranchKind kind, int64_t r) {
  return kind == BranchKind::key_dilated ? r : 1;
}

// The keys of (branch (w, r), head h) in segment s.
DILATRON_HOST_DEVICE GridSpan key_grid(int64_t w, int64_t r, int64_t h, int64_t s, int64_t N) {
  const int64_t start = s * w, len = N - start < w ? N - start : w;
  return residue_span(start, len, r, h % r);
}

// The most grid points of any (head, segment, sub-problem) of branch (w, r), of either grid: head
// 0's first segment (tiles and scratch are sized by it).
DILATRON_HOST_DEVICE int64_t max_grid_points(int64_t w, int64_t r, int64_t N) { return key_grid(w, r, 0, 0, N).count; }

// The queries of sub-problem `sub` (< subproblems(kind, r)) of (branch, head h) in segment s.
DILATRON_HOST_DEVICE GridSpan query_grid(int64_t w, int64_t r, BranchKind kind, bool causal, int64_t h,
                                                int64_t s, int64_t sub, int64_t N) {
  if (kind == BranchKind::dilated) return key_grid(w, r, h, s, N);
  const int64_t start = s * w, len = N - start < w ? N - start : w, o = h % r;
  return residue_span(start, len, r, causal && sub < o ? sub + r : sub);
}

// Decoding: the keys query t can reach in branch (w, r, kind) of head h, all in t's segment and at
// or before t. Their positions are span.position(c); a decode cache holds them at index c. Empty
// for a dilated branch when t is not on the grid.
DILATRON_HOST_DEVICE GridSpan decode_key_span(int64_t w, int64_t r, BranchKind kind, int64_t h, int64_t t) {
  const int64_t start = t / w * w, o = h % r;
  const bool on_grid = t - start >= o && (t - start - o) % r == 0;
  if (kind == BranchKind::dilated && !on_grid) return {start + o, r, 0};
  return residue_span(start, t - start + 1, r, o);
}

// ---- dropout: the contract's bit m(t, i, j) of (b, h) ----
//
// counter {j >> 2, t, (b*H + h)*16 + i, offset}, key seed, word j & 3; keep when the word is at
// least floor(p * 2^32) (dropout_threshold). The four keys 4c .. 4c+3 share one Philox block.

// The third counter word of (b*H + h, branch i).
DILATRON_HOST_DEVICE uint32_t dropout_stream(int64_t bh, int64_t branch) {
  return static_cast<uint32_t>(bh * kMaxBranches + branch);
}

// The Philox block holding the words of keys 4c .. 4c+3 (c = j >> 2) for query t.
DILATRON_HOST_DEVICE Philox4 dropout_block(uint64_t seed, uint32_t offset, uint32_t stream, int64_t t, int64_t c) {
  return philox4x32_10(Philox4{{static_cast<uint32_t>(c), static_cast<uint32_t>(t), stream, offset}},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Key j's word of its block. Selects, not block.x[j & 3]: a runtime index would put the block in
// local memory on the GPU.
DILATRON_HOST_DEVICE uint32_t dropout_word(const Philox4& block, int64_t j) {
  return (j & 2) ? ((j & 1) ? block.x[3] : block.x[2]) : ((j & 1) ? block.x[1] : block.x[0]);
}

DILATRON_HOST_DEVICE bool dropout_keeps(uint32_t word, uint32_t threshold) { return word >= threshold; }

// ---- relative-position bias: the score's term bias[h, bucket(t - j)] ----

// The bucket of distance n = t - j in (-N, N), from AttentionParams' table (or a device copy of it)
// and its bucket_base = N - 1.
DILATRON_HOST_DEVICE int32_t bias_bucket(const int32_t* bucket_of_distance, int64_t bucket_base, int64_t n) {
  return bucket_of_distance[bucket_base + n];
}

}  // namespace dilatron::kernels
