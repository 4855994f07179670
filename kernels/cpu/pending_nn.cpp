// TEMPORARY stubs until the owner implements these; delete when done.
#include "cpu/cpu_backend.h"
namespace dilatron::kernels {
void CpuBackend::softmax_last(Tensor& out, const Tensor& in) { throw Error("CpuBackend::softmax_last: not implemented yet"); }
void CpuBackend::softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) { throw Error("CpuBackend::softmax_backward_last: not implemented yet"); }
void CpuBackend::log_softmax_last(Tensor& out, const Tensor& in) { throw Error("CpuBackend::log_softmax_last: not implemented yet"); }
void CpuBackend::log_softmax_backward_last(Tensor& dx, const Tensor& y, const Tensor& dy) { throw Error("CpuBackend::log_softmax_backward_last: not implemented yet"); }
void CpuBackend::cross_entropy(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets, int64_t ignore_index) { throw Error("CpuBackend::cross_entropy: not implemented yet"); }
void CpuBackend::cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& lse, const Tensor& targets, int64_t ignore_index) { throw Error("CpuBackend::cross_entropy_backward: not implemented yet"); }
void CpuBackend::layer_norm(Tensor& out, Tensor& mean, Tensor& rstd, const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) { throw Error("CpuBackend::layer_norm: not implemented yet"); }
void CpuBackend::layer_norm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& weight) { throw Error("CpuBackend::layer_norm_backward: not implemented yet"); }
void CpuBackend::embedding(Tensor& out, const Tensor& weight, const Tensor& indices) { throw Error("CpuBackend::embedding: not implemented yet"); }
void CpuBackend::embedding_backward(Tensor& dweight, const Tensor& dout, const Tensor& indices) { throw Error("CpuBackend::embedding_backward: not implemented yet"); }
void CpuBackend::dropout(Tensor& out, const Tensor& in, double p, uint64_t seed, uint32_t offset) { throw Error("CpuBackend::dropout: not implemented yet"); }
void CpuBackend::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) { throw Error("CpuBackend::adamw_step: not implemented yet"); }
}
