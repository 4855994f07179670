// Private hooks between the device-independent code and the CUDA build (kernels/cuda/), with a
// stand-in (kernels/no_cuda.cpp) when CUDA is not compiled in.
#pragma once

#include <cstddef>

#include "dilatron/kernels/backend.h"

namespace dilatron::kernels::cuda {
Backend& backend(int device_index);  // throws when no such GPU
void* device_alloc(size_t nbytes, int device_index);
void device_free(void* p, int device_index);
}  // namespace dilatron::kernels::cuda
