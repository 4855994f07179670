// The CPU backend's one instance (dilatron/kernels/backend.h).
#include "cpu/cpu_backend.h"

namespace dilatron::kernels {

Backend& cpu_backend() {
  static CpuBackend cpu;
  return cpu;
}

}  // namespace dilatron::kernels
