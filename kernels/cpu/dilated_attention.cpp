// Flash dilated attention on the CPU: exactly the function of ../shared/specs/dilated-attention.md.
//
// Rows in place. q, k, v, o and their gradients are [B, N, H, D]: the row of (b, t, h) starts at
// ((b*N + t)*H + h)*D. The grid of (branch i, head h) in segment s is t = s*w + o + a*r
// (o = h mod r, a = 0..g-1), so a tile of consecutive grid points is a set of rows r*H*D apart,
// read and written in place; nothing is gathered. On a grid, causality is c <= a in grid indices,
// so a segment is dense (causal) attention over its g grid points: key tiles above the diagonal
// are skipped and the diagonal tile is masked.
//
// Forward. The merge over branches is one softmax over the multiset of (branch, key). An online
// softmax's state for query t, (running max m, running sum l, accumulator acc), is equivalent to
// (lse = m + log l, o = acc / l), so the outputs o and lse themselves carry the state from one
// branch to the next: branch i's pass over a query tile starts from m = lse, l = 1 (l = 0 while
// lse = -inf: no key yet) and acc = o, folds in the branch's key tiles (acc lives in o's rows),
// and stores o = acc / l, lse = m + log l. After the last branch, o and lse are the merged result
// exactly; a query on no grid keeps the initial o = 0, lse = -inf. Branches run one after another
// (they update the same rows); within a branch the (b, h, segment, query tile) work items own
// disjoint rows and run in parallel, costliest (causal: last) tiles first.
//
// Backward (FlashAttention-2). Dt = <do[t], o[t]> once per row; then per branch, per
// (b, h, segment) work item: for each key tile, for each query tile at or below the diagonal,
// recompute s, P = exp(s - lse) and the dropout bits, dS = P (dP - Dt), and accumulate dv and dk
// (key rows) and dq (query rows) in place. Within a branch, work items touch disjoint rows; the
// branches run one after another because they share rows. dbias is summed per work item into its
// own slot and the slots are added in item order, so every result is independent of thread timing.
//
// Extra memory beyond the inputs and outputs: per thread one (forward) or two (backward) 64 x 64
// score tiles, whatever N is; the backward adds Dt [B, H, N] and the dbias slots
// [B*H*segments, num_buckets] (double), both linear in N. Nothing is N x N or N x w.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"
#include "dilatron/philox.h"
#include "dilatron/storage.h"

namespace dilatron::kernels {
namespace {

constexpr int64_t kTile = 64;  // grid points per query tile and per key tile (64 x 64 scores, in L1)

// The grid points of (branch, head) in one segment: positions first + a * stride, a < count.
struct GridSpan {
  int64_t first = 0, stride = 1, count = 0;
  int64_t position(int64_t a) const { return first + a * stride; }
};

GridSpan grid_span(const AttentionBranch& br, int64_t h, int64_t s, int64_t N) {
  const int64_t start = s * br.segment, len = std::min(br.segment, N - start), o = h % br.dilation;
  return {start + o, br.dilation, len > o ? (len - o - 1) / br.dilation + 1 : 0};
}

int64_t num_segments(const AttentionBranch& br, int64_t N) { return (N + br.segment - 1) / br.segment; }

// The problem's sizes and options, in the kernel's type.
template <typename T>
struct Problem {
  int64_t B, N, H, D;
  T scale;
  bool causal;
  bool dropout;
  uint32_t threshold, key0, key1, offset;
  T keep_scale;            // 1 / (1 - p)
  const T* bias;           // [H, num_buckets], or null
  int64_t num_buckets;
  const int32_t* bucket;   // bucket[t - j] for |t - j| < N

  Problem(const Tensor& q, const Tensor& bias_table, const AttentionParams& p)
      : B(q.size(0)), N(q.size(1)), H(q.size(2)), D(q.size(3)), scale(static_cast<T>(p.scale)), causal(p.causal),
        dropout(p.dropout_p > 0.0), threshold(dropout_threshold(p.dropout_p)),
        key0(static_cast<uint32_t>(p.seed)), key1(static_cast<uint32_t>(p.seed >> 32)), offset(p.offset),
        keep_scale(static_cast<T>(1.0 / (1.0 - p.dropout_p))),
        bias(bias_table.defined() ? bias_table.data<T>() : nullptr),
        num_buckets(bias_table.defined() ? bias_table.size(1) : 0),
        bucket(bias_table.defined() ? p.bucket_of_distance.data() + p.bucket_base : nullptr) {}

  int64_t row(int64_t b, int64_t t, int64_t h) const { return ((b * N + t) * H + h) * D; }
  // Offset between consecutive grid rows of a branch with dilation r.
  int64_t grid_step(int64_t r) const { return r * H * D; }
  // The third Philox counter word of (b, h, branch i).
  uint32_t stream(int64_t b, int64_t h, size_t i) const { return static_cast<uint32_t>((b * H + h) * 16 + i); }
};

// The contract's dropout bits m(t, i, j) along one query row: one Philox block holds the words of
// the 4 keys with the same j >> 2, so it is computed once per block as j increases.
class DropoutRow {
 public:
  template <typename T>
  DropoutRow(const Problem<T>& p, int64_t t, uint32_t stream)
      : key0_(p.key0), key1_(p.key1), t_(static_cast<uint32_t>(t)), stream_(stream), offset_(p.offset),
        threshold_(p.threshold) {}
  bool keep(int64_t j) {
    const auto block = static_cast<uint32_t>(j >> 2);
    if (block != block_) {
      words_ = philox4x32_10(Philox4{{block, t_, stream_, offset_}}, key0_, key1_);
      block_ = block;
    }
    return words_.x[j & 3] >= threshold_;
  }

 private:
  uint32_t key0_, key1_, t_, stream_, offset_, threshold_;
  uint32_t block_ = std::numeric_limits<uint32_t>::max();  // no block: j < 2^31, so j >> 2 < 2^29
  Philox4 words_{};
};

template <typename T>
T dot(const T* x, const T* y, int64_t D) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += x[d] * y[d];
  return s;
}

// S[a * ld + c] = <x_a, y_c> for a < na, c < nc, with rows x_a = x + a * x_step and
// y_c = y + c * y_step of D elements. Blocks of 2 x 4 dot products share their loads; the simd
// reduction lets the compiler split each sum across vector lanes.
template <typename T>
void tile_dots(const T* x, int64_t x_step, int64_t na, const T* y, int64_t y_step, int64_t nc, int64_t D, T* S,
               int64_t ld) {
  int64_t a = 0;
  for (; a + 2 <= na; a += 2) {
    const T* x0 = x + a * x_step;
    const T* x1 = x0 + x_step;
    T* s0 = S + a * ld;
    T* s1 = s0 + ld;
    int64_t c = 0;
    for (; c + 4 <= nc; c += 4) {
      const T* y0 = y + c * y_step;
      const T* y1 = y0 + y_step;
      const T* y2 = y1 + y_step;
      const T* y3 = y2 + y_step;
      T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
      for (int64_t d = 0; d < D; ++d) {
        const T a0 = x0[d], a1 = x1[d];
        s00 += a0 * y0[d];
        s01 += a0 * y1[d];
        s02 += a0 * y2[d];
        s03 += a0 * y3[d];
        s10 += a1 * y0[d];
        s11 += a1 * y1[d];
        s12 += a1 * y2[d];
        s13 += a1 * y3[d];
      }
      s0[c] = s00, s0[c + 1] = s01, s0[c + 2] = s02, s0[c + 3] = s03;
      s1[c] = s10, s1[c + 1] = s11, s1[c + 2] = s12, s1[c + 3] = s13;
    }
    for (; c < nc; ++c) {
      s0[c] = dot(x0, y + c * y_step, D);
      s1[c] = dot(x1, y + c * y_step, D);
    }
  }
  for (; a < na; ++a)
    for (int64_t c = 0; c < nc; ++c) S[a * ld + c] = dot(x + a * x_step, y + c * y_step, D);
}

// out_x += sum_y W[x * wx + y * wy] * in_y for the R rows x < R, with rows out_x = out + x * out_step
// and in_y = in + y * in_step of D elements. Each pass over D adds four input rows into R output
// rows, so a loaded input element serves R outputs; the D loop carries no dependence, so it
// vectorises without reassociation.
template <int R, typename T>
void accumulate_block(T* out, int64_t out_step, const T* W, int64_t wx, int64_t wy, const T* in, int64_t in_step,
                      int64_t ny, int64_t D) {
  T* dst[R];
  const T* w[R];
  for (int x = 0; x < R; ++x) dst[x] = out + x * out_step, w[x] = W + x * wx;
  int64_t y = 0;
  for (; y + 4 <= ny; y += 4) {
    T c[R][4];
    for (int x = 0; x < R; ++x)
      for (int u = 0; u < 4; ++u) c[x][u] = w[x][(y + u) * wy];
    const T* i0 = in + y * in_step;
    const T* i1 = i0 + in_step;
    const T* i2 = i1 + in_step;
    const T* i3 = i2 + in_step;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const T v0 = i0[d], v1 = i1[d], v2 = i2[d], v3 = i3[d];
      for (int x = 0; x < R; ++x) dst[x][d] += (c[x][0] * v0 + c[x][1] * v1) + (c[x][2] * v2 + c[x][3] * v3);
    }
  }
  for (; y < ny; ++y) {
    T c[R];
    for (int x = 0; x < R; ++x) c[x] = w[x][y * wy];
    const T* i0 = in + y * in_step;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d)
      for (int x = 0; x < R; ++x) dst[x][d] += c[x] * i0[d];
  }
}

// The same for all rows x < nx, two at a time.
template <typename T>
void accumulate_rows(T* out, int64_t out_step, int64_t nx, const T* W, int64_t wx, int64_t wy, const T* in,
                     int64_t in_step, int64_t ny, int64_t D) {
  int64_t x = 0;
  for (; x + 2 <= nx; x += 2)
    accumulate_block<2>(out + x * out_step, out_step, W + x * wx, wx, wy, in, in_step, ny, D);
  if (x < nx) accumulate_block<1>(out + x * out_step, out_step, W + x * wx, wx, wy, in, in_step, ny, D);
}

template <typename T>
void scale_row(T* x, T factor, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) x[d] *= factor;
}

// Threads for `items` independent work items (1 inside an enclosing parallel region).
int worker_count(int64_t items) {
  if (omp_in_parallel()) return 1;
  return static_cast<int>(std::clamp<int64_t>(items, 1, omp_get_max_threads()));
}

// ---------------------------------------------------------------- forward

// Folds branch `i`'s keys into the state (o, lse) of the query tile q0.. of grid g.
template <typename T>
void forward_tile(const Problem<T>& P, const T* q, const T* k, const T* v, T* o, T* lse, int64_t b, int64_t h,
                  size_t i, const GridSpan& g, int64_t q0, T* scores) {
  const int64_t nq = std::min(kTile, g.count - q0);
  const int64_t step = P.grid_step(g.stride), base = P.row(b, g.first, h), D = P.D;
  const T* q_tile = q + base + q0 * step;
  T* o_tile = o + base + q0 * step;
  T* lse_bh = lse + (b * P.H + h) * P.N;
  const T* bias_h = P.bias ? P.bias + h * P.num_buckets : nullptr;
  const uint32_t stream = P.stream(b, h, i);

  T m[kTile], l[kTile];  // running max and sum of the online softmax
  for (int64_t a = 0; a < nq; ++a) {
    m[a] = lse_bh[g.position(q0 + a)];
    l[a] = m[a] == -std::numeric_limits<T>::infinity() ? T(0) : T(1);
  }
  // Causal: keys up to the tile's last query; the tiles are aligned, so every row of the last
  // (diagonal) key tile keeps at least its own key.
  const int64_t key_end = P.causal ? q0 + nq : g.count;
  for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
    const int64_t nk = std::min(kTile, key_end - k0);
    tile_dots(q_tile, step, nq, k + base + k0 * step, step, nk, D, scores, kTile);
    for (int64_t a = 0; a < nq; ++a) {
      const int64_t qi = q0 + a, t = g.position(qi);
      const int64_t valid = P.causal ? std::min(nk, qi - k0 + 1) : nk;
      T* s = scores + a * kTile;
      T mx = m[a];
      for (int64_t c = 0; c < valid; ++c) {
        s[c] *= P.scale;
        if (bias_h) s[c] += bias_h[P.bucket[t - g.position(k0 + c)]];
        mx = std::max(mx, s[c]);
      }
      const T alpha = std::exp(m[a] - mx);  // 0 while m = -inf
      T sum = 0;
      for (int64_t c = 0; c < valid; ++c) {
        s[c] = std::exp(s[c] - mx);
        sum += s[c];
      }
      if (P.dropout) {
        DropoutRow bits(P, t, stream);
        for (int64_t c = 0; c < valid; ++c) s[c] = bits.keep(g.position(k0 + c)) ? s[c] * P.keep_scale : T(0);
      }
      std::fill(s + valid, s + nk, T(0));
      l[a] = l[a] * alpha + sum;
      m[a] = mx;
      if (alpha != T(1)) scale_row(o_tile + a * step, alpha, D);
    }
    accumulate_rows(o_tile, step, nq, scores, kTile, 1, v + base + k0 * step, step, nk, D);
  }
  for (int64_t a = 0; a < nq; ++a) {
    scale_row(o_tile + a * step, T(1) / l[a], D);
    lse_bh[g.position(q0 + a)] = m[a] + std::log(l[a]);
  }
}

template <typename T>
void forward(Tensor& o_t, Tensor& lse_t, const Tensor& q_t, const Tensor& k_t, const Tensor& v_t,
             const Tensor& bias_t, const AttentionParams& params) {
  const Problem<T> P(q_t, bias_t, params);
  const T *q = q_t.data<T>(), *k = k_t.data<T>(), *v = v_t.data<T>();
  T* o = o_t.data<T>();
  T* lse = lse_t.data<T>();
  const int64_t BH = P.B * P.H;
  parallel_for(o_t.numel(), 1 << 16, [&](int64_t begin, int64_t end) { std::fill(o + begin, o + end, T(0)); });
  std::fill(lse, lse + BH * P.N, -std::numeric_limits<T>::infinity());

  // Work items of branch i: (query tile, b*H + h, segment), last query tiles first.
  auto tiles_of = [&](const AttentionBranch& br) {
    return (grid_span(br, 0, 0, P.N).count + kTile - 1) / kTile;  // head 0's first segment is the largest
  };
  int64_t max_items = 0;
  for (const auto& br : params.schedule) max_items = std::max(max_items, tiles_of(br) * BH * num_segments(br, P.N));
  const int threads = worker_count(max_items);
  ScratchBuffer<T> scratch(static_cast<size_t>(threads * kTile * kTile));

#pragma omp parallel num_threads(threads)
  {
    T* scores = scratch.data() + omp_get_thread_num() * kTile * kTile;
    for (size_t i = 0; i < params.schedule.size(); ++i) {
      const AttentionBranch& br = params.schedule[i];
      const int64_t nseg = num_segments(br, P.N), tiles = tiles_of(br), per_tile = BH * nseg;
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < tiles * per_tile; ++item) {
        const int64_t tile = tiles - 1 - item / per_tile, bh = item % per_tile / nseg, s = item % nseg;
        const int64_t b = bh / P.H, h = bh % P.H;
        const GridSpan g = grid_span(br, h, s, P.N);
        if (tile * kTile < g.count) forward_tile(P, q, k, v, o, lse, b, h, i, g, tile * kTile, scores);
      }
    }
  }
}

// ---------------------------------------------------------------- backward

// All of branch i's gradient contributions within one segment (grid g) of (b, h).
template <typename T>
void backward_segment(const Problem<T>& P, const T* q, const T* k, const T* v, const T* dout, const T* lse,
                      const T* Dt, T* dq, T* dk, T* dv, int64_t b, int64_t h, size_t i, const GridSpan& g, T* S,
                      T* dP, double* dbias) {
  const int64_t step = P.grid_step(g.stride), base = P.row(b, g.first, h), D = P.D;
  const T* lse_bh = lse + (b * P.H + h) * P.N;
  const T* Dt_bh = Dt + (b * P.H + h) * P.N;
  const T* bias_h = P.bias ? P.bias + h * P.num_buckets : nullptr;
  const uint32_t stream = P.stream(b, h, i);

  for (int64_t k0 = 0; k0 < g.count; k0 += kTile) {
    const int64_t nk = std::min(kTile, g.count - k0), key_rows = base + k0 * step;
    for (int64_t q0 = P.causal ? k0 : 0; q0 < g.count; q0 += kTile) {
      const int64_t nq = std::min(kTile, g.count - q0), query_rows = base + q0 * step;
      tile_dots(q + query_rows, step, nq, k + key_rows, step, nk, D, S, kTile);
      tile_dots(dout + query_rows, step, nq, v + key_rows, step, nk, D, dP, kTile);
      for (int64_t a = 0; a < nq; ++a) {
        const int64_t qi = q0 + a, t = g.position(qi);
        const int64_t valid = P.causal ? std::min(nk, qi - k0 + 1) : nk;
        const T lse_t = lse_bh[t], D_t = Dt_bh[t];
        T* s = S + a * kTile;
        T* dp = dP + a * kTile;
        DropoutRow bits(P, t, stream);
        for (int64_t c = 0; c < valid; ++c) {
          const int64_t j = g.position(k0 + c);
          T score = s[c] * P.scale;
          if (bias_h) score += bias_h[P.bucket[t - j]];
          const T p = std::exp(score - lse_t);
          const T kept = P.dropout ? (bits.keep(j) ? P.keep_scale : T(0)) : T(1);
          const T ds = p * (dp[c] * kept - D_t);
          if (dbias) dbias[P.bucket[t - j]] += ds;
          s[c] = p * kept;      // weight of do[t] in dv[j]
          dp[c] = P.scale * ds;  // weight of k[j] in dq[t] and of q[t] in dk[j]
        }
        std::fill(s + valid, s + nk, T(0));
        std::fill(dp + valid, dp + nk, T(0));
      }
      accumulate_rows(dv + key_rows, step, nk, S, 1, kTile, dout + query_rows, step, nq, D);
      accumulate_rows(dk + key_rows, step, nk, dP, 1, kTile, q + query_rows, step, nq, D);
      accumulate_rows(dq + query_rows, step, nq, dP, kTile, 1, k + key_rows, step, nk, D);
    }
  }
}

template <typename T>
void backward(Tensor& dq_t, Tensor& dk_t, Tensor& dv_t, Tensor& dbias_t, const Tensor& dout_t, const Tensor& q_t,
              const Tensor& k_t, const Tensor& v_t, const Tensor& o_t, const Tensor& lse_t, const Tensor& bias_t,
              const AttentionParams& params) {
  const Problem<T> P(q_t, bias_t, params);
  const T *q = q_t.data<T>(), *k = k_t.data<T>(), *v = v_t.data<T>(), *dout = dout_t.data<T>(),
          *o = o_t.data<T>(), *lse = lse_t.data<T>();
  T *dq = dq_t.data<T>(), *dk = dk_t.data<T>(), *dv = dv_t.data<T>();
  const int64_t BH = P.B * P.H, D = P.D;
  const int64_t rows = P.B * P.N * P.H;  // (b, t, h) rows, in memory order

  // Dt[(b*H + h)*N + t] = <do[b, t, h], o[b, t, h]>, and zeroed gradients to accumulate into.
  ScratchBuffer<T> Dt(static_cast<size_t>(rows));
  parallel_for(rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % P.H, t = row / P.H % P.N, b = row / (P.H * P.N);
      Dt[static_cast<size_t>((b * P.H + h) * P.N + t)] = dot(dout + row * D, o + row * D, D);
      std::fill(dq + row * D, dq + (row + 1) * D, T(0));
      std::fill(dk + row * D, dk + (row + 1) * D, T(0));
      std::fill(dv + row * D, dv + (row + 1) * D, T(0));
    }
  });

  const bool want_dbias = dbias_t.defined();
  const int64_t nb = P.num_buckets;
  int64_t max_items = 0;
  for (const auto& br : params.schedule) max_items = std::max(max_items, BH * num_segments(br, P.N));
  ScratchBuffer<double> slots(want_dbias ? static_cast<size_t>(max_items * nb) : 0);
  ScratchBuffer<double> dbias_sum(want_dbias ? static_cast<size_t>(P.H * nb) : 0);
  std::fill(dbias_sum.data(), dbias_sum.data() + dbias_sum.size(), 0.0);
  const int threads = worker_count(max_items);
  ScratchBuffer<T> scratch(static_cast<size_t>(threads * 2 * kTile * kTile));

#pragma omp parallel num_threads(threads)
  {
    T* S = scratch.data() + omp_get_thread_num() * 2 * kTile * kTile;
    T* dP = S + kTile * kTile;
    for (size_t i = 0; i < params.schedule.size(); ++i) {
      const AttentionBranch& br = params.schedule[i];
      const int64_t nseg = num_segments(br, P.N);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < BH * nseg; ++item) {
        const int64_t b = item / nseg / P.H, h = item / nseg % P.H, s = item % nseg;
        double* slot = want_dbias ? slots.data() + item * nb : nullptr;
        if (slot) std::fill(slot, slot + nb, 0.0);
        backward_segment(P, q, k, v, dout, lse, Dt.data(), dq, dk, dv, b, h, i, grid_span(br, h, s, P.N), S, dP, slot);
      }
      if (want_dbias) {
#pragma omp single
        for (int64_t item = 0; item < BH * nseg; ++item) {
          const double* slot = slots.data() + item * nb;
          double* sum = dbias_sum.data() + item / nseg % P.H * nb;
          for (int64_t n = 0; n < nb; ++n) sum[n] += slot[n];
        }
      }
    }
  }
  if (want_dbias) {
    T* dbias = dbias_t.data<T>();
    for (int64_t n = 0; n < P.H * nb; ++n) dbias[n] = static_cast<T>(dbias_sum[static_cast<size_t>(n)]);
  }
}

}  // namespace

void CpuBackend::dilated_attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& bias, const AttentionParams& params) {
  dispatch_float(q.dtype(), [&](auto tag) { forward<decltype(tag)>(o, lse, q, k, v, bias, params); });
}

void CpuBackend::dilated_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dbias, const Tensor& dout,
                                            const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                            const Tensor& lse, const Tensor& bias, const AttentionParams& params) {
  dispatch_float(q.dtype(), [&](auto tag) {
    backward<decltype(tag)>(dq, dk, dv, dbias, dout, q, k, v, o, lse, bias, params);
  });
}

}  // namespace dilatron::kernels
