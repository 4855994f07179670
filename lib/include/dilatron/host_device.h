// DILATRON_HOST_DEVICE marks the small functions that host code and CUDA kernels share (Philox, the
// attention's grid geometry): inline on the host, __host__ __device__ under nvcc.
#pragma once

#if defined(__CUDACC__)
#define DILATRON_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DILATRON_HOST_DEVICE inline
#endif
