// The CUDA backend's entry points for the rest of the library and its tools: the backend of a
// GPU, the device memory behind Storage, and the caching allocator's and attention's switches.
// Declared in every build; without CUDA compiled in, kernels/no_cuda.cpp defines them to say so.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dilatron/kernels/backend.h"

namespace dilatron::kernels::cuda {

Backend& backend(int device_index);  // throws when no such GPU
void* device_alloc(size_t nbytes, int device_index);
void device_free(void* p, int device_index);

// The caching allocator behind device_alloc/device_free (kernels/cuda/device.cpp). Freed blocks go
// to per-device free lists keyed by size class and are handed out again, so a training step in
// steady state makes no cudaMalloc calls.
struct CacheStats {
  int64_t device_mallocs = 0;  // cudaMalloc calls so far on this device
  int64_t cached_bytes = 0;    // bytes in free lists (not counted by memory_stats)
};
CacheStats cache_stats(int device_index);
// Returns every cached block of every device to the driver (cudaFree).
void empty_cache();

// Dilated attention backward: the deterministic mode (no float atomics; bitwise reproducible dq,
// at the price of recomputing the scores once more) is on when the environment variable
// DILATRON_DETERMINISTIC is set to a value other than "0" or "".
bool deterministic_attention();

}  // namespace dilatron::kernels::cuda
