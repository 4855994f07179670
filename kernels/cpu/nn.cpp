// Fused nn kernels on the CPU: softmax / log-softmax, cross-entropy, layer norm, embedding, dropout.
// Each works on rows of the last dim of contiguous [M, K] data, rows in parallel.
//
// Precision: elementwise math runs in the tensor's dtype; row reductions (sums, dot products,
// mean/variance) accumulate in double, which keeps float32 rows of 50k logits accurate, with
// eight interleaved accumulators in a fixed order (see row_sum).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <utility>

#include "backend_checks.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"
#include "dilatron/philox.h"

namespace dilatron::kernels {
namespace {

// Rows per parallel task: about 16k elements, enough to amortise the fork.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K, 1)); }

// f(m) for every row m < M of [M, K] data, rows in parallel.
template <typename F>
void for_each_row(int64_t M, int64_t K, F&& f) {
  parallel_for(M, row_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) f(m);
  });
}

// y[k] = e^(x[k] - shift) over a row (y may be x), in float by exp_float (cpu_utils.h) four at a
// time. Float64, the gradcheck dtype, keeps libm.
inline void exp_shifted(double* y, const double* x, double shift, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] = std::exp(x[k] - shift);
}
inline void exp_shifted(float* y, const float* x, float shift, int64_t n) {
  int64_t k = 0;
  f32x4 v;
  for (; k + 4 <= n; k += 4) {
    std::memcpy(&v, x + k, sizeof v);
    v = exp_float(v - shift);
    std::memcpy(y + k, &v, sizeof v);
  }
  if (k == n) return;
  // The tail through the same vector code, so an element's value does not depend on its position.
  const auto tail = static_cast<size_t>(n - k) * sizeof(float);
  v = f32x4{};
  std::memcpy(&v, x + k, tail);
  v = exp_float(v - shift);
  std::memcpy(y + k, &v, tail);
}

// Sum of f(k) over [0, n) in double. Eight interleaved accumulators break the chain of dependent
// adds a single accumulator would be (the compiler may not reorder it without -ffast-math); the
// order is fixed by n alone, so results do not depend on threading.
template <typename F>
double row_sum(int64_t n, F f) {
  double acc[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) acc[j] += f(k + j);
  for (int j = 0; k < n; ++k, ++j) acc[j] += f(k);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
T row_max(const T* x, int64_t K) {
  T mx = x[0];
  for (int64_t k = 1; k < K; ++k) mx = std::max(mx, x[k]);
  return mx;
}

// max(x) and sum(e^(x - max)) of one row (max-subtracted, so no term overflows); e^(x - max)
// is left in buf.
template <typename T>
std::pair<T, double> row_max_sumexp(const T* x, T* buf, int64_t K) {
  const T mx = row_max(x, K);
  exp_shifted(buf, x, mx, K);
  return {mx, row_sum(K, [&](int64_t k) { return static_cast<double>(buf[k]); })};
}

}  // namespace

// ---------------------------------------------------------------- softmax family

// f(x_row, y_row, K) over the M rows of K elements of a [M, K] input and output, in their float type.
template <typename F>
void forward_rows(const Tensor& in, Tensor& out, int64_t M, int64_t K, F&& f) {
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = in.data<T>();
    T* y = out.data<T>();
    for_each_row(M, K, [&](int64_t m) { f(x + m * K, y + m * K); });
  });
}

// f(y_row, dy_row, dx_row) over the rows of a backward from the forward's output y.
template <typename F>
void backward_rows(const Tensor& y, const Tensor& dy, Tensor& dx, int64_t M, int64_t K, F&& f) {
  dispatch_float(y.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *yp = y.data<T>(), *dyp = dy.data<T>();
    T* dxp = dx.data<T>();
    for_each_row(M, K, [&](int64_t m) { f(yp + m * K, dyp + m * K, dxp + m * K); });
  });
}

void CpuBackend::softmax_last(Tensor& out, const Tensor& in) {
  const auto [M, K] = check_softmax("softmax_last", out, in);
  forward_rows(in, out, M, K, [K = K](const auto* xr, auto* yr) {
    using T = std::remove_pointer_t<decltype(yr)>;
    const double s = row_max_sumexp(xr, yr, K).second;
    const T inv = static_cast<T>(1.0 / s);
    for (int64_t k = 0; k < K; ++k) yr[k] *= inv;
  });
}

// dx = y * (dy - <dy, y>)
void CpuBackend::softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) {
  const auto [M, K] = check_softmax_backward("softmax_backward_last", dx, y, dy);
  backward_rows(y, dy, dx, M, K, [K = K](const auto* yr, const auto* dyr, auto* dxr) {
    using T = std::remove_pointer_t<decltype(dxr)>;
    const T d = static_cast<T>(row_sum(K, [&](int64_t k) { return static_cast<double>(dyr[k]) * yr[k]; }));
    for (int64_t k = 0; k < K; ++k) dxr[k] = yr[k] * (dyr[k] - d);
  });
}

void CpuBackend::log_softmax_last(Tensor& out, const Tensor& in) {
  const auto [M, K] = check_softmax("log_softmax_last", out, in);
  forward_rows(in, out, M, K, [K = K](const auto* xr, auto* yr) {
    using T = std::remove_pointer_t<decltype(yr)>;
    const auto [mx, s] = row_max_sumexp(xr, yr, K);
    // (x - max) - log(s) rather than x - lse: no rounding of a large lse in float32.
    const T log_s = static_cast<T>(std::log(s));
    for (int64_t k = 0; k < K; ++k) yr[k] = (xr[k] - mx) - log_s;
  });
}

// y = log_softmax(x): dx = dy - softmax(x) * sum(dy), with softmax(x) = exp(y).
void CpuBackend::log_softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) {
  const auto [M, K] = check_softmax_backward("log_softmax_backward_last", dx, y, dy);
  backward_rows(y, dy, dx, M, K, [K = K](const auto* yr, const auto* dyr, auto* dxr) {
    using T = std::remove_pointer_t<decltype(dxr)>;
    const T sum = static_cast<T>(row_sum(K, [&](int64_t k) { return static_cast<double>(dyr[k]); }));
    exp_shifted(dxr, yr, T(0), K);
    for (int64_t k = 0; k < K; ++k) dxr[k] = dyr[k] - dxr[k] * sum;
  });
}

// ---------------------------------------------------------------- cross-entropy

void CpuBackend::cross_entropy(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                               int64_t ignore_index) {
  const auto [M, C] = check_cross_entropy(loss, lse, logits, targets);
  const int64_t* tp = targets.data<int64_t>();
  check_targets("cross_entropy", tp, M, C, ignore_index);
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.data<T>();
    T* lossp = loss.data<T>();
    T* lsep = lse.data<T>();
    parallel_for(M, row_grain(C), [&](int64_t begin, int64_t end) {
      ScratchBuffer<T> exps(static_cast<size_t>(C));
      for (int64_t m = begin; m < end; ++m) {
        const T* xr = x + m * C;
        const auto [mx, s] = row_max_sumexp(xr, exps.data(), C);
        const double l = static_cast<double>(mx) + std::log(s);
        lsep[m] = static_cast<T>(l);
        lossp[m] = tp[m] == ignore_index ? T(0) : static_cast<T>(l - static_cast<double>(xr[tp[m]]));
      }
    });
  });
}

void CpuBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits,
                                        const Tensor& lse, const Tensor& targets, int64_t ignore_index) {
  const auto [M, C] = check_cross_entropy_backward(dlogits, dloss, logits, lse, targets);
  const int64_t* tp = targets.data<int64_t>();
  check_targets("cross_entropy_backward", tp, M, C, ignore_index);
  dispatch_float(logits.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = logits.data<T>();
    const T* dl = dloss.data<T>();
    const T* lsep = lse.data<T>();
    T* dx = dlogits.data<T>();
    parallel_for(M, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const T* xr = x + m * C;
        T* dxr = dx + m * C;
        if (tp[m] == ignore_index) {
          std::fill(dxr, dxr + C, T(0));
          continue;
        }
        const T g = dl[m];
        exp_shifted(dxr, xr, lsep[m], C);
        for (int64_t c = 0; c < C; ++c) dxr[c] *= g;
        dxr[tp[m]] -= g;
      }
    });
  });
}

// ---------------------------------------------------------------- layer norm

void CpuBackend::layer_norm(Tensor& out, Tensor& mean, Tensor& rstd, const Tensor& x, const Tensor& weight,
                            const Tensor& bias, double eps) {
  const auto [M, K] = check_layer_norm(out, mean, rstd, x, weight, bias);
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data<T>();
    const T* w = weight.defined() ? weight.data<T>() : nullptr;
    const T* b = bias.defined() ? bias.data<T>() : nullptr;
    T* y = out.data<T>();
    T* meanp = mean.data<T>();
    T* rstdp = rstd.data<T>();
    parallel_for(M, row_grain(K), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const T* xr = xp + m * K;
        T* yr = y + m * K;
        // Two passes (mean, then squared deviations): no cancellation for rows with a large mean.
        const double mu = row_sum(K, [&](int64_t k) { return static_cast<double>(xr[k]); }) / static_cast<double>(K);
        const double ss = row_sum(K, [&](int64_t k) {
          const double d = xr[k] - mu;
          return d * d;
        });
        const double r = 1.0 / std::sqrt(ss / static_cast<double>(K) + eps);  // biased variance, as PyTorch
        meanp[m] = static_cast<T>(mu);
        rstdp[m] = static_cast<T>(r);
        const T mu_t = static_cast<T>(mu), r_t = static_cast<T>(r);
        for (int64_t k = 0; k < K; ++k) {
          T v = (xr[k] - mu_t) * r_t;
          if (w) v *= w[k];
          if (b) v += b[k];
          yr[k] = v;
        }
      }
    });
  });
}

// xhat = (x - mean) * rstd, g = dy * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy).
// The column sums are taken per fixed block of rows (the blocking depends on M only, not on the
// thread count) and the block partials are added in block order, so the result is bitwise
// reproducible on any number of threads.
void CpuBackend::layer_norm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy, const Tensor& x,
                                     const Tensor& mean, const Tensor& rstd, const Tensor& weight) {
  const auto [M, K] = check_layer_norm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight);
  const bool need_params = dweight.defined() || dbias.defined();
  constexpr int64_t kMaxBlocks = 64;
  const int64_t rows_per_block = std::max<int64_t>(1, (M + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t num_blocks = M == 0 ? 0 : (M + rows_per_block - 1) / rows_per_block;
  // Per block: K partial dweight sums, then K partial dbias sums.
  ScratchBuffer<double> partial(need_params ? static_cast<size_t>(num_blocks * 2 * K) : 0);

  dispatch_float(x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data<T>();
    const T* dyp = dy.data<T>();
    const T* meanp = mean.data<T>();
    const T* rstdp = rstd.data<T>();
    const T* w = weight.defined() ? weight.data<T>() : nullptr;
    T* dxp = dx.data<T>();
    const double inv_k = 1.0 / static_cast<double>(K);
    const int64_t block_grain = std::max<int64_t>(1, row_grain(K) / rows_per_block);
    parallel_for(num_blocks, block_grain, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t blk = block_begin; blk < block_end; ++blk) {
        double* pw = need_params ? partial.data() + blk * 2 * K : nullptr;
        double* pb = need_params ? pw + K : nullptr;
        if (need_params) std::fill(pw, pw + 2 * K, 0.0);
        const int64_t m_end = std::min(M, (blk + 1) * rows_per_block);
        for (int64_t m = blk * rows_per_block; m < m_end; ++m) {
          const T* xr = xp + m * K;
          const T* dyr = dyp + m * K;
          T* dxr = dxp + m * K;
          const T mu = meanp[m], r = rstdp[m];
          auto xhat = [&](int64_t k) { return (xr[k] - mu) * r; };
          auto g = [&](int64_t k) { return w ? dyr[k] * w[k] : dyr[k]; };
          const T mean_g = static_cast<T>(row_sum(K, [&](int64_t k) { return static_cast<double>(g(k)); }) * inv_k);
          const T mean_gx = static_cast<T>(
              row_sum(K, [&](int64_t k) { return static_cast<double>(g(k)) * xhat(k); }) * inv_k);
          for (int64_t k = 0; k < K; ++k) dxr[k] = r * (g(k) - mean_g - xhat(k) * mean_gx);
          if (need_params) {
            for (int64_t k = 0; k < K; ++k) {
              pw[k] += static_cast<double>(dyr[k]) * xhat(k);
              pb[k] += dyr[k];
            }
          }
        }
      }
    });
    if (!need_params) return;
    T* dw = dweight.defined() ? dweight.data<T>() : nullptr;
    T* db = dbias.defined() ? dbias.data<T>() : nullptr;
    parallel_for(K, 256, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        double sw = 0.0, sb = 0.0;
        for (int64_t blk = 0; blk < num_blocks; ++blk) {
          sw += partial[static_cast<size_t>(blk * 2 * K + k)];
          sb += partial[static_cast<size_t>(blk * 2 * K + K + k)];
        }
        if (dw) dw[k] = static_cast<T>(sw);
        if (db) db[k] = static_cast<T>(sb);
      }
    });
  });
}

// ---------------------------------------------------------------- embedding

void CpuBackend::embedding(Tensor& out, const Tensor& weight, const Tensor& indices) {
  const auto [V, E, M] = check_embedding("embedding", "weight", weight, "out", out, indices);
  const int64_t* idx = indices.data<int64_t>();
  check_indices("embedding", idx, M, V);
  const size_t row_bytes = static_cast<size_t>(E) * dtype_size(weight.dtype());
  const char* w = static_cast<const char*>(weight.raw_data());
  char* o = static_cast<char*>(out.raw_data());
  parallel_for(M, row_grain(E), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      std::memcpy(o + static_cast<size_t>(m) * row_bytes, w + static_cast<size_t>(idx[m]) * row_bytes, row_bytes);
  });
}

// Scatter-add parallelised over columns: each thread owns a column range of every dweight row and
// adds the dout rows in index order, so repeated indices never race and the sum order is fixed.
void CpuBackend::embedding_backward(Tensor& dweight, const Tensor& dout, const Tensor& indices) {
  const auto [V, E, M] = check_embedding("embedding_backward", "dweight", dweight, "dout", dout, indices);
  const int64_t* idx = indices.data<int64_t>();
  check_indices("embedding_backward", idx, M, V);
  dispatch_float(dweight.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* dw = dweight.data<T>();
    const T* d = dout.data<T>();
    parallel_for(V, row_grain(E), [&](int64_t begin, int64_t end) { std::fill(dw + begin * E, dw + end * E, T(0)); });
    parallel_for(E, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t m = 0; m < M; ++m) {
        T* dst = dw + idx[m] * E;
        const T* src = d + m * E;
        for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
      }
    });
  });
}

// ---------------------------------------------------------------- dropout

// keep_i = philox_word(seed, offset, i) >= floor(p * 2^32): counter {i/4 lo, i/4 hi, offset, 0},
// key {seed lo, seed hi}, word i % 4. One Philox call serves four consecutive elements.
void CpuBackend::dropout(Tensor& out, const Tensor& in, double p, uint64_t seed, uint32_t offset) {
  check_dropout(out, in, p);
  const int64_t n = in.numel();
  const uint32_t threshold = dropout_threshold(p);
  const auto key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = in.data<T>();
    T* y = out.data<T>();
    const T scale = static_cast<T>(1.0 / (1.0 - p));
    const int64_t blocks = (n + 3) / 4;
    parallel_for(blocks, 1 << 12, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const auto b = static_cast<uint64_t>(blk);
        const Philox4 r = philox4x32_10(
            Philox4{{static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), offset, 0u}}, key0, key1);
        const int64_t i0 = blk * 4, i1 = std::min(n, i0 + 4);
        for (int64_t i = i0; i < i1; ++i) y[i] = r.x[i - i0] >= threshold ? x[i] * scale : T(0);
      }
    });
  });
}

}  // namespace dilatron::kernels
