// matmul as torch.matmul, on the backend's batched GEMM. Transposed views reach the GEMM as its
// trans flags instead of being copied, which is also how the backward avoids materialising transposes.
#include <algorithm>

#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron {
namespace {

using autograd::Context;

// Whether a [batch, rows, cols] view is in the layout gemm takes: row-major matrices, batches packed or broadcast.
bool gemm_layout(const Tensor& t) {
  const Shape& n = t.shape();
  const Shape& s = t.strides();
  return (n[1] <= 1 || s[1] == n[2]) && (n[2] <= 1 || s[2] == 1) && (n[0] <= 1 || s[0] == 0 || s[0] == n[1] * n[2]);
}

// A logical [batch, rows, cols] operand as gemm stores it: itself, the [batch, cols, rows] it is a
// transposed view of (trans), or a contiguous copy.
struct GemmOperand {
  Tensor stored;
  bool trans;
};
GemmOperand gemm_operand(const Tensor& t) {
  if (gemm_layout(t)) return {t, false};
  const Shape& n = t.shape();
  const Shape& s = t.strides();
  Tensor transposed = make_view(t, {n[0], n[2], n[1]}, {s[0], s[2], s[1]}, t.offset());
  if (gemm_layout(transposed)) return {transposed, true};
  return {contiguous(t), false};
}

// a [Ba, M, K] @ b [Bb, K, N] with Ba, Bb each the batch or 1 (no autograd).
Tensor bmm(const Tensor& a, const Tensor& b) {
  Tensor out = Tensor::empty({std::max(a.shape()[0], b.shape()[0]), a.shape()[1], b.shape()[2]}, a.options());
  const GemmOperand ga = gemm_operand(a), gb = gemm_operand(b);
  kernels::backend(a.device()).gemm(out, ga.stored, gb.stored, ga.trans, gb.trans, 1.0, 0.0);
  return out;
}

// A 2-D [rows, cols] as a batch of one (a view).
Tensor as_batched(const Tensor& t) {
  if (t.dim() == 3) return t;
  return make_view(t, {1, t.shape()[0], t.shape()[1]}, {0, t.strides()[0], t.strides()[1]}, t.offset());
}

// A batched gradient [B, rows, cols] summed over the batch where the input was broadcast, in its shape.
Tensor reduce_batch(const Tensor& g, const Shape& shape) {
  const Shape batched = shape.size() == 3 ? shape : Shape{1, shape[0], shape[1]};
  return reshape(sum_to(g, batched), shape);
}

// a [M, K] or [Ba, M, K] @ b [K, N] or [Bb, K, N], Ba and Bb each the batch or 1.
struct MatmulFn : autograd::Function<MatmulFn> {
  static const char* name() { return "matmul"; }
  static Tensor forward(Context& ctx, const Tensor& a, const Tensor& b) {
    ctx.save_for_backward({a, b});
    Tensor out = bmm(as_batched(a), as_batched(b));
    return a.dim() == 2 && b.dim() == 2 ? view(out, {out.shape()[1], out.shape()[2]}) : out;
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& a = ctx.saved()[0];
    const Tensor& b = ctx.saved()[1];
    const Tensor g = as_batched(grads[0]);
    Tensor ga, gb;
    // dA = dC @ B^T and dB = A^T @ dC, with the transposes as views that gemm takes by flag.
    if (ctx.needs_input_grad[0]) ga = reduce_batch(bmm(g, transpose(as_batched(b), 1, 2)), a.shape());
    if (ctx.needs_input_grad[1]) gb = reduce_batch(bmm(transpose(as_batched(a), 1, 2), g), b.shape());
    return {ga, gb};
  }
};

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  DILATRON_CHECK(a.dim() >= 1 && b.dim() >= 1, "matmul: both operands need at least one dim, got shapes ",
                 shape_str(a.shape()), " and ", shape_str(b.shape()));
  DILATRON_CHECK(is_floating(a.dtype()) && a.dtype() == b.dtype(), "matmul: expected two float tensors of one dtype, "
                 "got ", dtype_name(a.dtype()), " and ", dtype_name(b.dtype()));
  DILATRON_CHECK(a.device() == b.device(), "matmul: tensors on ", a.device().str(), " and ", b.device().str());
  const int64_t k = a.size(-1);
  const int64_t kb = b.dim() == 1 ? b.size(0) : b.size(-2);
  DILATRON_CHECK(k == kb, "matmul: shapes ", shape_str(a.shape()), " and ", shape_str(b.shape()),
                 " cannot be multiplied (", k, " vs ", kb, ")");

  // 1-D operands become a row / column matrix whose dim is dropped again from the result.
  if (b.dim() == 1) return squeeze(matmul(a, unsqueeze(b, 1)), -1);
  if (a.dim() == 1) return squeeze(matmul(unsqueeze(a, 0), b), -2);
  if (a.dim() == 2 && b.dim() == 2) return MatmulFn::apply(a, b);

  const int64_t m = a.size(-2), n = b.size(-1);
  const Shape a_batch(a.shape().begin(), a.shape().end() - 2), b_batch(b.shape().begin(), b.shape().end() - 2);
  Shape batch;
  try {
    batch = broadcast_shapes(a_batch, b_batch);
  } catch (const Error& e) {
    throw Error(detail::concat("matmul: the batch dims of ", shape_str(a.shape()), " and ", shape_str(b.shape()),
                               " do not broadcast: ", e.what()));
  }
  Shape out_shape = batch;
  out_shape.insert(out_shape.end(), {m, n});
  if (shape_numel(b_batch) == 1) {
    // One right matrix for every batch (a linear layer): fold a's batch into its rows, one GEMM.
    const Tensor a2 = reshape(a, {shape_numel(a_batch) * m, k});
    return reshape(MatmulFn::apply(a2, reshape(b, {k, n})), out_shape);
  }
  const int64_t nb = shape_numel(batch);
  // Each operand as [batch, rows, cols]: a batch of one stays one (gemm broadcasts it); a partly
  // broadcast batch is expanded (reshape copies it then).
  auto batched = [&](const Tensor& t, const Shape& t_batch, int64_t rows, int64_t cols) {
    if (shape_numel(t_batch) == 1) return reshape(t, {1, rows, cols});
    Shape full = batch;
    full.insert(full.end(), {rows, cols});
    return reshape(expand(t, full), {nb, rows, cols});
  };
  return reshape(MatmulFn::apply(batched(a, a_batch, m, k), batched(b, b_batch, k, n)), out_shape);
}

}  // namespace dilatron
