// Built when CUDA is not compiled in: every CUDA entry point says so.
#include "dilatron/kernels/cuda.h"

namespace dilatron::kernels {

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }

namespace cuda {
static Error not_built() {
  return Error("device cuda: this build of dilatron has no CUDA backend (configure with -DDILATRON_CUDA=ON on a "
               "machine with nvcc)");
}
Backend& backend(int) { throw not_built(); }
void* device_alloc(size_t, int) { throw not_built(); }
void device_free(void*, int) {}
CacheStats cache_stats(int) { return {}; }
void empty_cache() {}
bool deterministic_attention() { return false; }
}  // namespace cuda

}  // namespace dilatron::kernels
