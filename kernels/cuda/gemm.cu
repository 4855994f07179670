// Batched GEMM on cuBLAS, with size-1 batches broadcast through a batch stride of 0.
//
// cuBLAS is column-major. A row-major [r, c] matrix is the column-major [c, r] matrix of its
// transpose, so the row-major product C = op(A) op(B) is computed as the column-major
// C^T = op(B)^T op(A)^T: swap the operands and the M/N sizes, keep each operand's own op.
#include <climits>
#include <memory>
#include <mutex>

#include "cpu/cpu_utils.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"

namespace dilatron::kernels {

namespace cuda {
cublasHandle_t cublas_handle() {
  constexpr int kMaxDevices = 16;
  static cublasHandle_t handles[kMaxDevices] = {};
  static std::mutex mu;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  DILATRON_CHECK(device < kMaxDevices, "cuBLAS: device cuda:", device, " is beyond the supported ", kMaxDevices);
  std::lock_guard<std::mutex> lock(mu);
  cublasHandle_t& h = handles[device];
  if (!h) {
    CUBLAS_CHECK(cublasCreate(&h));
    CUBLAS_CHECK(cublasSetStream(h, kStream));
    // Full float32 products (the default mode never rounds Sgemm inputs to TF32, which would break
    // parity with the CPU backend); said explicitly so a future default cannot change it.
    CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  }
  return h;
}
}  // namespace cuda

namespace {

struct Operand {
  long long batch_stride;  // 0 when broadcast
  int ld;                  // row stride of the stored row-major matrix
};

// Checks one stored operand [batch or 1, rows, cols] with row-major matrices (as the CPU backend).
Operand check_operand(const char* name, const Tensor& t, int64_t batch, int64_t rows, int64_t cols) {
  DILATRON_CHECK(t.dim() == 3 && (t.shape()[0] == batch || t.shape()[0] == 1) && t.shape()[1] == rows &&
                     t.shape()[2] == cols,
                 "gemm: ", name, " has shape ", shape_str(t.shape()), ", expected [", batch, " or 1, ", rows, ", ",
                 cols, "]");
  const Shape& s = t.strides();
  DILATRON_CHECK((rows <= 1 || s[1] == cols) && (cols <= 1 || s[2] == 1), "gemm: ", name,
                 " matrices must be contiguous, got shape ", shape_str(t.shape()), " strides ", shape_str(s));
  DILATRON_CHECK(rows <= INT_MAX && cols <= INT_MAX, "gemm: ", name, " shape ", shape_str(t.shape()),
                 " exceeds the cuBLAS index range");
  return {t.shape()[0] == 1 ? 0 : static_cast<long long>(s[0]), static_cast<int>(std::max<int64_t>(cols, 1))};
}

cublasStatus_t gemm_strided_batched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                    int k, const float* alpha, const float* a, int lda, long long sa, const float* b,
                                    int ldb, long long sb, const float* beta, float* c, int ldc, long long sc,
                                    int batch) {
  return cublasSgemmStridedBatched(h, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch);
}
cublasStatus_t gemm_strided_batched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                    int k, const double* alpha, const double* a, int lda, long long sa,
                                    const double* b, int ldb, long long sb, const double* beta, double* c, int ldc,
                                    long long sc, int batch) {
  return cublasDgemmStridedBatched(h, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch);
}

}  // namespace

void CudaBackend::gemm(Tensor& out, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
                       double beta) {
  DILATRON_CHECK(out.dim() == 3 && out.is_contiguous(), "gemm: out must be a contiguous 3-D tensor, got shape ",
                 shape_str(out.shape()));
  DILATRON_CHECK(a.dtype() == out.dtype() && b.dtype() == out.dtype(), "gemm: dtypes ", dtype_name(a.dtype()), " @ ",
                 dtype_name(b.dtype()), " -> ", dtype_name(out.dtype()));
  DILATRON_CHECK(a.dim() == 3 && b.dim() == 3, "gemm: expected 3-D operands, got ", shape_str(a.shape()), " and ",
                 shape_str(b.shape()));
  cuda::check_on_device("gemm", "a", a, index_);
  cuda::check_on_device("gemm", "b", b, index_);
  cuda::check_on_device("gemm", "out", out, index_);
  const int64_t batch = out.shape()[0], m = out.shape()[1], n = out.shape()[2];
  const int64_t k = trans_a ? a.shape()[1] : a.shape()[2];
  const Operand oa = trans_a ? check_operand("a", a, batch, k, m) : check_operand("a", a, batch, m, k);
  const Operand ob = trans_b ? check_operand("b", b, batch, n, k) : check_operand("b", b, batch, k, n);
  DILATRON_CHECK(m <= INT_MAX && n <= INT_MAX && batch <= INT_MAX, "gemm: out shape ", shape_str(out.shape()),
                 " exceeds the cuBLAS index range");
  if (batch == 0 || m == 0 || n == 0) return;

  cuda::DeviceGuard guard(index_);
  cublasHandle_t h = cuda::cublas_handle();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T alpha_t = static_cast<T>(alpha), beta_t = static_cast<T>(beta);
    // Column-major C^T [n, m] = op(B)^T [n, k] * op(A)^T [k, m]; each stored operand read as-is is
    // already the transpose of the row-major matrix, so its op flag carries over unchanged.
    CUBLAS_CHECK(gemm_strided_batched(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha_t,
                                      b.data<T>(), ob.ld, ob.batch_stride, a.data<T>(), oa.ld, oa.batch_stride,
                                      &beta_t, out.data<T>(), static_cast<int>(n), static_cast<long long>(m * n),
                                      static_cast<int>(batch)));
  });
}

}  // namespace dilatron::kernels
