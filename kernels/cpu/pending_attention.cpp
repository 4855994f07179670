// TEMPORARY stubs until the owner implements these; delete when done.
#include "cpu/cpu_backend.h"
namespace dilatron::kernels {
void CpuBackend::dilated_attention_forward(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const AttentionParams&) { throw Error("dilated_attention_forward: not implemented yet"); }
void CpuBackend::dilated_attention_backward(Tensor&, Tensor&, Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const AttentionParams&) { throw Error("dilated_attention_backward: not implemented yet"); }
}
