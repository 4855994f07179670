// Helpers shared by the CPU kernels: strided elementwise loops, exp_float, OpenMP parallel loops
// (dtype dispatch: dtype_dispatch.h, shared with the CUDA backend).
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "dilatron/tensor.h"
#include "dtype_dispatch.h"

namespace dilatron::kernels {

// N strided operands walked together over one shape. Dims are merged wherever every operand is
// contiguous across them and size-1 dims dropped, so a bias add [B, T, C] + [C] walks [B*T, C] with
// the bias at row stride 0, and a copy into a narrow view of a cat result walks rows of the
// piece's width: inner loops see long runs of unit (or zero) strides.
template <size_t N>
class ElementwiseLoop {
 public:
  ElementwiseLoop(const Shape& shape, const std::array<const Shape*, N>& strides) {
    for (size_t d = 0; d < shape.size(); ++d) {
      if (shape[d] == 1) continue;
      bool merge = !shape_.empty();
      for (size_t k = 0; k < N && merge; ++k) merge = strides_[k].back() == (*strides[k])[d] * shape[d];
      if (merge) {
        shape_.back() *= shape[d];
        for (size_t k = 0; k < N; ++k) strides_[k].back() = (*strides[k])[d];
      } else {
        shape_.push_back(shape[d]);
        for (size_t k = 0; k < N; ++k) strides_[k].push_back((*strides[k])[d]);
      }
    }
    if (shape_.empty()) {  // one element
      shape_.push_back(1);
      for (auto& s : strides_) s.push_back(0);
    }
  }

  // Strides of the innermost (merged) dim.
  std::array<int64_t, N> inner_strides() const {
    std::array<int64_t, N> s;
    for (size_t k = 0; k < N; ++k) s[k] = strides_[k].back();
    return s;
  }

  // Calls f(offsets, len) for each run along the innermost dim within row-major elements [begin, end);
  // offsets[k] is operand k's element offset at the start of the run.
  template <typename F>
  void for_each_run(int64_t begin, int64_t end, F&& f) const {
    const auto nd = static_cast<int64_t>(shape_.size());
    const int64_t inner = shape_.back();
    std::vector<int64_t> coord(static_cast<size_t>(nd), 0);
    std::array<int64_t, N> base{};  // offsets at coord with the inner index 0
    int64_t rest = begin / inner;
    for (int64_t d = nd - 2; d >= 0; --d) {
      const auto du = static_cast<size_t>(d);
      coord[du] = rest % shape_[du];
      rest /= shape_[du];
      for (size_t k = 0; k < N; ++k) base[k] += coord[du] * strides_[k][du];
    }
    int64_t i0 = begin % inner;
    for (int64_t pos = begin; pos < end;) {
      const int64_t len = std::min(inner - i0, end - pos);
      std::array<int64_t, N> run;
      for (size_t k = 0; k < N; ++k) run[k] = base[k] + i0 * strides_[k].back();
      f(run, len);
      pos += len;
      i0 = 0;
      for (int64_t d = nd - 2; d >= 0; --d) {  // odometer step over the outer dims
        const auto du = static_cast<size_t>(d);
        for (size_t k = 0; k < N; ++k) base[k] += strides_[k][du];
        if (++coord[du] < shape_[du]) break;
        for (size_t k = 0; k < N; ++k) base[k] -= strides_[k][du] * shape_[du];
        coord[du] = 0;
      }
    }
  }

 private:
  Shape shape_;
  std::array<Shape, N> strides_;
};

// Four floats as a GCC/Clang vector-extension type (SSE; wider vectors work with exp_float too).
using f32x4 = float __attribute__((vector_size(16)));

// e^x in float without a libm call, the one definition the CPU kernels share: V is float (written
// so that loops calling it auto-vectorise; needs -fno-trapping-math) or a float vector (f32x4
// or wider) for explicit SIMD. Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so
// n * ln2_hi is exact), a degree-7 polynomial for e^r, and 2^n as two exponent-bit factors so that
// n down to -150 gives a subnormal or 0 rather than a wrapped exponent. Relative error below 2 ulp
// for normal results; x > 88.7 gives the largest finite range (e^88.7), e^-inf = 0, nan stays nan.
template <typename V>
[[gnu::always_inline]] inline V exp_float(V x) {
  x = x < -104.0f ? V{} - 104.0f : x;  // e^-104 rounds to 0; nan compares false and stays
  x = x > 88.7f ? V{} + 88.7f : x;     // e^88.7 is just below the largest float
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  V n = (x * 1.44269504088896341f + kRound) - kRound;
  V r = x - n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  V p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  n = n == n ? n : V{};  // nan -> 0 before the int conversion (defined), p carries the nan
  if constexpr (std::is_same_v<V, float>) {
    const int32_t ni = static_cast<int32_t>(n), half = ni >> 1;
    return p * std::bit_cast<float>((half + 127) << 23) * std::bit_cast<float>((ni - half + 127) << 23);
  } else {
    using I = decltype(n < n);  // the int32 vector of V's lanes
    const I ni = __builtin_convertvector(n, I), half = ni >> 1;
    return p * std::bit_cast<V>((half + 127) << 23) * std::bit_cast<V>((ni - half + 127) << 23);
  }
}

// Splits [0, n) into per-thread chunks of at least `grain` items; f(begin, end). Serial when small.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int max_threads = omp_get_max_threads();
  const int64_t chunks = std::min<int64_t>(max_threads, (n + grain - 1) / grain);
  if (chunks <= 1 || omp_in_parallel()) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel for num_threads(static_cast<int>(chunks)) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
    f(begin, end);
  }
}

}  // namespace dilatron::kernels
