// Rotary / XPOS position embedding on the GPU (kernels/cpu/rotary.cpp's semantics): one thread per
// (x[2i], x[2i+1]) pair, reading a possibly strided x and writing a contiguous out.
#include <initializer_list>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dtype_dispatch.h"

namespace dilatron::kernels {
namespace {

struct RotaryGeometry {
  int64_t n, heads, half;  // x is [B, n, heads, 2 * half]
  int64_t sb, sn, sh, sd;  // x's strides
};

template <typename T>
__global__ void rotary_kernel(T* out, const T* x, const T* cos, const T* sin, RotaryGeometry g, int64_t pairs) {
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < pairs; p += int64_t{gridDim.x} * blockDim.x) {
    // p enumerates (b, t, h, i) row-major, so out's pair p sits at 2p.
    const int64_t i = p % g.half;
    int64_t r = p / g.half;
    const int64_t h = r % g.heads;
    r /= g.heads;
    const int64_t t = r % g.n, b = r / g.n;
    const T* xp = x + b * g.sb + t * g.sn + h * g.sh + 2 * i * g.sd;
    const T x0 = xp[0], x1 = xp[g.sd];
    const T c = cos[t * g.half + i], s = sin[t * g.half + i];
    out[2 * p] = x0 * c - x1 * s;
    out[2 * p + 1] = x1 * c + x0 * s;
  }
}

}  // namespace

void CudaBackend::rotary(Tensor& out, const Tensor& x, const Tensor& cos, const Tensor& sin) {
  DILATRON_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rotary: x must be [B, N, H, D] with D even, got ",
                 shape_str(x.shape()));
  DILATRON_CHECK(out.shape() == x.shape() && out.is_contiguous() && out.dtype() == x.dtype(),
                 "rotary: out must be contiguous ", dtype_name(x.dtype()), " ", shape_str(x.shape()), ", got ",
                 dtype_name(out.dtype()), " ", shape_str(out.shape()), " with strides ", shape_str(out.strides()));
  const RotaryGeometry g{x.size(1), x.size(2), x.size(3) / 2, x.strides()[0], x.strides()[1], x.strides()[2],
                         x.strides()[3]};
  const Shape table{g.n, g.half};
  for (const Tensor* t : {&cos, &sin})
    DILATRON_CHECK(t->shape() == table && t->is_contiguous() && t->dtype() == x.dtype(), "rotary: cos and sin must be ",
                   "contiguous ", dtype_name(x.dtype()), " ", shape_str(table), ", got ", dtype_name(t->dtype()), " ",
                   shape_str(t->shape()));
  for (const Tensor* t : std::initializer_list<const Tensor*>{&out, &x, &cos, &sin})
    cuda::check_on_device("rotary", "out/x/cos/sin", *t, index_);
  const int64_t pairs = x.numel() / 2;
  if (pairs == 0) return;
  DeviceGuard guard(index_);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T><<<grid_for(pairs), kBlockThreads, 0, kStream>>>(out.data<T>(), x.data<T>(), cos.data<T>(),
                                                                      sin.data<T>(), g, pairs);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace dilatron::kernels
