// Gradients of data-parallel training: each rank's backward leaves the gradient of its part of the
// global batch, and these make every rank's gradients the global batch's.
#pragma once

#include <cstdint>
#include <vector>

#include "dilatron/dist.h"

namespace dilatron::dist {

// PyTorch DDP's default bucket: large enough that per-message latency stays small, small enough that
// the flat copies stay a fraction of the gradients' memory.
inline constexpr int64_t kBucketBytes = int64_t{25} << 20;

// Sums the gradients of `params` (each defined, every rank with the same shapes in the same order)
// over the ranks: each bucket of up to bucket_bytes is copied into one flat tensor, all-reduced, and
// its parts become the gradients.
void all_reduce_gradients(ProcessGroup& group, const std::vector<Tensor>& params, int64_t bucket_bytes = kBucketBytes);

// The gradients of `params` as one flat tensor [n] (n: their elements), in order.
Tensor flatten_gradients(const std::vector<Tensor>& params);
// Sets the gradients of `params` to the parts of a flat tensor laid out as flatten_gradients lays it out.
void set_gradients(const std::vector<Tensor>& params, const Tensor& flat);

// The deterministic sum of a global batch's K shards: `local` holds this rank's K / P consecutive
// shards [K / P, n] (rank r: shards r K / P ...); every rank's are gathered and summed left to right,
// ((s_0 + s_1) + s_2) + ..., into [n]. The bits depend only on the shards, not on P.
Tensor sum_shards_in_order(ProcessGroup& group, const Tensor& local);

}  // namespace dilatron::dist
