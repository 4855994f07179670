// The tensor: a strided view over shared Storage, with autograd metadata.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "dilatron/dtype.h"
#include "dilatron/error.h"
#include "dilatron/storage.h"

namespace dilatron {

using Shape = std::vector<int64_t>;

namespace autograd {
struct Node;
}

class Generator;
class Tensor;

struct TensorOptions {
  DType dtype = DType::Float32;
  Device device = Device::cpu();
  bool requires_grad = false;

  TensorOptions() = default;
  TensorOptions(DType t) : dtype(t) {}  // NOLINT: zeros({2, 3}, DType::Float64) reads naturally
  TensorOptions(Device d) : device(d) {}  // NOLINT
  TensorOptions with_dtype(DType t) const { auto o = *this; o.dtype = t; return o; }
  TensorOptions with_device(Device d) const { auto o = *this; o.device = d; return o; }
  TensorOptions with_requires_grad(bool r = true) const { auto o = *this; o.requires_grad = r; return o; }
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  Shape shape;
  Shape strides;       // in elements
  int64_t offset = 0;  // in elements
  DType dtype = DType::Float32;

  // autograd
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;
  std::shared_ptr<autograd::Node> grad_fn;  // null for leaves
  uint32_t output_nr = 0;                   // which output of grad_fn this is
  std::weak_ptr<autograd::Node> grad_accumulator;  // leaves only, created lazily
};

class Tensor {
 public:
  Tensor() = default;  // undefined; defined() is false
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- creation ----
  static Tensor empty(const Shape& shape, TensorOptions opts = {});
  static Tensor zeros(const Shape& shape, TensorOptions opts = {});
  static Tensor ones(const Shape& shape, TensorOptions opts = {});
  static Tensor full(const Shape& shape, double value, TensorOptions opts = {});
  static Tensor arange(double start, double end, double step = 1.0, TensorOptions opts = {});
  static Tensor scalar(double value, TensorOptions opts = {});
  // uniform in [low, high), standard normal scaled, from a Philox generator (one draw per call)
  static Tensor rand(const Shape& shape, Generator& gen, TensorOptions opts = {});
  static Tensor uniform(const Shape& shape, double low, double high, Generator& gen, TensorOptions opts = {});
  static Tensor randn(const Shape& shape, Generator& gen, TensorOptions opts = {}, double mean = 0.0,
                      double std = 1.0);
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape,
                            TensorOptions opts = TensorOptions(dtype_of<T>::value));  // float, double, int64_t, bfloat16

  // ---- metadata ----
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t offset() const { return impl().offset; }
  int64_t dim() const { return static_cast<int64_t>(impl().shape.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const;
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device(); }
  bool is_contiguous() const;
  TensorOptions options() const { return TensorOptions(dtype()).with_device(device()); }
  const std::shared_ptr<Storage>& storage() const { return impl().storage; }
  TensorImpl& impl() const;
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& other) const { return impl_ == other.impl_; }

  // ---- data access (CPU pointers; the element at offset()) ----
  void* raw_data() const;
  template <typename T>
  T* data() const;  // checks that T matches dtype()
  double item() const;  // a one-element tensor's value (copied to the host)
  double at(std::initializer_list<int64_t> index) const;  // one element as double, for tests
  template <typename T>
  std::vector<T> to_vector() const;  // all elements in row-major order, converted to T (float, double, int64_t, bfloat16)

  // ---- conversions and views (autograd-aware, see ops.h for the rest) ----
  Tensor to(DType t) const;
  Tensor to(Device d) const;
  Tensor clone() const;
  Tensor contiguous() const;
  Tensor detach() const;  // shares storage, no grad_fn, requires_grad false
  Tensor reshape(const Shape& shape) const;
  Tensor view(const Shape& shape) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor permute(const Shape& dims) const;
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor sum() const;
  Tensor mean() const;

  // ---- in place, outside autograd (initialisation, optimizers) ----
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }
  Tensor& copy_(const Tensor& src);  // same shape; converts dtype and device; *this may be a view

  // ---- autograd ----
  bool requires_grad() const { return impl().requires_grad; }
  Tensor& requires_grad_(bool r = true);
  bool is_leaf() const { return impl().grad_fn == nullptr; }
  Tensor grad() const;
  void set_grad(const Tensor& g);
  const std::shared_ptr<autograd::Node>& grad_fn() const { return impl().grad_fn; }
  // From a one-element tensor when grad is undefined; otherwise grad has this tensor's shape.
  void backward(const Tensor& grad = Tensor(), bool retain_graph = false) const;

  std::string str() const;

 private:
  std::shared_ptr<TensorImpl> impl_;
};

std::ostream& operator<<(std::ostream& os, const Tensor& t);

// Row-major strides of a shape, and the number of elements.
Shape contiguous_strides(const Shape& shape);
int64_t shape_numel(const Shape& shape);
// A view of t's storage with the given geometry (no autograd).
Tensor make_view(const Tensor& t, const Shape& shape, const Shape& strides, int64_t offset);

// ---- templates ----
template <typename T>
T* Tensor::data() const {
  DILATRON_CHECK(dtype() == dtype_of<T>::value, "Tensor::data<", dtype_name(dtype_of<T>::value),
                 ">() called on a ", dtype_name(dtype()), " tensor");
  return static_cast<T*>(raw_data());
}

}  // namespace dilatron
