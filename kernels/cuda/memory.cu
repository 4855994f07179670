// Copies (host<->device, device<->device; strided and dtype-converting), fills, and the Philox
// random fills, computing the same values as kernels/cpu/memory.cpp.
#include <cmath>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dilatron/philox.h"
#include "dtype_dispatch.h"

namespace dilatron::kernels {
namespace {

using cuda::StridedIndexer;

// out[out_index(i)] = D(in[in_index(i)]): the copy behind every non-trivial copy on one device
// (strided source or destination, dtype change).
template <typename S, typename D>
__global__ void copy_convert_kernel(D* out, StridedIndexer out_index, const S* in, StridedIndexer in_index, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[out_index(i)] = static_cast<D>(in[in_index(i)]);
}

template <typename T>
__global__ void fill_kernel(T* out, T value, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = value;
}

// The CPU formula term for term; __dadd_rn/__dmul_rn keep nvcc from contracting into an FMA,
// which would round differently from the host.
template <typename T>
__global__ void fill_uniform_kernel(T* out, int64_t n, uint64_t seed, uint64_t offset, double low, double high) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const auto w = 2 * static_cast<uint64_t>(i);
    const double u = uniform_double(philox_word(seed, offset, w), philox_word(seed, offset, w + 1));
    out[i] = static_cast<T>(__dadd_rn(low, __dmul_rn(high - low, u)));
  }
}

// Box-Muller on one Philox block per pair of elements: cos for even i, sin for odd i (as the CPU).
template <typename T>
__global__ void fill_normal_kernel(T* out, int64_t n, uint64_t seed, uint64_t offset, double mean, double std) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t pair = static_cast<uint64_t>(i) >> 1;
    const Philox4 r = philox4x32_10(Philox4{{static_cast<uint32_t>(pair), static_cast<uint32_t>(pair >> 32),
                                             static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}},
                                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const double u1 = 1.0 - uniform_double(r.x[0], r.x[1]);  // (0, 1]
    const double u2 = uniform_double(r.x[2], r.x[3]);
    const double radius = sqrt(-2.0 * log(u1));
    const double angle = 2.0 * M_PI * u2;
    const double z = (i & 1) ? __dmul_rn(radius, sin(angle)) : __dmul_rn(radius, cos(angle));
    out[i] = static_cast<T>(__dadd_rn(mean, __dmul_rn(std, z)));
  }
}

// out = in, both on one device, any strides and dtypes.
void copy_on_device(Tensor& out, const Tensor& in) {
  const int64_t n = in.numel();
  if (n == 0) return;
  const StridedIndexer out_index = cuda::make_indexer(out), in_index = cuda::make_indexer(in);
  dispatch_all(in.dtype(), [&](auto src_tag) {
    using S = decltype(src_tag);
    dispatch_all(out.dtype(), [&](auto dst_tag) {
      using D = decltype(dst_tag);
      copy_convert_kernel<S, D><<<grid_for(n), kBlockThreads, 0, kStream>>>(
          static_cast<D*>(out.raw_data()), out_index, static_cast<const S*>(in.raw_data()), in_index, n);
      CUDA_CHECK_LAUNCH();
    });
  });
}

bool plain_copy(const Tensor& out, const Tensor& in) {
  return in.dtype() == out.dtype() && in.is_contiguous() && out.is_contiguous();
}

}  // namespace

void CudaBackend::copy(Tensor& out, const Tensor& in) {
  DILATRON_CHECK(out.shape() == in.shape(), "copy: shape ", shape_str(in.shape()), " into ", shape_str(out.shape()));
  DILATRON_CHECK(out.device().is_cuda() || in.device().is_cuda(), "CUDA copy between ", in.device().str(), " and ",
                 out.device().str());
  const int64_t n = out.numel();
  if (n == 0) return;
  const size_t bytes = static_cast<size_t>(n) * dtype_size(out.dtype());

  if (!out.is_contiguous() && out.device() != in.device()) {
    // A strided destination elsewhere: bring the values over contiguous, then place them on out's device.
    Tensor staged = Tensor::empty(out.shape(), TensorOptions(out.dtype()).with_device(out.device()));
    copy(staged, in);
    backend(out.device()).copy(out, staged);
    return;
  }

  if (in.device().is_cpu()) {  // host -> device: convert on the host, then one transfer
    DeviceGuard guard(out.device().index);
    if (plain_copy(out, in)) {
      CUDA_CHECK(cudaMemcpy(out.raw_data(), in.raw_data(), bytes, cudaMemcpyHostToDevice));
      return;
    }
    Tensor staged = Tensor::empty(out.shape(), TensorOptions(out.dtype()));
    cpu_backend().copy(staged, in);
    CUDA_CHECK(cudaMemcpy(out.raw_data(), staged.raw_data(), bytes, cudaMemcpyHostToDevice));
    return;
  }

  // The source is on a GPU: make it contiguous in out's dtype there first (a copy kernel),
  // then move it with one transfer when out is elsewhere.
  DeviceGuard guard(in.device().index);
  const bool same_device = out.device() == in.device();
  if (same_device) {
    if (plain_copy(out, in)) {
      CUDA_CHECK(cudaMemcpyAsync(out.raw_data(), in.raw_data(), bytes, cudaMemcpyDeviceToDevice, kStream));
    } else {
      copy_on_device(out, in);
    }
    return;
  }
  Tensor staged = plain_copy(out, in) ? in : Tensor::empty(out.shape(), TensorOptions(out.dtype()).with_device(in.device()));
  if (!staged.same(in)) copy_on_device(staged, in);
  if (out.device().is_cpu()) {
    // Synchronous on the default stream: returns once the data (and the gather before it) is there.
    CUDA_CHECK(cudaMemcpy(out.raw_data(), staged.raw_data(), bytes, cudaMemcpyDeviceToHost));
  } else {
    CUDA_CHECK(cudaMemcpyPeer(out.raw_data(), out.device().index, staged.raw_data(), in.device().index, bytes));
  }
}

void CudaBackend::synchronize() {
  DeviceGuard guard(index_);
  CUDA_CHECK(cudaStreamSynchronize(kStream));
}

void CudaBackend::fill(Tensor& out, double value) {
  DILATRON_CHECK(out.is_contiguous(), "fill: out must be contiguous, got strides ", shape_str(out.strides()));
  DeviceGuard guard(index_);
  const int64_t n = out.numel();
  if (n == 0) return;
  dispatch_all(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    fill_kernel<T><<<grid_for(n), kBlockThreads, 0, kStream>>>(static_cast<T*>(out.raw_data()),
                                                                static_cast<T>(value), n);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double low, double high) {
  DILATRON_CHECK(out.is_contiguous(), "fill_uniform: out must be contiguous");
  DeviceGuard guard(index_);
  const int64_t n = out.numel();
  if (n == 0) return;
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    fill_uniform_kernel<T><<<grid_for(n), kBlockThreads, 0, kStream>>>(static_cast<T*>(out.raw_data()), n, seed,
                                                                        offset, low, high);
    CUDA_CHECK_LAUNCH();
  });
}

void CudaBackend::fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double mean, double std) {
  DILATRON_CHECK(out.is_contiguous(), "fill_normal: out must be contiguous");
  DeviceGuard guard(index_);
  const int64_t n = out.numel();
  if (n == 0) return;
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    fill_normal_kernel<T><<<grid_for(n), kBlockThreads, 0, kStream>>>(static_cast<T*>(out.raw_data()), n, seed,
                                                                       offset, mean, std);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace dilatron::kernels
