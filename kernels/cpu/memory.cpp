// Copies (strided, dtype-converting), fills and Philox random fills on the CPU.
#include <cmath>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"
#include "dilatron/philox.h"

namespace dilatron::kernels {

void CpuBackend::copy(Tensor& out, const Tensor& in) {
  DILATRON_CHECK(out.shape() == in.shape(), "copy: shape ", shape_str(in.shape()), " into ", shape_str(out.shape()));
  DILATRON_CHECK(out.device().is_cpu() && in.device().is_cpu(), "CPU copy between ", in.device().str(), " and ",
                 out.device().str());
  const int64_t n = out.numel();
  if (n == 0) return;
  // Both sides walked in runs along their merged innermost dim: a contiguous copy is one run per
  // thread, a narrow or split piece one run per row; only transposes take the element-strided loop.
  const ElementwiseLoop<2> loop(out.shape(), {&out.strides(), &in.strides()});
  const auto inner = loop.inner_strides();
  const int64_t so = inner[0], si = inner[1];
  dispatch_all(in.dtype(), [&](auto src_tag) {
    using S = decltype(src_tag);
    dispatch_all(out.dtype(), [&](auto dst_tag) {
      using D = decltype(dst_tag);
      const S* src = static_cast<const S*>(in.raw_data());
      D* dst = static_cast<D*>(out.raw_data());
      parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
        loop.for_each_run(begin, end, [&](const std::array<int64_t, 2>& off, int64_t len) {
          D* o = dst + off[0];
          const S* x = src + off[1];
          if (so == 1 && si == 1) {
            if constexpr (std::is_same_v<S, D>) std::memcpy(o, x, static_cast<size_t>(len) * sizeof(D));
            else for (int64_t i = 0; i < len; ++i) o[i] = static_cast<D>(x[i]);
          } else {
            for (int64_t i = 0; i < len; ++i) o[i * so] = static_cast<D>(x[i * si]);
          }
        });
      });
    });
  });
}

void CpuBackend::fill(Tensor& out, double value) {
  const int64_t n = out.numel();
  dispatch_all(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(out.raw_data());
    const T v = static_cast<T>(value);
    for (int64_t i = 0; i < n; ++i) p[i] = v;
  });
}

namespace {

// out[i] = value(i), computed in double, for every element of a float tensor, in parallel.
template <typename F>
void fill_each(Tensor& out, F&& value) {
  const int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(out.raw_data());
    parallel_for(n, 1 << 12, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) p[i] = static_cast<T>(value(i));
    });
  });
}

}  // namespace

void CpuBackend::fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double low, double high) {
  fill_each(out, [&](int64_t i) {
    // Two words per element give 53-bit uniforms in both dtypes.
    const double u = uniform_double(philox_word(seed, offset, 2 * static_cast<uint64_t>(i)),
                                    philox_word(seed, offset, 2 * static_cast<uint64_t>(i) + 1));
    return low + (high - low) * u;
  });
}

void CpuBackend::fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double mean, double std) {
  fill_each(out, [&](int64_t i) {
    // Box-Muller on one Philox block per pair of elements: cos for even i, sin for odd i.
    const uint64_t pair = static_cast<uint64_t>(i) >> 1;
    const uint32_t w0 = philox_word(seed, offset, 4 * pair), w1 = philox_word(seed, offset, 4 * pair + 1);
    const uint32_t w2 = philox_word(seed, offset, 4 * pair + 2), w3 = philox_word(seed, offset, 4 * pair + 3);
    const double u1 = 1.0 - uniform_double(w0, w1);  // (0, 1]
    const double u2 = uniform_double(w2, w3);
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double z = (i & 1) ? r * std::sin(2.0 * M_PI * u2) : r * std::cos(2.0 * M_PI * u2);
    return mean + std * z;
  });
}

}  // namespace dilatron::kernels
