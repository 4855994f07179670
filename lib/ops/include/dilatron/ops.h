// Differentiable ops. Binary ops broadcast like PyTorch. Dims may be negative (counted from the end).
// Every op here has a backward unless noted, checked by a float64 finite-difference gradcheck.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dilatron/tensor.h"

namespace dilatron {

// ---- elementwise ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor neg(const Tensor& x);
Tensor add(const Tensor& a, double s);
Tensor sub(const Tensor& a, double s);
Tensor rsub(const Tensor& a, double s);  // s - a
Tensor mul(const Tensor& a, double s);
Tensor div(const Tensor& a, double s);
Tensor rdiv(const Tensor& a, double s);  // s / a
Tensor pow(const Tensor& a, double exponent);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor abs(const Tensor& x);
Tensor relu(const Tensor& x);
// approximate: "none" (erf) or "tanh", as torch.nn.functional.gelu
Tensor gelu(const Tensor& x, const std::string& approximate = "none");
Tensor maximum(const Tensor& a, const Tensor& b);  // gradient to the larger (ties: a)

// Comparisons return Bool tensors and have no gradient.
Tensor eq(const Tensor& a, const Tensor& b);
Tensor ne(const Tensor& a, const Tensor& b);
Tensor lt(const Tensor& a, const Tensor& b);
Tensor le(const Tensor& a, const Tensor& b);
Tensor gt(const Tensor& a, const Tensor& b);
Tensor ge(const Tensor& a, const Tensor& b);

// cond (Bool) ? a : b, broadcast together.
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
// x with value wherever mask (Bool, broadcast to x) is true.
Tensor masked_fill(const Tensor& x, const Tensor& mask, double value);

// ---- linear algebra (BLAS / cuBLAS) ----
// 1-D and 2-D as torch.matmul; >= 3-D is batched with broadcast batch dims.
Tensor matmul(const Tensor& a, const Tensor& b);

// ---- shape ----
Tensor reshape(const Tensor& x, const Shape& shape);  // one -1 allowed; a view when possible
Tensor view(const Tensor& x, const Shape& shape);     // never copies; errors when impossible
Tensor transpose(const Tensor& x, int64_t d0, int64_t d1);
Tensor permute(const Tensor& x, const Shape& dims);
Tensor contiguous(const Tensor& x);
Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length);
Tensor slice(const Tensor& x, int64_t dim, int64_t start, int64_t end);  // [start, end), a view
Tensor unsqueeze(const Tensor& x, int64_t dim);
Tensor squeeze(const Tensor& x, int64_t dim);
Tensor expand(const Tensor& x, const Shape& shape);  // broadcast view; backward sums
Tensor flatten(const Tensor& x, int64_t start_dim = 0, int64_t end_dim = -1);
Tensor cat(const std::vector<Tensor>& xs, int64_t dim);
std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim);        // equal chunks, last may be smaller
std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim);
std::vector<Tensor> chunk(const Tensor& x, int64_t chunks, int64_t dim);

// ---- reductions ----
Tensor sum(const Tensor& x);
Tensor sum(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim = false);
Tensor mean(const Tensor& x);
Tensor mean(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim = false);
// Forward only (no gradient): values and Int64 indices of the max over dim.
struct MaxResult {
  Tensor values, indices;
};
MaxResult max(const Tensor& x, int64_t dim, bool keepdim = false);
Tensor max(const Tensor& x);  // the largest element, no gradient
// Sum a broadcast gradient back to shape (the reverse of expand).
Tensor sum_to(const Tensor& x, const Shape& shape);

// ---- nn ----
Tensor softmax(const Tensor& x, int64_t dim);
Tensor log_softmax(const Tensor& x, int64_t dim);
// logits [M, C] (or [..., C] flattened), targets Int64 [M] (or [...]). Mean over non-ignored
// targets ("mean"), or "sum", or "none" (per-target losses, 0 where ignored). weight: undefined, or
// a constant loss weight >= 0 per target (the targets' shape, the logits' dtype and device): each
// loss is scaled by its weight, and "mean" divides by the sum of the non-ignored weights.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100,
                     const std::string& reduction = "mean", const Tensor& weight = Tensor());
// Normalises over the last dim (normalized_shape = {x.size(-1)}); weight and bias may be undefined.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5);
// weight [V, E], indices Int64 of any shape -> [..., E]
Tensor embedding(const Tensor& weight, const Tensor& indices);
// Inverted dropout with Philox bits from (seed, offset); identity when !training or p == 0.
Tensor dropout(const Tensor& x, double p, bool training, uint64_t seed, uint32_t offset);
// Rotary / XPOS position embedding of x [B, N, H, D] (any strides): each pair (x[2i], x[2i+1]) at
// position t becomes (x[2i] c - x[2i+1] s, x[2i+1] c + x[2i] s) with c = cos[t, i], s = sin[t, i]
// ([N, D/2] tables, any scale folded in; x's dtype, or float32 for bf16 x). The tables are
// constants: they take no gradient.
Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin);

// ---- operators ----
inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator-(const Tensor& a) { return neg(a); }
inline Tensor operator+(const Tensor& a, double s) { return add(a, s); }
inline Tensor operator-(const Tensor& a, double s) { return sub(a, s); }
inline Tensor operator*(const Tensor& a, double s) { return mul(a, s); }
inline Tensor operator/(const Tensor& a, double s) { return div(a, s); }
inline Tensor operator+(double s, const Tensor& a) { return add(a, s); }
inline Tensor operator-(double s, const Tensor& a) { return rsub(a, s); }
inline Tensor operator*(double s, const Tensor& a) { return mul(a, s); }
inline Tensor operator/(double s, const Tensor& a) { return rdiv(a, s); }

// Broadcast shape of two shapes, or an Error naming both.
Shape broadcast_shapes(const Shape& a, const Shape& b);
// Normalise a possibly negative dim for a tensor of rank `ndim`, or an Error naming it.
int64_t wrap_dim(int64_t dim, int64_t ndim);

}  // namespace dilatron
