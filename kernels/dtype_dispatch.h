// Dtype dispatch, shared by the CPU and CUDA backends: calls a generic lambda with a value of the
// C++ type of a tensor's dtype. Host-only and free of OpenMP, so .cu files include it too.
#pragma once

#include <cstdint>

#include "dilatron/dtype.h"
#include "dilatron/error.h"

namespace dilatron::kernels {

// Calls f(T{}) with T the C++ type of a float dtype; errors for others.
template <typename F>
void dispatch_float(DType t, F&& f) {
  switch (t) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    default: throw Error(detail::concat("expected a float32 or float64 tensor, got ", dtype_name(t)));
  }
}

// Calls f(T{}) for any dtype (Bool as bool, BFloat16 as bfloat16): the kernels that only move or
// compare values (copy, fill, where, max); bfloat16 arithmetic goes through Float32Compute.
template <typename F>
void dispatch_all(DType t, F&& f) {
  switch (t) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    case DType::Int64: f(int64_t{}); return;
    case DType::Bool: f(bool{}); return;
    case DType::BFloat16: f(bfloat16{}); return;
  }
}

}  // namespace dilatron::kernels
