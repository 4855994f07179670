#pragma once

namespace dilatron {
// The library version ("0.1.0"), also stored in checkpoints.
const char* version();
}  // namespace dilatron
