// Helpers shared by the CUDA backend: error checks that throw dilatron::Error, the device guard,
// launch sizes, and (nvcc only) strided indexing and block reductions used by the kernels.
//
// The error macros and host helpers compile with a plain C++ compiler too (the tests use
// CURAND_CHECK), so the device-only part is fenced by __CUDACC__.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <curand.h>

#include <cstdint>
#include <memory>

#include "dilatron/error.h"
#include "dilatron/kernels/dilated_attention.h"
#include "dilatron/storage.h"
#include "dilatron/tensor.h"

namespace dilatron::kernels::cuda {

// cuRAND has no error-string function; the status enum's names are the useful part.
inline const char* curand_status_name(curandStatus_t s) {
  switch (s) {
    case CURAND_STATUS_SUCCESS: return "CURAND_STATUS_SUCCESS";
    case CURAND_STATUS_VERSION_MISMATCH: return "CURAND_STATUS_VERSION_MISMATCH";
    case CURAND_STATUS_NOT_INITIALIZED: return "CURAND_STATUS_NOT_INITIALIZED";
    case CURAND_STATUS_ALLOCATION_FAILED: return "CURAND_STATUS_ALLOCATION_FAILED";
    case CURAND_STATUS_TYPE_ERROR: return "CURAND_STATUS_TYPE_ERROR";
    case CURAND_STATUS_OUT_OF_RANGE: return "CURAND_STATUS_OUT_OF_RANGE";
    case CURAND_STATUS_LENGTH_NOT_MULTIPLE: return "CURAND_STATUS_LENGTH_NOT_MULTIPLE";
    case CURAND_STATUS_DOUBLE_PRECISION_REQUIRED: return "CURAND_STATUS_DOUBLE_PRECISION_REQUIRED";
    case CURAND_STATUS_LAUNCH_FAILURE: return "CURAND_STATUS_LAUNCH_FAILURE";
    case CURAND_STATUS_PREEXISTING_FAILURE: return "CURAND_STATUS_PREEXISTING_FAILURE";
    case CURAND_STATUS_INITIALIZATION_FAILED: return "CURAND_STATUS_INITIALIZATION_FAILED";
    case CURAND_STATUS_ARCH_MISMATCH: return "CURAND_STATUS_ARCH_MISMATCH";
    case CURAND_STATUS_INTERNAL_ERROR: return "CURAND_STATUS_INTERNAL_ERROR";
  }
  return "unknown cuRAND status";
}

}  // namespace dilatron::kernels::cuda

// Each throws dilatron::Error naming the failed call, where it was made, and the library's message.
#define CUDA_CHECK(call)                                                                                 \
  do {                                                                                                   \
    const cudaError_t dilatron_err_ = (call);                                                            \
    if (dilatron_err_ != cudaSuccess)                                                                    \
      throw ::dilatron::Error(::dilatron::detail::concat("CUDA call ", #call, " failed at ", __FILE__, ":", \
                                                         __LINE__, ": ", cudaGetErrorName(dilatron_err_), \
                                                         " (", cudaGetErrorString(dilatron_err_), ")")); \
  } while (0)

#define CUBLAS_CHECK(call)                                                                                \
  do {                                                                                                    \
    const cublasStatus_t dilatron_st_ = (call);                                                           \
    if (dilatron_st_ != CUBLAS_STATUS_SUCCESS)                                                            \
      throw ::dilatron::Error(::dilatron::detail::concat("cuBLAS call ", #call, " failed at ", __FILE__, ":", \
                                                         __LINE__, ": ", cublasGetStatusName(dilatron_st_), \
                                                         " (", cublasGetStatusString(dilatron_st_), ")")); \
  } while (0)

#define CURAND_CHECK(call)                                                                                \
  do {                                                                                                    \
    const curandStatus_t dilatron_st_ = (call);                                                           \
    if (dilatron_st_ != CURAND_STATUS_SUCCESS)                                                            \
      throw ::dilatron::Error(::dilatron::detail::concat("cuRAND call ", #call, " failed at ", __FILE__, ":", \
                                                         __LINE__, ": ",                                  \
                                                         ::dilatron::kernels::cuda::curand_status_name(dilatron_st_))); \
  } while (0)

// Kernel launches are asynchronous; this surfaces launch-configuration errors at the call site.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

namespace dilatron::kernels::cuda {

// Makes `index` the current device for the guard's lifetime (every backend entry point holds one,
// so kernels, allocations and cuBLAS calls land on the tensor's GPU).
class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != index) CUDA_CHECK(cudaSetDevice(index));
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Every kernel runs on the legacy default stream: one in-order queue per device, so a block freed
// back to the caching allocator can be reused by the next kernel without events, and copies to the
// host synchronise by themselves.
constexpr cudaStream_t kStream = 0;

// cuBLAS handle of the current device, created on first use (gemm.cu).
cublasHandle_t cublas_handle();

// Threads per block for the simple elementwise and row kernels.
constexpr int kBlockThreads = 256;

// Blocks for a grid-stride loop over n items (capped: each thread loops over the rest).
inline unsigned grid_for(int64_t n, int threads = kBlockThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks));
}

// Up to this many dims survive coalescing in a strided operand (more is an error naming the shape).
constexpr int kMaxDims = 8;

// A strided view's geometry in a form kernels take by value: maps a row-major linear index of the
// view to the element offset in its storage. ndim == 0 means contiguous (offset = index).
struct StridedIndexer {
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

#if defined(__CUDACC__)
  __host__ __device__ __forceinline__ int64_t operator()(int64_t linear) const {
    if (ndim == 0) return linear;
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      off += (linear % sizes[d]) * strides[d];
      linear /= sizes[d];
    }
    return off;
  }
#endif
};

// Drops size-1 dims and merges dims that are contiguous across each other, so most views need one
// or two dims (a broadcast bias is [rows, cols] with row stride 0).
StridedIndexer make_indexer(const Tensor& t);

// Checks that t lives on this backend's device.
void check_on_device(const char* op, const char* what, const Tensor& t, int device_index);

// The bucket table on the device (uploaded per call: it is 4 (2N - 1) bytes).
// (The forward, backward and decode kernels read it through bias_bucket.)
struct DeviceBuckets {
  std::unique_ptr<ScratchBuffer<int32_t>> buffer;
  DeviceBuckets(const AttentionParams& params, bool enabled, int device_index) {
    if (!enabled) return;
    buffer = std::make_unique<ScratchBuffer<int32_t>>(params.bucket_of_distance.size(), Device::cuda(device_index));
    CUDA_CHECK(cudaMemcpy(buffer->data(), params.bucket_of_distance.data(),
                          params.bucket_of_distance.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  }
  const int32_t* data() const { return buffer ? buffer->data() : nullptr; }
};

}  // namespace dilatron::kernels::cuda

namespace dilatron::kernels {
// The launch helpers every CUDA kernel file uses, by their short names.
using cuda::DeviceGuard;
using cuda::grid_for;
using cuda::kBlockThreads;
using cuda::kStream;
}  // namespace dilatron::kernels

#if defined(__CUDACC__)
#include <cub/block/block_reduce.cuh>

namespace dilatron::kernels::cuda {

// Sum over a block of kBlockThreads threads in a fixed tree order (deterministic); the result is
// valid in every thread. `temp` must not be reused before a __syncthreads().
template <typename T>
using BlockReduce = cub::BlockReduce<T, kBlockThreads>;

template <typename T>
__device__ __forceinline__ T block_sum(T v, typename BlockReduce<T>::TempStorage& temp, T* broadcast) {
  const T total = BlockReduce<T>(temp).Sum(v);
  if (threadIdx.x == 0) *broadcast = total;
  __syncthreads();
  const T out = *broadcast;
  __syncthreads();
  return out;
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return b > a ? b : a;
  }
};

template <typename T>
__device__ __forceinline__ T block_max(T v, typename BlockReduce<T>::TempStorage& temp, T* broadcast) {
  const T total = BlockReduce<T>(temp).Reduce(v, MaxOp{});
  if (threadIdx.x == 0) *broadcast = total;
  __syncthreads();
  const T out = *broadcast;
  __syncthreads();
  return out;
}

}  // namespace dilatron::kernels::cuda
#endif
