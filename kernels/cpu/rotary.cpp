// Rotary / XPOS position embedding on the CPU: each (x[2i], x[2i+1]) pair of a head rotated by the
// angle of its position and frequency, in one pass over a possibly strided x.
#include <type_traits>

#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"

namespace dilatron::kernels {

void CpuBackend::rotary(Tensor& out, const Tensor& x, const Tensor& cos, const Tensor& sin) {
  DILATRON_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rotary: x must be [B, N, H, D] with D even, got ",
                 shape_str(x.shape()));
  const int64_t batch = x.size(0), n = x.size(1), heads = x.size(2), half = x.size(3) / 2;
  DILATRON_CHECK(out.shape() == x.shape() && out.is_contiguous(), "rotary: out must be contiguous ",
                 shape_str(x.shape()), ", got ", shape_str(out.shape()), " with strides ", shape_str(out.strides()));
  const Shape table{n, half};
  for (const Tensor* t : {&cos, &sin})
    DILATRON_CHECK(t->shape() == table && t->is_contiguous() && t->dtype() == x.dtype(), "rotary: cos and sin must be ",
                   "contiguous ", dtype_name(x.dtype()), " ", shape_str(table), ", got ", dtype_name(t->dtype()), " ",
                   shape_str(t->shape()));
  DILATRON_CHECK(out.dtype() == x.dtype(), "rotary: x is ", dtype_name(x.dtype()), ", out is ",
                 dtype_name(out.dtype()));
  const Shape& st = x.strides();
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = x.data<T>();
    const T* pc = cos.data<T>();
    const T* ps = sin.data<T>();
    T* po = out.data<T>();
    // One (b, t) row of H heads per item: the table row is loaded once for all heads. The pair
    // stride is a compile-time 1 for the usual x (a view of whole heads), so the pairs vectorise.
    auto rotate_rows = [&](auto sd, int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / n, t = row % n;
        const T* c = pc + t * half;
        const T* s = ps + t * half;
        for (int64_t h = 0; h < heads; ++h) {
          const T* xh = px + b * st[0] + t * st[1] + h * st[2];
          T* o = po + (row * heads + h) * 2 * half;
          for (int64_t i = 0; i < half; ++i) {
            const T x0 = xh[2 * i * sd], x1 = xh[(2 * i + 1) * sd];
            o[2 * i] = x0 * c[i] - x1 * s[i];
            o[2 * i + 1] = x1 * c[i] + x0 * s[i];
          }
        }
      }
    };
    parallel_for(batch * n, 64, [&](int64_t begin, int64_t end) {
      if (st[3] == 1) rotate_rows(std::integral_constant<int64_t, 1>{}, begin, end);
      else rotate_rows(st[3], begin, end);
    });
  });
}

}  // namespace dilatron::kernels
