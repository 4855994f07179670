// Batched GEMM on OpenBLAS (row-major CBLAS), with size-1 / stride-0 batches broadcast.
#include <cblas.h>

#include <algorithm>

#include "backend_checks.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_utils.h"

namespace dilatron::kernels {
namespace {

void blas_gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda,
              b, ldb, beta, c, ldc);
}
void blas_gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
               int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda,
              b, ldb, beta, c, ldc);
}

// Up to this many multiply-adds a call runs on the calling thread: OpenBLAS's own single-thread
// limit (GEMM_MULTITHREAD_THRESHOLD 4 x 65536), and below it waking another thread costs more (on a
// loaded machine it can wait out a time slice).
constexpr double kSerialMacs = 4.0 * 65536.0;

// OpenBLAS splits a GEMM across its threads by blocks of the output, and its edge kernels round
// differently from its main kernel, so a result depends on how many threads computed it. We cut
// each bigger matrix into row tiles fixed by the shape alone and run each tile as its own
// single-threaded BLAS call (OpenBLAS's OpenMP build runs single-threaded inside an active parallel
// region), so the result is the same for any thread count. A multiple of 4 near-equal tiles of up
// to ~512 rows: they share out evenly over 2 or 4 threads, and each tile re-packs the whole of b,
// which stays cheap next to the tile's own work (a weight gradient, K = B * T in the thousands, gets 4).
int64_t row_tiles(int64_t m, double macs) {
  if (macs <= kSerialMacs) return 1;
  return std::min<int64_t>(m, 4 * ((m + 2047) / 2048));
}

}  // namespace

void CpuBackend::gemm(Tensor& out, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
                      double beta) {
  const GemmShape g = check_gemm(out, a, b, trans_a, trans_b, "BLAS");
  const int64_t batch = g.batch, m = g.m, n = g.n, k = g.k;
  const GemmOperand oa = g.a, ob = g.b;
  if (batch == 0 || m == 0 || n == 0) return;

  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* pc = out.data<T>();
    const int ldc = static_cast<int>(n);
    const double macs = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
    const int64_t tiles = row_tiles(m, macs);
    // Tile t covers rows [r0, r1) of op(a): rows of a stored a, columns of a transposed one.
    auto run = [&](int64_t item) {
      const int64_t i = item / tiles, t = item % tiles;
      const int64_t r0 = m * t / tiles, r1 = m * (t + 1) / tiles;
      const int64_t a_offset = trans_a ? r0 : r0 * oa.ld;
      blas_gemm(trans_a, trans_b, static_cast<int>(r1 - r0), static_cast<int>(n), static_cast<int>(k),
                static_cast<T>(alpha), pa + i * oa.batch_stride + a_offset, oa.ld, pb + i * ob.batch_stride, ob.ld,
                static_cast<T>(beta), pc + (i * m + r0) * n, ldc);
    };
    const int64_t items = batch * tiles;
    // Not parallel_for: its serial path for a single item would leave OpenBLAS free to thread it.
    if (omp_get_max_threads() == 1 || omp_in_parallel() || static_cast<double>(batch) * macs <= kSerialMacs) {
      for (int64_t item = 0; item < items; ++item) run(item);
      return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < items; ++item) run(item);
  });
}

}  // namespace dilatron::kernels
