// Flash dilated attention on the CPU: exactly the function of docs/attention-contract.md.
//
// Rows in place. q, k, v, o and their gradients are [B, N, H, D]: the row of (b, t, h) starts at
// ((b*N + t)*H + h)*D. Each (branch, head, segment) is one or more sub-problems (dilated_attention.h):
// queries qfirst + a*r and keys kfirst + c*r (a dilated branch: both on the grid of offset
// o = h mod r; a key-dilated branch: keys on that grid, queries on each of the r residues), so a
// tile of consecutive grid points is a set of rows r*H*D apart; nothing is gathered into
// [B, H, N, D] copies. Causality is c <= a in grid indices, so a sub-problem is dense (causal)
// attention between its two grids: key tiles above the diagonal are skipped, the diagonal tile is
// masked and its products skip the masked half.
//
// Speed. The tile products run as register-blocked micro-kernels (tile_gemm: 6 rows x 4 vectors
// of accumulators with AVX-512, 6 x 2 below it; broadcast-FMA over contiguous rows) on contiguous
// per-thread copies of the tiles: rows r*H*D apart alias in the caches (for r*H*D*sizeof(T) a
// multiple of 4 KiB all of a tile's rows fall in the same few sets), so each row is copied once and
// then read from the copy. The softmax loops run on the same vectors. exp is exp_float
// (cpu_utils.h) in float, vectorised; float64 keeps libm's. No sum's order depends on the vector
// width, so 64-byte vectors give the bits 32-byte ones give on the same CPU (see row_block).
//
// Forward. The merge over branches is one softmax over the multiset of (branch, key). An online
// softmax's state for query t, (running max m, running sum l, accumulator acc), is equivalent to
// (lse = m + log l, o = acc / l), so the outputs o and lse themselves carry the state from one
// branch to the next: branch i's pass over a query tile starts from m = lse, l = 1 (l = 0 while
// lse = -inf: no key yet) and acc = o, folds in the branch's key tiles (acc is a per-thread copy
// of o's rows), and stores o = acc / l, lse = m + log l. After the last branch, o and lse are the merged result
// exactly; a query on no grid keeps the initial o = 0, lse = -inf. Branches run one after another
// (they update the same rows); within a branch the (b, h, segment, sub-problem, query tile) work
// items own disjoint rows and run in parallel, a segment's costliest (causal: last) tiles first. A
// thread keeps its current segment's k and v rows copied (contiguous) while it works on that segment.
//
// Backward (FlashAttention-2). Dt = <do[t], o[t]> once per row; then per branch, per
// (b, h, segment) work item and each of its sub-problems in order: for each key tile, for each
// query tile at or below the diagonal, recompute s, P = exp(s - lse) and the dropout bits,
// dS = P (dP - Dt), and accumulate dv and dk (per key tile, in the thread's scratch, then added
// to the key rows) and dq (query rows, or the thread's copy of the sub-problem's dq rows, copied
// back). Within a branch, work items touch disjoint rows; the branches run one after another
// because they share rows. dbias is summed per work item into its
// own slot and the slots are added in item order, so every result is independent of thread timing.
//
// Determinism: each output element's sums run in an order fixed by the problem (tile order, p order
// within a micro-kernel), whichever thread computes it and whether its rows were read from the
// segment copy or packed per tile, so results are bitwise independent of the thread count.
//
// Extra memory beyond the inputs and outputs: per thread the tile scratch (forward: one 64 x 64
// score tile and four 64 x D tiles; backward: two and seven), whatever N is, plus the segment
// copies (forward 2, backward 3 x g x D per thread) only where all threads' copies together fit in
// 1/16 of q's size; the backward adds Dt [B, H, N] and the dbias slots [B*H*segments, num_buckets]
// (double). All linear in N; nothing is N x N or N x w.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"
#include "dilatron/philox.h"
#include "dilatron/storage.h"

namespace dilatron::kernels {
namespace {

constexpr int64_t kTile = 64;  // grid points per query tile and per key tile (64 x 64 scores, in L1)

// A branch's sub-problems (dilated_attention.h): query grid gq and key grid gk with causal c <= a.
GridSpan keys_of(const AttentionBranch& br, int64_t h, int64_t s, int64_t N) {
  return key_grid(br.segment, br.dilation, h, s, N);
}
GridSpan queries_of(const AttentionBranch& br, bool causal, int64_t h, int64_t s, int64_t sub, int64_t N) {
  return query_grid(br.segment, br.dilation, br.kind, causal, h, s, sub, N);
}
int64_t subproblems_of(const AttentionBranch& br) { return subproblems(br.kind, br.dilation); }
int64_t segments_of(const AttentionBranch& br, int64_t N) { return num_segments(br.segment, N); }
int64_t max_points_of(const AttentionBranch& br, int64_t N) { return max_grid_points(br.segment, br.dilation, N); }

// AttentionParams and the tensors' sizes, in the kernel's type.
template <typename T>
struct KernelParams {
  int64_t B, N, H, D;
  T scale;
  bool causal;
  bool dropout;
  uint64_t seed;
  uint32_t offset, threshold;
  T keep_scale;             // 1 / (1 - p)
  const T* bias;            // [H, num_buckets], or null
  int64_t num_buckets;
  const int32_t* buckets;   // AttentionParams::bucket_of_distance
  int64_t bucket_base;

  KernelParams(const Tensor& q, const Tensor& bias_table, const AttentionParams& p)
      : B(q.size(0)), N(q.size(1)), H(q.size(2)), D(q.size(3)), scale(static_cast<T>(p.scale)), causal(p.causal),
        dropout(p.dropout_p > 0.0), seed(p.seed), offset(p.offset), threshold(dropout_threshold(p.dropout_p)),
        keep_scale(static_cast<T>(1.0 / (1.0 - p.dropout_p))),
        bias(bias_table.defined() ? bias_table.data<T>() : nullptr),
        num_buckets(bias_table.defined() ? bias_table.size(1) : 0),
        buckets(bias_table.defined() ? p.bucket_of_distance.data() : nullptr), bucket_base(p.bucket_base) {}

  int64_t row(int64_t b, int64_t t, int64_t h) const { return ((b * N + t) * H + h) * D; }
  // Offset between consecutive grid rows of a branch with dilation r.
  int64_t grid_step(int64_t r) const { return r * H * D; }
  int32_t bucket(int64_t t, int64_t j) const { return bias_bucket(buckets, bucket_base, t - j); }
};

// The contract's dropout bits m(t, i, j) along one query row: one Philox block holds the words of
// the 4 keys with the same j >> 2, so it is computed once per block as j increases.
class DropoutRow {
 public:
  template <typename T>
  DropoutRow(const KernelParams<T>& p, int64_t t, uint32_t stream)
      : seed_(p.seed), t_(t), stream_(stream), offset_(p.offset), threshold_(p.threshold) {}
  bool keep(int64_t j) {
    const int64_t block = j >> 2;
    if (block != block_) {
      words_ = dropout_block(seed_, offset_, stream_, t_, block);
      block_ = block;
    }
    return dropout_keeps(dropout_word(words_, j), threshold_);
  }

 private:
  uint64_t seed_;
  int64_t t_;
  uint32_t stream_, offset_, threshold_;
  int64_t block_ = -1;  // no block yet
  Philox4 words_{};
};

template <typename T>
T dot(const T* x, const T* y, int64_t D) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += x[d] * y[d];
  return s;
}

// ---------------------------------------------------------------- tile products

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// SIMD vectors of the widest size the target compiles to (AVX-512: 64 bytes, AVX/AVX2: 32, else
// 16; the generic vector code lowers to whatever the target has, and a * b + c contracts to FMA
// where there is one). kLanes<T> divides kTile. The micro-tiles keep kRows x kColVecs
// accumulators in registers: 6 x 4 = 24 of AVX-512's 32, else 6 x 2 = 12 of 16.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kRows = 6, kColVecs = 4;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kRows = 6, kColVecs = 2;
#else
constexpr int kVecBytes = 16;
constexpr int kRows = 6, kColVecs = 2;
#endif
template <typename T, int Bytes = kVecBytes>
struct SimdOf {
  using V [[gnu::vector_size(Bytes)]] = T;
};
template <typename T, int Bytes = kVecBytes>
using Vec = typename SimdOf<T, Bytes>::V;
template <typename T>
constexpr int64_t kLanes = kVecBytes / static_cast<int64_t>(sizeof(T));

template <typename V, typename T>
[[gnu::always_inline]] inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename T>
[[gnu::always_inline]] inline void vstore(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename V, typename T, size_t... I>
[[gnu::always_inline]] inline V broadcast_impl(T x, std::index_sequence<I...>) {
  return V{((void)I, x)...};
}
template <typename V, typename T>
[[gnu::always_inline]] inline V broadcast(T x) {
  return broadcast_impl<V>(x, std::make_index_sequence<sizeof(V) / sizeof(T)>{});
}

// e^x lane by lane: exp_float (cpu_utils.h) in float, libm's in double (exact). A lane's result
// depends on that lane alone, so the vector width does not change it.
template <typename T>
[[gnu::always_inline]] inline Vec<T> exp_t(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_float(x);
  } else {
    for (int64_t i = 0; i < kLanes<T>; ++i) x[i] = std::exp(x[i]);
    return x;
  }
}

// Every tile product has the form C[i][j] = init + sum_{p < K} A[i*ai + p*ap] * B[p*ldb + j] for
// i < M, j < Nc, with C's and B's rows contiguous in j and init = 0, C[i][j] or C[i][j] * scale[i].
// A block of R rows x CV vectors of C lives in registers (R * CV accumulators, at most
// kRows x kColVecs), each step of p broadcasts R elements of A and loads CV vectors of B, so
// the inner loop is R * CV independent FMAs. The sum over p runs in order for each (i, j), so
// the result is fixed by the operands (not by blocking or threads).
// kAddTo: from 0, and the block's sums are added to C when stored.
enum class Init { kZero, kLoad, kScale, kAddTo };

// Without FMA each step of a sum rounds twice, and a D-term score summed in one chain drifts
// several times further from the exact value than the former lane-split dot products did (enough
// to fail the float32 dbias check at 1e-5): there, products from 0 (the scores) sum blocks of
// kDepthChunk terms and add the block sums. With FMA one chain is as accurate, and faster.
#if defined(__FMA__)
constexpr int64_t kDepthChunk = int64_t{1} << 40;
#else
constexpr int64_t kDepthChunk = 8;
#endif

template <typename T, int R, int CV, int Bytes = kVecBytes>
[[gnu::always_inline]] inline void micro_tile(T* C, int64_t ldc, const T* A, int64_t ai, int64_t ap, const T* B,
                                              int64_t ldb, int64_t K, Init init, const T* scale) {
  using V = Vec<T, Bytes>;
  constexpr int64_t L = Bytes / static_cast<int64_t>(sizeof(T));
  V acc[R][CV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < CV; ++v) {
      if (init == Init::kZero || init == Init::kAddTo) {
        acc[r][v] = V{};
      } else {
        acc[r][v] = vload<V>(C + r * ldc + v * L);
        if (init == Init::kScale && scale) acc[r][v] *= broadcast<V>(scale[r]);
      }
    }
  for (int64_t p = 0; p < K; ++p) {
    V b[CV];
#pragma GCC unroll 4
    for (int v = 0; v < CV; ++v) b[v] = vload<V>(B + p * ldb + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V a = broadcast<V>(A[r * ai + p * ap]);
#pragma GCC unroll 4
      for (int v = 0; v < CV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < CV; ++v) {
      if (init == Init::kAddTo) acc[r][v] = vload<V>(C + r * ldc + v * L) + acc[r][v];
      vstore(C + r * ldc + v * L, acc[r][v]);
    }
}

// The last nv < kColVecs whole vectors of a row block: one micro-tile of CV = nv vectors.
template <typename T, int R, int CV>
[[gnu::always_inline]] inline void micro_tile_rest(T* C, int64_t ldc, const T* A, int64_t ai, int64_t ap,
                                                   const T* B, int64_t ldb, int64_t nv, int64_t K, Init init,
                                                   const T* scale) {
  if constexpr (CV > 0) {
    if (nv == CV) micro_tile<T, R, CV>(C, ldc, A, ai, ap, B, ldb, K, init, scale);
    else micro_tile_rest<T, R, CV - 1>(C, ldc, A, ai, ap, B, ldb, nv, K, init, scale);
  }
}

// R rows of C, all Nc columns: blocks of kColVecs vectors, then the remaining whole vectors, then
// single columns. GCC compiles the single columns' sums as vectorised products added in order, not
// as FMAs, so with 64-byte vectors a last 32 bytes of columns take a 32-byte vector: every column
// then sums as it did with 32-byte vectors (bit for bit).
template <typename T, int R>
void row_block(T* C, int64_t ldc, const T* A, int64_t ai, int64_t ap, const T* B, int64_t ldb, int64_t Nc,
               int64_t K, Init init, const T* scale) {
  constexpr int64_t L = kLanes<T>, W = kColVecs * L;
  int64_t j = 0;
  for (; j + W <= Nc; j += W) micro_tile<T, R, kColVecs>(C + j, ldc, A, ai, ap, B + j, ldb, K, init, scale);
  micro_tile_rest<T, R, kColVecs - 1>(C + j, ldc, A, ai, ap, B + j, ldb, (Nc - j) / L, K, init, scale);
  j += (Nc - j) / L * L;
  if constexpr (kVecBytes == 64) {
    if (j + L / 2 <= Nc) {
      micro_tile<T, R, 1, 32>(C + j, ldc, A, ai, ap, B + j, ldb, K, init, scale);
      j += L / 2;
    }
  }
  for (; j < Nc; ++j)
    for (int r = 0; r < R; ++r) {
      T* c = C + r * ldc + j;
      T sum = init == Init::kLoad ? *c : init == Init::kScale && scale ? *c * scale[r] : T(0);
      for (int64_t p = 0; p < K; ++p) sum += A[r * ai + p * ap] * B[p * ldb + j];
      *c = init == Init::kAddTo ? *c + sum : sum;
    }
}

// On a causal diagonal tile (key tile = query tile) half of each product is known: Skip names the
// part a row block i0 .. i0 + R - 1 leaves out. kColsBefore: columns j < i0 (rounded down to a
// block; left unwritten, the caller masks them); kColsAfter: columns j >= i0 + R (rounded up to a
// vector; left unwritten, the caller zeroes them); kDepthBefore / kDepthAfter: the terms p < i0 /
// p >= i0 + R, whose A factors are zero (dropping them changes no sum).
enum class Skip { kNone, kColsBefore, kColsAfter, kDepthBefore, kDepthAfter };

// row_block for a runtime row count rows <= R.
template <typename T, int R>
[[gnu::always_inline]] inline void row_blocks(int64_t rows, T* C, int64_t ldc, const T* A, int64_t ai, int64_t ap,
                                              const T* B, int64_t ldb, int64_t Nc, int64_t K, Init init,
                                              const T* scale) {
  if (rows == R || R == 1) row_block<T, R>(C, ldc, A, ai, ap, B, ldb, Nc, K, init, scale);
  else if constexpr (R > 1) row_blocks<T, R - 1>(rows, C, ldc, A, ai, ap, B, ldb, Nc, K, init, scale);
}

template <typename T>
void tile_gemm(T* C, int64_t ldc, const T* A, int64_t ai, int64_t ap, const T* B, int64_t ldb, int64_t M, int64_t Nc,
               int64_t K, Init init, const T* scale = nullptr, Skip skip = Skip::kNone) {
  constexpr int R = kRows;
  constexpr int64_t L = kLanes<T>;
  for (int64_t i = 0; i < M; i += R) {
    const int64_t rows = std::min<int64_t>(R, M - i);
    int64_t j0 = 0, j1 = Nc, p0 = 0, p1 = K;
    switch (skip) {
      case Skip::kNone: break;
      case Skip::kColsBefore: j0 = std::min(Nc, i / (kColVecs * L) * (kColVecs * L)); break;
      case Skip::kColsAfter: j1 = std::min(Nc, round_up(i + rows, L)); break;
      case Skip::kDepthBefore: p0 = std::min(K, i); break;
      case Skip::kDepthAfter: p1 = std::min(K, i + rows); break;
    }
    T* c = C + i * ldc + j0;
    const T* sc = scale ? scale + i : nullptr;
    const int64_t nc = j1 - j0, chunk = init == Init::kZero ? kDepthChunk : K;
    for (int64_t pc = p0; pc < p1; pc += chunk) {
      const T* a = A + i * ai + pc * ap;
      const T* b = B + pc * ldb + j0;
      const int64_t k = std::min(chunk, p1 - pc);
      const Init in = pc == p0 ? init : Init::kAddTo;
      row_blocks<T, R>(rows, c, ldc, a, ai, ap, b, ldb, nc, k, in, sc);
    }
  }
}

// The n rows x_r = x + r * step of D elements, copied to dst (rows D apart) and, where dst_t is
// given, transposed into dst_t[d * kTile + r] with columns n .. n_pad - 1 zero.
// The rows are far apart (r * H * D elements), so the hardware prefetchers do not follow them:
// each row's cache lines are requested kAhead rows early.
template <typename T>
void pack_rows(const T* x, int64_t step, int64_t n, int64_t D, T* dst, T* dst_t, int64_t n_pad) {
  constexpr int64_t kAhead = 6, kLine = 64 / sizeof(T);
  for (int64_t r = 0; r < std::min(kAhead, n); ++r)
    for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(x + r * step + d);
  for (int64_t r = 0; r < n; ++r) {
    const T* row = x + r * step;
    if (r + kAhead < n)
      for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(row + kAhead * step + d);
    if (dst) std::memcpy(dst + r * D, row, static_cast<size_t>(D) * sizeof(T));
    if (dst_t)
      for (int64_t d = 0; d < D; ++d) dst_t[d * kTile + r] = row[d];
  }
  if (dst_t)
    for (int64_t d = 0; d < D; ++d) std::fill(dst_t + d * kTile + n, dst_t + d * kTile + n_pad, T(0));
}

// Threads for `items` independent work items (1 inside an enclosing parallel region).
int worker_count(int64_t items) {
  if (omp_in_parallel()) return 1;
  return static_cast<int>(std::clamp<int64_t>(items, 1, omp_get_max_threads()));
}

// ---------------------------------------------------------------- forward

// Per-thread scratch of the forward, in elements of T: the key-major score tile S^T [key][query]
// (kTile x kTile), Q^T [D][kTile], the key tile's K and V rows and the tile's output accumulator
// (kTile x D each).
int64_t forward_scratch(int64_t D) { return kTile * kTile + 4 * kTile * D; }

// Folds branch `i`'s keys into the state (o, lse) of the query tile q0.. of grid g. The scores are
// kept key-major, S^T = K Q^T, so that the online softmax runs across queries, a vector of queries
// at a time, and the tile's queries are packed (transposed) once for all its key tiles. k_seg and
// v_seg, where given, hold the segment's K and V rows contiguously (grid point c at c * D), else
// each key tile is packed from the strided rows.
template <typename T>
void forward_tile(const KernelParams<T>& P, const T* q, const T* k, const T* v, T* o, T* lse, int64_t b, int64_t h,
                  size_t i, const GridSpan& gq, const GridSpan& gk, int64_t q0, T* scratch, const T* k_seg,
                  const T* v_seg) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  const V scale = broadcast<V>(P.scale);
  const int64_t nq = std::min(kTile, gq.count - q0), nqv = round_up(nq, L);
  const int64_t step = P.grid_step(gq.stride), base = P.row(b, gq.first, h), key_base = P.row(b, gk.first, h);
  const int64_t D = P.D;
  const T* q_tile = q + base + q0 * step;
  T* o_tile = o + base + q0 * step;
  T* lse_bh = lse + (b * P.H + h) * P.N;
  const T* bias_h = P.bias ? P.bias + h * P.num_buckets : nullptr;
  const uint32_t stream = dropout_stream(b * P.H + h, static_cast<int64_t>(i));
  T* St = scratch;              // [key c][query a], row length kTile
  T* Qt = St + kTile * kTile;   // [d][query a]
  T* Kp = Qt + D * kTile;       // [key c][d]
  T* Vp = Kp + kTile * D;       // [key c][d]
  T* acc = Vp + kTile * D;      // [query a][d]: o's rows while the tile is folded in

  pack_rows(q_tile, step, nq, D, static_cast<T*>(nullptr), Qt, nqv);
  // The online softmax's running max and sum; lanes nq..nqv-1 (zero queries) are inert padding.
  alignas(64) T m[kTile], l[kTile], alpha[kTile];
  for (int64_t a = 0; a < nqv; ++a) {
    m[a] = a < nq ? lse_bh[gq.position(q0 + a)] : T(0);
    l[a] = m[a] == kNegInf ? T(0) : T(1);
  }
  pack_rows(o_tile, step, nq, D, acc, static_cast<T*>(nullptr), 0);
  // Causal: keys up to the tile's last query; the tiles are aligned, so the last key tile is the
  // diagonal one (k0 = q0), where key c is visible to query a iff c <= a.
  const int64_t key_end = P.causal ? q0 + nq : gk.count;
  for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
    const int64_t nk = std::min(kTile, key_end - k0);
    const bool diagonal = P.causal && k0 == q0;
    const T* Kc = Kp;  // the key tile's rows, contiguous
    const T* Vc = Vp;
    if (k_seg) {
      Kc = k_seg + k0 * D, Vc = v_seg + k0 * D;
    } else {
      pack_rows(k + key_base + k0 * step, step, nk, D, Kp, static_cast<T*>(nullptr), 0);
      pack_rows(v + key_base + k0 * step, step, nk, D, Vp, static_cast<T*>(nullptr), 0);
    }
    const Skip skip_cols = diagonal ? Skip::kColsBefore : Skip::kNone;  // S^T[c][a], a < c masked below
    tile_gemm(St, kTile, Kc, D, 1, Qt, kTile, nk, nqv, D, Init::kZero, static_cast<const T*>(nullptr), skip_cols);
    for (int64_t c = 0; c < nk; ++c) {
      T* row = St + c * kTile;
      const int64_t a0 = diagonal ? c : 0;  // on the diagonal, queries a < c are masked (not computed)
      for (int64_t a = a0 / L * L; a < nqv; a += L) vstore(row + a, vload<V>(row + a) * scale);  // a < a0: masked next
      if (bias_h) {
        const int64_t j = gk.position(k0 + c);
        for (int64_t a = a0; a < nq; ++a) row[a] += bias_h[P.bucket(gq.position(q0 + a), j)];
      }
      std::fill(row, row + a0, kNegInf);
    }
    // A vector of queries at a time: the new max over the key tile, the weights and their sum (in key order).
    for (int64_t a = 0; a < nqv; a += L) {
      const V m_old = vload<V>(m + a);
      V mx = m_old, sum{};
      for (int64_t c = 0; c < nk; ++c) {
        const V x = vload<V>(St + c * kTile + a);
        mx = x > mx ? x : mx;
      }
      const V al = exp_t<T>(m_old - mx);  // 0 while m = -inf
      for (int64_t c = 0; c < nk; ++c) {
        const V w = exp_t<T>(vload<V>(St + c * kTile + a) - mx);  // 0 where masked (-inf)
        vstore(St + c * kTile + a, w);
        sum += w;
      }
      vstore(alpha + a, al);
      vstore(l + a, vload<V>(l + a) * al + sum);
      vstore(m + a, mx);
    }
    if (P.dropout)
      for (int64_t a = 0; a < nq; ++a) {
        DropoutRow bits(P, gq.position(q0 + a), stream);
        for (int64_t c = 0; c < (diagonal ? a + 1 : nk); ++c) {
          T& w = St[c * kTile + a];
          w = bits.keep(gk.position(k0 + c)) ? w * P.keep_scale : T(0);
        }
      }
    // acc = alpha * acc + P V, P[a][c] = St[c][a].
    tile_gemm(acc, D, St, 1, kTile, Vc, D, nq, D, nk, Init::kScale, alpha,
              diagonal ? Skip::kDepthAfter : Skip::kNone);
  }
  for (int64_t a = 0; a < nq; ++a) {
    const T inv = T(1) / l[a];
    T* out = o_tile + a * step;
    const T* in = acc + a * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = in[d] * inv;
    lse_bh[gq.position(q0 + a)] = m[a] + std::log(l[a]);
  }
}

template <typename T>
void forward(Tensor& o_t, Tensor& lse_t, const Tensor& q_t, const Tensor& k_t, const Tensor& v_t,
             const Tensor& bias_t, const AttentionParams& params) {
  const KernelParams<T> P(q_t, bias_t, params);
  const T *q = q_t.data<T>(), *k = k_t.data<T>(), *v = v_t.data<T>();
  T* o = o_t.data<T>();
  T* lse = lse_t.data<T>();
  const int64_t BH = P.B * P.H;
  parallel_for(o_t.numel(), 1 << 16, [&](int64_t begin, int64_t end) { std::fill(o + begin, o + end, T(0)); });
  std::fill(lse, lse + BH * P.N, -std::numeric_limits<T>::infinity());

  // Work items of branch i: (b*H + h, segment, sub-problem, query tile), a segment's last
  // (costliest) query tiles first.
  auto tiles_of = [&](const AttentionBranch& br) { return (max_points_of(br, P.N) + kTile - 1) / kTile; };
  int64_t max_items = 0, seg_rows = 0;
  for (const auto& br : params.schedule) {
    max_items = std::max(max_items, tiles_of(br) * BH * segments_of(br, P.N) * subproblems_of(br));
    seg_rows = std::max(seg_rows, max_points_of(br, P.N));
  }
  const int threads = worker_count(max_items);
  // Each thread keeps a contiguous copy of its current segment's K and V rows (strided rows r*H*D
  // apart alias in the caches; the copy is read once per segment instead of once per tile pair),
  // where all threads' copies together stay within 1/16 of q's size, else packs per key tile.
  if (threads * seg_rows * 2 * P.D > P.B * P.N * P.H * P.D / 16) seg_rows = 0;
  const int64_t per_thread = forward_scratch(P.D) + 2 * seg_rows * P.D;
  ScratchBuffer<T> scratch(static_cast<size_t>(threads * per_thread));

#pragma omp parallel num_threads(threads)
  {
    T* tile_scratch = scratch.data() + omp_get_thread_num() * per_thread;
    T* k_seg = seg_rows ? tile_scratch + forward_scratch(P.D) : nullptr;
    T* v_seg = seg_rows ? k_seg + seg_rows * P.D : nullptr;
    for (size_t i = 0; i < params.schedule.size(); ++i) {
      const AttentionBranch& br = params.schedule[i];
      const int64_t nseg = segments_of(br, P.N), nsub = subproblems_of(br), tiles = tiles_of(br);
      int64_t cached = -1, packed = 0;  // the segment in k_seg / v_seg, and its rows copied so far
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < tiles * BH * nseg * nsub; ++item) {
        const int64_t problem = item / tiles, tile = tiles - 1 - item % tiles, seg = problem / nsub;
        const int64_t bh = seg / nseg, s = seg % nseg, b = bh / P.H, h = bh % P.H;
        const GridSpan gq = queries_of(br, P.causal, h, s, problem % nsub, P.N), gk = keys_of(br, h, s, P.N);
        if (tile * kTile >= gq.count || gk.count == 0) continue;  // no queries, or no keys for them
        if (k_seg) {  // a segment's sub-problems share its keys
          if (seg != cached) cached = seg, packed = 0;
          const int64_t need = P.causal ? std::min(gk.count, (tile + 1) * kTile) : gk.count;
          if (packed < need) {
            const int64_t step = P.grid_step(gk.stride), rows = P.row(b, gk.first, h) + packed * step;
            pack_rows(k + rows, step, need - packed, P.D, k_seg + packed * P.D, static_cast<T*>(nullptr), 0);
            pack_rows(v + rows, step, need - packed, P.D, v_seg + packed * P.D, static_cast<T*>(nullptr), 0);
            packed = need;
          }
        }
        forward_tile(P, q, k, v, o, lse, b, h, i, gq, gk, tile * kTile, tile_scratch, k_seg, v_seg);
      }
    }
  }
}

// ---------------------------------------------------------------- backward

// Per-thread scratch of the backward, in elements of T: the score tiles S and dP [query][key]
// (kTile x kTile each), K^T and V^T [D][kTile], and kTile x D each for K's rows, the query tile's
// q and do rows, and the key tile's dk and dv accumulators.
int64_t backward_scratch(int64_t D) { return 2 * kTile * kTile + 7 * kTile * D; }

// All of branch i's gradient contributions within one sub-problem (query grid gq, key grid gk) of a
// segment of (b, h). Per key tile,
// its K^T, V^T and K rows are packed once and its dk, dv accumulate in the scratch; per query
// tile, S = Q K^T and dP = dO V^T are products with the packed transposes, then dv += P^T dO,
// dk += dS^T Q (in the scratch) and dq += dS K (in place).
template <typename T>
void backward_segment(const KernelParams<T>& P, const T* q, const T* k, const T* v, const T* dout, const T* lse,
                      const T* Dt, T* dq, T* dk, T* dv, int64_t b, int64_t h, size_t i, const GridSpan& gq,
                      const GridSpan& gk, T* scratch, T* seg, double* dbias) {
  const int64_t step = P.grid_step(gq.stride), base = P.row(b, gq.first, h), key_base = P.row(b, gk.first, h);
  const int64_t D = P.D;
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  const V scale = broadcast<V>(P.scale);
  const T* lse_bh = lse + (b * P.H + h) * P.N;
  const T* Dt_bh = Dt + (b * P.H + h) * P.N;
  const T* bias_h = P.bias ? P.bias + h * P.num_buckets : nullptr;
  const uint32_t stream = dropout_stream(b * P.H + h, static_cast<int64_t>(i));
  T* S = scratch;               // [query a][key c], row length kTile
  T* dP = S + kTile * kTile;    // [query a][key c]
  T* Kt = dP + kTile * kTile;   // [d][key c]
  T* Vt = Kt + D * kTile;       // [d][key c]
  T* Kp = Vt + D * kTile;       // [key c][d]
  T* Qp = Kp + kTile * D;       // [query a][d]
  T* dOp = Qp + kTile * D;      // [query a][d]
  T* dKacc = dOp + kTile * D;   // [key c][d]
  T* dVacc = dKacc + kTile * D; // [key c][d]
  // With `seg` (3 * gq.count * D elements): the sub-problem's q, do and dq rows, contiguous (grid point
  // a at a * D), copied once; dq accumulates there and is copied back, so each dq element sees the
  // same sums in the same order either way.
  T* q_seg = seg;
  T* do_seg = seg ? seg + gq.count * D : nullptr;
  T* dq_seg = seg ? seg + 2 * gq.count * D : nullptr;
  if (seg) {
    pack_rows(q + base, step, gq.count, D, q_seg, static_cast<T*>(nullptr), 0);
    pack_rows(dout + base, step, gq.count, D, do_seg, static_cast<T*>(nullptr), 0);
    pack_rows(dq + base, step, gq.count, D, dq_seg, static_cast<T*>(nullptr), 0);
  }

  // Causal, queries exist only up to gq.count <= gk.count: later key tiles see none.
  const int64_t key_count = P.causal ? gq.count : gk.count;
  for (int64_t k0 = 0; k0 < key_count; k0 += kTile) {
    const int64_t nk = std::min(kTile, key_count - k0), nkv = round_up(nk, L);
    const int64_t key_rows = key_base + k0 * step;
    pack_rows(k + key_rows, step, nk, D, Kp, Kt, nkv);
    pack_rows(v + key_rows, step, nk, D, static_cast<T*>(nullptr), Vt, nkv);
    std::fill(dKacc, dKacc + nk * D, T(0));
    std::fill(dVacc, dVacc + nk * D, T(0));
    for (int64_t q0 = P.causal ? k0 : 0; q0 < gq.count; q0 += kTile) {
      const int64_t nq = std::min(kTile, gq.count - q0), query_rows = base + q0 * step;
      const T* Qc = Qp;  // the query tile's q and do rows, contiguous
      const T* dOc = dOp;
      if (seg) {
        Qc = q_seg + q0 * D, dOc = do_seg + q0 * D;
      } else {
        pack_rows(q + query_rows, step, nq, D, Qp, static_cast<T*>(nullptr), 0);
        pack_rows(dout + query_rows, step, nq, D, dOp, static_cast<T*>(nullptr), 0);
      }
      // On the diagonal tile, S[a][c] and dP[a][c] for c > a are masked (zeroed below), and the
      // weights P[a][c], dS[a][c] are zero there.
      const bool diagonal = P.causal && q0 == k0;
      const T* none = nullptr;
      const Skip after_cols = diagonal ? Skip::kColsAfter : Skip::kNone;
      tile_gemm(S, kTile, Qc, D, 1, Kt, kTile, nq, nkv, D, Init::kZero, none, after_cols);
      tile_gemm(dP, kTile, dOc, D, 1, Vt, kTile, nq, nkv, D, Init::kZero, none, after_cols);
      for (int64_t a = 0; a < nq; ++a) {
        const int64_t qi = q0 + a, t = gq.position(qi);
        const int64_t valid = P.causal ? std::min(nk, qi - k0 + 1) : nk;
        const T lse_t = lse_bh[t], D_t = Dt_bh[t];
        const int64_t cv = round_up(valid, L);  // <= nkv; on the diagonal, S is computed to here
        T* s = S + a * kTile;
        T* dp = dP + a * kTile;
        if (bias_h) {
          for (int64_t c = 0; c < valid; ++c) s[c] = s[c] * P.scale + bias_h[P.bucket(t, gk.position(k0 + c))];
        } else {
          for (int64_t c = 0; c < cv; c += L) vstore(s + c, vload<V>(s + c) * scale);
        }
        for (int64_t c = 0; c < cv; c += L) vstore(s + c, exp_t<T>(vload<V>(s + c) - broadcast<V>(lse_t)));  // P
        if (P.dropout || dbias) {
          DropoutRow bits(P, t, stream);
          for (int64_t c = 0; c < valid; ++c) {
            const int64_t j = gk.position(k0 + c);
            const T p = s[c];
            const T kept = P.dropout ? (bits.keep(j) ? P.keep_scale : T(0)) : T(1);
            const T ds = p * (dp[c] * kept - D_t);
            if (dbias) dbias[P.bucket(t, j)] += ds;
            s[c] = p * kept;       // weight of do[t] in dv[j]
            dp[c] = P.scale * ds;  // weight of k[j] in dq[t] and of q[t] in dk[j]
          }
        } else {  // to cv: lanes valid..nk-1 are zeroed next, later ones unused
          for (int64_t c = 0; c < cv; c += L)
            vstore(dp + c, scale * (vload<V>(s + c) * (vload<V>(dp + c) - broadcast<V>(D_t))));
        }
        std::fill(s + valid, s + nk, T(0));
        std::fill(dp + valid, dp + nk, T(0));
      }
      const Skip before = diagonal ? Skip::kDepthBefore : Skip::kNone;
      const Skip after = diagonal ? Skip::kDepthAfter : Skip::kNone;
      tile_gemm(dVacc, D, S, 1, kTile, dOc, D, nk, D, nq, Init::kLoad, none, before);
      tile_gemm(dKacc, D, dP, 1, kTile, Qc, D, nk, D, nq, Init::kLoad, none, before);
      if (seg) tile_gemm(dq_seg + q0 * D, D, dP, kTile, 1, Kp, D, nq, D, nk, Init::kLoad, none, after);
      else tile_gemm(dq + query_rows, step, dP, kTile, 1, Kp, D, nq, D, nk, Init::kLoad, none, after);
    }
    for (int64_t c = 0; c < nk; ++c) {
      T* dk_row = dk + key_rows + c * step;
      T* dv_row = dv + key_rows + c * step;
      const T* dk_acc = dKacc + c * D;
      const T* dv_acc = dVacc + c * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dk_row[d] += dk_acc[d], dv_row[d] += dv_acc[d];
    }
  }
  if (seg)
    for (int64_t a = 0; a < gq.count; ++a)
      std::memcpy(dq + base + a * step, dq_seg + a * D, static_cast<size_t>(D) * sizeof(T));
}

template <typename T>
void backward(Tensor& dq_t, Tensor& dk_t, Tensor& dv_t, Tensor& dbias_t, const Tensor& dout_t, const Tensor& q_t,
              const Tensor& k_t, const Tensor& v_t, const Tensor& o_t, const Tensor& lse_t, const Tensor& bias_t,
              const AttentionParams& params) {
  const KernelParams<T> P(q_t, bias_t, params);
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
  for (const auto& br : params.schedule) max_items = std::max(max_items, BH * segments_of(br, P.N));
  ScratchBuffer<double> slots(want_dbias ? static_cast<size_t>(max_items * nb) : 0);
  ScratchBuffer<double> dbias_sum(want_dbias ? static_cast<size_t>(P.H * nb) : 0);
  std::fill(dbias_sum.data(), dbias_sum.data() + dbias_sum.size(), 0.0);
  const int threads = worker_count(max_items);
  // Per thread, a contiguous copy of the current segment's q, do and dq rows where all threads'
  // copies together stay within 1/16 of q's size (as in the forward), else per-tile packing.
  int64_t seg_rows = 0;
  for (const auto& br : params.schedule) seg_rows = std::max(seg_rows, max_points_of(br, P.N));
  if (threads * seg_rows * 3 * D > rows * D / 16) seg_rows = 0;
  const int64_t per_thread = backward_scratch(D) + 3 * seg_rows * D;
  ScratchBuffer<T> scratch(static_cast<size_t>(threads * per_thread));

#pragma omp parallel num_threads(threads)
  {
    T* tile_scratch = scratch.data() + omp_get_thread_num() * per_thread;
    T* seg = seg_rows ? tile_scratch + backward_scratch(D) : nullptr;
    for (size_t i = 0; i < params.schedule.size(); ++i) {
      const AttentionBranch& br = params.schedule[i];
      const int64_t nseg = segments_of(br, P.N);
      // A work item is a whole segment: its sub-problems share the key rows whose dk, dv they add to.
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < BH * nseg; ++item) {
        const int64_t b = item / nseg / P.H, h = item / nseg % P.H, s = item % nseg;
        double* slot = want_dbias ? slots.data() + item * nb : nullptr;
        if (slot) std::fill(slot, slot + nb, 0.0);
        const GridSpan gk = keys_of(br, h, s, P.N);
        for (int64_t sub = 0; sub < subproblems_of(br); ++sub)
          backward_segment(P, q, k, v, dout, lse, Dt.data(), dq, dk, dv, b, h, i,
                           queries_of(br, P.causal, h, s, sub, P.N), gk, tile_scratch, seg, slot);
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
