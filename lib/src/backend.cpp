#include "dilatron/kernels/backend.h"

#include "cpu/cpu_backend.h"
#include "cuda_device.h"

namespace dilatron::kernels {

Backend& cpu_backend() {
  static CpuBackend cpu;
  return cpu;
}

Backend& backend(Device device) {
  if (device.is_cpu()) return cpu_backend();
  return cuda::backend(device.index);
}

}  // namespace dilatron::kernels
