// The CPU backend's one instance (dilatron/kernels/backend.h).
#include "bfloat16_backend.h"
#include "cpu/cpu_backend.h"

namespace dilatron::kernels {

Backend& cpu_backend() {
  static BFloat16Backend<CpuBackend> cpu;
  return cpu;
}

}  // namespace dilatron::kernels
