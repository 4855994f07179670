// Reductions: an arbitrary set of dims is reduced by laying it out as the trailing (sum_last) or
// leading (sum_first) block of a contiguous [M, K], permuting and copying only when it is neither.
#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron {
namespace {

using autograd::Context;

// Which dims of a rank-ndim tensor are reduced; an empty list means all of them, as in torch.sum.
std::vector<bool> reduced_mask(const char* what, const std::vector<int64_t>& dims, int64_t ndim) {
  std::vector<bool> reduced(static_cast<size_t>(ndim), dims.empty());
  for (int64_t dim : dims) {
    const auto d = static_cast<size_t>(wrap_dim(dim, ndim));
    DILATRON_CHECK(!reduced[d], what, ": dim ", dim, " appears more than once in ", shape_str(dims));
    reduced[d] = true;
  }
  return reduced;
}

// x's shape with the reduced dims dropped, or kept as 1.
Shape reduced_shape(const Shape& shape, const std::vector<bool>& reduced, bool keepdim) {
  Shape out;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (!reduced[i]) out.push_back(shape[i]);
    else if (keepdim) out.push_back(1);
  }
  return out;
}

// How many elements each output element sums.
int64_t reduced_count(const Shape& shape, const std::vector<bool>& reduced) {
  int64_t count = 1;
  for (size_t i = 0; i < shape.size(); ++i)
    if (reduced[i]) count *= shape[i];
  return count;
}

// Whether every reduced dim that is not size 1 comes after (trailing) / before (leading) every kept one.
bool reduced_block_is(bool trailing, const Shape& shape, const std::vector<bool>& reduced) {
  bool seen_second = false;  // trailing: a reduced dim seen; leading: a kept dim seen
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 1) continue;
    const bool second = trailing ? reduced[i] : !reduced[i];
    if (second) seen_second = true;
    else if (seen_second) return false;
  }
  return true;
}

// The sums over the reduced dims, shaped as the kept dims (no autograd).
Tensor sum_forward(const Tensor& x, const std::vector<bool>& reduced) {
  const Shape kept = reduced_shape(x.shape(), reduced, false);
  const int64_t m = shape_numel(kept);
  const int64_t k = reduced_count(x.shape(), reduced);
  Tensor out = Tensor::empty(kept, x.options());
  kernels::Backend& be = kernels::backend(x.device());
  if (x.is_contiguous() && reduced_block_is(true, x.shape(), reduced)) {
    be.sum_last(out, view(x, {m, k}));
  } else if (x.is_contiguous() && reduced_block_is(false, x.shape(), reduced)) {
    be.sum_first(out, view(x, {k, m}));
  } else {
    Shape order;
    for (size_t i = 0; i < reduced.size(); ++i)
      if (!reduced[i]) order.push_back(static_cast<int64_t>(i));
    for (size_t i = 0; i < reduced.size(); ++i)
      if (reduced[i]) order.push_back(static_cast<int64_t>(i));
    be.sum_last(out, view(contiguous(permute(x, order)), {m, k}));
  }
  return out;
}

// The gradient is broadcast back over the reduced dims.
struct SumFn : autograd::Function<SumFn> {
  static const char* name() { return "sum"; }
  static Tensor forward(Context& ctx, const Tensor& x, const std::vector<bool>& reduced, bool keepdim) {
    ctx.set("shape", x.shape());
    ctx.set("keepdim_shape", reduced_shape(x.shape(), reduced, true));
    Tensor out = sum_forward(x, reduced);
    return keepdim ? reshape(out, reduced_shape(x.shape(), reduced, true)) : out;
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    return {expand(reshape(grads[0], ctx.get<Shape>("keepdim_shape")), ctx.get<Shape>("shape"))};
  }
};

void check_float(const char* what, const Tensor& x) {
  DILATRON_CHECK(is_floating(x.dtype()), what, ": expected a float tensor, got ", dtype_name(x.dtype()));
}

}  // namespace

Tensor sum(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  check_float("sum", x);
  return SumFn::apply(x, reduced_mask("sum", dims, x.dim()), keepdim);
}

Tensor sum(const Tensor& x) { return sum(x, {}, false); }

Tensor mean(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  check_float("mean", x);
  const std::vector<bool> reduced = reduced_mask("mean", dims, x.dim());
  // Summed and scaled in compute_dtype, so a bf16 mean is rounded once, not after the sum and again.
  const Tensor s = SumFn::apply(x.to(compute_dtype(x.dtype())), reduced, keepdim);
  return mul(s, 1.0 / static_cast<double>(reduced_count(x.shape(), reduced))).to(x.dtype());
}

Tensor mean(const Tensor& x) { return mean(x, {}, false); }

MaxResult max(const Tensor& x, int64_t dim, bool keepdim) {
  autograd::NoGradGuard no_grad;
  const int64_t d = wrap_dim(dim, x.dim());
  const int64_t k = x.shape()[static_cast<size_t>(d)];
  DILATRON_CHECK(k > 0, "max: dim ", dim, " of shape ", shape_str(x.shape()), " is empty");
  Shape order;
  for (int64_t i = 0; i < x.dim(); ++i)
    if (i != d) order.push_back(i);
  order.push_back(d);
  std::vector<bool> reduced(static_cast<size_t>(x.dim()), false);
  reduced[static_cast<size_t>(d)] = true;
  const int64_t m = x.numel() / k;
  MaxResult r{Tensor::empty({m}, x.options()), Tensor::empty({m}, TensorOptions(DType::Int64).with_device(x.device()))};
  kernels::backend(x.device()).max_last(r.values, r.indices, view(contiguous(permute(x, order)), {m, k}));
  const Shape shape = reduced_shape(x.shape(), reduced, keepdim);
  return {reshape(r.values, shape), reshape(r.indices, shape)};
}

Tensor max(const Tensor& x) {
  autograd::NoGradGuard no_grad;
  DILATRON_CHECK(x.numel() > 0, "max: the tensor of shape ", shape_str(x.shape()), " has no elements");
  Tensor values = Tensor::empty({1}, x.options());
  Tensor indices = Tensor::empty({1}, TensorOptions(DType::Int64).with_device(x.device()));
  kernels::backend(x.device()).max_last(values, indices, view(contiguous(x), {1, x.numel()}));
  return reshape(values, {});
}

Tensor sum_to(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  const int64_t lead = x.dim() - static_cast<int64_t>(shape.size());
  bool ok = lead >= 0;
  std::vector<int64_t> dims;
  for (int64_t i = 0; i < x.dim() && ok; ++i) {
    const int64_t size = x.shape()[static_cast<size_t>(i)];
    if (i < lead) {
      dims.push_back(i);
      continue;
    }
    const int64_t target = shape[static_cast<size_t>(i - lead)];
    ok = target == size || target == 1;
    if (target == 1 && size != 1) dims.push_back(i);
  }
  DILATRON_CHECK(ok, "sum_to: shape ", shape_str(x.shape()), " cannot be summed to ", shape_str(shape));
  if (dims.empty()) return reshape(x, shape);
  return reshape(sum(x, dims, true), shape);
}

}  // namespace dilatron
