// Copies (strided, dtype-converting), fills and Philox random fills on the CPU.
#include <cmath>
#include <cstring>

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
  if (in.dtype() == out.dtype() && in.is_contiguous() && out.is_contiguous()) {
    std::memcpy(out.raw_data(), in.raw_data(), static_cast<size_t>(n) * dtype_size(in.dtype()));
    return;
  }
  dispatch_all(in.dtype(), [&](auto src_tag) {
    using S = decltype(src_tag);
    dispatch_all(out.dtype(), [&](auto dst_tag) {
      using D = decltype(dst_tag);
      const S* src = static_cast<const S*>(in.raw_data());
      D* dst = static_cast<D*>(out.raw_data());
      const StridedIndex idx(in.shape(), in.strides());
      parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<D>(src[idx(i)]);
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

void CpuBackend::fill_uniform(Tensor& out, uint64_t seed, uint64_t offset, double low, double high) {
  const int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(out.raw_data());
    parallel_for(n, 1 << 12, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // Two words per element give 53-bit uniforms in both dtypes.
        const double u = uniform_double(philox_word(seed, offset, 2 * static_cast<uint64_t>(i)),
                                        philox_word(seed, offset, 2 * static_cast<uint64_t>(i) + 1));
        p[i] = static_cast<T>(low + (high - low) * u);
      }
    });
  });
}

void CpuBackend::fill_normal(Tensor& out, uint64_t seed, uint64_t offset, double mean, double std) {
  const int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(out.raw_data());
    parallel_for(n, 1 << 12, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // Box-Muller on one Philox block per pair of elements: cos for even i, sin for odd i.
        const uint64_t pair = static_cast<uint64_t>(i) >> 1;
        const uint32_t w0 = philox_word(seed, offset, 4 * pair), w1 = philox_word(seed, offset, 4 * pair + 1);
        const uint32_t w2 = philox_word(seed, offset, 4 * pair + 2), w3 = philox_word(seed, offset, 4 * pair + 3);
        const double u1 = 1.0 - uniform_double(w0, w1);  // (0, 1]
        const double u2 = uniform_double(w2, w3);
        const double r = std::sqrt(-2.0 * std::log(u1));
        const double z = (i & 1) ? r * std::sin(2.0 * M_PI * u2) : r * std::cos(2.0 * M_PI * u2);
        p[i] = static_cast<T>(mean + std * z);
      }
    });
  });
}

}  // namespace dilatron::kernels
