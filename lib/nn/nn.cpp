#include "dilatron/nn.h"

#include <cmath>
#include <limits>

#include "dilatron/ops.h"

namespace dilatron::nn {

// ---------------------------------------------------------------- Module

void Module::check_new_name(const std::string& name) const {
  DILATRON_CHECK(!name.empty() && name.find('.') == std::string::npos, "Module: invalid name \"", name,
                 "\" (must be non-empty, without '.')");
  for (const auto& [n, p] : params_) DILATRON_CHECK(n != name, "Module: a parameter named \"", name, "\" already exists");
  for (const auto& [n, m] : children_) DILATRON_CHECK(n != name, "Module: a submodule named \"", name, "\" already exists");
}

Tensor Module::register_parameter(const std::string& name, Tensor t) {
  check_new_name(name);
  DILATRON_CHECK(t.defined(), "Module: parameter \"", name, "\" is undefined");
  DILATRON_CHECK(t.is_leaf(), "Module: parameter \"", name, "\" must be a leaf tensor (detach it first)");
  t.requires_grad_(true);
  params_.emplace_back(name, t);
  return t;
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> module) {
  check_new_name(name);
  DILATRON_CHECK(module != nullptr, "Module: submodule \"", name, "\" is null");
  children_.emplace_back(name, std::move(module));
}

void Module::collect(const std::string& prefix, NamedParameters& out) const {
  for (const auto& [name, p] : params_) out.emplace_back(prefix + name, p);
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

NamedParameters Module::named_parameters() const {
  NamedParameters out;
  collect("", out);
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (auto& [name, p] : named_parameters()) out.push_back(p);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (const auto& [name, p] : named_parameters()) n += p.numel();
  return n;
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [name, child] : children_) child->train(on);
}

void Module::zero_grad() {
  for (auto& [name, p] : named_parameters()) p.set_grad(Tensor());
}

// ---------------------------------------------------------------- layers

Linear::Linear(int64_t in_features, int64_t out_features, Generator& gen, bool with_bias, TensorOptions opts)
    : in_features(in_features), out_features(out_features) {
  DILATRON_CHECK(in_features > 0 && out_features > 0, "Linear: features must be positive, got in ", in_features,
                 ", out ", out_features);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  weight = register_parameter("weight", Tensor::uniform({out_features, in_features}, -bound, bound, gen, opts));
  if (with_bias) bias = register_parameter("bias", Tensor::uniform({out_features}, -bound, bound, gen, opts));
}

// Leading dims are flattened so the product is one 2-D GEMM against the transposed weight.
Tensor Linear::forward(const Tensor& x) {
  DILATRON_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "Linear: expected input [..., ", in_features, "], got ",
                 shape_str(x.shape()));
  Shape out_shape = x.shape();
  out_shape.back() = out_features;
  // A bfloat16 input runs on bf16 copies of float32 parameters (mixed precision); the copies' backward
  // accumulates float32 gradients into the parameters.
  const DType dtype = x.dtype() == DType::BFloat16 ? x.dtype() : weight.dtype();
  Tensor y = matmul(reshape(x, {-1, in_features}), transpose(weight.to(dtype), 0, 1));
  if (bias.defined()) y = add(y, bias.to(dtype));
  return reshape(y, out_shape);
}

LayerNorm::LayerNorm(int64_t dim, double eps, bool affine, TensorOptions opts) : dim(dim), eps(eps) {
  DILATRON_CHECK(dim > 0, "LayerNorm: dim must be positive, got ", dim);
  if (affine) {
    weight = register_parameter("weight", Tensor::ones({dim}, opts));
    bias = register_parameter("bias", Tensor::zeros({dim}, opts));
  }
}

Tensor LayerNorm::forward(const Tensor& x) { return layer_norm(x, weight, bias, eps); }

Embedding::Embedding(int64_t num_embeddings, int64_t dim, Generator& gen, double init_std, TensorOptions opts)
    : num_embeddings(num_embeddings), dim(dim) {
  DILATRON_CHECK(num_embeddings > 0 && dim > 0, "Embedding: sizes must be positive, got ", num_embeddings, " x ",
                 dim);
  weight = register_parameter("weight", Tensor::randn({num_embeddings, dim}, gen, opts, 0.0, init_std));
}

Tensor Embedding::forward(const Tensor& indices) { return embedding(weight, indices); }

Dropout::Dropout(double p, std::shared_ptr<Generator> gen) : p(p), gen_(std::move(gen)) {
  DILATRON_CHECK(p >= 0.0 && p < 1.0, "Dropout: p must be in [0, 1), got ", p);
  DILATRON_CHECK(gen_ != nullptr, "Dropout: needs a generator");
}

Tensor Dropout::forward(const Tensor& x) {
  if (!is_training() || p == 0.0) return x;
  const uint64_t offset = gen_->next_offset();
  DILATRON_CHECK(offset <= std::numeric_limits<uint32_t>::max(), "Dropout: generator offset ", offset,
                 " exceeds the 32-bit dropout offset");
  return dropout(x, p, true, gen_->seed(), static_cast<uint32_t>(offset));
}

Sequential& Sequential::append(std::function<Tensor(const Tensor&)> fn) {
  DILATRON_CHECK(fn != nullptr, "Sequential: layer ", layers_.size(), " is an empty function");
  layers_.push_back(std::move(fn));
  return *this;
}

Tensor Sequential::forward(const Tensor& x) {
  Tensor y = x;
  for (auto& layer : layers_) y = layer(y);
  return y;
}

}  // namespace dilatron::nn
