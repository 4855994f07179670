#include "dilatron/random.h"

#include "dilatron/error.h"
#include "dilatron/philox.h"

namespace dilatron {

double Generator::next_uniform() {
  const uint64_t off = next_offset();
  return uniform_double(philox_word(seed_, off, 0), philox_word(seed_, off, 1));
}

uint64_t Generator::next_below(uint64_t n) {
  DILATRON_CHECK(n > 0, "Generator::next_below(0)");
  const uint64_t off = next_offset();
  const uint64_t x = (static_cast<uint64_t>(philox_word(seed_, off, 1)) << 32) | philox_word(seed_, off, 0);
  return x % n;  // bias below 2^-32 for the n used here (positions, keys)
}

}  // namespace dilatron
