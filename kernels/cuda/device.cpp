// The CUDA device layer: device discovery, one CudaBackend per GPU, and the caching allocator
// behind Storage (the hooks declared in dilatron/kernels/cuda.h).
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "bfloat16_backend.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dilatron/kernels/cuda.h"

namespace dilatron::kernels {

bool cuda_compiled() { return true; }

int cuda_device_count() {
  // Asked once: the count cannot change while the process runs. No driver or no GPU is not an
  // error here (the CUDA tests skip and backend() explains), anything else is.
  static const int count = [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
      cudaGetLastError();  // clear it, so the next checked call does not report it
      return 0;
    }
    CUDA_CHECK(err);
    return n;
  }();
  return count;
}

namespace cuda {
namespace {

constexpr int kMaxDevices = 16;  // as storage.cpp's accounting

void check_index(int index) {
  const int count = cuda_device_count();
  DILATRON_CHECK(index >= 0 && index < count, "device cuda:", index, " does not exist: ", count,
                 count == 1 ? " CUDA device is" : " CUDA devices are", " present",
                 count == 0 ? " (no GPU or no NVIDIA driver on this machine)" : "");
  DILATRON_CHECK(index < kMaxDevices, "device cuda:", index, ": at most ", kMaxDevices, " GPUs are supported");
}

// Size classes, as PyTorch's allocator rounds: 512-byte steps below 1 MiB, 2 MiB steps above, so
// a shape seen again (every step of a training loop) maps to the same class and reuses its block.
size_t size_class(size_t nbytes) {
  constexpr size_t kSmallStep = 512, kLargeStep = 2 << 20, kSmallLimit = 1 << 20;
  if (nbytes == 0) nbytes = 1;
  const size_t step = nbytes < kSmallLimit ? kSmallStep : kLargeStep;
  return (nbytes + step - 1) / step * step;
}

// One device's cache. Blocks are never split or merged: a block is a whole cudaMalloc of one size
// class, which keeps the bookkeeping to two hash maps under one mutex.
struct DeviceCache {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // size class -> idle blocks
  std::unordered_map<void*, size_t> live;                      // block -> its size class
  int64_t device_mallocs = 0;
  int64_t cached_bytes = 0;

  // cudaFree every idle block; the caller holds mu and has made this device current.
  void release_free_blocks() {
    for (auto& [size, blocks] : free_blocks) {
      for (void* p : blocks) CUDA_CHECK(cudaFree(p));
      cached_bytes -= static_cast<int64_t>(size * blocks.size());
    }
    free_blocks.clear();
  }
};

// Leaked on purpose: tensors held in static objects may be freed after static destructors ran,
// and the driver reclaims device memory at exit anyway.
DeviceCache& cache(int index) {
  static auto* caches = new std::array<DeviceCache, kMaxDevices>();
  return (*caches)[static_cast<size_t>(index)];
}

}  // namespace

void* device_alloc(size_t nbytes, int device_index) {
  check_index(device_index);
  const size_t size = size_class(nbytes);
  DeviceCache& c = cache(device_index);
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.free_blocks.find(size);
  if (it != c.free_blocks.end() && !it->second.empty()) {
    void* p = it->second.back();
    it->second.pop_back();
    c.cached_bytes -= static_cast<int64_t>(size);
    c.live.emplace(p, size);
    return p;
  }
  DeviceGuard guard(device_index);
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, size);
  if (err == cudaErrorMemoryAllocation) {
    // Out of memory with blocks parked in the cache: give them back and try once more.
    cudaGetLastError();
    c.release_free_blocks();
    err = cudaMalloc(&p, size);
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    throw Error(detail::concat("out of memory on cuda:", device_index, " allocating ", nbytes, " bytes (",
                               free_bytes, " of ", total_bytes, " bytes free): ", cudaGetErrorString(err)));
  }
  ++c.device_mallocs;
  c.live.emplace(p, size);
  return p;
}

void device_free(void* p, int device_index) {
  if (!p) return;
  DeviceCache& c = cache(device_index);
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.live.find(p);
  DILATRON_CHECK(it != c.live.end(), "device_free: pointer ", p, " was not allocated on cuda:", device_index);
  const size_t size = it->second;
  c.live.erase(it);
  c.free_blocks[size].push_back(p);
  c.cached_bytes += static_cast<int64_t>(size);
}

CacheStats cache_stats(int device_index) {
  check_index(device_index);
  DeviceCache& c = cache(device_index);
  std::lock_guard<std::mutex> lock(c.mu);
  return {c.device_mallocs, c.cached_bytes};
}

void empty_cache() {
  for (int i = 0; i < cuda_device_count(); ++i) {
    DeviceCache& c = cache(i);
    std::lock_guard<std::mutex> lock(c.mu);
    DeviceGuard guard(i);
    c.release_free_blocks();
  }
}

Backend& backend(int device_index) {
  check_index(device_index);
  static std::array<std::unique_ptr<BFloat16Backend<CudaBackend>>, kMaxDevices> backends;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  auto& b = backends[static_cast<size_t>(device_index)];
  if (!b) b = std::make_unique<BFloat16Backend<CudaBackend>>(device_index);
  return *b;
}

bool deterministic_attention() {
  const char* v = std::getenv("DILATRON_DETERMINISTIC");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

StridedIndexer make_indexer(const Tensor& t) {
  StridedIndexer ix;
  if (t.is_contiguous()) return ix;
  // Coalesce from the innermost dim outwards into (sizes, strides) listed outer to inner.
  std::vector<int64_t> sizes, strides;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    const int64_t size = t.shape()[static_cast<size_t>(d)], stride = t.strides()[static_cast<size_t>(d)];
    if (size == 1) continue;
    if (!sizes.empty() && strides.back() * sizes.back() == stride) {
      sizes.back() *= size;  // dim d continues the merged inner run
      continue;
    }
    sizes.push_back(size);
    strides.push_back(stride);
  }
  DILATRON_CHECK(static_cast<int>(sizes.size()) <= kMaxDims, "CUDA kernels take strided views of at most ",
                 kMaxDims, " non-mergeable dims, got shape ", shape_str(t.shape()), " with strides ",
                 shape_str(t.strides()));
  ix.ndim = static_cast<int>(sizes.size());
  for (int d = 0; d < ix.ndim; ++d) {  // reverse into outer-to-inner order
    ix.sizes[d] = sizes[sizes.size() - 1 - static_cast<size_t>(d)];
    ix.strides[d] = strides[strides.size() - 1 - static_cast<size_t>(d)];
  }
  return ix;
}

void check_on_device(const char* op, const char* what, const Tensor& t, int device_index) {
  DILATRON_CHECK(t.device() == Device::cuda(device_index), op, ": ", what, " is on ", t.device().str(),
                 ", expected cuda:", device_index);
}

}  // namespace cuda
}  // namespace dilatron::kernels
