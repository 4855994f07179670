// The argument checks of the Backend methods (dilatron/kernels/backend.h), shared by the CPU and CUDA
// backends so that both reject the same calls with the same messages. Each backend adds only what is
// its own (CUDA: the tensors' device, its index limits). Host-only; no OpenMP, no CUDA headers.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

#include "dilatron/kernels/backend.h"

namespace dilatron::kernels {

inline void check_contiguous(const char* op, const char* what, const Tensor& t) {
  DILATRON_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous, got shape ", shape_str(t.shape()),
                 " with strides ", shape_str(t.strides()));
}

// The [M, K] geometry of a contiguous tensor with last dim K (M = 0 when it is empty).
struct Rows {
  int64_t M, K;
};
inline Rows rows_of(const char* op, const char* what, const Tensor& t) {
  check_contiguous(op, what, t);
  DILATRON_CHECK(t.dim() >= 1, op, ": ", what, " needs at least one dim, got a scalar");
  const int64_t K = t.size(-1);
  return {K == 0 ? 0 : t.numel() / K, K};
}

inline void check_same_shape(const char* op, const char* a_name, const Tensor& a, const char* b_name,
                             const Tensor& b) {
  DILATRON_CHECK(a.shape() == b.shape(), op, ": ", a_name, " shape ", shape_str(a.shape()), " != ", b_name,
                 " shape ", shape_str(b.shape()));
  DILATRON_CHECK(a.dtype() == b.dtype(), op, ": ", a_name, " is ", dtype_name(a.dtype()), " but ", b_name, " is ",
                 dtype_name(b.dtype()));
}

inline void check_int64_vector(const char* op, const char* what, const Tensor& t, int64_t n) {
  check_contiguous(op, what, t);
  DILATRON_CHECK(t.dtype() == DType::Int64, op, ": ", what, " must be int64, got ", dtype_name(t.dtype()));
  DILATRON_CHECK(t.numel() == n, op, ": ", what, " has ", t.numel(), " elements, expected ", n);
}

// Each defined tensor of ts: contiguous, n elements of dtype.
inline void check_row_vectors(const char* op, const char* what, std::initializer_list<const Tensor*> ts, int64_t n,
                              DType dtype) {
  for (const Tensor* t : ts) {
    if (!t->defined()) continue;
    check_contiguous(op, what, *t);
    DILATRON_CHECK(t->numel() == n && t->dtype() == dtype, op, ": ", what, " must be ", dtype_name(dtype), " with ",
                   n, " elements, got ", dtype_name(t->dtype()), " ", shape_str(t->shape()));
  }
}

// ---- reductions over a contiguous [M, K] ----

// The [rows, cols] of a 2-D input whose row count is out's element count.
inline Rows check_row_reduction(const char* op, const Tensor& out, const Tensor& in) {
  DILATRON_CHECK(in.is_contiguous(), op, ": input must be contiguous");
  DILATRON_CHECK(in.dim() == 2, op, ": expected a 2-D [M, K] input, got shape ", shape_str(in.shape()));
  const Rows r{in.shape()[0], in.shape()[1]};
  DILATRON_CHECK(out.is_contiguous() && out.numel() == r.M, op, ": out shape ", shape_str(out.shape()),
                 " for input ", shape_str(in.shape()));
  return r;
}
inline Rows check_sum_last(const Tensor& out, const Tensor& in) {
  const Rows r = check_row_reduction("sum_last", out, in);
  DILATRON_CHECK(out.dtype() == in.dtype(), "sum_last: input is ", dtype_name(in.dtype()), ", out is ",
                 dtype_name(out.dtype()));
  return r;
}
inline Rows check_max_last(const Tensor& values, const Tensor& indices, const Tensor& in) {
  const Rows r = check_row_reduction("max_last", values, in);
  DILATRON_CHECK(r.K > 0 || r.M == 0, "max_last: cannot take the max over an empty dim, input shape ",
                 shape_str(in.shape()));
  DILATRON_CHECK(values.dtype() == in.dtype() && indices.dtype() == DType::Int64 && indices.numel() == r.M,
                 "max_last: values must be ", dtype_name(in.dtype()), " and indices int64 of ", r.M, " elements");
  return r;
}
inline Rows check_sum_first(const Tensor& out, const Tensor& in) {
  DILATRON_CHECK(in.is_contiguous() && in.dim() == 2, "sum_first: expected a contiguous 2-D input, got shape ",
                 shape_str(in.shape()));
  const Rows r{in.shape()[0], in.shape()[1]};
  DILATRON_CHECK(out.is_contiguous() && out.numel() == r.K && out.dtype() == in.dtype(), "sum_first: out shape ",
                 shape_str(out.shape()), " (", dtype_name(out.dtype()), ") for input ", shape_str(in.shape()), " (",
                 dtype_name(in.dtype()), ")");
  return r;
}

// ---- gemm ----

struct GemmOperand {
  int64_t batch_stride;  // 0 when broadcast
  int ld;                // row stride of the stored row-major matrix
};
struct GemmShape {
  int64_t batch, m, n, k;
  GemmOperand a, b;
};

// One stored operand [batch or 1, rows, cols] with row-major matrices; `blas` names the library
// whose 32-bit index range bounds it.
inline GemmOperand check_gemm_operand(const char* name, const Tensor& t, int64_t batch, int64_t rows, int64_t cols,
                                      const char* blas) {
  DILATRON_CHECK(t.dim() == 3 && (t.shape()[0] == batch || t.shape()[0] == 1) && t.shape()[1] == rows &&
                     t.shape()[2] == cols,
                 "gemm: ", name, " has shape ", shape_str(t.shape()), ", expected [", batch, " or 1, ", rows, ", ",
                 cols, "]");
  const Shape& s = t.strides();
  DILATRON_CHECK((rows <= 1 || s[1] == cols) && (cols <= 1 || s[2] == 1), "gemm: ", name,
                 " matrices must be contiguous, got shape ", shape_str(t.shape()), " strides ", shape_str(s));
  DILATRON_CHECK(rows <= INT_MAX && cols <= INT_MAX, "gemm: ", name, " shape ", shape_str(t.shape()), " exceeds the ",
                 blas, " index range");
  return {t.shape()[0] == 1 ? 0 : s[0], static_cast<int>(std::max<int64_t>(cols, 1))};
}

inline GemmShape check_gemm(const Tensor& out, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                            const char* blas) {
  DILATRON_CHECK(out.dim() == 3 && out.is_contiguous(), "gemm: out must be a contiguous 3-D tensor, got shape ",
                 shape_str(out.shape()));
  DILATRON_CHECK(a.dtype() == out.dtype() && b.dtype() == out.dtype(), "gemm: dtypes ", dtype_name(a.dtype()), " @ ",
                 dtype_name(b.dtype()), " -> ", dtype_name(out.dtype()));
  DILATRON_CHECK(a.dim() == 3 && b.dim() == 3, "gemm: expected 3-D operands, got ", shape_str(a.shape()), " and ",
                 shape_str(b.shape()));
  GemmShape g{out.shape()[0], out.shape()[1], out.shape()[2], trans_a ? a.shape()[1] : a.shape()[2], {}, {}};
  g.a = trans_a ? check_gemm_operand("a", a, g.batch, g.k, g.m, blas) : check_gemm_operand("a", a, g.batch, g.m, g.k, blas);
  g.b = trans_b ? check_gemm_operand("b", b, g.batch, g.n, g.k, blas) : check_gemm_operand("b", b, g.batch, g.k, g.n, blas);
  DILATRON_CHECK(g.m <= INT_MAX && g.n <= INT_MAX, "gemm: out shape ", shape_str(out.shape()), " exceeds the ", blas,
                 " index range");
  return g;
}

// ---- elementwise ----

inline bool is_comparison(BinaryOp op) {
  switch (op) {
    case BinaryOp::Eq: case BinaryOp::Ne: case BinaryOp::Lt: case BinaryOp::Le: case BinaryOp::Gt: case BinaryOp::Ge:
      return true;
    default:
      return false;
  }
}

// ---- fused nn kernels ----

// softmax_last, log_softmax_last.
inline Rows check_softmax(const char* op, const Tensor& out, const Tensor& in) {
  check_same_shape(op, "out", out, "input", in);
  check_contiguous(op, "out", out);
  return rows_of(op, "input", in);
}
// softmax_backward_last, log_softmax_backward_last.
inline Rows check_softmax_backward(const char* op, const Tensor& dx, const Tensor& y, const Tensor& dy) {
  check_same_shape(op, "dy", dy, "y", y);
  check_same_shape(op, "dx", dx, "y", y);
  check_contiguous(op, "dx", dx);
  check_contiguous(op, "dy", dy);
  return rows_of(op, "y", y);
}
// {M, C}; the targets' values are checked where they live (check_targets on the host).
inline Rows check_cross_entropy(const Tensor& loss, const Tensor& lse, const Tensor& logits, const Tensor& targets) {
  const Rows r = rows_of("cross_entropy", "logits", logits);
  check_int64_vector("cross_entropy", "targets", targets, r.M);
  check_row_vectors("cross_entropy", "loss/lse", {&loss, &lse}, r.M, logits.dtype());
  return r;
}
inline Rows check_cross_entropy_backward(const Tensor& dlogits, const Tensor& dloss, const Tensor& logits,
                                         const Tensor& lse, const Tensor& targets) {
  check_same_shape("cross_entropy_backward", "dlogits", dlogits, "logits", logits);
  check_contiguous("cross_entropy_backward", "dlogits", dlogits);
  const Rows r = rows_of("cross_entropy_backward", "logits", logits);
  check_int64_vector("cross_entropy_backward", "targets", targets, r.M);
  check_row_vectors("cross_entropy_backward", "dloss/lse", {&dloss, &lse}, r.M, logits.dtype());
  return r;
}
// Host targets: each in [0, C) or ignore_index. Serial (on the CPU, before any parallel region: an
// exception must not escape an OpenMP thread).
inline void check_targets(const char* op, const int64_t* targets, int64_t M, int64_t C, int64_t ignore_index) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t t = targets[m];
    DILATRON_CHECK(t == ignore_index || (t >= 0 && t < C), op, ": target ", t, " at position ", m,
                   " is out of range for ", C, " classes (ignore_index is ", ignore_index, ")");
  }
}

inline Rows check_layer_norm(const Tensor& out, const Tensor& mean, const Tensor& rstd, const Tensor& x,
                             const Tensor& weight, const Tensor& bias) {
  check_same_shape("layer_norm", "out", out, "x", x);
  check_contiguous("layer_norm", "out", out);
  const Rows r = rows_of("layer_norm", "x", x);
  check_row_vectors("layer_norm", "mean/rstd", {&mean, &rstd}, r.M, x.dtype());
  check_row_vectors("layer_norm", "weight/bias", {&weight, &bias}, r.K, x.dtype());
  return r;
}
inline Rows check_layer_norm_backward(const Tensor& dx, const Tensor& dweight, const Tensor& dbias, const Tensor& dy,
                                      const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& weight) {
  check_same_shape("layer_norm_backward", "dy", dy, "x", x);
  check_same_shape("layer_norm_backward", "dx", dx, "x", x);
  check_contiguous("layer_norm_backward", "dx", dx);
  check_contiguous("layer_norm_backward", "dy", dy);
  const Rows r = rows_of("layer_norm_backward", "x", x);
  check_row_vectors("layer_norm_backward", "mean/rstd", {&mean, &rstd}, r.M, x.dtype());
  check_row_vectors("layer_norm_backward", "weight/dweight/dbias", {&weight, &dweight, &dbias}, r.K, x.dtype());
  return r;
}

// embedding (table = weight, rows = out) and embedding_backward (table = dweight, rows = dout):
// table [V, E], M int64 indices, rows [M, E]. The indices' values are checked where they live
// (check_indices on the host).
struct EmbeddingShape {
  int64_t V, E, M;
};
inline EmbeddingShape check_embedding(const char* op, const char* table_name, const Tensor& table,
                                      const char* rows_name, const Tensor& rows, const Tensor& indices) {
  const auto [V, E] = rows_of(op, table_name, table);
  DILATRON_CHECK(table.dim() == 2, op, ": ", table_name, " must be [V, E], got ", shape_str(table.shape()));
  const int64_t M = indices.numel();
  check_int64_vector(op, "indices", indices, M);
  check_contiguous(op, rows_name, rows);
  DILATRON_CHECK(rows.numel() == M * E && rows.dtype() == table.dtype(), op, ": ", rows_name, " must be ",
                 dtype_name(table.dtype()), " [", M, ", ", E, "], got ", dtype_name(rows.dtype()), " ",
                 shape_str(rows.shape()));
  return {V, E, M};
}
inline void check_indices(const char* op, const int64_t* indices, int64_t M, int64_t V) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t i = indices[m];
    DILATRON_CHECK(i >= 0 && i < V, op, ": index ", i, " at position ", m, " is out of range for ", V,
                   " embeddings");
  }
}

inline void check_dropout(const Tensor& out, const Tensor& in, double p) {
  check_same_shape("dropout", "out", out, "input", in);
  check_contiguous("dropout", "out", out);
  check_contiguous("dropout", "input", in);
  DILATRON_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
}

// ---- optimizers ----

inline void check_adamw(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                        const AdamWParams& hp) {
  for (const Tensor* t : {&grad, &m, &v}) {
    DILATRON_CHECK(t->shape() == param.shape() && t->dtype() == param.dtype(), "adamw_step: grad/m/v must be ",
                   dtype_name(param.dtype()), " ", shape_str(param.shape()), ", got ", dtype_name(t->dtype()), " ",
                   shape_str(t->shape()));
  }
  for (const Tensor* t : {&param, &grad, &m, &v})
    DILATRON_CHECK(t->is_contiguous(), "adamw_step: tensors must be contiguous, got strides ",
                   shape_str(t->strides()), " for shape ", shape_str(t->shape()));
  DILATRON_CHECK(hp.step >= 1, "adamw_step: step is 1-based, got ", hp.step);
}

}  // namespace dilatron::kernels
