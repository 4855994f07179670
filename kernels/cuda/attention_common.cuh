// What the flash dilated attention kernels share (kernels/cuda/dilated_attention.cu, SIMT float32 /
// float64, and kernels/cuda/dilated_attention_bf16.cu, bf16 on tensor cores): the launch
// parameters, how a block finds its rows, the dropout bit, the delta and dbias-reduction kernels,
// and the host-side checks, launch shapes and head-dim padding. The geometry itself is the
// contract's, in dilatron/kernels/dilated_attention.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dilatron/kernels/cuda.h"
#include "dilatron/philox.h"

namespace dilatron::kernels::attention {

constexpr int kTile = 64;              // query rows and key rows per tile
constexpr int kStrip = 2 * kTile - 1;  // row differences (query - key) inside a tile pair
constexpr int kStripLen = kStrip + 1;  // storage for a strip, rounded to keep 16-byte alignment

// ---------------------------------------------------------------- small vector helpers

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ---------------------------------------------------------------- parameters and geometry

// AttentionParams in the kernels' types with the tensors and this launch's branch: everything a
// launch needs, by value (kernel_params builds it). In is the tensors' element type, Acc the type of
// the arithmetic and of the carried state (the same except for bf16 inputs, whose kernels work in
// float32). Tensors are contiguous: q, k, v, o, dout, dq, dk, dv [B, N, H, D]; lse and delta
// [B, H, N]; bias [H, num_buckets].
template <typename In, typename Acc = In>
struct KernelParams {
  const In *q, *k, *v;
  Acc *o, *lse;             // forward: the output and the carried softmax state
  const In* dout;           // backward: incoming gradient
  const Acc* delta;         // backward: delta = rowsum(do * o)
  Acc *dq, *dk, *dv;
  Acc* dbias_partial;       // backward with a bias gradient: one row of num_buckets sums per block
  const In* bias;           // null when the bias is off
  const int32_t* buckets;  // AttentionParams::bucket_of_distance on the device
  int64_t bucket_base;
  int num_buckets;
  int64_t B, N, H;
  Acc scale;
  bool causal;
  bool dropout;
  uint32_t drop_threshold;  // keep when the Philox word >= this
  Acc keep_scale;             // 1 / (1 - p)
  uint64_t seed;
  uint32_t offset;
  // the branch of this launch
  int64_t w, r;
  BranchKind kind;
  int64_t subs;  // sub-problems per segment
  int branch;
  int64_t tiles_per_segment;
};

// The rows of one grid (queries or keys of a sub-problem) of one (b, h) in this launch's branch.
struct Slice {
  int64_t bh, h;
  int64_t first;   // absolute position of row 0
  int64_t r;       // position step between rows
  int64_t L;       // number of rows
  int64_t row0;    // element offset of row 0 in q/k/v/o/do/dq/dk/dv
  int64_t stride;  // elements between consecutive rows: r * H * D
  int64_t lse0;    // index of position 0 of (b, h) in lse/delta
  __device__ int64_t position(int64_t m) const { return first + m * r; }
  __device__ int64_t offset(int64_t m) const { return row0 + m * stride; }
};

template <int D, typename Params>
__device__ Slice rows_of(const Params& p, int64_t bh, const GridSpan& g) {
  Slice s;
  s.bh = bh;
  s.h = bh % p.H;
  s.first = g.first;
  s.r = g.stride;
  s.L = g.count;
  s.stride = p.r * p.H * D;
  s.row0 = ((bh / p.H * p.N + g.first) * p.H + s.h) * D;
  s.lse0 = bh * p.N;
  return s;
}

// What one block works on: (b, h), segment, sub-problem and tile.
struct Work {
  int64_t bh, segment, sub, tile;
  template <int D, typename Params>
  __device__ Slice queries(const Params& p, int64_t of_sub) const {
    return rows_of<D>(p, bh, query_grid(p.w, p.r, p.kind, p.causal, bh % p.H, segment, of_sub, p.N));
  }
  template <int D, typename Params>
  __device__ Slice keys(const Params& p) const {
    return rows_of<D>(p, bh, key_grid(p.w, p.r, bh % p.H, segment, p.N));
  }
};

// Grid: x = (segment * subs + sub) * tiles_per_segment + tile for query-tile blocks (per_sub),
// segment * tiles_per_segment + tile for key-tile blocks; (y, z) = b*H + h (split: y is at most
// 65535). With heavy_first (causal query tiles) a segment's last tiles, which see the most keys,
// start first.
template <typename Params>
__device__ Work locate(const Params& p, bool per_sub, bool heavy_first) {
  Work w;
  w.bh = blockIdx.y + int64_t{gridDim.y} * blockIdx.z;
  const int64_t t = blockIdx.x % p.tiles_per_segment, x = blockIdx.x / p.tiles_per_segment;
  w.tile = heavy_first ? p.tiles_per_segment - 1 - t : t;
  w.sub = per_sub ? x % p.subs : 0;
  w.segment = per_sub ? x / p.subs : x;
  return w;
}

// The contract's dropout bit of (query position t, key position j) in this launch's branch.
template <typename Params>
__device__ __forceinline__ bool keep(const Params& p, const Slice& s, int64_t t, int64_t j) {
  const Philox4 block = dropout_block(p.seed, p.offset, dropout_stream(s.bh, p.branch), t, j >> 2);
  return dropout_keeps(dropout_word(block, j), p.drop_threshold);
}

// delta[b, h, t] = <do[b, t, h, :], o[b, t, h, :]>, the softmax-gradient row term shared by all
// branches. One warp per (b, t, h) row.
template <typename In, typename Acc>
__global__ void attention_delta_kernel(Acc* delta, const In* dout, const In* o, int64_t rows, int64_t N, int64_t H,
                                       int D) {
  const int64_t row = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  Acc acc = Acc(0);
  for (int d = lane; d < D; d += 32) acc += static_cast<Acc>(dout[row * D + d]) * static_cast<Acc>(o[row * D + d]);
#pragma unroll
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, lane_mask);
  if (lane == 0) {
    const int64_t h = row % H, t = (row / H) % N, b = row / (H * N);
    delta[(b * H + h) * N + t] = acc;
  }
}

// The 127 bias values a tile pair uses: strip[d] = bias[h, bucket(n)] for the distance
// n = t - j = (qfirst - kfirst) + ((qt - kt) * 64 + d - 63) * r between query row and key row. With
// bucket_strip, also the bucket (-1 for distances outside the table, which only padding rows produce).
template <int kThreads, typename Acc, typename Params>
__device__ void load_bias_strip(Acc* strip, int* bucket_strip, const Params& p, const Slice& sq, const Slice& sk,
                                int64_t tile_diff) {
  for (int d = threadIdx.x; d < kStrip; d += kThreads) {
    const int64_t n = sq.first - sk.first + (tile_diff * kTile + d - (kTile - 1)) * sq.r;
    const int bucket = (n > -p.N && n < p.N) ? bias_bucket(p.buckets, p.bucket_base, n) : -1;
    strip[d] = bucket >= 0 ? static_cast<Acc>(p.bias[sq.h * p.num_buckets + bucket]) : Acc(0);
    if (bucket_strip) bucket_strip[d] = bucket;
  }
}

// dbias contributions of one tile pair, from dS in shared memory (ds(query row, key row), both in
// [0, 64)): diag[d] sums dS over the diagonal (query row - key row = d - 63) in row order; then the
// thread owning bucket k adds the diagonals that fall in k, in diagonal order. Fixed orders, no
// atomics: bitwise reproducible.
template <int kThreads, typename T, typename Scores>
__device__ void accumulate_dbias(const Scores& ds, T* diag, T* dbias, const int* bucket_strip, int num_buckets) {
  for (int d = threadIdx.x; d < kStrip; d += kThreads) {
    const int shift = d - (kTile - 1);
    T sum = T(0);
    for (int row = max(0, shift); row < min(kTile, kTile + shift); ++row) sum += ds(row, row - shift);
    diag[d] = sum;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < num_buckets; k += kThreads) {
    T sum = dbias[k];
    for (int d = 0; d < kStrip; ++d)
      if (bucket_strip[d] == k) sum += diag[d];
    dbias[k] = sum;
  }
}

// dbias[h, k] += sum over (b, block) of the per-block partial sums of one branch, in a fixed order.
template <typename T>
__global__ void attention_dbias_reduce_kernel(T* dbias, const T* partial, int64_t B, int64_t H, int64_t blocks_x,
                                              int num_buckets) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= H * num_buckets) return;
  const int64_t h = i / num_buckets, k = i % num_buckets;
  T sum = T(0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t x = 0; x < blocks_x; ++x) sum += partial[((b * H + h) * blocks_x + x) * num_buckets + k];
  dbias[i] += sum;
}

// ---------------------------------------------------------------- host side

// One branch's launch shapes, (y, z) over b*H + h: blocks per query tile (forward, deterministic
// dq: x over (segment, sub-problem, tile)) and per key tile (backward: x over (segment, tile)).
struct BranchGrid {
  dim3 by_query_tile, by_key_tile;
  int64_t tiles_per_segment;
};
inline BranchGrid branch_grid(int64_t N, int64_t BH, const AttentionBranch& br) {
  const int64_t rows = max_grid_points(br.segment, br.dilation, N);
  const int64_t tiles = (rows + kTile - 1) / kTile;
  const int64_t blocks = num_segments(br.segment, N) * subproblems(br.kind, br.dilation) * tiles;
  DILATRON_CHECK(blocks < (int64_t{1} << 31), "dilated attention on CUDA: branch (", br.segment, ", ", br.dilation,
                 ") with N = ", N, " needs ", blocks, " tiles per head, over the 2^31 grid limit");
  const unsigned y = static_cast<unsigned>(std::min<int64_t>(BH, 65535)), z = static_cast<unsigned>((BH + y - 1) / y);
  return {dim3(static_cast<unsigned>(blocks), y, z),
          dim3(static_cast<unsigned>(num_segments(br.segment, N) * tiles), y, z), tiles};
}

// A head dim without its own kernel runs on the next compiled one: q, k, v (and o, dout) get zero
// columns up to it, which add nothing to any q.k and give zero output columns; the softmax scale
// stays the caller's, from the true D.
inline Shape with_head_dim(Shape shape, int64_t padded) {
  shape[3] = padded;
  return shape;
}
inline Tensor pad_head_dim(const Tensor& t, int64_t padded, Backend& backend) {
  Tensor out = Tensor::zeros(with_head_dim(t.shape(), padded), t.options());
  Tensor head = out.narrow(3, 0, t.size(3));
  backend.copy(head, t);
  return out;
}
inline Tensor empty_padded(const Tensor& t, int64_t padded) {
  return Tensor::empty(with_head_dim(t.shape(), padded), t.options());
}
// out = the first out.size(3) columns of a padded result.
inline void unpad_head_dim(Tensor& out, const Tensor& padded, Backend& backend) {
  backend.copy(out, padded.narrow(3, 0, out.size(3)));
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// What these kernels need of their inputs, common to forward and backward (the contract's limits,
// schedule included, are the op's to check: attention_params); returns {B, N, H, D}.
struct Dims {
  int64_t B, N, H, D;
};
inline Dims check_attention_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& bias, int device_index) {
  DILATRON_CHECK(q.dim() == 4, op, ": q must be [B, N, H, D], got shape ", shape_str(q.shape()));
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  for (const auto& [name, t] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}}) {
    DILATRON_CHECK(t->shape() == q.shape() && t->dtype() == q.dtype() && t->is_contiguous(), op, ": ", name,
                   " must be a contiguous ", dtype_name(q.dtype()), " ", shape_str(q.shape()), " tensor, got ",
                   dtype_name(t->dtype()), " ", shape_str(t->shape()));
    cuda::check_on_device(op, name, *t, device_index);
  }
  if (bias.defined()) {
    DILATRON_CHECK(bias.dim() == 2 && bias.size(0) == d.H && bias.dtype() == q.dtype() && bias.is_contiguous(), op,
                   ": bias must be a contiguous ", dtype_name(q.dtype()), " [H = ", d.H, ", num_buckets], got ",
                   dtype_name(bias.dtype()), " ", shape_str(bias.shape()));
    cuda::check_on_device(op, "bias", bias, device_index);
  }
  return d;
}

inline void check_output(const char* op, const char* name, const Tensor& t, const Shape& shape, DType dtype,
                         int device_index) {
  DILATRON_CHECK(t.shape() == shape && t.dtype() == dtype && t.is_contiguous(), op, ": ", name, " must be a contiguous ",
                 dtype_name(dtype), " ", shape_str(shape), " tensor, got ", dtype_name(t.dtype()), " ",
                 shape_str(t.shape()));
  cuda::check_on_device(op, name, t, device_index);
}

// The backward's gradients and saved tensors: dq, dk, dv, dout and o shaped like q, lse [B, H, N] in
// lse_dtype, and dbias (if given, with a bias) shaped like the bias.
inline void check_backward_tensors(const char* op, const Dims& d, const Tensor& q, const Tensor& dq, const Tensor& dk,
                                   const Tensor& dv, const Tensor& dout, const Tensor& o, const Tensor& lse,
                                   DType lse_dtype, const Tensor& bias, const Tensor& dbias, int device_index) {
  const std::pair<const char*, const Tensor*> same_as_q[] = {
      {"dq", &dq}, {"dk", &dk}, {"dv", &dv}, {"dout", &dout}, {"o", &o}};
  for (const auto& [name, t] : same_as_q) check_output(op, name, *t, q.shape(), q.dtype(), device_index);
  check_output(op, "lse", lse, {d.B, d.H, d.N}, lse_dtype, device_index);
  if (dbias.defined()) {
    DILATRON_CHECK(bias.defined(), op, ": dbias given without a bias");
    check_output(op, "dbias", dbias, bias.shape(), bias.dtype(), device_index);
  }
}

// The kernels read and write rows as 16-byte vectors: a view whose data starts off that alignment
// (a storage offset) is copied once into fresh, aligned memory.
inline Tensor aligned(const Tensor& t, Backend& backend) {
  if (!t.defined() || reinterpret_cast<uintptr_t>(t.raw_data()) % 16 == 0) return t;
  Tensor copy = Tensor::empty(t.shape(), t.options());
  backend.copy(copy, t);
  return copy;
}
inline void check_aligned(const char* op, const char* name, const Tensor& t) {
  DILATRON_CHECK(reinterpret_cast<uintptr_t>(t.raw_data()) % 16 == 0, op, ": ", name,
                 " must start 16-byte aligned (a fresh tensor does; got a view with storage offset ", t.offset(), ")");
}

// AttentionParams in the kernels' type, with the device bucket table and the inputs.
template <typename In, typename Acc = In>
KernelParams<In, Acc> kernel_params(const Dims& d, const AttentionParams& ap, const Tensor& bias,
                                    const int32_t* buckets, const Tensor& q, const Tensor& k, const Tensor& v) {
  KernelParams<In, Acc> p{};
  p.q = q.data<In>();
  p.k = k.data<In>();
  p.v = v.data<In>();
  p.B = d.B;
  p.N = d.N;
  p.H = d.H;
  p.scale = static_cast<Acc>(ap.scale);
  p.causal = ap.causal;
  p.dropout = ap.dropout_p > 0.0;
  p.drop_threshold = dropout_threshold(ap.dropout_p);
  p.keep_scale = static_cast<Acc>(1.0 / (1.0 - ap.dropout_p));
  p.seed = ap.seed;
  p.offset = ap.offset;
  p.bias = bias.defined() ? bias.data<In>() : nullptr;
  p.buckets = buckets;
  p.bucket_base = ap.bucket_base;
  p.num_buckets = bias.defined() ? static_cast<int>(bias.size(1)) : 0;
  return p;
}

template <typename Params>
inline void set_branch(Params& p, const AttentionBranch& br, int index, const BranchGrid& g) {
  p.w = br.segment;
  p.r = br.dilation;
  p.kind = br.kind;
  p.subs = subproblems(br.kind, br.dilation);
  p.branch = index;
  p.tiles_per_segment = g.tiles_per_segment;
}

}  // namespace dilatron::kernels::attention
