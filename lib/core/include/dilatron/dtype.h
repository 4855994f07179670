// Element types and devices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dilatron/bfloat16.h"

namespace dilatron {

// Float32/Float64 carry values and gradients (Float64 is what gradient checks run in);
// BFloat16 stores activations and weights in half the memory; its kernels compute in float32 and
// round each output once (see compute_dtype). Int64 holds indices (embedding, cross_entropy
// targets); Bool holds masks.
enum class DType : uint8_t { Float32, Float64, Int64, Bool, BFloat16 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
DType dtype_from_name(std::string_view name);  // "float32", "float64", "int64", "bool", "bfloat16"
inline bool is_floating(DType t) { return t == DType::Float32 || t == DType::Float64 || t == DType::BFloat16; }
// The dtype a float dtype's kernels compute in, and that statistics kept for a backward (softmax
// lse, layer_norm mean and rstd) and cross_entropy's losses are stored in: float32 for bfloat16,
// whose 8 significant bits would cost the backward its accuracy, else the dtype itself.
inline DType compute_dtype(DType t) { return t == DType::BFloat16 ? DType::Float32 : t; }

template <typename T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::Float32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::Float64; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::Int64; };
template <> struct dtype_of<bool> { static constexpr DType value = DType::Bool; };
template <> struct dtype_of<bfloat16> { static constexpr DType value = DType::BFloat16; };

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  static Device cpu() { return {DeviceType::CPU, 0}; }
  static Device cuda(int i = 0) { return {DeviceType::CUDA, i}; }
  static Device parse(std::string_view s);  // "cpu", "cuda", "cuda:1"
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  std::string str() const;
  bool operator==(const Device&) const = default;
};

}  // namespace dilatron
