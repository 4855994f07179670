// Modules, as torch.nn: a Module owns named parameters and child modules. Names are hierarchical
// ("blocks.3.attn.qkv.weight") and every listing is in registration order, so checkpoints and
// optimizer state line up run after run.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dilatron/random.h"
#include "dilatron/tensor.h"

namespace dilatron::nn {

using NamedParameters = std::vector<std::pair<std::string, Tensor>>;

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  // Parameters are shared handles, so a copy would silently alias them.
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Makes t a leaf that requires grad, records it under name and returns it (the same tensor).
  Tensor register_parameter(const std::string& name, Tensor t);
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    add_child(name, module);
    return module;
  }

  // This module's own parameters, then each child's under "<child name>.", as torch's named_parameters.
  NamedParameters named_parameters() const;
  std::vector<Tensor> parameters() const;
  int64_t num_parameters() const;  // total elements
  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& named_children() const { return children_; }

  // Training mode (dropout active) for this module and all below it.
  void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }

  // Drops every parameter's gradient (undefined, like torch's set_to_none=True).
  void zero_grad();

 private:
  void check_new_name(const std::string& name) const;
  void add_child(const std::string& name, std::shared_ptr<Module> module);
  void collect(const std::string& prefix, NamedParameters& out) const;

  NamedParameters params_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

// y = x W^T + b for x [..., in_features]. W is [out_features, in_features] (PyTorch's layout),
// initialised like PyTorch: W and b uniform in +-1/sqrt(in_features). A bfloat16 x over float32
// parameters computes in bfloat16 (mixed precision, as torch.autocast casts them).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, Generator& gen, bool bias = true, TensorOptions opts = {});
  Tensor forward(const Tensor& x);

  const int64_t in_features, out_features;
  Tensor weight;  // [out_features, in_features]
  Tensor bias;    // [out_features], undefined without bias
};

// Normalises the last dim; weight (ones) and bias (zeros) [dim] when affine.
class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, bool affine = true, TensorOptions opts = {});
  Tensor forward(const Tensor& x);

  const int64_t dim;
  const double eps;
  Tensor weight, bias;  // undefined without affine
};

// indices (int64, any shape) -> [..., dim]. weight ~ N(0, init_std^2): 1 is PyTorch's default,
// GPT-2 uses 0.02.
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t dim, Generator& gen, double init_std = 1.0, TensorOptions opts = {});
  Tensor forward(const Tensor& indices);

  const int64_t num_embeddings, dim;
  Tensor weight;  // [num_embeddings, dim]
};

// Inverted dropout. Every training-mode forward with p > 0 takes the next offset of the shared
// generator (seed, offset) for its mask, so the masks of a run follow from the generator's state,
// which is what a checkpoint saves. Eval mode and p = 0 take no offset.
class Dropout : public Module {
 public:
  Dropout(double p, std::shared_ptr<Generator> gen);
  Tensor forward(const Tensor& x);

  const double p;

 private:
  std::shared_ptr<Generator> gen_;
};

// Runs its layers in order. A layer is a module with Tensor forward(const Tensor&) (registered as
// child "<index>") or a parameter-free function such as an activation, which takes an index too,
// as nn.ReLU() does in torch's nn.Sequential.
class Sequential : public Module {
 public:
  template <typename M>
  Sequential& append(std::shared_ptr<M> module) {
    register_module(std::to_string(layers_.size()), module);
    layers_.push_back([module](const Tensor& x) { return module->forward(x); });
    return *this;
  }
  Sequential& append(std::function<Tensor(const Tensor&)> fn);
  Tensor forward(const Tensor& x);
  size_t size() const { return layers_.size(); }

 private:
  std::vector<std::function<Tensor(const Tensor&)>> layers_;
};

}  // namespace dilatron::nn
