// Helpers every test file may use.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
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

// The whole text of a file ("" when it cannot be opened).
inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Xors the byte at `offset` of a file with `mask` (the same call again restores it).
inline void xor_byte(const std::string& path, size_t offset, unsigned char mask) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  const char c = static_cast<char>(f.get() ^ mask);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(c);
}

}  // namespace dilatron::test
