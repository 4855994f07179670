#include "dilatron/profiler.h"

#include <algorithm>
#include <map>

namespace dilatron::profiler {
namespace {

using Clock = std::chrono::steady_clock;

bool g_enabled = false;
void (*g_synchronize)() = nullptr;
std::map<std::string, Entry, std::less<>> g_entries;
// Ops run on the thread that calls them (OpenMP parallelism is inside the kernels); the outermost
// scope of that thread is the one timed.
thread_local int t_depth = 0;
thread_local std::string t_name;
thread_local Clock::time_point t_start;

}  // namespace

void set_enabled(bool on) { g_enabled = on; }
bool enabled() { return g_enabled; }
void set_synchronize(void (*fn)()) { g_synchronize = fn; }
void reset() { g_entries.clear(); }

std::vector<Entry> entries() {
  std::vector<Entry> out;
  for (const auto& [name, e] : g_entries) out.push_back(e);
  std::stable_sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.seconds > b.seconds; });
  return out;
}

void Scope::begin(std::string_view name, bool backward) {
  active_ = true;
  if (t_depth++ > 0) return;
  t_name.assign(name);
  if (backward) t_name += " backward";
  t_start = Clock::now();
}

void Scope::end() {
  if (--t_depth > 0) return;
  if (g_synchronize) g_synchronize();
  const double seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  auto it = g_entries.find(t_name);
  if (it == g_entries.end()) it = g_entries.emplace(t_name, Entry{t_name, 0, 0.0}).first;
  it->second.calls += 1;
  it->second.seconds += seconds;
}

}  // namespace dilatron::profiler
