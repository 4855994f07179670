// TEMPORARY stubs until the owner implements these; delete when done.
#include "dilatron/ops.h"
namespace dilatron {
Tensor softmax(const Tensor& x, int64_t dim) { throw Error("softmax: not implemented yet"); }
Tensor log_softmax(const Tensor& x, int64_t dim) { throw Error("log_softmax: not implemented yet"); }
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index, const std::string& reduction) { throw Error("cross_entropy: not implemented yet"); }
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) { throw Error("layer_norm: not implemented yet"); }
Tensor embedding(const Tensor& weight, const Tensor& indices) { throw Error("embedding: not implemented yet"); }
Tensor dropout(const Tensor& x, double p, bool training, uint64_t seed, uint32_t offset) { throw Error("dropout: not implemented yet"); }
}
