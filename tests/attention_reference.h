// The dilated attention contract (docs/attention-contract.md) written out literally in
// float64: a dense key mask per (branch, head), one explicit softmax over the multiset of
// (branch, key) occurrences, the dropout bits and the bias buckets computed from their
// definitions. It is the oracle the kernels are tested against: obviously correct, not fast
// (O(K * N^2) per head), so small sizes only.
//
// naive_bf16 below is the yardstick for bf16 kernels: the same function computed the way a naive
// bf16 implementation (PyTorch's math attention in bf16) does, rounding where it rounds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "dilatron/bfloat16.h"
#include "dilatron/kernels/dilated_attention.h"
#include "dilatron/philox.h"

namespace dilatron::attention_reference {

struct Problem {
  int64_t B = 1, N = 1, H = 1, D = 1;
  std::vector<kernels::AttentionBranch> schedule;
  bool causal = false;
  double scale = 1.0;
  double p = 0.0;  // dropout
  uint64_t seed = 0;
  uint32_t offset = 0;
  std::vector<double> bias;  // [H, num_buckets], empty when the bias is off
  int64_t num_buckets = 32, max_distance = 128;
  std::vector<double> q, k, v;  // [B, N, H, D]

  size_t row(int64_t b, int64_t t, int64_t h) const { return static_cast<size_t>(((b * N + t) * H + h) * D); }
};

// "t is on the grid of (branch, head h)".
inline bool on_grid(const kernels::AttentionBranch& br, int64_t h, int64_t t) {
  const int64_t s = t / br.segment, u = t - s * br.segment, o = h % br.dilation;
  return u >= o && (u - o) % br.dilation == 0;
}

// mask[t * N + j]: j is in K_i(t) for branch i and head h. A dilated branch gives a query off its
// grid no keys; a key-dilated branch gives every query the grid keys of its segment.
inline std::vector<char> key_mask(const Problem& p, size_t i, int64_t h) {
  const auto& br = p.schedule[i];
  std::vector<char> mask(static_cast<size_t>(p.N * p.N), 0);
  for (int64_t t = 0; t < p.N; ++t)
    for (int64_t j = 0; j < p.N; ++j)
      mask[static_cast<size_t>(t * p.N + j)] = (br.kind == kernels::BranchKind::key_dilated || on_grid(br, h, t)) &&
                                               on_grid(br, h, j) &&
                                               t / br.segment == j / br.segment && (!p.causal || j <= t);
  return mask;
}

// m(t, i, j): the contract's Philox counter, key and threshold.
inline bool keep(const Problem& p, int64_t b, int64_t h, size_t i, int64_t t, int64_t j) {
  const Philox4 counter{{static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(t),
                         static_cast<uint32_t>((b * p.H + h) * 16 + static_cast<int64_t>(i)), p.offset}};
  const uint32_t x = philox4x32_10(counter, static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32))
                         .x[j & 3];
  return x >= static_cast<uint32_t>(std::floor(p.p * 4294967296.0));
}

// T5 bucket of n = t - j, as torchscale's RelativePositionBias.
inline int64_t bucket(int64_t n, bool causal, int64_t num_buckets, int64_t max_distance) {
  int64_t ret = 0, nb = num_buckets;
  if (causal) {
    n = std::max<int64_t>(n, 0);
  } else {
    nb = num_buckets / 2;
    if (n < 0) ret += nb;
    n = std::abs(n);
  }
  const int64_t max_exact = nb / 2;
  if (n < max_exact) return ret + n;
  const double large = std::log(static_cast<double>(n) / static_cast<double>(max_exact)) /
                       std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)) *
                       static_cast<double>(nb - max_exact);
  return ret + std::min(nb - 1, max_exact + static_cast<int64_t>(std::floor(large)));
}

inline double score(const Problem& p, int64_t b, int64_t h, int64_t t, int64_t j) {
  double s = 0.0;
  for (int64_t d = 0; d < p.D; ++d) s += p.q[p.row(b, t, h) + d] * p.k[p.row(b, j, h) + d];
  s *= p.scale;
  if (!p.bias.empty())
    s += p.bias[static_cast<size_t>(h * p.num_buckets + bucket(t - j, p.causal, p.num_buckets, p.max_distance))];
  return s;
}

// One (branch, key) occurrence in a query's multiset.
struct Occurrence {
  size_t i;
  int64_t j;
  double s;
};

// Calls f(b, h, t, occurrences of t) for every query.
template <typename F>
void for_each_query(const Problem& p, F&& f) {
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.H; ++h) {
      std::vector<std::vector<char>> masks;
      for (size_t i = 0; i < p.schedule.size(); ++i) masks.push_back(key_mask(p, i, h));
      for (int64_t t = 0; t < p.N; ++t) {
        std::vector<Occurrence> occ;
        for (size_t i = 0; i < p.schedule.size(); ++i)
          for (int64_t j = 0; j < p.N; ++j)
            if (masks[i][static_cast<size_t>(t * p.N + j)]) occ.push_back({i, j, score(p, b, h, t, j)});
        f(b, h, t, occ);
      }
    }
  }
}

struct Forward {
  std::vector<double> o;    // [B, N, H, D]
  std::vector<double> lse;  // [B, H, N]
};

inline Forward forward(const Problem& p) {
  Forward out{std::vector<double>(p.q.size(), 0.0),
              std::vector<double>(static_cast<size_t>(p.B * p.H * p.N), -std::numeric_limits<double>::infinity())};
  for_each_query(p, [&](int64_t b, int64_t h, int64_t t, const std::vector<Occurrence>& occ) {
    if (occ.empty()) return;  // on no grid: o = 0, lse = -inf
    double mx = -std::numeric_limits<double>::infinity();
    for (const auto& e : occ) mx = std::max(mx, e.s);
    double Z = 0.0;
    for (const auto& e : occ) Z += std::exp(e.s - mx);
    const double lse = mx + std::log(Z);
    out.lse[static_cast<size_t>((b * p.H + h) * p.N + t)] = lse;
    for (const auto& e : occ) {
      const double P = std::exp(e.s - lse);
      const double w = keep(p, b, h, e.i, t, e.j) ? P / (1.0 - p.p) : 0.0;
      for (int64_t d = 0; d < p.D; ++d) out.o[p.row(b, t, h) + d] += w * p.v[p.row(b, e.j, h) + d];
    }
  });
  return out;
}

struct Grads {
  std::vector<double> dq, dk, dv;  // [B, N, H, D]
  std::vector<double> dbias;       // [H, num_buckets], empty when the bias is off
};

inline Grads backward(const Problem& p, const Forward& fwd, const std::vector<double>& dout) {
  Grads g{std::vector<double>(p.q.size(), 0.0), std::vector<double>(p.q.size(), 0.0),
          std::vector<double>(p.q.size(), 0.0), std::vector<double>(p.bias.size(), 0.0)};
  for_each_query(p, [&](int64_t b, int64_t h, int64_t t, const std::vector<Occurrence>& occ) {
    const size_t rt = p.row(b, t, h);
    double Dt = 0.0;
    for (int64_t d = 0; d < p.D; ++d) Dt += dout[rt + d] * fwd.o[rt + d];
    const double lse = fwd.lse[static_cast<size_t>((b * p.H + h) * p.N + t)];
    for (const auto& e : occ) {
      const size_t rj = p.row(b, e.j, h);
      const double P = std::exp(e.s - lse);
      const double m = keep(p, b, h, e.i, t, e.j) ? 1.0 : 0.0;
      double do_v = 0.0;
      for (int64_t d = 0; d < p.D; ++d) do_v += dout[rt + d] * p.v[rj + d];
      const double dP = m / (1.0 - p.p) * do_v;
      const double dS = P * (dP - Dt);
      for (int64_t d = 0; d < p.D; ++d) {
        g.dq[rt + d] += p.scale * dS * p.k[rj + d];
        g.dk[rj + d] += p.scale * dS * p.q[rt + d];
        g.dv[rj + d] += P * m / (1.0 - p.p) * dout[rt + d];
      }
      if (!p.bias.empty())
        g.dbias[static_cast<size_t>(h * p.num_buckets + bucket(t - e.j, p.causal, p.num_buckets, p.max_distance))] +=
            dS;
    }
  });
  return g;
}

// ---------------------------------------------------------------- naive bf16

// The contract computed as a naive bf16 implementation does it: PyTorch's math attention run in bf16
// with autograd (FlashAttention's tests' baseline). The inputs are taken as given (the caller rounds
// them to bf16); every matmul sums in float32 and rounds its result to bf16, the softmax runs in
// float32 and rounds its output, dropout and scalings round, and the softmax backward takes
// D_t = sum_j P dP (not do . o). Accumulations over keys (o, dq) or queries (dk, dv, dbias) are
// float32 sums rounded once. lse (which the naive code never materialises) is float32 log Z.
struct NaiveBf16 {
  Forward fwd;
  Grads grads;
};

inline NaiveBf16 naive_bf16(const Problem& p, const std::vector<double>& dout) {
  auto r = [](float x) { return static_cast<float>(bfloat16(x)); };
  auto f = [](double x) { return static_cast<float>(x); };
  const float scale = f(p.scale), drop_scale = r(f(1.0 / (1.0 - p.p)));
  std::vector<float> o(p.q.size(), 0.0f), dq(p.q.size(), 0.0f), dk(p.q.size(), 0.0f), dv(p.q.size(), 0.0f),
      dbias(p.bias.size(), 0.0f);
  NaiveBf16 out;
  out.fwd.lse.assign(static_cast<size_t>(p.B * p.H * p.N), -std::numeric_limits<double>::infinity());
  for_each_query(p, [&](int64_t b, int64_t h, int64_t t, const std::vector<Occurrence>& occ) {
    if (occ.empty()) return;
    const size_t rt = p.row(b, t, h);
    std::vector<float> s, P, Pd, dP;
    std::vector<int64_t> buckets;
    for (const auto& e : occ) {
      float dot = 0.0f;
      for (int64_t d = 0; d < p.D; ++d) dot += f(p.q[rt + d]) * f(p.k[p.row(b, e.j, h) + d]);
      float si = r(r(dot) * scale);
      const int64_t bk = bucket(t - e.j, p.causal, p.num_buckets, p.max_distance);
      if (!p.bias.empty()) si = r(si + f(p.bias[static_cast<size_t>(h * p.num_buckets + bk)]));
      s.push_back(si);
      buckets.push_back(bk);
    }
    float mx = -std::numeric_limits<float>::infinity(), z = 0.0f;
    for (float si : s) mx = std::max(mx, si);
    for (float si : s) z += std::exp(si - mx);
    out.fwd.lse[static_cast<size_t>((b * p.H + h) * p.N + t)] = mx + std::log(z);
    float Dt = 0.0f;
    for (size_t n = 0; n < occ.size(); ++n) {
      const size_t rj = p.row(b, occ[n].j, h);
      const bool kept = keep(p, b, h, occ[n].i, t, occ[n].j);
      P.push_back(r(std::exp(s[n] - mx) / z));
      Pd.push_back(kept ? r(P[n] * drop_scale) : 0.0f);
      float do_v = 0.0f;
      for (int64_t d = 0; d < p.D; ++d) do_v += f(dout[rt + d]) * f(p.v[rj + d]);
      dP.push_back(kept ? r(r(do_v) * drop_scale) : 0.0f);
      Dt += P[n] * dP[n];
      for (int64_t d = 0; d < p.D; ++d) {
        o[rt + d] += Pd[n] * f(p.v[rj + d]);
        dv[rj + d] += Pd[n] * f(dout[rt + d]);
      }
    }
    for (size_t n = 0; n < occ.size(); ++n) {
      const size_t rj = p.row(b, occ[n].j, h);
      const float dS = r(P[n] * (dP[n] - Dt)), dS_scaled = r(dS * scale);
      for (int64_t d = 0; d < p.D; ++d) {
        dq[rt + d] += dS_scaled * f(p.k[rj + d]);
        dk[rj + d] += dS_scaled * f(p.q[rt + d]);
      }
      if (!p.bias.empty()) dbias[static_cast<size_t>(h * p.num_buckets + buckets[n])] += dS;
    }
  });
  auto rounded = [&](const std::vector<float>& x) {
    std::vector<double> y;
    for (float v : x) y.push_back(r(v));
    return y;
  };
  out.fwd.o = rounded(o);
  out.grads = {rounded(dq), rounded(dk), rounded(dv), rounded(dbias)};
  return out;
}

}  // namespace dilatron::attention_reference
