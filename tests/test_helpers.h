// Helpers every test file may use.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "dilatron/error.h"

namespace dilatron::test {

// The message of the dilatron::Error that f throws ("" and a test failure when it throws none).
template <typename F>
std::string error_message(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a dilatron::Error";
  return "";
}

}  // namespace dilatron::test
