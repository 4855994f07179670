#include "dilatron/dtype.h"

#include "dilatron/error.h"

namespace dilatron {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Int64: return 8;
    case DType::Bool: return 1;
    case DType::BFloat16: return 2;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
    case DType::Bool: return "bool";
    case DType::BFloat16: return "bfloat16";
  }
  return "?";
}

DType dtype_from_name(std::string_view name) {
  if (name == "float32") return DType::Float32;
  if (name == "float64") return DType::Float64;
  if (name == "int64") return DType::Int64;
  if (name == "bool") return DType::Bool;
  if (name == "bfloat16") return DType::BFloat16;
  throw Error(detail::concat("unknown dtype '", name, "' (expected float32, float64, int64, bool or bfloat16)"));
}

Device Device::parse(std::string_view s) {
  if (s == "cpu") return cpu();
  if (s == "cuda") return cuda(0);
  if (s.substr(0, 5) == "cuda:" && s.size() > 5) {
    int idx = 0;
    for (char c : s.substr(5)) {
      DILATRON_CHECK(c >= '0' && c <= '9', "bad device '", s, "' (expected cpu, cuda or cuda:N)");
      idx = idx * 10 + (c - '0');
    }
    return cuda(idx);
  }
  throw Error(detail::concat("bad device '", s, "' (expected cpu, cuda or cuda:N)"));
}

std::string Device::str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace dilatron
