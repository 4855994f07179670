// bfloat16: the top 16 bits of an IEEE float32 (sign, 8 exponent bits, 7 mantissa bits). The one
// home of the conversions, shared by the CPU and the CUDA kernels: float -> bf16 rounds to nearest
// even (overflow gives inf, as RNE does; NaN stays a quiet NaN with its sign), bf16 -> float is exact.
#pragma once

#include <cstdint>
#include <cstring>

#include "dilatron/host_device.h"

namespace dilatron {

namespace detail {
// memcpy rather than std::bit_cast: it also compiles in device code.
DILATRON_HOST_DEVICE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
DILATRON_HOST_DEVICE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

DILATRON_HOST_DEVICE uint16_t bf16_bits_from_float(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
  // Round to nearest even: add half an ulp of the kept part, minus one unless the kept part is odd.
  // A carry out of the mantissa steps the exponent (the largest finite values round up to inf).
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

// double -> float rounding to odd (a float with the low bit set when inexact) keeps the sticky
// information, so the float -> bf16 rounding after it is the correctly rounded double -> bf16.
DILATRON_HOST_DEVICE float float_round_to_odd(double d) {
  const float f = static_cast<float>(d);
  const uint32_t u = float_bits(f);
  if (static_cast<double>(f) == d || (u & 0x7fffffffu) >= 0x7f800000u) return f;  // exact, inf or NaN
  // Truncate toward zero (when f is further from zero than d, one step down in magnitude; by d's sign,
  // since f may have underflowed to a zero), then set the low bit.
  const bool away_from_zero = d < 0.0 ? static_cast<double>(f) < d : static_cast<double>(f) > d;
  return bits_float((away_from_zero ? u - 1 : u) | 1u);
}
}  // namespace detail

struct bfloat16 {
  uint16_t bits;  // uninitialised by default (trivial, so CUDA __shared__ arrays may hold it); bfloat16{} is 0

  bfloat16() = default;
  DILATRON_HOST_DEVICE explicit bfloat16(float f) : bits(detail::bf16_bits_from_float(f)) {}
  DILATRON_HOST_DEVICE explicit bfloat16(double d) : bfloat16(detail::float_round_to_odd(d)) {}
  // Integers and bool go through double: exact up to 2^53, far beyond bf16's 8 significant bits.
  DILATRON_HOST_DEVICE explicit bfloat16(int64_t i) : bfloat16(static_cast<double>(i)) {}
  DILATRON_HOST_DEVICE explicit bfloat16(bool b) : bits(b ? 0x3f80 : 0) {}

  static DILATRON_HOST_DEVICE bfloat16 from_bits(uint16_t b) {
    bfloat16 r;
    r.bits = b;
    return r;
  }
  // Exact; other conversions (double, int64, bool) go through float, as for a float32 value.
  DILATRON_HOST_DEVICE operator float() const { return detail::bits_float(static_cast<uint32_t>(bits) << 16); }
};
static_assert(sizeof(bfloat16) == 2);

}  // namespace dilatron
