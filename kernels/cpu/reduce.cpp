// Reductions over contiguous [M, K] views. Sums accumulate in double in an order fixed by the shape
// alone, so results are bitwise the same whatever the thread count.
#include <algorithm>

#include "backend_checks.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"

namespace dilatron::kernels {
namespace {

constexpr int64_t kGrain = 1 << 14;
// A long row is summed as the in-order sum of blocks of this many elements; blocks of one row may
// run on different threads when there are too few rows to go round.
constexpr int64_t kBlock = 1 << 14;

// Sum of f(x[i]) over [0, n) in double with eight interleaved accumulators (a fixed order the
// compiler can vectorise, where a single accumulator would be one long dependency chain).
template <typename T, typename F>
double block_sum(const T* x, int64_t n, F f) {
  double acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += f(static_cast<double>(x[i + j]));
  for (int j = 0; i < n; ++i, ++j) acc[j] += f(static_cast<double>(x[i]));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// store(r, sum of f over row r) for a contiguous [rows, cols].
template <typename T, typename F, typename Store>
void row_sums(const T* x, int64_t rows, int64_t cols, F f, Store store) {
  const int64_t blocks = std::max<int64_t>(1, (cols + kBlock - 1) / kBlock);
  auto block = [&](int64_t r, int64_t b) {
    const int64_t start = b * kBlock;
    return block_sum(x + r * cols + start, std::min(kBlock, cols - start), f);
  };
  if (blocks == 1 || rows >= omp_get_max_threads()) {
    parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        double s = 0.0;
        for (int64_t b = 0; b < blocks; ++b) s += block(r, b);
        store(r, s);
      }
    });
    return;
  }
  ScratchBuffer<double> partial(static_cast<size_t>(rows * blocks));
  parallel_for(rows * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) partial[static_cast<size_t>(i)] = block(i / blocks, i % blocks);
  });
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (int64_t b = 0; b < blocks; ++b) s += partial[static_cast<size_t>(r * blocks + b)];
    store(r, s);
  }
}

}  // namespace

void CpuBackend::sum_last(Tensor& out, const Tensor& in) {
  const auto [rows, cols] = check_sum_last(out, in);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* o = out.data<T>();
    row_sums(in.data<T>(), rows, cols, [](double v) { return v; },
             [&](int64_t r, double s) { o[r] = static_cast<T>(s); });
  });
}

void CpuBackend::max_last(Tensor& values, Tensor& indices, const Tensor& in) {
  const auto [rows, cols] = check_max_last(values, indices, in);
  dispatch_all(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = in.data<T>();
    T* val = values.data<T>();
    int64_t* idx = indices.data<int64_t>();
    parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* row = x + r * cols;
        T best = row[0];
        int64_t arg = 0;
        for (int64_t k = 1; k < cols; ++k) {
          // Strictly greater keeps the first max; the first NaN wins and then stays, as in torch.max.
          if (row[k] > best || (row[k] != row[k] && best == best)) {
            best = row[k];
            arg = k;
          }
        }
        val[r] = best;
        idx[r] = arg;
      }
    });
  });
}

void CpuBackend::sum_first(Tensor& out, const Tensor& in) {
  const auto [rows, cols] = check_sum_first(out, in);
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = in.data<T>();
    T* o = out.data<T>();
    // Threads own column ranges and add rows in order; the inner loop runs along a row and vectorises.
    parallel_for(cols, std::max<int64_t>(1, kGrain / std::max<int64_t>(rows, 1)), [&](int64_t c0, int64_t c1) {
      const int64_t width = c1 - c0;
      ScratchBuffer<double> acc(static_cast<size_t>(width));
      double* a = acc.data();
      std::fill(a, a + width, 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * cols + c0;
        for (int64_t c = 0; c < width; ++c) a[c] += static_cast<double>(row[c]);
      }
      for (int64_t c = 0; c < width; ++c) o[c0 + c] = static_cast<T>(a[c]);
    });
  });
}

double CpuBackend::sum_squares(const Tensor& in) {
  DILATRON_CHECK(in.is_contiguous(), "sum_squares: input must be contiguous");
  double total = 0.0;
  dispatch_float(in.dtype(), [&](auto tag) {
    using T = decltype(tag);
    row_sums(in.data<T>(), 1, in.numel(), [](double v) { return v * v; }, [&](int64_t, double s) { total = s; });
  });
  return total;
}

}  // namespace dilatron::kernels
