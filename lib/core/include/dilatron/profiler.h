// Where a step's wall time goes: every autograd op's forward and backward, and named scopes (data,
// optimizer). Off by default, when a scope costs one branch. The outermost scope owns everything
// inside it (a layer norm's backward calling mul counts as "layer_norm backward"), so entries never
// overlap and the time outside all of them is the framework's own. On CUDA the scopes synchronise the
// device when they end (set_synchronize), so an op owns its kernels' time.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dilatron::profiler {

struct Entry {
  std::string name;  // an op's name ("matmul"), "<op> backward", or a scope's name
  int64_t calls = 0;
  double seconds = 0.0;
};

void set_enabled(bool on);
bool enabled();
// Called when a scope ends (e.g. a device synchronisation); none by default.
void set_synchronize(void (*fn)());
void reset();
// The entries so far, most time first.
std::vector<Entry> entries();

class Scope {
 public:
  explicit Scope(std::string_view name, bool backward = false) {
    if (enabled()) begin(name, backward);
  }
  ~Scope() {
    if (active_) end();
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  void begin(std::string_view name, bool backward);
  void end();
  bool active_ = false;
};

}  // namespace dilatron::profiler
