// Decoding on the GPU (kernels/cpu/dilated_attention_decode.cpp's semantics): one block per (b, h)
// for the query at position t. Each branch's cached keys (decode_key_span) are taken in chunks of
// kChunk: the block computes the chunk's scores into shared memory, folds them into one online
// softmax (block-wide max and sum), and each thread accumulates its own output dims over the chunk,
// so the work is the sum over branches of at most w_i / r_i keys, whatever t is. The bias table is
// the distances 0 .. largest segment - 1 only, uploaded per call (a few KiB).
#include <cmath>
#include <limits>
#include <vector>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dtype_dispatch.h"

namespace dilatron::kernels {
namespace {

constexpr int kThreads = kBlockThreads;
constexpr int kChunk = 512;
constexpr int kMaxDimsPerThread = 4;  // head dims up to 4 * kThreads

template <typename T>
struct DecodeBranches {
  const T* k[kMaxBranches];
  const T* v[kMaxBranches];
  int64_t capacity[kMaxBranches], segment[kMaxBranches], dilation[kMaxBranches];
  BranchKind kind[kMaxBranches];
  int count;
};

template <typename T>
__device__ T exp_of(T x) {
  if constexpr (std::is_same_v<T, float>) return expf(x);
  else return exp(x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_kernel(T* o, const T* q, DecodeBranches<T> br, const T* bias,
                                                          const int32_t* buckets, int64_t bucket_base,
                                                          int64_t num_buckets, int64_t H, int64_t D, T scale,
                                                          int64_t t) {
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
  extern __shared__ unsigned char shared_bytes[];
  T* q_s = reinterpret_cast<T*>(shared_bytes);  // [D]
  T* scores = q_s + D;                          // [kChunk]
  __shared__ typename cuda::BlockReduce<T>::TempStorage reduce_storage;
  __shared__ T reduced;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) q_s[d] = q[bh * D + d];
  __syncthreads();

  T m = -std::numeric_limits<T>::infinity(), l = 0, acc[kMaxDimsPerThread] = {};
  for (int i = 0; i < br.count; ++i) {
    const GridSpan span = decode_key_span(br.segment[i], br.dilation[i], br.kind[i], h, t);
    const T* kd = br.k[i] + (b * H + h) * br.capacity[i] * D;
    const T* vd = br.v[i] + (b * H + h) * br.capacity[i] * D;
    for (int64_t first = 0; first < span.count; first += kChunk) {
      const int64_t n = span.count - first < kChunk ? span.count - first : kChunk;
      T local_max = -std::numeric_limits<T>::infinity();
      for (int64_t c = threadIdx.x; c < n; c += kThreads) {
        const T* key = kd + (first + c) * D;
        T s = 0;
        for (int64_t d = 0; d < D; ++d) s += q_s[d] * key[d];
        s *= scale;
        if (bias) s += bias[h * num_buckets + bias_bucket(buckets, bucket_base, t - span.position(first + c))];
        scores[c] = s;
        local_max = s > local_max ? s : local_max;
      }
      const T chunk_max = cuda::block_max(local_max, reduce_storage, &reduced);
      const T m_new = m > chunk_max ? m : chunk_max;
      const T correction = exp_of(m - m_new);
      T local_sum = 0;
      for (int64_t c = threadIdx.x; c < n; c += kThreads) local_sum += scores[c] = exp_of(scores[c] - m_new);
      l = l * correction + cuda::block_sum(local_sum, reduce_storage, &reduced);  // also orders the score writes before the reads below
      for (int j = 0; j < kMaxDimsPerThread; ++j) {
        const int64_t d = threadIdx.x + int64_t{j} * kThreads;
        if (d >= D) break;
        T a = 0;
        for (int64_t c = 0; c < n; ++c) a += scores[c] * vd[(first + c) * D + d];
        acc[j] = acc[j] * correction + a;
      }
      m = m_new;
      __syncthreads();  // the next chunk overwrites scores
    }
  }
  for (int j = 0; j < kMaxDimsPerThread; ++j) {
    const int64_t d = threadIdx.x + int64_t{j} * kThreads;
    if (d < D) o[bh * D + d] = l > 0 ? acc[j] / l : T(0);
  }
}

}  // namespace

void CudaBackend::dilated_attention_decode(Tensor& o, const Tensor& q, const std::vector<Tensor>& k_caches,
                                           const std::vector<Tensor>& v_caches, const Tensor& bias,
                                           const AttentionParams& params, int64_t t) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  DILATRON_CHECK(D <= kMaxDimsPerThread * kThreads, "CUDA attention decoding: head dim ", D, " exceeds ",
                 kMaxDimsPerThread * kThreads);
  DeviceGuard guard(index_);
  const cuda::DeviceBuckets buckets(params, bias.defined(), index_);
  dispatch_float(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    DecodeBranches<T> br{};
    br.count = static_cast<int>(params.schedule.size());
    for (int i = 0; i < br.count; ++i) {
      br.k[i] = k_caches[i].data<T>();
      br.v[i] = v_caches[i].data<T>();
      br.capacity[i] = k_caches[i].size(2);
      br.segment[i] = params.schedule[i].segment;
      br.dilation[i] = params.schedule[i].dilation;
      br.kind[i] = params.schedule[i].kind;
    }
    const size_t shared = (static_cast<size_t>(D) + kChunk) * sizeof(T);
    decode_kernel<T><<<static_cast<unsigned>(B * H), kThreads, shared, kStream>>>(
        o.data<T>(), q.data<T>(), br, bias.defined() ? bias.data<T>() : nullptr,
        buckets.data(), params.bucket_base, bias.defined() ? bias.size(1) : 0, H, D, static_cast<T>(params.scale), t);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace dilatron::kernels
