// Flash dilated attention for bf16 inputs on tensor cores (sm_80 and later), forward and backward:
// the function of docs/attention-contract.md with bf16 q, k, v, bias and output gradient, float32
// products (mma.sync m16n8k16, bf16 operands, float32 accumulators), float32 softmax statistics,
// float32 lse, and every output and gradient rounded to bf16 once, at the end.
//
// UNVERIFIED: written and compiled without a GPU; it has never run. tests/test_cuda.cpp holds its
// tests (CudaAttentionBf16 and the bf16 cases of the dropout and determinism tests), which skip
// without a GPU; run scripts/gpu-check.sh before relying on it.
//
// The plain reference next to it is tests/attention_reference.h's naive_bf16 (PyTorch's math
// attention in bf16: every matmul and the softmax round their results to bf16). The tests measure
// both against the float64 contract: this kernel's error must stay within twice the naive one's.
//
// The work is cut as in the SIMT kernels (kernels/cuda/dilated_attention.cu, whose header explains
// branches, sub-problems and the merge; the shared pieces are in attention_common.cuh): one launch
// per branch, a block per 64-row tile of one sub-problem of one (b, h), strided rows read in place
// (cp.async into shared memory). The merge across branches carries o and lse in float32 (o in a
// float32 scratch tensor, lse in the float32 lse output): the running output is never rounded.
//
// Forward (FlashAttention-2): 4 warps, each owning 16 query rows of the 64-row tile. Per key tile,
// S = Q K^T on mma, the online softmax on the accumulators, P converted in registers to the A
// fragments of the next mma, O += P V. Operand fragments are read from shared memory with ldmatrix
// just before each mma (Q's too: fewer registers than holding them).
//
// Backward: a block owns a 64-key tile and keeps dK, dV in float32 registers (warp w: keys
// 16w .. 16w+15; 64 columns per pass over the query tiles, so two passes for D = 128). Per query
// tile it recomputes S^T = K Q^T and dP^T = V dO^T (keys as rows), P^T = exp(S^T - lse) and dS^T,
// then dV += P^T dO and dK += dS^T Q straight from registers, and dQ += dS K through shared memory
// (dS^T is stored there) with float atomics into a float32 dq. In the deterministic mode
// (DILATRON_DETERMINISTIC=1) a second, query-major kernel computes dq instead, summing over key
// tiles in order, as the float32 kernels do.
//
// Fragment layouts relied on (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type", .bf16, and "Warp-level matrix load instruction: ldmatrix"). In a warp, lane = 4 g + c (g the group,
// c the thread in the group):
//   A, 16 x 16 row-major: a0 = (row g, cols 2c, 2c+1), a1 = (row g+8, same cols),
//                         a2 = (row g, cols 2c+8, 2c+9), a3 = (row g+8, cols 2c+8, 2c+9);
//   B, 16 x 8 (K x N):    b0 = (rows 2c, 2c+1, col g), b1 = (rows 2c+8, 2c+9, col g);
//   C, 16 x 8 float32:    c0, c1 = (row g, cols 2c, 2c+1), c2, c3 = (row g+8, cols 2c, 2c+1).
// ldmatrix .x4 reads four 8 x 8 bf16 matrices, lanes 8i .. 8i+7 giving the addresses of matrix i's
// rows; register i of lane 4g + c then holds row g, cols 2c, 2c+1 of matrix i (with .trans: rows
// 2c, 2c+1 of col g). So a 16 x 16 tile stored row-major is an A fragment (matrices: rows 0-7 and
// 8-15 of cols 0-7, then of cols 8-15); a row-major [n][k] tile (K, V as stored) is a B fragment
// without .trans, and a row-major [k][n] tile (V, dO, Q as the right factor) one with .trans. The
// C fragment of two adjacent n-blocks, packed to bf16 pairs, is exactly an A fragment (a0/a1 from
// the first block's c0 c1 / c2 c3, a2/a3 from the second's): P, and dS on its way into dK, never
// leave registers between one product and the next.
//
// Shared-memory rows are padded by 8 bf16 (16 bytes): a row is then 4 banks further on than the
// one above, and the 8 row addresses of one ldmatrix phase hit 8 distinct 16-byte bank groups.
//
// Resources (ptxas -v, nvcc 13.0; registers per thread, sm_80 / sm_90; no spills; dynamic shared
// memory): forward D = 64: 159 / 164, 28,160 B; forward D = 128: 174 / 209, 52,736 B; backward
// D = 64: 230 / 247, 48,128 B; backward D = 128: 248 / 241, 80,896 B (each backward plus 17,536 B
// with a 32-bucket bias gradient); deterministic dq D = 64: 166 / 168, 37,376 B; D = 128:
// 240 / 248, 70,144 B. docs/cuda-bf16-attention.md has the rest.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

#include "cuda/attention_common.cuh"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dilatron/bfloat16.h"
#include "dilatron/kernels/cuda.h"

namespace dilatron::kernels {
namespace {

using namespace attention;
using Params = KernelParams<bfloat16, float>;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowPad = 8;  // bf16 elements of padding per shared-memory row
// Backward: queries per chunk of S^T and dP^T. 32 spills the D = 128 kernel on sm_90 (255 registers).
constexpr int kQueryChunk = 16;

template <int D>
constexpr int kRowStride = D + kRowPad;  // bf16 elements between shared-memory rows
template <int D>
constexpr int kTileElements = kTile * kRowStride<D>;

// ---------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers (cp.async.cg: cached in L2 only).
__device__ __forceinline__ void copy_async_16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p))
               : "memory");
}

// c += a b for a 16 x 16 A fragment and a 16 x 8 B fragment (b0, b1), float32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to nearest even as a bf16 pair: lo in bits 0-15 (the lower column / row).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// The A fragment of k-step kk (columns 16kk .. 16kk+15) from the C fragments of n-blocks 2kk, 2kk+1.
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// ---------------------------------------------------------------- tiles

// dst row i = slice row (first_row + i), i < 64, by cp.async (16 bytes per copy, consecutive
// threads along a row); rows past the slice's end are zeros, which add nothing to any product.
template <int D>
__device__ void load_tile_async(uint16_t* dst, const bfloat16* src, const Slice& s, int64_t first_row) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
    const int row = i / kChunks, col = (i % kChunks) * 8;
    const int64_t m = first_row + row;
    uint16_t* d = dst + row * kRowStride<D> + col;
    if (m < s.L) copy_async_16(d, src + s.offset(m) + col);
    else *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
  }
}

// acc[n] = sum over the D columns of A[r] * B[8n + j]: rows a_row0 .. a_row0 + 15 of tile_a times
// the transposes of rows b_row0 .. b_row0 + 8 NB - 1 of tile_b, both [64][D] row-major in shared
// memory (S = Q K^T in the forward; S^T = K Q^T and dP^T = V dO^T in the backward).
template <int D, int NB>
__device__ __forceinline__ void mma_a_bt(float (&acc)[NB][4], const uint16_t* tile_a, int a_row0,
                                         const uint16_t* tile_b, int b_row0, int lane) {
#pragma unroll
  for (int n = 0; n < NB; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  // A matrices: rows +0-7, +8-15 at column 0, then at column 8 (a0 .. a3).
  const uint16_t* a_base = tile_a + (a_row0 + lane % 8 + (lane / 8) % 2 * 8) * kRowStride<D> + lane / 16 * 8;
  // B matrices: rows 16 n2 + 0-7 at columns 0 and 8 (b0, b1 of n-block 2 n2), then rows 16 n2 + 8-15
  // (n-block 2 n2 + 1).
  const uint16_t* b_base = tile_b + (b_row0 + lane % 8 + lane / 16 * 8) * kRowStride<D> + (lane / 8) % 2 * 8;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, a_base + 16 * ks);
#pragma unroll
    for (int n2 = 0; n2 < NB / 2; ++n2) {
      uint32_t b[4];
      ldmatrix_x4(b, b_base + 16 * n2 * kRowStride<D> + 16 * ks);
      mma_bf16(acc[2 * n2], a, b[0], b[1]);
      mma_bf16(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

// acc[n] += A B with A (16 x 16 KS) in fragments a and B rows k_row0 .. k_row0 + 16 KS - 1 of a
// row-major tile in shared memory (row stride `stride`), columns col0 + 8n .. col0 + 8n + 7
// (O += P V; dV += P^T dO, dK += dS^T Q, dQ += dS K).
template <int KS, int NB>
__device__ __forceinline__ void mma_a_b(float (&acc)[NB][4], const uint32_t (&a)[KS][4], const uint16_t* tile,
                                        int stride, int k_row0, int col0, int lane) {
  // Matrices (.trans): rows 16 kk + 0-7, 8-15 at column 16 n2, then at 16 n2 + 8: b0, b1 of n-blocks
  // 2 n2 and 2 n2 + 1.
  const uint16_t* base = tile + (k_row0 + lane % 8 + (lane / 8) % 2 * 8) * stride + col0 + lane / 16 * 8;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk)
#pragma unroll
    for (int n2 = 0; n2 < NB / 2; ++n2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, base + 16 * kk * stride + 16 * n2);
      mma_bf16(acc[2 * n2], a[kk], b[0], b[1]);
      mma_bf16(acc[2 * n2 + 1], a[kk], b[2], b[3]);
    }
}

// Which (query row, key row) pairs of a tile pair (qt, kt) exist and are visible, in tile-local
// int coordinates (cheaper than the int64 positions): rows past a grid's end do not exist, and causal
// visibility mk <= mq is rk <= rq + 64 (qt - kt), true throughout when qt > kt.
struct TilePairMask {
  int q_rows, k_rows, causal_shift;
  __device__ TilePairMask(const Slice& sq, const Slice& sk, int64_t qt, int64_t kt, bool causal)
      : q_rows(static_cast<int>(min(int64_t{kTile}, sq.L - qt * kTile))),
        k_rows(static_cast<int>(min(int64_t{kTile}, sk.L - kt * kTile))),
        causal_shift(causal ? static_cast<int>(min(int64_t{kTile}, (qt - kt) * kTile)) : kTile) {}
  __device__ bool visible(int rq, int rk) const { return rq < q_rows && rk < k_rows && rk <= rq + causal_shift; }
};

// The backward's values of one (query row rq, key row rk) pair of the tile pair (qt, kt), from its
// q.k and dP = <do, v>: pd = P m / (1 - p) (what multiplied v in the forward) and
// ds = P (dP m / (1 - p) - delta); both 0 where the pair is not visible.
struct PairGradient {
  float pd, ds;
};
__device__ __forceinline__ PairGradient pair_gradient(const Params& p, const Slice& sq, const Slice& sk,
                                                      const TilePairMask& mask, int64_t qt, int64_t kt, int rq, int rk,
                                                      float qk, float dp, float lse, float delta,
                                                      const float* bias_strip) {
  if (!mask.visible(rq, rk)) return {0.0f, 0.0f};
  const float bias = p.bias ? bias_strip[rq - rk + kTile - 1] : 0.0f;
  const float prob = __expf(qk * p.scale + bias - lse);
  float kept = 1.0f;
  if (p.dropout) {
    const int64_t t = sq.position(qt * kTile + rq), j = sk.position(kt * kTile + rk);
    kept = keep(p, sq, t, j) ? p.keep_scale : 0.0f;
  }
  return {prob * kept, prob * (dp * kept - delta)};
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------- forward

template <int D>
constexpr size_t kForwardSmemBytes = 3 * kTileElements<D> * sizeof(uint16_t) + kStripLen * sizeof(float);

template <int D>
__global__ void __launch_bounds__(kThreads) attention_forward_bf16_kernel(const Params p) {
  const Work w = locate(p, true, p.causal);
  if (w.bh >= p.B * p.H) return;
  const Slice s = w.queries<D>(p, w.sub), sk = w.keys<D>(p);
  const int64_t qt = w.tile;
  if (qt * kTile >= s.L || sk.L == 0) return;  // no queries, or no keys for them

  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* const Qs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const Ks = Qs + kTileElements<D>;
  uint16_t* const Vs = Ks + kTileElements<D>;
  float* const bias_strip = reinterpret_cast<float*>(Vs + kTileElements<D>);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  // This thread's rows of the tile (C-fragment rows g and g + 8 of its warp's 16).
  const int rows[2] = {16 * warp + g, 16 * warp + g + 8};

  load_tile_async<D>(Qs, p.q, s, qt * kTile);
  load_tile_async<D>(Ks, p.k, sk, 0);
  copy_async_commit();

  // Online-softmax state, resumed from the earlier branches (o in float32 scratch, lse). l is kept
  // per thread over its own columns and summed over the quad at the end, so the resumed l = 1 sits
  // with the quad's first thread only.
  float m_run[2], l_run[2], acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t m = qt * kTile + rows[i];
    const bool valid = m < s.L;
    m_run[i] = valid ? p.lse[s.lse0 + s.position(m)] : kNegInf<float>;
    l_run[i] = (c == 0 && m_run[i] != kNegInf<float>) ? 1.0f : 0.0f;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      float2 o = make_float2(0.0f, 0.0f);
      if (valid) o = *reinterpret_cast<const float2*>(p.o + s.offset(m) + 8 * n + 2 * c);
      acc[n][2 * i] = o.x;
      acc[n][2 * i + 1] = o.y;
    }
  }

  // Causal: key tiles after the query tile are fully masked and skipped.
  const int64_t key_tiles = p.causal ? qt + 1 : (sk.L + kTile - 1) / kTile;
  for (int64_t kt = 0; kt < key_tiles; ++kt) {
    __syncthreads();  // the previous tile's readers of V and the bias strip are done
    load_tile_async<D>(Vs, p.v, sk, kt * kTile);
    copy_async_commit();
    if (p.bias) load_bias_strip<kThreads>(bias_strip, static_cast<int*>(nullptr), p, s, sk, qt - kt);
    copy_async_wait<1>();  // Q and this K have landed (V may be in flight)
    __syncthreads();

    float sc[kTile / 8][4];
    mma_a_bt<D>(sc, Qs, 16 * warp, Ks, 0, lane);
    __syncthreads();  // every warp is done with K: fetch the next tile behind the softmax
    if (kt + 1 < key_tiles) load_tile_async<D>(Ks, p.k, sk, (kt + 1) * kTile);
    copy_async_commit();

    // Scores, masks and the running max of rows i (accumulator elements 2i, 2i + 1).
    const TilePairMask mask(s, sk, qt, kt, p.causal);
    float row_max[2] = {kNegInf<float>, kNegInf<float>};
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2, rq = rows[i], rk = 8 * n + 2 * c + e % 2;
        const float bias = p.bias ? bias_strip[rq - rk + kTile - 1] : 0.0f;
        sc[n][e] = mask.visible(rq, rk) ? sc[n][e] * p.scale + bias : kNegInf<float>;
        row_max[i] = fmaxf(row_max[i], sc[n][e]);
      }
    float m_ref[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m_run[i], quad_max(row_max[i]));
      m_ref[i] = m_new == kNegInf<float> ? 0.0f : m_new;  // nothing visible yet: keep exact zeros
      const float corr = __expf(m_run[i] - m_ref[i]);
      m_run[i] = m_new;
      l_run[i] *= corr;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[n][2 * i] *= corr;
        acc[n][2 * i + 1] *= corr;
      }
    }
    uint32_t pf[kTile / 16][4];
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2;
        float prob = __expf(sc[n][e] - m_ref[i]);
        // The normaliser counts every occurrence; dropout only removes terms from the output.
        l_run[i] += prob;
        if (p.dropout && prob != 0.0f) {
          const int64_t t = s.position(qt * kTile + rows[i]), j = sk.position(kt * kTile + 8 * n + 2 * c + e % 2);
          prob = keep(p, s, t, j) ? prob * p.keep_scale : 0.0f;
        }
        sc[n][e] = prob;
      }
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) accumulators_to_a(pf[kk], sc[2 * kk], sc[2 * kk + 1]);

    copy_async_wait<1>();  // V has landed (the next K may be in flight)
    __syncthreads();
    mma_a_b(acc, pf, Vs, kRowStride<D>, 0, 0, lane);
  }
  copy_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t m = qt * kTile + rows[i];
    const float l = quad_sum(l_run[i]);
    if (m >= s.L) continue;
    const float inv = 1.0f / l;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(p.o + s.offset(m) + 8 * n + 2 * c) =
          make_float2(acc[n][2 * i] * inv, acc[n][2 * i + 1] * inv);
    if (c == 0) p.lse[s.lse0 + s.position(m)] = m_run[i] + logf(l);
  }
}

// ---------------------------------------------------------------- backward

// Shared memory of the backward, in bytes from the start: the K, V, Q and dO tiles and dS^T
// (bf16, padded rows), then float32 lse, delta, bias strip, diagonal sums, dbias accumulators and,
// with a bias gradient, dS^T in float32 for the dbias sums; then the bucket strip.
template <int D>
struct BackwardSmem {
  static constexpr size_t kTileBytes = kTileElements<D> * sizeof(uint16_t);
  static constexpr size_t kK = 0, kV = kTileBytes, kQ = 2 * kTileBytes, kDO = 3 * kTileBytes, kDS = 4 * kTileBytes;
  static constexpr size_t kLse = kDS + kTileElements<kTile> * sizeof(uint16_t);
  static constexpr size_t kDelta = kLse + kTile * sizeof(float);
  static constexpr size_t kBiasStrip = kDelta + kTile * sizeof(float);
  static constexpr size_t kDiag = kBiasStrip + kStripLen * sizeof(float);
  static constexpr size_t kDbias = kDiag + kStripLen * sizeof(float);
  static constexpr int kScoreStride = kTile + 4;  // floats per dS^T row
  // num_buckets is 0 without a bias gradient (then there is no float32 dS^T either).
  __host__ __device__ static size_t score_offset(int num_buckets) {
    return kDbias + (static_cast<size_t>(num_buckets) + 3) / 4 * 4 * sizeof(float);
  }
  __host__ __device__ static size_t bucket_offset(int num_buckets) {
    return score_offset(num_buckets) + (num_buckets > 0 ? size_t{kTile} * kScoreStride * sizeof(float) : 0);
  }
  static size_t bytes(int num_buckets) { return bucket_offset(num_buckets) + kStripLen * sizeof(int); }
};

// Key-major backward of one branch: this block's key tile gets dK and dV over all query tiles (of
// every sub-problem) that see it, and adds its share of dq with float atomics unless accumulate_dq
// is false (deterministic mode: attention_backward_dq_bf16_kernel adds dq).
template <int D>
__global__ void __launch_bounds__(kThreads) attention_backward_bf16_kernel(const Params p, bool accumulate_dq) {
  using Layout = BackwardSmem<D>;
  const Work w = locate(p, false, false);
  if (w.bh >= p.B * p.H) return;
  const Slice sk = w.keys<D>(p);
  const int64_t kt = w.tile;
  const bool want_dbias = p.dbias_partial != nullptr;
  float* partial = want_dbias ? p.dbias_partial + (w.bh * gridDim.x + blockIdx.x) * p.num_buckets : nullptr;
  if (kt * kTile >= sk.L) {  // an empty tile still owns its (zero) partial row
    for (int k = threadIdx.x; want_dbias && k < p.num_buckets; k += kThreads) partial[k] = 0.0f;
    return;
  }

  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* const Ks = reinterpret_cast<uint16_t*>(smem + Layout::kK);
  uint16_t* const Vs = reinterpret_cast<uint16_t*>(smem + Layout::kV);
  uint16_t* const Qs = reinterpret_cast<uint16_t*>(smem + Layout::kQ);
  uint16_t* const dOs = reinterpret_cast<uint16_t*>(smem + Layout::kDO);
  uint16_t* const dSt = reinterpret_cast<uint16_t*>(smem + Layout::kDS);  // dS^T [key][query], bf16
  float* const lse = reinterpret_cast<float*>(smem + Layout::kLse);
  float* const delta = reinterpret_cast<float*>(smem + Layout::kDelta);
  float* const bias_strip = reinterpret_cast<float*>(smem + Layout::kBiasStrip);
  float* const diag = reinterpret_cast<float*>(smem + Layout::kDiag);
  float* const dbias = reinterpret_cast<float*>(smem + Layout::kDbias);
  const int buckets = want_dbias ? p.num_buckets : 0;
  float* const dSt_f32 = reinterpret_cast<float*>(smem + Layout::score_offset(buckets));
  int* const bucket_strip = reinterpret_cast<int*>(smem + Layout::bucket_offset(buckets));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  // This thread's key rows of the tile (C-fragment rows g and g + 8 of its warp's 16 keys).
  const int key_rows[2] = {16 * warp + g, 16 * warp + g + 8};
  load_tile_async<D>(Ks, p.k, sk, kt * kTile);
  load_tile_async<D>(Vs, p.v, sk, kt * kTile);
  copy_async_commit();
  for (int k = threadIdx.x; k < buckets; k += kThreads) dbias[k] = 0.0f;

  // dK and dV of 64 columns at a time stay within the register file: with D = 128 the query tiles
  // are walked twice and S, dP recomputed; dQ and dbias are added in the first pass only.
  for (int col0 = 0; col0 < D; col0 += 64) {
    const bool first_pass = col0 == 0;
    float dk[8][4] = {}, dv[8][4] = {};
    for (int64_t sub = 0; sub < p.subs; ++sub) {
      const Slice s = w.queries<D>(p, sub);
      const int64_t query_tiles = (s.L + kTile - 1) / kTile;
      for (int64_t qt = p.causal ? kt : 0; qt < query_tiles; ++qt) {
        __syncthreads();  // the previous pair's readers of Q, dO, dS^T and the strips are done
        load_tile_async<D>(Qs, p.q, s, qt * kTile);
        load_tile_async<D>(dOs, p.dout, s, qt * kTile);
        copy_async_commit();
        for (int r = threadIdx.x; r < kTile; r += kThreads) {
          const int64_t m = qt * kTile + r;
          const bool valid = m < s.L;
          lse[r] = valid ? p.lse[s.lse0 + s.position(m)] : 0.0f;
          delta[r] = valid ? p.delta[s.lse0 + s.position(m)] : 0.0f;
        }
        if (p.bias) load_bias_strip<kThreads>(bias_strip, want_dbias ? bucket_strip : nullptr, p, s, sk, qt - kt);
        copy_async_wait<0>();
        __syncthreads();

        // Chunks of kQueryChunk queries keep the score fragments small next to dK and dV.
#pragma unroll 1
        for (int q0 = 0; q0 < kTile; q0 += kQueryChunk) {
          const TilePairMask mask(s, sk, qt, kt, p.causal);
          // S^T and dP^T: rows = this warp's keys, columns = queries q0 + 8n ..
          float st[kQueryChunk / 8][4], dpt[kQueryChunk / 8][4];
          mma_a_bt<D>(st, Ks, 16 * warp, Qs, q0, lane);
          mma_a_bt<D>(dpt, Vs, 16 * warp, dOs, q0, lane);
#pragma unroll
          for (int n = 0; n < kQueryChunk / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int rk = key_rows[e / 2], rq = q0 + 8 * n + 2 * c + e % 2;
              const PairGradient pg =
                  pair_gradient(p, s, sk, mask, qt, kt, rq, rk, st[n][e], dpt[n][e], lse[rq], delta[rq], bias_strip);
              st[n][e] = pg.pd;  // P^T m / (1 - p) into st, dS^T into dpt
              dpt[n][e] = pg.ds;
            }
          uint32_t pf[kQueryChunk / 16][4], dsf[kQueryChunk / 16][4];
#pragma unroll
          for (int kk = 0; kk < kQueryChunk / 16; ++kk) {
            accumulators_to_a(pf[kk], st[2 * kk], st[2 * kk + 1]);
            accumulators_to_a(dsf[kk], dpt[2 * kk], dpt[2 * kk + 1]);
          }
          mma_a_b(dv, pf, dOs, kRowStride<D>, q0, col0, lane);
          mma_a_b(dk, dsf, Qs, kRowStride<D>, q0, col0, lane);
          if (!first_pass) continue;
          // dS^T to shared memory for dQ (bf16, as the mma reads it) and, for dbias, in float32.
#pragma unroll
          for (int n = 0; n < kQueryChunk / 8; ++n)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const int rq = q0 + 8 * n + 2 * c;
              if (accumulate_dq)
                *reinterpret_cast<uint32_t*>(dSt + key_rows[i] * kRowStride<kTile> + rq) =
                    pack_bf16(dpt[n][2 * i], dpt[n][2 * i + 1]);
              if (want_dbias)
                *reinterpret_cast<float2*>(dSt_f32 + key_rows[i] * Layout::kScoreStride + rq) =
                    make_float2(dpt[n][2 * i], dpt[n][2 * i + 1]);
            }
        }
        if (!first_pass || !(accumulate_dq || want_dbias)) continue;
        __syncthreads();  // dS^T is complete
        if (want_dbias)
          accumulate_dbias<kThreads>([&](int q, int k) { return dSt_f32[k * Layout::kScoreStride + q]; }, diag, dbias,
                                     bucket_strip, p.num_buckets);
        if (!accumulate_dq) continue;

        // dQ rows 16 warp .. 16 warp + 15 += dS K: the A fragments are dS^T's transpose (ldmatrix
        // .trans over [key][query]: matrices keys 0-7 at queries +0, +8, then keys 8-15).
        uint32_t dsq[kTile / 16][4];
        const uint16_t* ds_base = dSt + (lane % 8 + lane / 16 * 8) * kRowStride<kTile> + 16 * warp + (lane / 8) % 2 * 8;
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) ldmatrix_x4_trans(dsq[kk], ds_base + 16 * kk * kRowStride<kTile>);
#pragma unroll
        for (int dq_col0 = 0; dq_col0 < D; dq_col0 += 64) {  // 64 columns at a time: fewer live accumulators
          float dq[8][4] = {};
          mma_a_b(dq, dsq, Ks, kRowStride<D>, 0, dq_col0, lane);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int64_t m = qt * kTile + 16 * warp + g + 8 * i;
            if (m >= s.L) continue;
            float* row = p.dq + s.offset(m) + dq_col0 + 2 * c;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
              atomicAdd(row + 8 * n, p.scale * dq[n][2 * i]);
              atomicAdd(row + 8 * n + 1, p.scale * dq[n][2 * i + 1]);
            }
          }
        }
      }
    }

    // Add this branch's dK, dV to the rows of the key tile (no other block of this launch owns them).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t m = kt * kTile + key_rows[i];
      if (m >= sk.L) continue;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        float2* dk_row = reinterpret_cast<float2*>(p.dk + sk.offset(m) + col0 + 8 * n + 2 * c);
        float2* dv_row = reinterpret_cast<float2*>(p.dv + sk.offset(m) + col0 + 8 * n + 2 * c);
        const float2 a = *dk_row, b = *dv_row;
        *dk_row = make_float2(a.x + p.scale * dk[n][2 * i], a.y + p.scale * dk[n][2 * i + 1]);
        *dv_row = make_float2(b.x + dv[n][2 * i], b.y + dv[n][2 * i + 1]);
      }
    }
  }
  if (want_dbias) {
    __syncthreads();
    for (int k = threadIdx.x; k < p.num_buckets; k += kThreads) partial[k] = dbias[k];
  }
}

// Deterministic dq of one branch (DILATRON_DETERMINISTIC=1): a block owns a query tile (warp w its
// rows 16w .. 16w + 15), walks its key tiles in order and adds scale * dS K to its float32 dq rows
// once at the end: no atomics, at the price of computing S and dP a second time.
template <int D>
constexpr size_t kDqSmemBytes = 4 * kTileElements<D> * sizeof(uint16_t) + kStripLen * sizeof(float);

template <int D>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_bf16_kernel(const Params p) {
  const Work w = locate(p, true, p.causal);
  if (w.bh >= p.B * p.H) return;
  const Slice s = w.queries<D>(p, w.sub), sk = w.keys<D>(p);
  const int64_t qt = w.tile;
  if (qt * kTile >= s.L || sk.L == 0) return;

  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* const Qs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const dOs = Qs + kTileElements<D>;
  uint16_t* const Ks = dOs + kTileElements<D>;
  uint16_t* const Vs = Ks + kTileElements<D>;
  float* const bias_strip = reinterpret_cast<float*>(Vs + kTileElements<D>);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int rows[2] = {16 * warp + g, 16 * warp + g + 8};
  float lse[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t m = qt * kTile + rows[i];
    const bool valid = m < s.L;
    lse[i] = valid ? p.lse[s.lse0 + s.position(m)] : 0.0f;
    delta[i] = valid ? p.delta[s.lse0 + s.position(m)] : 0.0f;
  }
  load_tile_async<D>(Qs, p.q, s, qt * kTile);
  load_tile_async<D>(dOs, p.dout, s, qt * kTile);
  copy_async_commit();

  float dq[D / 8][4] = {};
  const int64_t key_tiles = p.causal ? qt + 1 : (sk.L + kTile - 1) / kTile;
  for (int64_t kt = 0; kt < key_tiles; ++kt) {
    __syncthreads();  // the previous pair's readers of K, V and the bias strip are done
    load_tile_async<D>(Ks, p.k, sk, kt * kTile);
    load_tile_async<D>(Vs, p.v, sk, kt * kTile);
    copy_async_commit();
    if (p.bias) load_bias_strip<kThreads>(bias_strip, static_cast<int*>(nullptr), p, s, sk, qt - kt);
    copy_async_wait<0>();
    __syncthreads();

    float sc[kTile / 8][4], dp[kTile / 8][4];
    mma_a_bt<D>(sc, Qs, 16 * warp, Ks, 0, lane);
    mma_a_bt<D>(dp, dOs, 16 * warp, Vs, 0, lane);
    const TilePairMask mask(s, sk, qt, kt, p.causal);
#pragma unroll
    for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2, rq = rows[i], rk = 8 * n + 2 * c + e % 2;
        sc[n][e] = pair_gradient(p, s, sk, mask, qt, kt, rq, rk, sc[n][e], dp[n][e], lse[i], delta[i], bias_strip).ds;
      }
    uint32_t dsf[kTile / 16][4];
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) accumulators_to_a(dsf[kk], sc[2 * kk], sc[2 * kk + 1]);
    mma_a_b(dq, dsf, Ks, kRowStride<D>, 0, 0, lane);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t m = qt * kTile + rows[i];
    if (m >= s.L) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      float2* row = reinterpret_cast<float2*>(p.dq + s.offset(m) + 8 * n + 2 * c);
      const float2 a = *row;
      *row = make_float2(a.x + p.scale * dq[n][2 * i], a.y + p.scale * dq[n][2 * i + 1]);
    }
  }
}

// ---------------------------------------------------------------- host side

// The head dim the tensor-core kernels run a call of head dim D on (zero-padded up to it), or 0
// when they have none (D > 128).
int64_t tensor_core_head_dim(int64_t D) { return D <= 64 ? 64 : D <= 128 ? 128 : 0; }

template <typename F>
void dispatch_tensor_core_head_dim(int64_t D, F&& f) {
  if (D == 64) return f(std::integral_constant<int, 64>{});
  return f(std::integral_constant<int, 128>{});
}

// q as the kernels read it: padded to head dim Dp (a fresh tensor) or 16-byte aligned.
Tensor kernel_input(const Tensor& t, int64_t Dp, Backend& backend) {
  return t.size(3) == Dp ? aligned(t, backend) : pad_head_dim(t, Dp, backend);
}

Tensor float32_scratch(const Shape& shape, int device_index) {
  return Tensor::empty(shape, TensorOptions(DType::Float32).with_device(Device::cuda(device_index)));
}

// out (bf16, head dim D) = the first D columns of a float32 result, rounded to nearest even.
void round_into(Tensor& out, const Tensor& result, Backend& backend) {
  backend.copy(out, result.size(3) == out.size(3) ? result : result.narrow(3, 0, out.size(3)));
}

}  // namespace

bool CudaBackend::native_bf16_attention(int64_t head_dim) {
  return tensor_core_head_dim(head_dim) != 0;
}

void CudaBackend::dilated_attention_forward_bf16(Tensor& o, Tensor& lse, const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& bias,
                                                 const AttentionParams& params) {
  constexpr const char* op = "dilated_attention_forward (bf16, tensor cores)";
  const Dims d = check_attention_inputs(op, q_in, k_in, v_in, bias, index_);
  DILATRON_CHECK(q_in.dtype() == DType::BFloat16, op, ": q must be bfloat16, got ", dtype_name(q_in.dtype()));
  check_output(op, "o", o, q_in.shape(), DType::BFloat16, index_);
  check_output(op, "lse", lse, {d.B, d.H, d.N}, DType::Float32, index_);
  if (o.numel() == 0) return;
  DeviceGuard guard(index_);
  const int64_t Dp = tensor_core_head_dim(d.D);
  DILATRON_CHECK(Dp != 0, op, ": head dim D = ", d.D, " is not supported (at most 128)");
  const Tensor q = kernel_input(q_in, Dp, *this), k = kernel_input(k_in, Dp, *this), v = kernel_input(v_in, Dp, *this);
  const cuda::DeviceBuckets buckets(params, bias.defined(), index_);
  // The carried state starts empty: o = 0, lse = -inf (also the final values off every grid).
  Tensor o_acc = float32_scratch(with_head_dim(o.shape(), Dp), index_);
  CUDA_CHECK(cudaMemsetAsync(o_acc.raw_data(), 0, static_cast<size_t>(o_acc.numel()) * sizeof(float), kStream));
  fill(lse, -std::numeric_limits<double>::infinity());

  dispatch_tensor_core_head_dim(Dp, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    Params p = kernel_params<bfloat16, float>(d, params, bias, buckets.data(), q, k, v);
    p.o = o_acc.data<float>();
    p.lse = lse.data<float>();
    constexpr size_t smem = kForwardSmemBytes<D>;
    allow_shared_memory(attention_forward_bf16_kernel<D>, smem);
    for (size_t i = 0; i < params.schedule.size(); ++i) {
      const BranchGrid g = branch_grid(d.N, d.B * d.H, params.schedule[i]);
      set_branch(p, params.schedule[i], static_cast<int>(i), g);
      attention_forward_bf16_kernel<D><<<g.by_query_tile, kThreads, smem, kStream>>>(p);
      CUDA_CHECK_LAUNCH();
    }
  });
  round_into(o, o_acc, *this);
}

void CudaBackend::dilated_attention_backward_bf16(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dbias,
                                                  const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                  const Tensor& v_in, const Tensor& o_in, const Tensor& lse,
                                                  const Tensor& bias, const AttentionParams& params) {
  constexpr const char* op = "dilated_attention_backward (bf16, tensor cores)";
  const Dims d = check_attention_inputs(op, q_in, k_in, v_in, bias, index_);
  DILATRON_CHECK(q_in.dtype() == DType::BFloat16, op, ": q must be bfloat16, got ", dtype_name(q_in.dtype()));
  check_backward_tensors(op, d, q_in, dq, dk, dv, dout_in, o_in, lse, DType::Float32, bias, dbias, index_);
  if (dq.numel() == 0) {
    if (dbias.defined()) fill(dbias, 0.0);
    return;
  }
  DeviceGuard guard(index_);
  const int64_t Dp = tensor_core_head_dim(d.D);
  DILATRON_CHECK(Dp != 0, op, ": head dim D = ", d.D, " is not supported (at most 128)");
  const Device dev = Device::cuda(index_);
  const Tensor q = kernel_input(q_in, Dp, *this), k = kernel_input(k_in, Dp, *this), v = kernel_input(v_in, Dp, *this);
  const Tensor dout = kernel_input(dout_in, Dp, *this);
  const cuda::DeviceBuckets buckets(params, bias.defined(), index_);
  const int64_t BH = d.B * d.H;
  const bool deterministic = cuda::deterministic_attention();

  // The gradients accumulate in float32 over every branch (dq also over key tiles, by atomics).
  const Shape padded = with_head_dim(q_in.shape(), Dp);
  Tensor dq_acc = float32_scratch(padded, index_), dk_acc = float32_scratch(padded, index_),
         dv_acc = float32_scratch(padded, index_);
  for (Tensor* g : {&dq_acc, &dk_acc, &dv_acc})
    CUDA_CHECK(cudaMemsetAsync(g->raw_data(), 0, static_cast<size_t>(g->numel()) * sizeof(float), kStream));

  // delta = rowsum(do * o) over the true head dim, from the bf16 o the forward returned.
  ScratchBuffer<float> delta(static_cast<size_t>(BH * d.N), dev);
  const int64_t rows = d.B * d.N * d.H;
  attention_delta_kernel<bfloat16, float><<<static_cast<unsigned>((rows * 32 + 255) / 256), 256, 0, kStream>>>(
      delta.data(), dout_in.data<bfloat16>(), o_in.data<bfloat16>(), rows, d.N, d.H, static_cast<int>(d.D));
  CUDA_CHECK_LAUNCH();

  // dbias: per-block partial rows, sized for the largest branch grid, summed into a float32 table.
  const bool want_dbias = dbias.defined();
  const int num_buckets = bias.defined() ? static_cast<int>(bias.size(1)) : 0;
  int64_t max_blocks = 0;
  for (const AttentionBranch& br : params.schedule)
    max_blocks = std::max<int64_t>(max_blocks, branch_grid(d.N, BH, br).by_key_tile.x * BH);
  ScratchBuffer<float> partial(want_dbias ? static_cast<size_t>(max_blocks * num_buckets) : 0, dev);
  Tensor dbias_acc = want_dbias ? float32_scratch(dbias.shape(), index_) : Tensor();
  if (want_dbias) {
    const size_t bytes = static_cast<size_t>(dbias_acc.numel()) * sizeof(float);
    CUDA_CHECK(cudaMemsetAsync(dbias_acc.raw_data(), 0, bytes, kStream));
  }

  dispatch_tensor_core_head_dim(Dp, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    Params p = kernel_params<bfloat16, float>(d, params, bias, buckets.data(), q, k, v);
    p.lse = const_cast<float*>(lse.data<float>());  // read only in the backward kernel
    p.dout = dout.data<bfloat16>();
    p.delta = delta.data();
    p.dq = dq_acc.data<float>();
    p.dk = dk_acc.data<float>();
    p.dv = dv_acc.data<float>();
    p.dbias_partial = want_dbias ? partial.data() : nullptr;
    const size_t smem = BackwardSmem<D>::bytes(want_dbias ? num_buckets : 0);
    allow_shared_memory(attention_backward_bf16_kernel<D>, smem);
    if (deterministic) allow_shared_memory(attention_backward_dq_bf16_kernel<D>, kDqSmemBytes<D>);
    for (size_t i = 0; i < params.schedule.size(); ++i) {
      const BranchGrid g = branch_grid(d.N, BH, params.schedule[i]);
      set_branch(p, params.schedule[i], static_cast<int>(i), g);
      attention_backward_bf16_kernel<D><<<g.by_key_tile, kThreads, smem, kStream>>>(p, !deterministic);
      CUDA_CHECK_LAUNCH();
      if (deterministic) {
        attention_backward_dq_bf16_kernel<D><<<g.by_query_tile, kThreads, kDqSmemBytes<D>, kStream>>>(p);
        CUDA_CHECK_LAUNCH();
      }
      if (want_dbias) {
        const int64_t outs = d.H * num_buckets;
        attention_dbias_reduce_kernel<float><<<static_cast<unsigned>((outs + 255) / 256), 256, 0, kStream>>>(
            dbias_acc.data<float>(), partial.data(), d.B, d.H, g.by_key_tile.x, num_buckets);
        CUDA_CHECK_LAUNCH();
      }
    }
  });
  round_into(dq, dq_acc, *this);
  round_into(dk, dk_acc, *this);
  round_into(dv, dv_acc, *this);
  if (want_dbias) copy(dbias, dbias_acc);
}

}  // namespace dilatron::kernels
