#include "dilatron/version.h"

namespace dilatron {
const char* version() { return DILATRON_VERSION; }
}  // namespace dilatron
