// DILATRON_HOST_DEVICE marks the small functions that host code and CUDA kernels share (Philox, the
// attention's grid geometry): inline on the host, __host__ __device__ under nvcc.
#pragma once

//
// DILATRON_HOST_DEVICE_INLINE also forces inlining on the host, for formulas that CPU loops call
// per element (GELU): a call left in a loop keeps the loop scalar.
#if defined(__CUDACC__)
#define DILATRON_HOST_DEVICE __host__ __device__ __forceinline__
#define DILATRON_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define DILATRON_HOST_DEVICE inline
#define DILATRON_HOST_DEVICE_INLINE [[gnu::always_inline]] inline
#endif
