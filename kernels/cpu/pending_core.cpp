// TEMPORARY stubs until the owner implements these; delete when done.
#include "cpu/cpu_backend.h"
namespace dilatron::kernels {
void CpuBackend::unary(UnaryOp op, Tensor& out, const Tensor& in) { throw Error("CpuBackend::unary: not implemented yet"); }
void CpuBackend::binary(BinaryOp op, Tensor& out, const Tensor& a, const Tensor& b) { throw Error("CpuBackend::binary: not implemented yet"); }
void CpuBackend::binary_scalar(BinaryOp op, Tensor& out, const Tensor& in, double scalar, bool scalar_first) { throw Error("CpuBackend::binary_scalar: not implemented yet"); }
void CpuBackend::where(Tensor& out, const Tensor& cond, const Tensor& a, const Tensor& b) { throw Error("CpuBackend::where: not implemented yet"); }
void CpuBackend::sum_last(Tensor& out, const Tensor& in) { throw Error("CpuBackend::sum_last: not implemented yet"); }
void CpuBackend::max_last(Tensor& values, Tensor& indices, const Tensor& in) { throw Error("CpuBackend::max_last: not implemented yet"); }
void CpuBackend::sum_first(Tensor& out, const Tensor& in) { throw Error("CpuBackend::sum_first: not implemented yet"); }
double CpuBackend::sum_squares(const Tensor& in) { throw Error("CpuBackend::sum_squares: not implemented yet"); }
void CpuBackend::gemm(Tensor& out, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta) { throw Error("CpuBackend::gemm: not implemented yet"); }
}
