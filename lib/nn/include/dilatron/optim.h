// Optimizers (AdamW, SGD), gradient clipping and learning-rate schedules, as torch.optim.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "dilatron/nn.h"
#include "dilatron/tensor.h"

namespace dilatron::optim {

using nn::NamedParameters;

struct ParamGroup {
  NamedParameters params;
  double lr = 1e-3;
  double weight_decay = 0.0;
};

// Parameter names must be unique across groups: optimizer state is addressed by them.
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update from the current .grad of every parameter; parameters without a grad are skipped.
  virtual void step() = 0;
  // Drops every parameter's gradient (undefined, like torch's set_to_none=True).
  void zero_grad();

  std::vector<ParamGroup>& param_groups() { return groups_; }
  const std::vector<ParamGroup>& param_groups() const { return groups_; }
  void set_lr(double lr);  // every group (what a schedule calls before each step)

  // Steps taken so far (bias corrections use it); a checkpoint saves and restores it.
  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t n);

  // Per-parameter state (AdamW: "m", "v"; SGD with momentum: "momentum"), zeros of the
  // parameter's shape allocated at construction, so a checkpoint is restored by copying into
  // state(name, key) before the first step.
  const std::vector<std::string>& state_keys() const { return state_keys_; }
  Tensor state(const std::string& param_name, const std::string& key) const;

 protected:
  Optimizer(std::vector<ParamGroup> groups, std::vector<std::string> state_keys);
  // State `key` (an index into state_keys) of parameter `index`, counting through the groups in order.
  Tensor& state_at(size_t index, size_t key) { return state_[index][key]; }

  std::vector<ParamGroup> groups_;
  int64_t step_count_ = 0;

 private:
  std::vector<std::string> state_keys_;
  std::vector<std::vector<Tensor>> state_;
  std::unordered_map<std::string, size_t> index_of_;
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// torch.optim.AdamW (decoupled weight decay, bias-corrected moments), one fused kernel per parameter.
class AdamW : public Optimizer {
 public:
  // One group with opts.lr and opts.weight_decay.
  explicit AdamW(const NamedParameters& params, const AdamWOptions& opts = {});
  // Explicit groups: their lr and weight_decay replace opts'.
  explicit AdamW(std::vector<ParamGroup> groups, const AdamWOptions& opts = {});
  void step() override;

 private:
  AdamWOptions opts_;
};

struct SGDOptions {
  double lr = 1e-2;
  double momentum = 0.0;
  double weight_decay = 0.0;  // L2, added to the gradient as torch.optim.SGD does
  bool nesterov = false;
};

// torch.optim.SGD without dampening: buf = momentum * buf + g; p -= lr * (nesterov ? g + momentum * buf : buf).
class SGD : public Optimizer {
 public:
  explicit SGD(const NamedParameters& params, const SGDOptions& opts = {});
  explicit SGD(std::vector<ParamGroup> groups, const SGDOptions& opts = {});
  void step() override;

 private:
  SGDOptions opts_;
};

// GPT convention: {decay group: tensors of dim >= 2 (matmul weights, embeddings),
// no-decay group: dim < 2 (biases, norm gains)}, both with lr; parameter order is kept.
std::vector<ParamGroup> weight_decay_groups(const NamedParameters& params, double lr, double weight_decay);

// torch.nn.utils.clip_grad_norm_: when the L2 norm over all gradients exceeds max_norm, scales
// them by max_norm / (norm + 1e-6). Returns the norm before clipping. Deterministic: per-tensor
// sums of squares (accumulated in double) are added in parameter order.
double clip_grad_norm_(const std::vector<Tensor>& params, double max_norm);

// Learning rate as a pure function of the 0-based step, so resuming needs only the step count.
class LRSchedule {
 public:
  virtual ~LRSchedule() = default;
  virtual double lr_at(int64_t step) const = 0;
};

class ConstantLR final : public LRSchedule {
 public:
  explicit ConstantLR(double lr) : lr_(lr) {}
  double lr_at(int64_t) const override { return lr_; }

 private:
  double lr_;
};

// Linear warmup base_lr * (step + 1) / warmup_steps for step < warmup_steps, then a half cosine
// from base_lr down to min_lr at total_steps, and min_lr after. A run shorter than its warmup
// only warms up.
class WarmupCosine final : public LRSchedule {
 public:
  WarmupCosine(double base_lr, int64_t warmup_steps, int64_t total_steps, double min_lr = 0.0);
  double lr_at(int64_t step) const override;

 private:
  double base_lr_;
  int64_t warmup_steps_, total_steps_;
  double min_lr_;
};

}  // namespace dilatron::optim
