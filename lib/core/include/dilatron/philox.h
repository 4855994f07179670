// Philox4x32-10 (Salmon et al., 2011), the counter-based generator behind every random number in
// dilatron: tensor init, dropout and attention dropout. Host and device share this one function,
// so the CPU and CUDA backends draw bit-identical streams. Same as cuRAND's PHILOX4_32_10.
#pragma once

#include <cstdint>

#include "dilatron/host_device.h"

namespace dilatron {

struct Philox4 {
  uint32_t x[4];
};

DILATRON_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

DILATRON_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, ctr.x[0], hi0, lo0);
    philox_mulhilo(kMul1, ctr.x[2], hi1, lo1);
    ctr = Philox4{{hi1 ^ ctr.x[1] ^ key0, lo1, hi0 ^ ctr.x[3] ^ key1, lo0}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// The 32-bit word for element i of a stream with (seed, offset): counter {i/4 lo, i/4 hi, offset lo,
// offset hi}, key {seed lo, seed hi}, word i % 4. Tensor fills use this layout.
DILATRON_HOST_DEVICE uint32_t philox_word(uint64_t seed, uint64_t offset, uint64_t i) {
  const uint64_t block = i >> 2;
  Philox4 r = philox4x32_10(Philox4{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                                     static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}},
                            static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return r.x[i & 3];
}

// Dropout keep threshold: keep when word >= floor(p * 2^32).
DILATRON_HOST_DEVICE uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

// Uniform in [0, 1) from one word (24 bits, float) or two words (53 bits, double).
DILATRON_HOST_DEVICE float uniform_float(uint32_t w) { return static_cast<float>(w >> 8) * (1.0f / 16777216.0f); }
DILATRON_HOST_DEVICE double uniform_double(uint32_t lo, uint32_t hi) {
  const uint64_t bits = (static_cast<uint64_t>(hi) << 21) ^ (lo >> 11);
  return static_cast<double>(bits & ((1ull << 53) - 1)) * (1.0 / 9007199254740992.0);
}

}  // namespace dilatron
