#include "dilatron/storage.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <new>

#include "dilatron/error.h"
#include "dilatron/kernels/cuda.h"

namespace dilatron {
namespace {

struct Counters {
  std::atomic<int64_t> current{0}, peak{0}, allocs{0};
};
constexpr int kMaxDevices = 17;  // cpu + 16 GPUs
std::array<Counters, kMaxDevices> g_counters;

Counters& counters(Device d) {
  const int slot = d.is_cpu() ? 0 : 1 + d.index;
  DILATRON_CHECK(slot >= 0 && slot < kMaxDevices, "device index out of range: ", d.str());
  return g_counters[slot];
}

void* cpu_alloc(size_t nbytes) {
  const size_t rounded = (nbytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (!p) throw Error(detail::concat("out of CPU memory allocating ", nbytes, " bytes"));
  return p;
}

void* device_alloc(size_t nbytes, Device d) {
  return d.is_cpu() ? cpu_alloc(nbytes) : kernels::cuda::device_alloc(nbytes, d.index);
}
void device_free(void* p, Device d) {
  if (d.is_cpu()) std::free(p);
  else kernels::cuda::device_free(p, d.index);
}

}  // namespace

namespace detail {
void record_alloc(Device device, int64_t nbytes) {
  auto& c = counters(device);
  const int64_t now = c.current.fetch_add(nbytes) + nbytes;
  c.allocs.fetch_add(1);
  int64_t peak = c.peak.load();
  while (now > peak && !c.peak.compare_exchange_weak(peak, now)) {
  }
}
void record_free(Device device, int64_t nbytes) { counters(device).current.fetch_sub(nbytes); }
}  // namespace detail

Storage::Storage(size_t nbytes, Device device) : nbytes_(nbytes), device_(device) {
  data_ = device_alloc(nbytes, device);
  detail::record_alloc(device, static_cast<int64_t>(nbytes));
}

Storage::~Storage() {
  device_free(data_, device_);
  detail::record_free(device_, static_cast<int64_t>(nbytes_));
}

MemoryStats memory_stats(Device device) {
  auto& c = counters(device);
  return {c.current.load(), c.peak.load(), c.allocs.load()};
}

void reset_peak_memory_stats(Device device) {
  auto& c = counters(device);
  c.peak.store(c.current.load());
}

void* scratch_alloc(size_t nbytes, Device device) {
  void* p = device_alloc(nbytes, device);
  detail::record_alloc(device, static_cast<int64_t>(nbytes));
  return p;
}

void scratch_free(void* p, size_t nbytes, Device device) {
  if (!p) return;
  device_free(p, device);
  detail::record_free(device, static_cast<int64_t>(nbytes));
}

}  // namespace dilatron
