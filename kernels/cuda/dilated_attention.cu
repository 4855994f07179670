// Flash dilated attention on the GPU, forward and backward: the function of
// docs/attention-contract.md (the contract), which kernels/cpu/dilated_attention.cpp also
// implements. SIMT float32 / float64 kernels (no tensor cores: TF32 would miss the contract's 1e-5);
// bf16 runs on tensor cores in dilated_attention_bf16.cu, and what the two files share (launch
// parameters, row slices, dropout bit, bias strip, dbias sums, host checks) is in attention_common.cuh.
//
// How the work is cut. For branch i = (w, r) and head h, segment s splits into sub-problems
// (kernels/dilated_attention.h): query rows qfirst + m*r and key rows kfirst + m*r, and inside one
// sub-problem the branch is ordinary (optionally causal, mk <= mq) attention between the two.
// A dilated branch has one sub-problem (both on the grid of h mod r), a key-dilated one r (one per
// query residue, sharing the keys). One launch handles one branch; a block handles one 64-row tile
// of one sub-problem of one (b, h) and reads the strided rows in place (q/k/v are [B, N, H, D],
// consecutive rows are r*H*D apart).
//
// Branches are merged through one online softmax. The launches run in order on one stream and
// each carries the running state of its query rows in the outputs themselves: lse holds the
// running log-normaliser (the max and the sum in one number) and o the normalised output. A
// branch resumes from (m = lse, l = 1, acc = o), adds its keys, and writes back (m + log l,
// acc / l). After the last branch this is exactly the softmax over the multiset of (branch, key)
// occurrences, with no extra buffers. Rows on no branch's grid keep o = 0, lse = -inf.
//
// Inside a block, 256 threads form a 16 x 16 grid over the 64 x 64 score tile: thread (ra, cb)
// owns query rows ra + 16i and key columns cb + 16j (i, j < 4). The 16 threads of a row group
// are half a warp, so row max/sum are 4 shuffles. Tiles live in shared memory with rows padded by
// 4 elements: a row group reads the same Q row (a broadcast) and 8 consecutive K rows per
// 16-byte phase land in distinct banks.
//
// Backward (FlashAttention-2 style): a block owns a key tile, keeps K, V and its dK, dV
// accumulators resident and walks the query tiles of every sub-problem, recomputing P from the
// saved lse. dq is added
// with float atomics, or, in the deterministic mode (DILATRON_DETERMINISTIC=1), by a second,
// query-major kernel that recomputes the scores and sums over key tiles in order. dk, dv and
// dbias never use atomics: every branch's launch adds into dk/dv rows its blocks own exclusively,
// and dbias goes through per-block partial sums reduced in a fixed order.
#include <algorithm>
#include <initializer_list>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#include "cuda/attention_common.cuh"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dilatron/kernels/cuda.h"
#include "dilatron/philox.h"
#include "dtype_dispatch.h"

namespace dilatron::kernels {
namespace {

using namespace attention;

constexpr int kThreads = 256;          // 16 x 16 threads over a 64 x 64 tile
constexpr int kGroup = 16;             // threads per row group = row groups per block
constexpr int kPad = 4;                // shared-memory row padding, in elements

// Blocks per SM the forward is compiled for: two caps float32 at 128 registers, so two blocks
// (16 warps) share an SM and hide each other's tile loads. The backward keeps K, V, dK, dV resident
// and gets all 255 registers (its shared memory allows one or two blocks anyway).
template <typename T>
constexpr int kForwardMinBlocks = std::is_same_v<T, float> ? 2 : 1;

// Column layout of a thread's share of a [64, D] output tile (O, dQ, dK, dV): C = D/16 columns,
// as NC vectors of VC contiguous elements; the 16 threads of a row group cover a row contiguously.
template <typename T, int D>
struct Cols {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte access
  static constexpr int C = D / kGroup;
  static constexpr int VC = C < kVec ? C : kVec;
  static constexpr int NC = C / VC;
  __device__ static int col(int cb, int q) { return q * kGroup * VC + cb * VC; }
};

template <typename T>
__device__ __forceinline__ T group_max(T v) {
#pragma unroll
  for (int lane_mask = kGroup / 2; lane_mask > 0; lane_mask >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, lane_mask));
  return v;
}
template <typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int lane_mask = kGroup / 2; lane_mask > 0; lane_mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, lane_mask);
  return v;
}

// ---------------------------------------------------------------- tile building blocks

// dst[i] = slice row (first_row + i), i < 64, as 16-byte vectors (consecutive threads read along a
// row: coalesced). Rows past the slice's end are zeros, so they add nothing (and no NaN) to products.
template <typename T, int D>
__device__ void load_rows(T (*dst)[D + kPad], const T* src, const Slice& s, int64_t first_row) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T)), kPerRow = D / kVec;
  for (int i = threadIdx.x; i < kTile * kPerRow; i += kThreads) {
    const int row = i / kPerRow, col = (i % kPerRow) * kVec;
    const int64_t m = first_row + row;
    Vec<T, kVec> val = {};
    if (m < s.L) val = load_vec<kVec>(src + s.offset(m) + col);
    store_vec(&dst[row][col], val);
  }
}

// S[ra + 16i][cb + 16j] = s[i][j]: this thread's 4 x 4 block into a 64 x 64 score tile.
template <typename T>
__device__ __forceinline__ void store_block(T (*S)[kTile + kPad], const T (&s)[4][4], int ra, int cb) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) S[ra + kGroup * i][cb + kGroup * j] = s[i][j];
}

// s[i][j] = <A[ra + 16i], B[cb + 16j]>: this thread's 4 x 4 block of a 64 x 64 product over D.
template <typename T, int D>
__device__ __forceinline__ void tile_dot(T (&s)[4][4], const T (*A)[D + kPad], const T (*Bm)[D + kPad], int ra,
                                         int cb) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = T(0);
#pragma unroll 2
  for (int d = 0; d < D; d += kVec) {
    Vec<T, kVec> a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = load_vec<kVec>(&A[ra + kGroup * i][d]);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = load_vec<kVec>(&Bm[cb + kGroup * j][d]);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < kVec; ++e) s[i][j] += a[i].v[e] * b[j].v[e];
  }
}

// acc[i][c] += sum_j P[ra + 16i][j] * X[j][col c]: (64 x 64) @ (64 x D) into this thread's rows
// ra + 16i and its Cols columns (O += P V, dQ += dS K).
template <typename T, int D>
__device__ __forceinline__ void tile_accumulate(T (&acc)[4][Cols<T, D>::C], const T (*P)[kTile + kPad],
                                                const T (*X)[D + kPad], int ra, int cb) {
  using L = Cols<T, D>;
  constexpr int kVec = L::kVec;
#pragma unroll 2
  for (int j = 0; j < kTile; j += kVec) {
    Vec<T, kVec> pv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) pv[i] = load_vec<kVec>(&P[ra + kGroup * i][j]);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      Vec<T, L::VC> x[L::NC];
#pragma unroll
      for (int q = 0; q < L::NC; ++q) x[q] = load_vec<L::VC>(&X[j + e][L::col(cb, q)]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int q = 0; q < L::NC; ++q)
#pragma unroll
          for (int c = 0; c < L::VC; ++c) acc[i][q * L::VC + c] += pv[i].v[e] * x[q].v[c];
    }
  }
}

// acc[i][c] += sum_q P[q][4 ra + i] * X[q][col c]: (64 x 64)^T @ (64 x D) into this thread's rows
// 4 ra + i (dV += Pd^T dO, dK += dS^T Q). Rows are contiguous here, so 16-byte reads get all four.
template <typename T, int D>
__device__ __forceinline__ void tile_accumulate_transposed(T (&acc)[4][Cols<T, D>::C], const T (*P)[kTile + kPad],
                                                           const T (*X)[D + kPad], int ra, int cb) {
  using L = Cols<T, D>;
  constexpr int kVec = L::kVec < 4 ? L::kVec : 4;
#pragma unroll 4
  for (int q = 0; q < kTile; ++q) {
    Vec<T, 4> pv;
#pragma unroll
    for (int h = 0; h < 4; h += kVec) {
      const Vec<T, kVec> part = load_vec<kVec>(&P[q][4 * ra + h]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) pv.v[h + e] = part.v[e];
    }
    Vec<T, L::VC> x[L::NC];
#pragma unroll
    for (int k = 0; k < L::NC; ++k) x[k] = load_vec<L::VC>(&X[q][L::col(cb, k)]);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int k = 0; k < L::NC; ++k)
#pragma unroll
        for (int c = 0; c < L::VC; ++c) acc[i][k * L::VC + c] += pv.v[i] * x[k].v[c];
  }
}

// Shared-memory layout (elements of T, then ints), the same for the three kernels' needs:
//   forward:  Q, K/V (K, then V, in one buffer), P, bias strip
//   backward: K, V, Q, dO, P/dS, lse, delta, bias strip, diagonal sums, dbias accumulators | bucket strip
template <typename T, int D>
struct Smem {
  static constexpr size_t kRows = size_t{kTile} * (D + kPad);
  static constexpr size_t kScores = size_t{kTile} * (kTile + kPad);
  static constexpr size_t forward_bytes = (2 * kRows + kScores + kStripLen) * sizeof(T);
  __host__ __device__ static size_t backward_elements(int num_buckets) {
    return 4 * kRows + kScores + 2 * kTile + 2 * kStripLen + static_cast<size_t>(num_buckets);
  }
  static size_t backward_bytes(int num_buckets) {
    return backward_elements(num_buckets) * sizeof(T) + kStripLen * sizeof(int);
  }
};

template <typename T, int D>
struct BackwardShared {
  T (*K)[D + kPad];
  T (*V)[D + kPad];
  T (*Q)[D + kPad];
  T (*dO)[D + kPad];
  T (*S)[kTile + kPad];  // P, then dS
  T* lse;
  T* delta;
  T* bias_strip;
  T* diag;
  T* dbias;
  int* bucket_strip;

  __device__ BackwardShared(unsigned char* base, int num_buckets) {
    using Layout = Smem<T, D>;
    T* t = reinterpret_cast<T*>(base);
    K = reinterpret_cast<T (*)[D + kPad]>(t);
    V = reinterpret_cast<T (*)[D + kPad]>(t + Layout::kRows);
    Q = reinterpret_cast<T (*)[D + kPad]>(t + 2 * Layout::kRows);
    dO = reinterpret_cast<T (*)[D + kPad]>(t + 3 * Layout::kRows);
    S = reinterpret_cast<T (*)[kTile + kPad]>(t + 4 * Layout::kRows);
    lse = t + 4 * Layout::kRows + Layout::kScores;
    delta = lse + kTile;
    bias_strip = delta + kTile;
    diag = bias_strip + kStripLen;
    dbias = diag + kStripLen;
    bucket_strip = reinterpret_cast<int*>(t + Layout::backward_elements(num_buckets));
  }
};

// For the tile pair (query tile qt, key tile kt), this thread's 4 x 4 block of
//   P  = exp(s - lse), 0 where the pair is not visible,   s = scale <q, k> + bias
//   Pd = P m / (1 - p)                                    (what multiplied v in the forward)
//   dS = P (dP m / (1 - p) - delta),   dP = <do, v>
// dS is returned; Pd is written to Pd_out when given (the dV product reads it).
template <typename T, int D>
__device__ __forceinline__ void score_gradients(T (&ds)[4][4], T (*Pd_out)[kTile + kPad], const KernelParams<T>& p,
                                                const Slice& sq, const Slice& sk, int64_t qt, int64_t kt,
                                                const BackwardShared<T, D>& sh, int ra, int cb) {
  T sc[4][4], dp[4][4];
  tile_dot<T, D>(sc, sh.Q, sh.K, ra, cb);
  tile_dot<T, D>(dp, sh.dO, sh.V, ra, cb);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int rq = ra + kGroup * i;
    const int64_t mq = qt * kTile + rq;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int rk = cb + kGroup * j;
      const int64_t mk = kt * kTile + rk;
      const bool visible = mq < sq.L && mk < sk.L && (!p.causal || mk <= mq);
      T prob = T(0), kept = T(1);
      if (visible) {
        const T bias = p.bias ? sh.bias_strip[rq - rk + kTile - 1] : T(0);
        prob = exp(sc[i][j] * p.scale + bias - sh.lse[rq]);
        if (p.dropout) kept = keep(p, sq, sq.position(mq), sk.position(mk)) ? p.keep_scale : T(0);
      }
      if (Pd_out) Pd_out[rq][rk] = prob * kept;
      ds[i][j] = prob * (dp[i][j] * kept - sh.delta[rq]);
    }
  }
}

// Loads the per-row saved values of a query tile: lse and delta (0 for padding rows).
template <typename T, int D>
__device__ void load_row_stats(const BackwardShared<T, D>& sh, const KernelParams<T>& p, const Slice& s, int64_t qt) {
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const int64_t m = qt * kTile + r;
    const bool valid = m < s.L;
    sh.lse[r] = valid ? p.lse[s.lse0 + s.position(m)] : T(0);
    sh.delta[r] = valid ? p.delta[s.lse0 + s.position(m)] : T(0);
  }
}

// ---------------------------------------------------------------- forward

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kForwardMinBlocks<T>) attention_forward_kernel(const KernelParams<T> p) {
  using L = Cols<T, D>;
  const Work w = locate(p, true, p.causal);
  if (w.bh >= p.B * p.H) return;
  const Slice s = w.queries<D>(p, w.sub), sk = w.keys<D>(p);
  const int64_t qt = w.tile;
  if (qt * kTile >= s.L || sk.L == 0) return;  // no queries, or no keys for them

  extern __shared__ __align__(16) unsigned char smem[];
  auto* Qs = reinterpret_cast<T (*)[D + kPad]>(smem);
  auto* KVs = Qs + kTile;
  auto* Ps = reinterpret_cast<T (*)[kTile + kPad]>(KVs + kTile);
  T* bias_strip = reinterpret_cast<T*>(Ps + kTile);

  const int ra = threadIdx.x / kGroup, cb = threadIdx.x % kGroup;
  load_rows<T, D>(Qs, p.q, s, qt * kTile);

  // Online-softmax state of this thread's 4 rows, resumed from the earlier branches.
  T m_run[4], l_run[4], acc[4][L::C];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = qt * kTile + ra + kGroup * i;
    const bool valid = m < s.L;
    m_run[i] = valid ? p.lse[s.lse0 + s.position(m)] : kNegInf<T>;
    l_run[i] = m_run[i] == kNegInf<T> ? T(0) : T(1);
#pragma unroll
    for (int q = 0; q < L::NC; ++q) {
      Vec<T, L::VC> o = {};
      if (valid) o = load_vec<L::VC>(p.o + s.offset(m) + L::col(cb, q));
#pragma unroll
      for (int c = 0; c < L::VC; ++c) acc[i][q * L::VC + c] = o.v[c];
    }
  }

  // Causal: key tiles after the query tile are fully masked and skipped.
  const int64_t key_tiles = p.causal ? qt + 1 : (sk.L + kTile - 1) / kTile;
  for (int64_t kt = 0; kt < key_tiles; ++kt) {
    __syncthreads();  // the previous tile's readers of KVs (as V) and Ps are done
    load_rows<T, D>(KVs, p.k, sk, kt * kTile);
    if (p.bias) load_bias_strip<kThreads>(bias_strip, static_cast<int*>(nullptr), p, s, sk, qt - kt);
    __syncthreads();

    T sc[4][4];
    tile_dot<T, D>(sc, Qs, KVs, ra, cb);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int rq = ra + kGroup * i;
      const int64_t mq = qt * kTile + rq;
      T row_max = kNegInf<T>;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int rk = cb + kGroup * j;
        const int64_t mk = kt * kTile + rk;
        const bool visible = mq < s.L && mk < sk.L && (!p.causal || mk <= mq);
        const T bias = p.bias ? bias_strip[rq - rk + kTile - 1] : T(0);
        sc[i][j] = visible ? sc[i][j] * p.scale + bias : kNegInf<T>;
        row_max = max(row_max, sc[i][j]);
      }
      row_max = group_max(row_max);
      const T m_new = max(m_run[i], row_max);
      const T m_ref = m_new == kNegInf<T> ? T(0) : m_new;  // nothing visible yet: keep exact zeros
      const T corr = exp(m_run[i] - m_ref);
      T row_sum = T(0);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sc[i][j] = exp(sc[i][j] - m_ref);
        row_sum += sc[i][j];
      }
      // The normaliser counts every occurrence; dropout only removes terms from the output.
      l_run[i] = l_run[i] * corr + group_sum(row_sum);
      m_run[i] = m_new;
#pragma unroll
      for (int c = 0; c < L::C; ++c) acc[i][c] *= corr;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int rk = cb + kGroup * j;
        T prob = sc[i][j];
        if (p.dropout && prob != T(0))
          prob = keep(p, s, s.position(mq), sk.position(kt * kTile + rk)) ? prob * p.keep_scale : T(0);
        Ps[rq][rk] = prob;
      }
    }
    __syncthreads();  // P is complete and nobody reads K any more
    load_rows<T, D>(KVs, p.v, sk, kt * kTile);
    __syncthreads();
    tile_accumulate<T, D>(acc, Ps, KVs, ra, cb);
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = qt * kTile + ra + kGroup * i;
    if (m >= s.L) continue;
    const T inv = T(1) / l_run[i];
#pragma unroll
    for (int q = 0; q < L::NC; ++q) {
      Vec<T, L::VC> o;
#pragma unroll
      for (int c = 0; c < L::VC; ++c) o.v[c] = acc[i][q * L::VC + c] * inv;
      store_vec(p.o + s.offset(m) + L::col(cb, q), o);
    }
    if (cb == 0) p.lse[s.lse0 + s.position(m)] = m_run[i] + log(l_run[i]);
  }
}

// ---------------------------------------------------------------- backward


// Key-major backward of one branch: this block's key tile gets dK and dV over all query tiles (of
// every sub-problem) that see it; dq gets its share through atomics unless accumulate_dq is false
// (deterministic mode).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_kernel(const KernelParams<T> p, bool accumulate_dq) {
  using L = Cols<T, D>;
  const Work w = locate(p, false, false);
  if (w.bh >= p.B * p.H) return;
  const Slice sk = w.keys<D>(p);
  const int64_t kt = w.tile;
  const bool want_dbias = p.dbias_partial != nullptr;
  T* partial = want_dbias ? p.dbias_partial + (w.bh * gridDim.x + blockIdx.x) * p.num_buckets : nullptr;
  if (kt * kTile >= sk.L) {  // an empty tile still owns its (zero) partial row
    for (int k = threadIdx.x; want_dbias && k < p.num_buckets; k += kThreads) partial[k] = T(0);
    return;
  }

  extern __shared__ __align__(16) unsigned char smem[];
  const BackwardShared<T, D> sh(smem, want_dbias ? p.num_buckets : 0);
  const int ra = threadIdx.x / kGroup, cb = threadIdx.x % kGroup;
  load_rows<T, D>(sh.K, p.k, sk, kt * kTile);
  load_rows<T, D>(sh.V, p.v, sk, kt * kTile);
  for (int k = threadIdx.x; want_dbias && k < p.num_buckets; k += kThreads) sh.dbias[k] = T(0);

  T dk[4][L::C] = {}, dv[4][L::C] = {};
  for (int64_t sub = 0; sub < p.subs; ++sub) {
    const Slice s = w.queries<D>(p, sub);
    const int64_t query_tiles = (s.L + kTile - 1) / kTile;
    for (int64_t qt = p.causal ? kt : 0; qt < query_tiles; ++qt) {
      __syncthreads();  // the previous pair's readers of Q, dO, S and the strips are done
      load_rows<T, D>(sh.Q, p.q, s, qt * kTile);
      load_rows<T, D>(sh.dO, p.dout, s, qt * kTile);
      load_row_stats(sh, p, s, qt);
      if (p.bias) load_bias_strip<kThreads>(sh.bias_strip, want_dbias ? sh.bucket_strip : nullptr, p, s, sk, qt - kt);
      __syncthreads();

      T ds[4][4];
      score_gradients<T, D>(ds, sh.S, p, s, sk, qt, kt, sh, ra, cb);
      __syncthreads();
      tile_accumulate_transposed<T, D>(dv, sh.S, sh.dO, ra, cb);
      __syncthreads();  // done with Pd; S now takes dS
      store_block(sh.S, ds, ra, cb);
      __syncthreads();
      tile_accumulate_transposed<T, D>(dk, sh.S, sh.Q, ra, cb);
      if (accumulate_dq) {
        T dq[4][L::C] = {};
        tile_accumulate<T, D>(dq, sh.S, sh.K, ra, cb);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t m = qt * kTile + ra + kGroup * i;
          if (m >= s.L) continue;
          T* row = p.dq + s.offset(m);
#pragma unroll
          for (int q = 0; q < L::NC; ++q)
#pragma unroll
            for (int c = 0; c < L::VC; ++c) atomicAdd(row + L::col(cb, q) + c, p.scale * dq[i][q * L::VC + c]);
        }
      }
      if (want_dbias)
        accumulate_dbias<kThreads>([&](int q, int k) { return sh.S[q][k]; }, sh.diag, sh.dbias, sh.bucket_strip,
                                   p.num_buckets);
    }
  }

  // Add this branch's dK, dV to the rows of the key tile (no other block of this launch owns them).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = kt * kTile + 4 * ra + i;
    if (m >= sk.L) continue;
#pragma unroll
    for (int q = 0; q < L::NC; ++q) {
      T* dk_row = p.dk + sk.offset(m) + L::col(cb, q);
      T* dv_row = p.dv + sk.offset(m) + L::col(cb, q);
      Vec<T, L::VC> a = load_vec<L::VC>(dk_row), b = load_vec<L::VC>(dv_row);
#pragma unroll
      for (int c = 0; c < L::VC; ++c) {
        a.v[c] += p.scale * dk[i][q * L::VC + c];
        b.v[c] += dv[i][q * L::VC + c];
      }
      store_vec(dk_row, a);
      store_vec(dv_row, b);
    }
  }
  if (want_dbias) {
    __syncthreads();
    for (int k = threadIdx.x; k < p.num_buckets; k += kThreads) partial[k] = sh.dbias[k];
  }
}

// Deterministic dq of one branch: a block owns a query tile, walks its key tiles in order and adds
// dS K to its rows once at the end (no atomics; costs a second pass over the scores).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_dq_kernel(const KernelParams<T> p) {
  using L = Cols<T, D>;
  const Work w = locate(p, true, p.causal);
  if (w.bh >= p.B * p.H) return;
  const Slice s = w.queries<D>(p, w.sub), sk = w.keys<D>(p);
  const int64_t qt = w.tile;
  if (qt * kTile >= s.L || sk.L == 0) return;

  extern __shared__ __align__(16) unsigned char smem[];
  const BackwardShared<T, D> sh(smem, 0);
  const int ra = threadIdx.x / kGroup, cb = threadIdx.x % kGroup;
  load_rows<T, D>(sh.Q, p.q, s, qt * kTile);
  load_rows<T, D>(sh.dO, p.dout, s, qt * kTile);
  load_row_stats(sh, p, s, qt);

  T dq[4][L::C] = {};
  const int64_t key_tiles = p.causal ? qt + 1 : (sk.L + kTile - 1) / kTile;
  for (int64_t kt = 0; kt < key_tiles; ++kt) {
    __syncthreads();  // the previous pair's readers of K, V and S are done
    load_rows<T, D>(sh.K, p.k, sk, kt * kTile);
    load_rows<T, D>(sh.V, p.v, sk, kt * kTile);
    if (p.bias) load_bias_strip<kThreads>(sh.bias_strip, static_cast<int*>(nullptr), p, s, sk, qt - kt);
    __syncthreads();
    T ds[4][4];
    score_gradients<T, D>(ds, nullptr, p, s, sk, qt, kt, sh, ra, cb);
    store_block(sh.S, ds, ra, cb);
    __syncthreads();
    tile_accumulate<T, D>(dq, sh.S, sh.K, ra, cb);
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = qt * kTile + ra + kGroup * i;
    if (m >= s.L) continue;
#pragma unroll
    for (int q = 0; q < L::NC; ++q) {
      T* row = p.dq + s.offset(m) + L::col(cb, q);
      Vec<T, L::VC> a = load_vec<L::VC>(row);
#pragma unroll
      for (int c = 0; c < L::VC; ++c) a.v[c] += p.scale * dq[i][q * L::VC + c];
      store_vec(row, a);
    }
  }
}

// ---------------------------------------------------------------- host side

// The head dims the kernels are compiled for. A float64 backward tile set for D = 128 would need
// 300 KB of shared memory.
int64_t compiled_head_dim_at_least(int64_t D, DType dtype) {
  const int64_t max_dim = dtype == DType::Float32 ? 128 : 64;
  for (int64_t c = 16; c <= max_dim; c *= 2)
    if (D <= c) return c;
  throw Error(detail::concat("dilated attention on CUDA: head dim D = ", D, " is not supported for ", dtype_name(dtype),
                             " (at most ", max_dim, ")"));
}

template <typename T, typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128:
      if constexpr (std::is_same_v<T, float>) return f(std::integral_constant<int, 128>{});
      break;
    default: break;
  }
  throw Error(detail::concat("dilated attention on CUDA: no kernel for head dim D = ", D));
}

}  // namespace

void CudaBackend::dilated_attention_forward(Tensor& o, Tensor& lse, const Tensor& q_in, const Tensor& k_in,
                                            const Tensor& v_in, const Tensor& bias, const AttentionParams& params) {
  constexpr const char* op = "dilated_attention_forward";
  const Dims d = check_attention_inputs(op, q_in, k_in, v_in, bias, index_);
  check_output(op, "o", o, q_in.shape(), q_in.dtype(), index_);
  check_output(op, "lse", lse, {d.B, d.H, d.N}, q_in.dtype(), index_);
  check_aligned(op, "o", o);
  if (o.numel() == 0) return;
  DeviceGuard guard(index_);
  if (const int64_t Dp = compiled_head_dim_at_least(d.D, q_in.dtype()); Dp != d.D) {
    Tensor o_padded = empty_padded(o, Dp);
    dilated_attention_forward(o_padded, lse, pad_head_dim(q_in, Dp, *this), pad_head_dim(k_in, Dp, *this),
                              pad_head_dim(v_in, Dp, *this), bias, params);
    unpad_head_dim(o, o_padded, *this);
    return;
  }
  const Tensor q = aligned(q_in, *this), k = aligned(k_in, *this), v = aligned(v_in, *this);
  const cuda::DeviceBuckets buckets(params, bias.defined(), index_);

  dispatch_float(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim<T>(d.D, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      KernelParams<T> p = kernel_params<T>(d, params, bias, buckets.data(), q, k, v);
      p.o = o.data<T>();
      p.lse = lse.data<T>();
      // The carried state starts empty: o = 0, lse = -inf (also the final values off every grid).
      CUDA_CHECK(cudaMemsetAsync(p.o, 0, static_cast<size_t>(o.numel()) * sizeof(T), kStream));
      fill(lse, -std::numeric_limits<double>::infinity());
      const size_t smem = Smem<T, D>::forward_bytes;
      allow_shared_memory(attention_forward_kernel<T, D>, smem);
      for (size_t i = 0; i < params.schedule.size(); ++i) {
        const BranchGrid g = branch_grid(d.N, d.B * d.H, params.schedule[i]);
        set_branch(p, params.schedule[i], static_cast<int>(i), g);
        attention_forward_kernel<T, D><<<g.by_query_tile, kThreads, smem, kStream>>>(p);
        CUDA_CHECK_LAUNCH();
      }
    });
  });
}

void CudaBackend::dilated_attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dbias, const Tensor& dout_in,
                                             const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                             const Tensor& o_in, const Tensor& lse, const Tensor& bias,
                                             const AttentionParams& params) {
  constexpr const char* op = "dilated_attention_backward";
  const Dims d = check_attention_inputs(op, q_in, k_in, v_in, bias, index_);
  check_backward_tensors(op, d, q_in, dq, dk, dv, dout_in, o_in, lse, q_in.dtype(), bias, dbias, index_);
  for (const auto& [name, t] : {std::pair{"dq", &dq}, std::pair{"dk", &dk}, std::pair{"dv", &dv}})
    check_aligned(op, name, *t);
  if (dq.numel() == 0) {
    if (dbias.defined()) fill(dbias, 0.0);
    return;
  }
  DeviceGuard guard(index_);
  if (const int64_t Dp = compiled_head_dim_at_least(d.D, q_in.dtype()); Dp != d.D) {
    Tensor dq_p = empty_padded(dq, Dp), dk_p = empty_padded(dk, Dp), dv_p = empty_padded(dv, Dp);
    dilated_attention_backward(dq_p, dk_p, dv_p, dbias, pad_head_dim(dout_in, Dp, *this), pad_head_dim(q_in, Dp, *this),
                               pad_head_dim(k_in, Dp, *this), pad_head_dim(v_in, Dp, *this),
                               pad_head_dim(o_in, Dp, *this), lse, bias, params);
    unpad_head_dim(dq, dq_p, *this);
    unpad_head_dim(dk, dk_p, *this);
    unpad_head_dim(dv, dv_p, *this);
    return;
  }
  const Device dev = Device::cuda(index_);
  const Tensor q = aligned(q_in, *this), k = aligned(k_in, *this), v = aligned(v_in, *this);
  const Tensor o = aligned(o_in, *this), dout = aligned(dout_in, *this);
  const cuda::DeviceBuckets buckets(params, bias.defined(), index_);
  const bool deterministic = cuda::deterministic_attention();
  const int64_t BH = d.B * d.H;

  dispatch_float(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim<T>(d.D, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      KernelParams<T> p = kernel_params<T>(d, params, bias, buckets.data(), q, k, v);
      p.lse = const_cast<T*>(lse.data<T>());  // read only in the backward kernels
      p.dout = dout.data<T>();
      p.dq = dq.data<T>();
      p.dk = dk.data<T>();
      p.dv = dv.data<T>();
      const size_t bytes = static_cast<size_t>(dq.numel()) * sizeof(T);
      T* const grads[] = {p.dq, p.dk, p.dv};
      for (T* g : grads) CUDA_CHECK(cudaMemsetAsync(g, 0, bytes, kStream));

      ScratchBuffer<T> delta(static_cast<size_t>(BH * d.N), dev);
      const int64_t rows = d.B * d.N * d.H;
      attention_delta_kernel<T, T><<<static_cast<unsigned>((rows * 32 + 255) / 256), 256, 0, kStream>>>(
          delta.data(), p.dout, o.data<T>(), rows, d.N, d.H, static_cast<int>(D));
      CUDA_CHECK_LAUNCH();
      p.delta = delta.data();

      // dbias: per-block partial rows, sized for the largest branch grid.
      const bool want_dbias = dbias.defined();
      int64_t max_blocks = 0;
      for (const AttentionBranch& br : params.schedule)
        max_blocks = std::max<int64_t>(max_blocks, branch_grid(d.N, BH, br).by_key_tile.x * BH);
      ScratchBuffer<T> partial(want_dbias ? static_cast<size_t>(max_blocks * p.num_buckets) : 0, dev);
      if (want_dbias) fill(dbias, 0.0);
      p.dbias_partial = want_dbias ? partial.data() : nullptr;

      const size_t smem = Smem<T, D>::backward_bytes(want_dbias ? p.num_buckets : 0);
      allow_shared_memory(attention_backward_kernel<T, D>, smem);
      const size_t dq_smem = Smem<T, D>::backward_bytes(0);
      if (deterministic) allow_shared_memory(attention_backward_dq_kernel<T, D>, dq_smem);
      for (size_t i = 0; i < params.schedule.size(); ++i) {
        const BranchGrid g = branch_grid(d.N, BH, params.schedule[i]);
        set_branch(p, params.schedule[i], static_cast<int>(i), g);
        attention_backward_kernel<T, D><<<g.by_key_tile, kThreads, smem, kStream>>>(p, !deterministic);
        CUDA_CHECK_LAUNCH();
        if (deterministic) {
          attention_backward_dq_kernel<T, D><<<g.by_query_tile, kThreads, dq_smem, kStream>>>(p);
          CUDA_CHECK_LAUNCH();
        }
        if (want_dbias) {
          const int64_t outs = d.H * p.num_buckets;
          attention_dbias_reduce_kernel<T><<<static_cast<unsigned>((outs + 255) / 256), 256, 0, kStream>>>(
              dbias.data<T>(), partial.data(), d.B, d.H, g.by_key_tile.x, p.num_buckets);
          CUDA_CHECK_LAUNCH();
        }
      }
    });
  });
}

}  // namespace dilatron::kernels
