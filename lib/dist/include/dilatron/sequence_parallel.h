// LongNet's distributed dilated attention: the sequence split into contiguous parts over the ranks
// of a group (docs/distributed.md, "Sequence parallel").
#pragma once

#include "dilatron/attention.h"
#include "dilatron/dist.h"

namespace dilatron::dist {

// Rank r of S holds positions [r n, (r + 1) n) of q, k, v ([B, n, H, D], the same n on every rank,
// N = S n) and gets the output o for them: the contract's dilated_attention on the whole sequence
// (docs/attention-contract.md), differentiable in q, k, v and bias. A branch whose segment length
// divides n runs on the rank's part alone. A branch whose segment covers whole parts (its length,
// at most N, a multiple of n that divides N) is computed by the ranks of each segment together: they
// all-gather only the keys and values on the branch's grid (per head, ceil(n / r) per part) forward,
// and reduce-scatter their gradients backward, so a rank sends (ranks per segment - 1) x
// ceil(n / r) keys and values per head: bounded by w / r whatever S is. The gradient of the bias
// table is this rank's share: the ranks' sum is the whole sequence's. CPU tensors, float32 or
// float64, and no dropout (an Error says which is refused).
Tensor sequence_parallel_attention(const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionOptions& opts,
                                   ProcessGroup& group, const Tensor& bias = Tensor());

}  // namespace dilatron::dist
