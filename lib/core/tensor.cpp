#include "dilatron/tensor.h"

#include <cmath>
#include <cstring>
#include <iomanip>
#include <ostream>
#include <sstream>

#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"
#include "dilatron/random.h"

namespace dilatron {

using kernels::backend;

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Tensor make_view(const Tensor& t, const Shape& shape, const Shape& strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = t.storage();
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  impl->dtype = t.dtype();
  return Tensor(std::move(impl));
}

// ---------------------------------------------------------------- creation

Tensor Tensor::empty(const Shape& shape, TensorOptions opts) {
  for (int64_t d : shape) DILATRON_CHECK(d >= 0, "negative dimension in shape ", shape_str(shape));
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = opts.dtype;
  impl->storage = std::make_shared<Storage>(static_cast<size_t>(shape_numel(shape)) * dtype_size(opts.dtype),
                                            opts.device);
  Tensor t(std::move(impl));
  if (opts.requires_grad) t.requires_grad_(true);
  return t;
}

Tensor Tensor::full(const Shape& shape, double value, TensorOptions opts) {
  Tensor t = empty(shape, opts.with_requires_grad(false));
  t.fill_(value);
  if (opts.requires_grad) t.requires_grad_(true);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, TensorOptions opts) { return full(shape, 0.0, opts); }
Tensor Tensor::ones(const Shape& shape, TensorOptions opts) { return full(shape, 1.0, opts); }
Tensor Tensor::scalar(double value, TensorOptions opts) { return full({}, value, opts); }

Tensor Tensor::arange(double start, double end, double step, TensorOptions opts) {
  DILATRON_CHECK(step != 0.0, "arange: step must be nonzero");
  const auto n = static_cast<int64_t>(std::ceil((end - start) / step));
  std::vector<double> values(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (size_t i = 0; i < values.size(); ++i) values[i] = start + static_cast<double>(i) * step;
  return from_vector(values, {static_cast<int64_t>(values.size())}, opts);
}

Tensor Tensor::uniform(const Shape& shape, double low, double high, Generator& gen, TensorOptions opts) {
  Tensor t = empty(shape, opts.with_requires_grad(false));
  backend(t.device()).fill_uniform(t, gen.seed(), gen.next_offset(), low, high);
  if (opts.requires_grad) t.requires_grad_(true);
  return t;
}

Tensor Tensor::rand(const Shape& shape, Generator& gen, TensorOptions opts) { return uniform(shape, 0.0, 1.0, gen, opts); }

Tensor Tensor::randn(const Shape& shape, Generator& gen, TensorOptions opts, double mean, double std) {
  Tensor t = empty(shape, opts.with_requires_grad(false));
  backend(t.device()).fill_normal(t, gen.seed(), gen.next_offset(), mean, std);
  if (opts.requires_grad) t.requires_grad_(true);
  return t;
}

template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& values, const Shape& shape, TensorOptions opts) {
  DILATRON_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape), "from_vector: ", values.size(),
                 " values do not fill shape ", shape_str(shape));
  // Stage on the CPU in the source type, then convert (and move) in one copy.
  Tensor host = empty(shape, TensorOptions(dtype_of<T>::value));
  if (!values.empty()) std::memcpy(host.raw_data(), values.data(), values.size() * sizeof(T));
  Tensor out = empty(shape, opts.with_requires_grad(false));
  backend(out.device()).copy(out, host);
  if (opts.requires_grad) out.requires_grad_(true);
  return out;
}
template Tensor Tensor::from_vector<float>(const std::vector<float>&, const Shape&, TensorOptions);
template Tensor Tensor::from_vector<double>(const std::vector<double>&, const Shape&, TensorOptions);
template Tensor Tensor::from_vector<int64_t>(const std::vector<int64_t>&, const Shape&, TensorOptions);
template Tensor Tensor::from_vector<bfloat16>(const std::vector<bfloat16>&, const Shape&, TensorOptions);

// ---------------------------------------------------------------- metadata and data access

TensorImpl& Tensor::impl() const {
  DILATRON_CHECK(impl_ != nullptr, "use of an undefined tensor");
  return *impl_;
}

int64_t Tensor::size(int64_t d) const { return shape()[static_cast<size_t>(wrap_dim(d, dim()))]; }
int64_t Tensor::numel() const { return shape_numel(shape()); }

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    const auto d = static_cast<size_t>(i);
    if (impl().shape[d] == 1) continue;
    if (impl().strides[d] != expected) return false;
    expected *= impl().shape[d];
  }
  return true;
}

void* Tensor::raw_data() const {
  return static_cast<char*>(impl().storage->data()) + impl().offset * static_cast<int64_t>(dtype_size(dtype()));
}

double Tensor::item() const {
  DILATRON_CHECK(numel() == 1, "item() needs a one-element tensor, got shape ", shape_str(shape()));
  return to_vector<double>()[0];
}

double Tensor::at(std::initializer_list<int64_t> index) const {
  DILATRON_CHECK(static_cast<int64_t>(index.size()) == dim(), "at(): ", index.size(), " indices for a ", dim(),
                 "-d tensor of shape ", shape_str(shape()));
  int64_t off = offset();
  int64_t d = 0;
  for (int64_t i : index) {
    DILATRON_CHECK(i >= 0 && i < shape()[static_cast<size_t>(d)], "at(): index ", i, " out of range for dim ", d,
                   " of shape ", shape_str(shape()));
    off += i * strides()[static_cast<size_t>(d++)];
  }
  return make_view(*this, {}, {}, off).item();
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  Tensor host = detach().to(Device::cpu()).to(dtype_of<T>::value).contiguous();
  const T* p = host.data<T>();
  return std::vector<T>(p, p + host.numel());
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;
template std::vector<bfloat16> Tensor::to_vector<bfloat16>() const;

// ---------------------------------------------------------------- conversions

namespace {
// Differentiable copy to another dtype and/or device; the gradient goes back the same way.
struct ToOp : autograd::Function<ToOp> {
  static const char* name() { return "to"; }
  static Tensor forward(autograd::Context& ctx, const Tensor& x, TensorOptions target) {
    ctx.set("source", x.options());
    Tensor out = Tensor::empty(x.shape(), target);
    // A host<->device copy runs on the device side's backend.
    backend(target.device.is_cpu() ? x.device() : target.device).copy(out, x);
    return out;
  }
  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    const auto source = ctx.get<TensorOptions>("source");
    return {grads[0].to(source.dtype).to(source.device)};
  }
};
}  // namespace

Tensor Tensor::to(DType t) const {
  if (t == dtype()) return *this;
  DILATRON_CHECK(!requires_grad() || is_floating(t), "to(", dtype_name(t), "): a tensor that requires grad can "
                 "only be converted to a floating dtype");
  return ToOp::apply(*this, options().with_dtype(t));
}

Tensor Tensor::to(Device d) const {
  if (d == device()) return *this;
  return ToOp::apply(*this, options().with_device(d));
}

Tensor Tensor::clone() const { return ToOp::apply(*this, options()); }

Tensor Tensor::detach() const {
  Tensor t = make_view(*this, shape(), strides(), offset());
  return t;
}

Tensor Tensor::contiguous() const { return dilatron::contiguous(*this); }
Tensor Tensor::reshape(const Shape& s) const { return dilatron::reshape(*this, s); }
Tensor Tensor::view(const Shape& s) const { return dilatron::view(*this, s); }
Tensor Tensor::transpose(int64_t d0, int64_t d1) const { return dilatron::transpose(*this, d0, d1); }
Tensor Tensor::permute(const Shape& dims) const { return dilatron::permute(*this, dims); }
Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const { return dilatron::narrow(*this, d, start, length); }
Tensor Tensor::sum() const { return dilatron::sum(*this); }
Tensor Tensor::mean() const { return dilatron::mean(*this); }

Tensor& Tensor::fill_(double value) {
  DILATRON_CHECK(is_contiguous(), "fill_ needs a contiguous tensor, got strides ", shape_str(strides()));
  backend(device()).fill(*this, value);
  return *this;
}

Tensor& Tensor::copy_(const Tensor& src) {
  DILATRON_CHECK(src.shape() == shape(), "copy_: source shape ", shape_str(src.shape()), " != destination shape ",
                 shape_str(shape()));
  backend(device().is_cpu() ? src.device() : device()).copy(*this, src);
  return *this;
}

// ---------------------------------------------------------------- autograd

Tensor& Tensor::requires_grad_(bool r) {
  DILATRON_CHECK(!r || is_floating(dtype()), "only floating tensors can require grad, got ", dtype_name(dtype()));
  DILATRON_CHECK(r || is_leaf(), "requires_grad_(false) on a non-leaf tensor; use detach()");
  impl().requires_grad = r;
  return *this;
}

Tensor Tensor::grad() const { return impl().grad ? Tensor(impl().grad) : Tensor(); }

void Tensor::set_grad(const Tensor& g) {
  if (g.defined()) {
    DILATRON_CHECK(g.shape() == shape(), "set_grad: gradient shape ", shape_str(g.shape()), " != tensor shape ",
                   shape_str(shape()));
  }
  impl().grad = g.defined() ? g.impl_ptr() : nullptr;
}

void Tensor::backward(const Tensor& grad, bool retain_graph) const {
  autograd::backward({*this}, {grad}, retain_graph);
}

// ---------------------------------------------------------------- printing

std::string Tensor::str() const {
  if (!defined()) return "tensor(undefined)";
  std::ostringstream os;
  const Tensor host = detach().to(Device::cpu());
  const std::vector<double> v = host.to_vector<double>();
  const int64_t n = numel();
  const bool summarise = n > 1000;
  const bool integral = !is_floating(dtype());
  auto print_value = [&](int64_t i) {
    if (integral) os << static_cast<int64_t>(v[static_cast<size_t>(i)]);
    else os << std::setprecision(dtype() == DType::Float64 ? 8 : 5) << v[static_cast<size_t>(i)];
  };
  // Recursive nested brackets, eliding the middle of long dims like PyTorch.
  const Shape& s = shape();
  const Shape st = contiguous_strides(s);
  std::function<void(size_t, int64_t)> rec = [&](size_t d, int64_t base) {
    if (d == s.size()) {
      print_value(base);
      return;
    }
    os << "[";
    for (int64_t i = 0; i < s[d]; ++i) {
      if (summarise && s[d] > 6 && i == 3) {
        os << "..., ";
        i = s[d] - 3;
      }
      rec(d + 1, base + i * st[d]);
      if (i + 1 < s[d]) os << (d + 1 == s.size() ? ", " : ",\n" + std::string(8 + d, ' '));
    }
    os << "]";
  };
  os << "tensor(";
  rec(0, 0);
  os << ", shape=" << shape_str(s) << ", dtype=" << dtype_name(dtype());
  if (!device().is_cpu()) os << ", device=" << device().str();
  if (grad_fn()) os << ", grad_fn=<" << grad_fn()->name() << ">";
  else if (requires_grad()) os << ", requires_grad=true";
  os << ")";
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.str(); }

}  // namespace dilatron
