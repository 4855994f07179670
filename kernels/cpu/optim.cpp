// Optimizer update kernels on the CPU.
#include "adamw.h"
#include "backend_checks.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"

namespace dilatron::kernels {

// kernels/adamw.h's update over the elements, in parallel.
void CpuBackend::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) {
  check_adamw(param, grad, m, v, hp);
  const int64_t n = param.numel();
  dispatch_float(param.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    T* mp = m.data<T>();
    T* vp = v.data<T>();
    const AdamWConstants<T> c = AdamWConstants<T>::from(hp);
    parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) adamw_update(p[i], g[i], mp[i], vp[i], c);
    });
  });
}

}  // namespace dilatron::kernels
