// Shape ops. Views share the input's storage (make_view); only contiguous, cat and a reshape that
// cannot be a view copy.
#include <algorithm>
#include <optional>

#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron {
namespace {

using autograd::Context;

// Strides that view (shape, strides) as new_shape without a copy, or nullopt (PyTorch's computeStride):
// new dims may only split or merge runs of old dims that are contiguous with each other.
std::optional<Shape> view_strides(const Shape& shape, const Shape& strides, const Shape& new_shape) {
  if (shape.empty() || shape_numel(shape) == 0) return contiguous_strides(new_shape);
  Shape new_strides(new_shape.size());
  auto view_d = static_cast<int64_t>(new_shape.size()) - 1;
  int64_t chunk_base_stride = strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (auto tensor_d = static_cast<int64_t>(shape.size()) - 1; tensor_d >= 0; --tensor_d) {
    const auto td = static_cast<size_t>(tensor_d);
    tensor_numel *= shape[td];
    // A run of mutually contiguous old dims ends at tensor_d: new dims must cover it exactly.
    if (tensor_d == 0 || (shape[td - 1] != 1 && strides[td - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || new_shape[static_cast<size_t>(view_d)] == 1)) {
        new_strides[static_cast<size_t>(view_d)] = view_numel * chunk_base_stride;
        view_numel *= new_shape[static_cast<size_t>(view_d)];
        --view_d;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (tensor_d > 0) {
        chunk_base_stride = strides[td - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  if (view_d != -1) return std::nullopt;
  return new_strides;
}

// A requested shape with its one -1 resolved against numel.
Shape infer_shape(const char* what, const Shape& requested, int64_t numel) {
  Shape shape = requested;
  int64_t infer = -1, known = 1;
  for (size_t i = 0; i < requested.size(); ++i) {
    if (requested[i] == -1) {
      DILATRON_CHECK(infer < 0, what, ": only one dimension can be -1, got ", shape_str(requested));
      infer = static_cast<int64_t>(i);
    } else {
      DILATRON_CHECK(requested[i] >= 0, what, ": invalid size ", requested[i], " in shape ", shape_str(requested));
      known *= requested[i];
    }
  }
  if (infer >= 0 && known != 0) shape[static_cast<size_t>(infer)] = numel / known;
  DILATRON_CHECK(shape_numel(shape) == numel && (infer < 0 || known != 0), what, ": shape ", shape_str(requested),
                 " is invalid for a tensor of ", numel, " elements");
  return shape;
}

void check_has_dims(const char* what, const Tensor& x) {
  DILATRON_CHECK(x.dim() > 0, what, ": expected a tensor with at least one dim, got a 0-d tensor");
}

// A view with another shape over the same elements; the gradient is reshaped back.
struct ViewFn : autograd::Function<ViewFn> {
  static const char* name() { return "view"; }
  static Tensor forward(Context& ctx, const Tensor& x, const Shape& shape, const Shape& strides) {
    ctx.set("shape", x.shape());
    return make_view(x, shape, strides, x.offset());
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    return {reshape(grads[0], ctx.get<Shape>("shape"))};
  }
};

struct PermuteFn : autograd::Function<PermuteFn> {
  static const char* name() { return "permute"; }
  static Tensor forward(Context& ctx, const Tensor& x, const Shape& dims) {
    Shape shape(dims.size()), strides(dims.size()), inverse(dims.size());
    for (size_t i = 0; i < dims.size(); ++i) {
      const auto d = static_cast<size_t>(dims[i]);
      shape[i] = x.shape()[d];
      strides[i] = x.strides()[d];
      inverse[d] = static_cast<int64_t>(i);
    }
    ctx.set("inverse", inverse);
    return make_view(x, shape, strides, x.offset());
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    return {permute(grads[0], ctx.get<Shape>("inverse"))};
  }
};

// The gradient is written into its place in a zero tensor of the input's size.
struct NarrowFn : autograd::Function<NarrowFn> {
  static const char* name() { return "narrow"; }
  static Tensor forward(Context& ctx, const Tensor& x, int64_t dim, int64_t start, int64_t length) {
    ctx.set("size", x.shape()[static_cast<size_t>(dim)]);
    ctx.set("dim", dim);
    ctx.set("start", start);
    Shape shape = x.shape();
    shape[static_cast<size_t>(dim)] = length;
    return make_view(x, shape, x.strides(), x.offset() + start * x.strides()[static_cast<size_t>(dim)]);
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    const Tensor& g = grads[0];
    const auto dim = ctx.get<int64_t>("dim");
    Shape shape = g.shape();
    shape[static_cast<size_t>(dim)] = ctx.get<int64_t>("size");
    Tensor dx = Tensor::zeros(shape, g.options());
    Tensor piece = narrow(dx, dim, ctx.get<int64_t>("start"), g.size(dim));
    kernels::backend(g.device()).copy(piece, g);
    return {dx};
  }
};

struct ExpandFn : autograd::Function<ExpandFn> {
  static const char* name() { return "expand"; }
  static Tensor forward(Context& ctx, const Tensor& x, const Shape& shape, const Shape& strides) {
    ctx.set("shape", x.shape());
    return make_view(x, shape, strides, x.offset());
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    return {sum_to(grads[0], ctx.get<Shape>("shape"))};
  }
};

struct ContiguousFn : autograd::Function<ContiguousFn> {
  static const char* name() { return "contiguous"; }
  static Tensor forward(Context&, const Tensor& x) {
    Tensor out = Tensor::empty(x.shape(), x.options());
    kernels::backend(x.device()).copy(out, x);
    return out;
  }
  static std::vector<Tensor> backward(Context&, const std::vector<Tensor>& grads) { return {grads[0]}; }
};

// Views of consecutive pieces along dim; the gradients are concatenated back.
struct SplitFn : autograd::Function<SplitFn> {
  static const char* name() { return "split"; }
  static std::vector<Tensor> forward(Context& ctx, const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim) {
    ctx.set("dim", dim);
    std::vector<Tensor> outs;
    Shape shape = x.shape();
    const int64_t stride = x.strides()[static_cast<size_t>(dim)];
    int64_t start = 0;
    for (int64_t n : sizes) {
      shape[static_cast<size_t>(dim)] = n;
      outs.push_back(make_view(x, shape, x.strides(), x.offset() + start * stride));
      start += n;
    }
    return outs;
  }
  static std::vector<Tensor> backward(Context& ctx, const std::vector<Tensor>& grads) {
    return {cat(grads, ctx.get<int64_t>("dim"))};
  }
};

// cat's graph node: it takes a list of tensors, which Function::apply does not collect.
struct CatBackward : autograd::Node {
  int64_t dim = 0;
  std::vector<int64_t> sizes;
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override {
    std::vector<Tensor> out(sizes.size());
    int64_t start = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      if (next_edges[i].fn) out[i] = narrow(grads[0], dim, start, sizes[i]);
      start += sizes[i];
    }
    return out;
  }
  std::string name() const override { return "cat"; }
};

}  // namespace

int64_t wrap_dim(int64_t dim, int64_t ndim) {
  DILATRON_CHECK(dim >= -ndim && dim < ndim, "dim ", dim, " is out of range for a tensor of rank ", ndim,
                 ndim > 0 ? detail::concat(" (expected [", -ndim, ", ", ndim - 1, "])") : std::string(" (no dims)"));
  return dim < 0 ? dim + ndim : dim;
}

Tensor view(const Tensor& x, const Shape& shape) {
  const Shape s = infer_shape("view", shape, x.numel());
  if (s == x.shape()) return x;
  const auto strides = view_strides(x.shape(), x.strides(), s);
  DILATRON_CHECK(strides.has_value(), "view: a tensor of shape ", shape_str(x.shape()), " and strides ",
                 shape_str(x.strides()), " cannot be viewed as ", shape_str(s), " without a copy; use reshape");
  return ViewFn::apply(x, s, *strides);
}

Tensor reshape(const Tensor& x, const Shape& shape) {
  const Shape s = infer_shape("reshape", shape, x.numel());
  if (s == x.shape()) return x;
  if (const auto strides = view_strides(x.shape(), x.strides(), s)) return ViewFn::apply(x, s, *strides);
  return view(contiguous(x), s);
}

Tensor permute(const Tensor& x, const Shape& dims) {
  DILATRON_CHECK(static_cast<int64_t>(dims.size()) == x.dim(), "permute: dims ", shape_str(dims),
                 " do not match a tensor of rank ", x.dim());
  Shape wrapped(dims.size());
  std::vector<bool> seen(dims.size(), false);
  bool identity = true;
  for (size_t i = 0; i < dims.size(); ++i) {
    wrapped[i] = wrap_dim(dims[i], x.dim());
    DILATRON_CHECK(!seen[static_cast<size_t>(wrapped[i])], "permute: dim ", dims[i], " repeated in ",
                   shape_str(dims));
    seen[static_cast<size_t>(wrapped[i])] = true;
    identity = identity && wrapped[i] == static_cast<int64_t>(i);
  }
  if (identity) return x;
  return PermuteFn::apply(x, wrapped);
}

Tensor transpose(const Tensor& x, int64_t d0, int64_t d1) {
  Shape dims(static_cast<size_t>(x.dim()));
  for (size_t i = 0; i < dims.size(); ++i) dims[i] = static_cast<int64_t>(i);
  std::swap(dims[static_cast<size_t>(wrap_dim(d0, x.dim()))], dims[static_cast<size_t>(wrap_dim(d1, x.dim()))]);
  return permute(x, dims);
}

Tensor contiguous(const Tensor& x) {
  if (x.is_contiguous()) return x;
  return ContiguousFn::apply(x);
}

Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length) {
  check_has_dims("narrow", x);
  const int64_t d = wrap_dim(dim, x.dim());
  const int64_t size = x.shape()[static_cast<size_t>(d)];
  const int64_t s = start < 0 ? start + size : start;
  DILATRON_CHECK(s >= 0 && length >= 0 && s + length <= size, "narrow: start ", start, " and length ", length,
                 " are out of range for dim ", dim, " of size ", size, " (shape ", shape_str(x.shape()), ")");
  if (s == 0 && length == size) return x;
  return NarrowFn::apply(x, d, s, length);
}

Tensor slice(const Tensor& x, int64_t dim, int64_t start, int64_t end) {
  check_has_dims("slice", x);
  const int64_t size = x.size(dim);
  // Python slicing: negative bounds count from the end, out-of-range bounds clamp.
  auto clamp = [&](int64_t i) { return std::clamp<int64_t>(i < 0 ? i + size : i, 0, size); };
  const int64_t s = clamp(start), e = std::max(clamp(end), s);
  return narrow(x, dim, s, e - s);
}

Tensor unsqueeze(const Tensor& x, int64_t dim) {
  const int64_t d = wrap_dim(dim, x.dim() + 1);
  Shape shape = x.shape();
  shape.insert(shape.begin() + d, 1);
  return view(x, shape);
}

Tensor squeeze(const Tensor& x, int64_t dim) {
  const int64_t d = wrap_dim(dim, x.dim());
  if (x.shape()[static_cast<size_t>(d)] != 1) return x;  // as torch.squeeze(dim)
  Shape shape = x.shape();
  shape.erase(shape.begin() + d);
  return view(x, shape);
}

Tensor expand(const Tensor& x, const Shape& shape) {
  const auto nd = static_cast<int64_t>(shape.size());
  DILATRON_CHECK(nd >= x.dim(), "expand: cannot expand shape ", shape_str(x.shape()), " to ", shape_str(shape),
                 " (fewer dims)");
  Shape out_shape(shape.size()), strides(shape.size());
  for (int64_t i = nd - 1; i >= 0; --i) {
    const auto ui = static_cast<size_t>(i);
    const int64_t xi = i - (nd - x.dim());  // aligned dim of x, < 0 for new leading dims
    if (xi < 0) {
      DILATRON_CHECK(shape[ui] >= 0, "expand: new leading dim ", i, " of ", shape_str(shape),
                     " needs a size, got ", shape[ui]);
      out_shape[ui] = shape[ui];
      strides[ui] = 0;
      continue;
    }
    const int64_t size = x.shape()[static_cast<size_t>(xi)];
    out_shape[ui] = shape[ui] == -1 ? size : shape[ui];
    DILATRON_CHECK(out_shape[ui] == size || size == 1, "expand: cannot expand shape ", shape_str(x.shape()), " to ",
                   shape_str(shape), " (dim ", i, ": ", size, " vs ", shape[ui], ")");
    strides[ui] = out_shape[ui] == size ? x.strides()[static_cast<size_t>(xi)] : 0;
  }
  if (out_shape == x.shape()) return x;
  return ExpandFn::apply(x, out_shape, strides);
}

Tensor flatten(const Tensor& x, int64_t start_dim, int64_t end_dim) {
  if (x.dim() == 0) return reshape(x, {1});
  const int64_t s = wrap_dim(start_dim, x.dim()), e = wrap_dim(end_dim, x.dim());
  DILATRON_CHECK(s <= e, "flatten: start_dim ", start_dim, " comes after end_dim ", end_dim, " for shape ",
                 shape_str(x.shape()));
  const Shape& in = x.shape();
  Shape shape(in.begin(), in.begin() + s);
  shape.push_back(shape_numel(Shape(in.begin() + s, in.begin() + e + 1)));
  shape.insert(shape.end(), in.begin() + e + 1, in.end());
  return reshape(x, shape);
}

Tensor cat(const std::vector<Tensor>& xs, int64_t dim) {
  DILATRON_CHECK(!xs.empty(), "cat: expected at least one tensor");
  const Tensor& first = xs[0];
  check_has_dims("cat", first);
  const int64_t d = wrap_dim(dim, first.dim());
  const auto ud = static_cast<size_t>(d);
  Shape shape = first.shape();
  shape[ud] = 0;
  std::vector<int64_t> sizes;
  for (const Tensor& x : xs) {
    Shape expected = first.shape();
    expected[ud] = x.dim() == first.dim() ? x.shape()[ud] : 0;
    DILATRON_CHECK(x.shape() == expected, "cat: shapes ", shape_str(first.shape()), " and ", shape_str(x.shape()),
                   " differ outside dim ", dim);
    DILATRON_CHECK(x.dtype() == first.dtype() && x.device() == first.device(), "cat: tensors of ",
                   dtype_name(first.dtype()), " on ", first.device().str(), " and ", dtype_name(x.dtype()), " on ",
                   x.device().str());
    sizes.push_back(x.shape()[ud]);
    shape[ud] += x.shape()[ud];
  }

  // Each input is copied straight into its narrow view of the result.
  Tensor out = Tensor::empty(shape, first.options());
  {
    autograd::NoGradGuard no_grad;
    int64_t start = 0;
    for (size_t i = 0; i < xs.size(); ++i) {
      Tensor piece = narrow(out, d, start, sizes[i]);
      kernels::backend(first.device()).copy(piece, xs[i]);
      start += sizes[i];
    }
  }
  if (autograd::any_requires_grad(xs)) {
    auto node = std::make_shared<CatBackward>();
    node->dim = d;
    node->sizes = sizes;
    for (const Tensor& x : xs) node->next_edges.push_back(autograd::gradient_edge(x));
    std::vector<Tensor> outs{out};
    autograd::set_history(outs, node);
    out = outs[0];
  }
  return out;
}

std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim) {
  check_has_dims("split", x);
  const int64_t d = wrap_dim(dim, x.dim());
  int64_t total = 0;
  for (int64_t n : sizes) {
    DILATRON_CHECK(n >= 0, "split: negative size ", n, " in ", shape_str(sizes));
    total += n;
  }
  DILATRON_CHECK(total == x.shape()[static_cast<size_t>(d)], "split: sizes ", shape_str(sizes), " sum to ", total,
                 " but dim ", dim, " of shape ", shape_str(x.shape()), " has size ", x.shape()[static_cast<size_t>(d)]);
  return SplitFn::apply(x, sizes, d);
}

std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim) {
  check_has_dims("split", x);
  const int64_t size = x.size(dim);
  DILATRON_CHECK(split_size > 0 || size == 0, "split: split_size must be positive, got ", split_size);
  std::vector<int64_t> sizes;
  for (int64_t start = 0; start < size; start += split_size) sizes.push_back(std::min(split_size, size - start));
  if (sizes.empty()) sizes.push_back(0);
  return split(x, sizes, dim);
}

std::vector<Tensor> chunk(const Tensor& x, int64_t chunks, int64_t dim) {
  check_has_dims("chunk", x);
  DILATRON_CHECK(chunks > 0, "chunk: chunks must be positive, got ", chunks);
  const int64_t size = x.size(dim);
  return split(x, (size + chunks - 1) / chunks, dim);  // as torch.chunk: equal chunks, maybe fewer
}

}  // namespace dilatron
