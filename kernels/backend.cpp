#include "dilatron/kernels/backend.h"

#include "dilatron/kernels/cuda.h"

namespace dilatron::kernels {

Backend& backend(Device device) {
  if (device.is_cpu()) return cpu_backend();
  return cuda::backend(device.index);
}

}  // namespace dilatron::kernels
