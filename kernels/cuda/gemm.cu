// Batched GEMM on cuBLAS, with size-1 batches broadcast through a batch stride of 0.
//
// cuBLAS is column-major. A row-major [r, c] matrix is the column-major [c, r] matrix of its
// transpose, so the row-major product C = op(A) op(B) is computed as the column-major
// C^T = op(B)^T op(A)^T: swap the operands and the M/N sizes, keep each operand's own op.
#include <climits>
#include <memory>
#include <mutex>

#include "backend_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_utils.cuh"
#include "dtype_dispatch.h"

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
  const GemmShape g = check_gemm(out, a, b, trans_a, trans_b, "cuBLAS");
  cuda::check_on_device("gemm", "a", a, index_);
  cuda::check_on_device("gemm", "b", b, index_);
  cuda::check_on_device("gemm", "out", out, index_);
  const int64_t batch = g.batch, m = g.m, n = g.n, k = g.k;
  const GemmOperand oa = g.a, ob = g.b;
  DILATRON_CHECK(batch <= INT_MAX, "gemm: out shape ", shape_str(out.shape()), " exceeds the cuBLAS index range");
  if (batch == 0 || m == 0 || n == 0) return;

  cuda::DeviceGuard guard(index_);
  cublasHandle_t h = cuda::cublas_handle();
  // Column-major C^T [n, m] = op(B)^T [n, k] * op(A)^T [k, m]; each stored operand read as-is is
  // already the transpose of the row-major matrix, so its op flag carries over unchanged.
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int n_i = static_cast<int>(n), m_i = static_cast<int>(m), k_i = static_cast<int>(k);
  const int batch_i = static_cast<int>(batch);
  const auto sa = static_cast<long long>(oa.batch_stride), sb = static_cast<long long>(ob.batch_stride);
  const auto sc = static_cast<long long>(m * n);
  if (out.dtype() == DType::BFloat16) {
    // bf16 operands on the tensor cores with float32 accumulation, alpha and beta, out rounded once:
    // the CPU's bf16 gemm (float32 products of the same operands, one rounding) up to summation order.
    const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, op_b, op_a, n_i, m_i, k_i, &alpha_f, b.data<bfloat16>(), CUDA_R_16BF,
                                            ob.ld, sb, a.data<bfloat16>(), CUDA_R_16BF, oa.ld, sa, &beta_f,
                                            out.data<bfloat16>(), CUDA_R_16BF, n_i, sc, batch_i, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
    return;
  }
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T alpha_t = static_cast<T>(alpha), beta_t = static_cast<T>(beta);
    CUBLAS_CHECK(gemm_strided_batched(h, op_b, op_a, n_i, m_i, k_i, &alpha_t, b.data<T>(), ob.ld, sb, a.data<T>(),
                                      oa.ld, sa, &beta_t, out.data<T>(), n_i, sc, batch_i));
  });
}

}  // namespace dilatron::kernels
