// Decoding on the CPU: one query per (b, h) at position t against the cached keys of each branch,
// exactly the contract's output for that query (docs/attention-contract.md). The cache holds, per
// branch, the keys decode_key_span gives (t's segment, on the head's grid, at or before t), so the
// work is the sum over branches of those spans: at most w_i / r_i keys each, whatever t is.
//
// One online softmax over the multiset of (branch, key), as in the forward; exp is exp_float in
// float (the forward's) and libm's in float64. (b, h) pairs run in parallel.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"

namespace dilatron::kernels {
namespace {

template <typename T>
T exp_of(T x) {
  if constexpr (std::is_same_v<T, float>) return exp_float(x);
  else return std::exp(x);
}

template <typename T>
void decode(Tensor& o, const Tensor& q, const std::vector<Tensor>& k_caches, const std::vector<Tensor>& v_caches,
            const Tensor& bias, const AttentionParams& p, int64_t t) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const T* qd = q.data<T>();
  T* od = o.data<T>();
  const T* bias_d = bias.defined() ? bias.data<T>() : nullptr;
  const int64_t num_buckets = bias.defined() ? bias.size(1) : 0;
  const T scale = static_cast<T>(p.scale);
  parallel_for(B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(static_cast<size_t>(D));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* qrow = qd + bh * D;
      T m = -std::numeric_limits<T>::infinity(), l = 0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (size_t i = 0; i < p.schedule.size(); ++i) {
        const AttentionBranch& br = p.schedule[i];
        const GridSpan span = decode_key_span(br.segment, br.dilation, br.kind, h, t);
        const int64_t capacity = k_caches[i].size(2);
        const T* kd = k_caches[i].data<T>() + (b * H + h) * capacity * D;
        const T* vd = v_caches[i].data<T>() + (b * H + h) * capacity * D;
        for (int64_t c = 0; c < span.count; ++c) {
          T s = 0;
          for (int64_t d = 0; d < D; ++d) s += qrow[d] * kd[c * D + d];
          s *= scale;
          if (bias_d)
            s += bias_d[h * num_buckets + bias_bucket(p.bucket_of_distance.data(), p.bucket_base, t - span.position(c))];
          // Online softmax: rescale what was summed when the maximum grows.
          const T m_new = std::max(m, s);
          const T correction = exp_of(m - m_new), e = exp_of(s - m_new);
          l = l * correction + e;
          for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * correction + e * vd[c * D + d];
          m = m_new;
        }
      }
      T* orow = od + bh * D;
      for (int64_t d = 0; d < D; ++d) orow[d] = l > 0 ? acc[d] / l : T(0);
    }
  });
}

}  // namespace

void CpuBackend::dilated_attention_decode(Tensor& o, const Tensor& q, const std::vector<Tensor>& k_caches,
                                          const std::vector<Tensor>& v_caches, const Tensor& bias,
                                          const AttentionParams& params, int64_t t) {
  dispatch_float(q.dtype(), [&](auto tag) { decode<decltype(tag)>(o, q, k_caches, v_caches, bias, params, t); });
}

}  // namespace dilatron::kernels
