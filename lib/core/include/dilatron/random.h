// A seeded Philox stream: every draw takes the next offset, so a run is reproducible from
// (seed, offset), which is all a checkpoint needs to store.
#pragma once

#include <cstdint>

namespace dilatron {

class Generator {
 public:
  explicit Generator(uint64_t seed = 0, uint64_t offset = 0) : seed_(seed), offset_(offset) {}
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void set_state(uint64_t seed, uint64_t offset) { seed_ = seed; offset_ = offset; }
  // The offset for one draw (a whole tensor fill, one dropout mask); advances the stream.
  uint64_t next_offset() { return offset_++; }
  // One uniform double in [0, 1) / one integer in [0, n), each taking one offset.
  double next_uniform();
  uint64_t next_below(uint64_t n);

 private:
  uint64_t seed_;
  uint64_t offset_;
};

}  // namespace dilatron
