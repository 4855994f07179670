// Reference-counted device memory shared by a tensor and its views, with per-device accounting.
#pragma once

#include <cstdint>
#include <memory>

#include "dilatron/dtype.h"

namespace dilatron {

class Storage {
 public:
  Storage(size_t nbytes, Device device);  // uninitialised memory, 64-byte aligned
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
};

// Bytes held by live Storage objects (and by kernel scratch taken through scratch_alloc)
// on one device: what the memory tests assert on.
struct MemoryStats {
  int64_t current_bytes = 0;
  int64_t peak_bytes = 0;
  int64_t num_allocs = 0;
};
MemoryStats memory_stats(Device device = Device::cpu());
void reset_peak_memory_stats(Device device = Device::cpu());

// Raw accounted allocations for kernel scratch (tiles, per-thread buffers).
void* scratch_alloc(size_t nbytes, Device device = Device::cpu());
void scratch_free(void* p, size_t nbytes, Device device = Device::cpu());

namespace detail {
// Used by the device allocators to keep MemoryStats.
void record_alloc(Device device, int64_t nbytes);
void record_free(Device device, int64_t nbytes);
}  // namespace detail

}  // namespace dilatron

namespace dilatron {
// An accounted, uninitialised buffer of n elements that frees itself (kernel scratch).
template <typename T>
class ScratchBuffer {
 public:
  explicit ScratchBuffer(size_t n, Device device = Device::cpu())
      : n_(n), device_(device), p_(static_cast<T*>(scratch_alloc(n * sizeof(T), device))) {}
  ~ScratchBuffer() { scratch_free(p_, n_ * sizeof(T), device_); }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  T* data() const { return p_; }
  size_t size() const { return n_; }
  T& operator[](size_t i) const { return p_[i]; }

 private:
  size_t n_;
  Device device_;
  T* p_;
};
}  // namespace dilatron
