// Fused nn kernels on the GPU: softmax / log-softmax, cross-entropy, layer norm, embedding, dropout
// (kernels/cpu/nn.cpp's semantics and precision: elementwise math in the tensor's dtype, row
// reductions in double, in an order fixed by the shape).
//
// Row kernels give one 256-thread block to each row of the last dim: rows here are long (model
// width, vocabulary), and a block's threads read adjacent elements of its row.
#include <cub/device/device_radix_sort.cuh>


#include "backend_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/reduce.cuh"
#include "dilatron/philox.h"
#include "dtype_dispatch.h"

namespace dilatron::kernels {
namespace {

using cuda::block_max;
using cuda::block_sum;
using cuda::BlockReduce;

// Per-block scratch for the row reductions: CUB's temp storage plus the broadcast slot.
template <typename T>
struct RowShared {
  typename BlockReduce<T>::TempStorage temp;
  T result;
};

// ---------------------------------------------------------------- softmax family

template <typename T>
__global__ void softmax_kernel(T* y, const T* x, int64_t K) {
  __shared__ RowShared<T> sh_max;
  __shared__ RowShared<double> sh_sum;
  const T* xr = x + blockIdx.x * K;
  T* yr = y + blockIdx.x * K;
  T mx = xr[0];
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) mx = max(mx, xr[k]);
  mx = block_max(mx, sh_max.temp, &sh_max.result);
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    yr[k] = exp(xr[k] - mx);
    s += yr[k];
  }
  const T inv = static_cast<T>(1.0 / block_sum(s, sh_sum.temp, &sh_sum.result));
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) yr[k] *= inv;
}

// dx = y * (dy - <dy, y>)
template <typename T>
__global__ void softmax_backward_kernel(T* dx, const T* y, const T* dy, int64_t K) {
  __shared__ RowShared<double> sh;
  const int64_t base = blockIdx.x * K;
  double dot = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) dot += static_cast<double>(dy[base + k]) * y[base + k];
  const T d = static_cast<T>(block_sum(dot, sh.temp, &sh.result));
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) dx[base + k] = y[base + k] * (dy[base + k] - d);
}

// log(sum(exp(x))) of one row, max-subtracted; called by the whole block, valid in every thread.
template <typename T>
__device__ double row_logsumexp(const T* xr, int64_t K, RowShared<T>& sh_max, RowShared<double>& sh_sum) {
  T mx = xr[0];
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) mx = max(mx, xr[k]);
  mx = block_max(mx, sh_max.temp, &sh_max.result);
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) s += exp(xr[k] - mx);
  return static_cast<double>(mx) + log(block_sum(s, sh_sum.temp, &sh_sum.result));
}

template <typename T>
__global__ void log_softmax_kernel(T* y, const T* x, int64_t K) {
  __shared__ RowShared<T> sh_max;
  __shared__ RowShared<double> sh_sum;
  const T* xr = x + blockIdx.x * K;
  T* yr = y + blockIdx.x * K;
  const T lse = static_cast<T>(row_logsumexp(xr, K, sh_max, sh_sum));
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) yr[k] = xr[k] - lse;
}

// y = log_softmax(x): dx = dy - exp(y) * sum(dy)
template <typename T>
__global__ void log_softmax_backward_kernel(T* dx, const T* y, const T* dy, int64_t K) {
  __shared__ RowShared<double> sh;
  const int64_t base = blockIdx.x * K;
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) s += dy[base + k];
  const T sum = static_cast<T>(block_sum(s, sh.temp, &sh.result));
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) dx[base + k] = dy[base + k] - exp(y[base + k]) * sum;
}

// ---------------------------------------------------------------- index checks

// Kernels flag an out-of-range index by atomicMin of its position into one device word; the host
// reads the word back after the launch (one 8-byte copy, which waits for the kernel) and throws an
// Error naming the value and position, as the CPU backend does before it computes anything.
class FirstBadPosition {
 public:
  explicit FirstBadPosition(int device_index) : word_(1, Device::cuda(device_index)) {
    CUDA_CHECK(cudaMemsetAsync(word_.data(), 0x7f, sizeof(unsigned long long), kStream));  // "none yet"
  }
  unsigned long long* device_word() const { return word_.data(); }
  // The smallest flagged position, or -1 when no position was flagged.
  int64_t read(int64_t positions) const {
    unsigned long long v = 0;
    CUDA_CHECK(cudaMemcpy(&v, word_.data(), sizeof v, cudaMemcpyDeviceToHost));
    return v < static_cast<unsigned long long>(positions) ? static_cast<int64_t>(v) : -1;
  }

 private:
  ScratchBuffer<unsigned long long> word_;
};

int64_t value_at(const int64_t* device_array, int64_t position) {
  int64_t v = 0;
  CUDA_CHECK(cudaMemcpy(&v, device_array + position, sizeof v, cudaMemcpyDeviceToHost));
  return v;
}

void throw_bad_target(const char* op, const int64_t* targets, int64_t pos, int64_t C, int64_t ignore_index) {
  throw Error(detail::concat(op, ": target ", value_at(targets, pos), " at position ", pos, " is out of range for ",
                             C, " classes (ignore_index is ", ignore_index, ")"));
}

void throw_bad_index(const char* op, const int64_t* indices, int64_t pos, int64_t V) {
  throw Error(detail::concat(op, ": index ", value_at(indices, pos), " at position ", pos, " is out of range for ", V,
                             " embeddings"));
}

__device__ __forceinline__ void flag(unsigned long long* word, int64_t position) {
  atomicMin(word, static_cast<unsigned long long>(position));
}

// ---------------------------------------------------------------- cross-entropy

template <typename T>
__global__ void cross_entropy_kernel(T* loss, T* lse, const T* logits, const int64_t* targets, int64_t C,
                                     int64_t ignore_index, unsigned long long* bad) {
  __shared__ RowShared<T> sh_max;
  __shared__ RowShared<double> sh_sum;
  const int64_t m = blockIdx.x;
  const T* xr = logits + m * C;
  const double l = row_logsumexp(xr, C, sh_max, sh_sum);
  if (threadIdx.x != 0) return;
  const int64_t t = targets[m];
  lse[m] = static_cast<T>(l);
  if (t == ignore_index) {
    loss[m] = T(0);
  } else if (t < 0 || t >= C) {
    flag(bad, m);
  } else {
    loss[m] = static_cast<T>(l - static_cast<double>(xr[t]));
  }
}

// dlogits = dloss * (softmax - onehot), zero rows for ignored targets.
template <typename T>
__global__ void cross_entropy_backward_kernel(T* dx, const T* dloss, const T* logits, const T* lse,
                                              const int64_t* targets, int64_t C, int64_t ignore_index,
                                              unsigned long long* bad) {
  const int64_t m = blockIdx.x;
  const int64_t t = targets[m];
  T* dxr = dx + m * C;
  const T* xr = logits + m * C;
  if (t == ignore_index) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) dxr[c] = T(0);
    return;
  }
  if (t < 0 || t >= C) {
    if (threadIdx.x == 0) flag(bad, m);
    return;
  }
  const T g = dloss[m], l = lse[m];
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const T d = g * exp(xr[c] - l);
    dxr[c] = c == t ? d - g : d;
  }
}

// ---------------------------------------------------------------- layer norm

template <typename T>
__global__ void layer_norm_kernel(T* y, T* mean, T* rstd, const T* x, const T* w, const T* b, int64_t K,
                                  double eps) {
  __shared__ RowShared<double> sh;
  const T* xr = x + blockIdx.x * K;
  T* yr = y + blockIdx.x * K;
  // Two passes (mean, then squared deviations): no cancellation for rows with a large mean.
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) s += xr[k];
  const double mu = block_sum(s, sh.temp, &sh.result) / static_cast<double>(K);
  double ss = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const double d = xr[k] - mu;
    ss += d * d;
  }
  const double r = 1.0 / sqrt(block_sum(ss, sh.temp, &sh.result) / static_cast<double>(K) + eps);  // biased
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = static_cast<T>(mu);
    rstd[blockIdx.x] = static_cast<T>(r);
  }
  const T mu_t = static_cast<T>(mu), r_t = static_cast<T>(r);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    T v = (xr[k] - mu_t) * r_t;
    if (w) v *= w[k];
    if (b) v += b[k];
    yr[k] = v;
  }
}

// xhat = (x - mean) * rstd, g = dy * weight: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
template <typename T>
__global__ void layer_norm_backward_dx_kernel(T* dx, const T* dy, const T* x, const T* mean, const T* rstd,
                                              const T* w, int64_t K) {
  __shared__ RowShared<double> sh;
  const int64_t base = blockIdx.x * K;
  const T mu = mean[blockIdx.x], r = rstd[blockIdx.x];
  double sum_g = 0.0, sum_gx = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T xhat = (x[base + k] - mu) * r;
    const T g = w ? dy[base + k] * w[k] : dy[base + k];
    sum_g += g;
    sum_gx += static_cast<double>(g) * xhat;
  }
  const double inv_k = 1.0 / static_cast<double>(K);
  const T mean_g = static_cast<T>(block_sum(sum_g, sh.temp, &sh.result) * inv_k);
  const T mean_gx = static_cast<T>(block_sum(sum_gx, sh.temp, &sh.result) * inv_k);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T xhat = (x[base + k] - mu) * r;
    const T g = w ? dy[base + k] * w[k] : dy[base + k];
    dx[base + k] = r * (g - mean_g - xhat * mean_gx);
  }
}

// Column terms of the parameter gradients: dweight = sum_rows(dy * xhat), dbias = sum_rows(dy).
template <typename T>
struct DyTimesXhat {
  const T *dy, *x, *mean, *rstd;
  int64_t K;
  __device__ double operator()(int64_t m, int64_t k) const {
    const T xhat = (x[m * K + k] - mean[m]) * rstd[m];
    return static_cast<double>(dy[m * K + k]) * xhat;
  }
};
template <typename T>
struct Dy {
  const T* dy;
  int64_t K;
  __device__ double operator()(int64_t m, int64_t k) const { return static_cast<double>(dy[m * K + k]); }
};

// ---------------------------------------------------------------- embedding

__global__ void flag_bad_indices_kernel(const int64_t* indices, int64_t M, int64_t V, unsigned long long* bad) {
  for (int64_t m = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; m < M; m += int64_t{gridDim.x} * blockDim.x)
    if (indices[m] < 0 || indices[m] >= V) flag(bad, m);
}

// Throws naming the first index outside [0, V) (a flagging kernel, then one read-back).
void check_device_indices(const char* op, const int64_t* indices, int64_t M, int64_t V, int device_index) {
  FirstBadPosition bad(device_index);
  flag_bad_indices_kernel<<<grid_for(M), kBlockThreads, 0, kStream>>>(indices, M, V, bad.device_word());
  CUDA_CHECK_LAUNCH();
  const int64_t pos = bad.read(M);
  if (pos >= 0) throw_bad_index(op, indices, pos, V);
}

// out [M, E] = weight rows; the indices were checked.
template <typename T>
__global__ void embedding_kernel(T* out, const T* weight, const int64_t* indices, int64_t M, int64_t E) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < M * E; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = weight[indices[i / E] * E + i % E];
}

// The positions sorted by index (a stable sort, so equal indices keep position order) put every
// dweight row's contributions next to each other. The thread for (run start p, column e) adds
// its run in position order: the CPU's summation order, with no atomics.
template <typename T>
__global__ void embedding_backward_kernel(T* dweight, const T* dout, const int64_t* sorted_indices,
                                          const int64_t* sorted_positions, int64_t M, int64_t E) {
  const int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  const int64_t p = blockIdx.y + int64_t{gridDim.y} * blockIdx.z;
  if (e >= E || p >= M) return;
  const int64_t row = sorted_indices[p];
  if (p > 0 && sorted_indices[p - 1] == row) return;  // not the start of its run
  T acc = T(0);
  for (int64_t q = p; q < M && sorted_indices[q] == row; ++q) acc += dout[sorted_positions[q] * E + e];
  dweight[row * E + e] = acc;
}

template <typename T>
__global__ void iota_kernel(T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = static_cast<T>(i);
}

// ---------------------------------------------------------------- dropout

// keep_i = philox_word(seed, offset, i) >= threshold; one thread per Philox block of four elements.
template <typename T>
__global__ void dropout_kernel(T* y, const T* x, int64_t n, uint32_t threshold, T scale, uint64_t seed,
                               uint32_t offset) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t blk = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; blk < blocks;
       blk += int64_t{gridDim.x} * blockDim.x) {
    const auto b = static_cast<uint64_t>(blk);
    const Philox4 r = philox4x32_10(Philox4{{static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), offset, 0u}},
                                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    // Constant word indices: a runtime index into r.x would put r in local memory.
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t i = blk * 4 + w;
      if (i < n) y[i] = r.x[w] >= threshold ? x[i] * scale : T(0);
    }
  }
}

unsigned row_grid(int64_t M) { return static_cast<unsigned>(M); }

}  // namespace

// ---------------------------------------------------------------- softmax family

void CudaBackend::softmax_last(Tensor& out, const Tensor& in) {
  const auto [M, K] = check_softmax("softmax_last", out, in);
  if (M == 0) return;
  DeviceGuard guard(index_);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    softmax_kernel<T><<<row_grid(M), kBlockThreads, 0, kStream>>>(out.data<T>(), in.data<T>(), K);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) {
  const auto [M, K] = check_softmax_backward("softmax_backward_last", dx, y, dy);
  if (M == 0) return;
  DeviceGuard guard(index_);
  dispatch_float(y.dtype(), [&](auto tag) {
    using T = decltype(tag);
    softmax_backward_kernel<T><<<row_grid(M), kBlockThreads, 0, kStream>>>(dx.data<T>(), y.data<T>(),
                                                                            dy.data<T>(), K);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::log_softmax_last(Tensor& out, const Tensor& in) {
  const auto [M, K] = check_softmax("log_softmax_last", out, in);
  if (M == 0) return;
  DeviceGuard guard(index_);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    log_softmax_kernel<T><<<row_grid(M), kBlockThreads, 0, kStream>>>(out.data<T>(), in.data<T>(), K);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::log_softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) {
  const auto [M, K] = check_softmax_backward("log_softmax_backward_last", dx, y, dy);
  if (M == 0) return;
  DeviceGuard guard(index_);
  dispatch_float(y.dtype(), [&](auto tag) {
    using T = decltype(tag);
    log_softmax_backward_kernel<T><<<row_grid(M), kBlockThreads, 0, kStream>>>(dx.data<T>(), y.data<T>(),
                                                                                dy.data<T>(), K);
    CUDA_CHECK_LAUNCH();
  });
}

// ---------------------------------------------------------------- cross-entropy

void CudaBackend::cross_entropy(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                                int64_t ignore_index) {
  const auto [M, C] = check_cross_entropy(loss, lse, logits, targets);
  if (M == 0) return;
  DeviceGuard guard(index_);
  FirstBadPosition bad(index_);
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    cross_entropy_kernel<T><<<row_grid(M), kBlockThreads, 0, kStream>>>(
        loss.data<T>(), lse.data<T>(), logits.data<T>(), targets.data<int64_t>(), C, ignore_index,
        bad.device_word());
    CUDA_CHECK_LAUNCH();
  });
  const int64_t pos = bad.read(M);
  if (pos >= 0) throw_bad_target("cross_entropy", targets.data<int64_t>(), pos, C, ignore_index);
}

void CudaBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits,
                                         const Tensor& lse, const Tensor& targets, int64_t ignore_index) {
  const auto [M, C] = check_cross_entropy_backward(dlogits, dloss, logits, lse, targets);
  if (M == 0) return;
  DeviceGuard guard(index_);
  FirstBadPosition bad(index_);
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    cross_entropy_backward_kernel<T><<<row_grid(M), kBlockThreads, 0, kStream>>>(
        dlogits.data<T>(), dloss.data<T>(), logits.data<T>(), lse.data<T>(), targets.data<int64_t>(), C,
        ignore_index, bad.device_word());
    CUDA_CHECK_LAUNCH();
  });
  const int64_t pos = bad.read(M);
  if (pos >= 0) throw_bad_target("cross_entropy_backward", targets.data<int64_t>(), pos, C, ignore_index);
}

// ---------------------------------------------------------------- layer norm

void CudaBackend::layer_norm(Tensor& out, Tensor& mean, Tensor& rstd, const Tensor& x, const Tensor& weight,
                             const Tensor& bias, double eps) {
  const auto [M, K] = check_layer_norm(out, mean, rstd, x, weight, bias);
  if (M == 0) return;
  DeviceGuard guard(index_);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    layer_norm_kernel<T><<<row_grid(M), kBlockThreads, 0, kStream>>>(
        out.data<T>(), mean.data<T>(), rstd.data<T>(), x.data<T>(), weight.defined() ? weight.data<T>() : nullptr,
        bias.defined() ? bias.data<T>() : nullptr, K, eps);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::layer_norm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy, const Tensor& x,
                                      const Tensor& mean, const Tensor& rstd, const Tensor& weight) {
  const auto [M, K] = check_layer_norm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight);
  DeviceGuard guard(index_);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    if (M > 0) {
      layer_norm_backward_dx_kernel<T><<<row_grid(M), kBlockThreads, 0, kStream>>>(
          dx.data<T>(), dy.data<T>(), x.data<T>(), mean.data<T>(), rstd.data<T>(),
          weight.defined() ? weight.data<T>() : nullptr, K);
      CUDA_CHECK_LAUNCH();
    }
    if (dweight.defined())
      cuda::column_sums(dweight.data<T>(), M, K,
                        DyTimesXhat<T>{dy.data<T>(), x.data<T>(), mean.data<T>(), rstd.data<T>(), K}, index_);
    if (dbias.defined()) cuda::column_sums(dbias.data<T>(), M, K, Dy<T>{dy.data<T>(), K}, index_);
  });
}

// ---------------------------------------------------------------- embedding

void CudaBackend::embedding(Tensor& out, const Tensor& weight, const Tensor& indices) {
  const auto [V, E, M] = check_embedding("embedding", "weight", weight, "out", out, indices);
  if (M == 0) return;
  DeviceGuard guard(index_);
  check_device_indices("embedding", indices.data<int64_t>(), M, V, index_);
  if (E == 0) return;
  dispatch_float(weight.dtype(), [&](auto tag) {
    using T = decltype(tag);
    embedding_kernel<T><<<grid_for(M * E), kBlockThreads, 0, kStream>>>(out.data<T>(), weight.data<T>(),
                                                                         indices.data<int64_t>(), M, E);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::embedding_backward(Tensor& dweight, const Tensor& dout, const Tensor& indices) {
  const auto [V, E, M] = check_embedding("embedding_backward", "dweight", dweight, "dout", dout, indices);
  DILATRON_CHECK(M < (int64_t{1} << 31), "embedding_backward: ", M, " indices exceed the sort's 2^31 limit");
  DeviceGuard guard(index_);
  const Device dev = Device::cuda(index_);
  if (dweight.numel() > 0)
    CUDA_CHECK(cudaMemsetAsync(dweight.raw_data(), 0, static_cast<size_t>(dweight.numel()) * dtype_size(dweight.dtype()),
                               kStream));
  if (M == 0) return;
  check_device_indices("embedding_backward", indices.data<int64_t>(), M, V, index_);
  if (E == 0) return;

  // Sort (index, position) pairs by index; indices are in [0, V), so only their low bits take part.
  ScratchBuffer<int64_t> positions(static_cast<size_t>(M), dev), sorted_positions(static_cast<size_t>(M), dev),
      sorted_indices(static_cast<size_t>(M), dev);
  iota_kernel<int64_t><<<grid_for(M), kBlockThreads, 0, kStream>>>(positions.data(), M);
  CUDA_CHECK_LAUNCH();
  int end_bit = 1;
  while (end_bit < 63 && (int64_t{1} << end_bit) < V) ++end_bit;
  size_t temp_bytes = 0;
  const int n = static_cast<int>(M);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, indices.data<int64_t>(), sorted_indices.data(),
                                             positions.data(), sorted_positions.data(), n, 0, end_bit, kStream));
  ScratchBuffer<unsigned char> temp(temp_bytes, dev);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data(), temp_bytes, indices.data<int64_t>(), sorted_indices.data(),
                                             positions.data(), sorted_positions.data(), n, 0, end_bit, kStream));

  dispatch_float(dweight.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const auto column_blocks = static_cast<unsigned>((E + 127) / 128);
    const auto run_rows = static_cast<unsigned>(std::min<int64_t>(M, 65535));
    const auto run_layers = static_cast<unsigned>((M + run_rows - 1) / run_rows);
    embedding_backward_kernel<T><<<dim3(column_blocks, run_rows, run_layers), 128, 0, kStream>>>(
        dweight.data<T>(), dout.data<T>(), sorted_indices.data(), sorted_positions.data(), M, E);
    CUDA_CHECK_LAUNCH();
  });
}

// ---------------------------------------------------------------- dropout

void CudaBackend::dropout(Tensor& out, const Tensor& in, double p, uint64_t seed, uint32_t offset) {
  check_dropout(out, in, p);
  const int64_t n = in.numel();
  if (n == 0) return;
  DeviceGuard guard(index_);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    dropout_kernel<T><<<grid_for((n + 3) / 4), kBlockThreads, 0, kStream>>>(
        out.data<T>(), in.data<T>(), n, dropout_threshold(p), static_cast<T>(1.0 / (1.0 - p)), seed, offset);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace dilatron::kernels
