// One error type for everything the library rejects; messages name the offending value.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace dilatron {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// "[2, 3]" for error messages.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace dilatron

// DILATRON_CHECK(cond, "message parts ", value, ...): throws dilatron::Error when cond is false.
#define DILATRON_CHECK(cond, ...)                                              \
  do {                                                                         \
    if (!(cond)) throw ::dilatron::Error(::dilatron::detail::concat(__VA_ARGS__)); \
  } while (0)
