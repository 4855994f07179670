#include "dilatron/optim.h"

#include <cmath>
#include <numbers>

#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron::optim {

// ---------------------------------------------------------------- Optimizer

Optimizer::Optimizer(std::vector<ParamGroup> groups, std::vector<std::string> state_keys)
    : groups_(std::move(groups)), state_keys_(std::move(state_keys)) {
  for (const auto& g : groups_) {
    DILATRON_CHECK(g.lr >= 0.0, "optimizer: lr must be >= 0, got ", g.lr);
    DILATRON_CHECK(g.weight_decay >= 0.0, "optimizer: weight_decay must be >= 0, got ", g.weight_decay);
    for (const auto& [name, p] : g.params) {
      DILATRON_CHECK(p.defined() && is_floating(p.dtype()), "optimizer: parameter \"", name,
                     "\" must be a defined float tensor");
      DILATRON_CHECK(index_of_.emplace(name, state_.size()).second, "optimizer: parameter name \"", name,
                     "\" appears twice");
      std::vector<Tensor> state;
      for (size_t k = 0; k < state_keys_.size(); ++k) state.push_back(Tensor::zeros(p.shape(), p.options()));
      state_.push_back(std::move(state));
    }
  }
}

void Optimizer::zero_grad() {
  for (auto& g : groups_)
    for (auto& [name, p] : g.params) p.set_grad(Tensor());
}

void Optimizer::set_lr(double lr) {
  DILATRON_CHECK(lr >= 0.0, "optimizer: lr must be >= 0, got ", lr);
  for (auto& g : groups_) g.lr = lr;
}

void Optimizer::set_step_count(int64_t n) {
  DILATRON_CHECK(n >= 0, "optimizer: step count must be >= 0, got ", n);
  step_count_ = n;
}

Tensor Optimizer::state(const std::string& param_name, const std::string& key) const {
  const auto it = index_of_.find(param_name);
  DILATRON_CHECK(it != index_of_.end(), "optimizer: no parameter named \"", param_name, "\"");
  for (size_t k = 0; k < state_keys_.size(); ++k)
    if (state_keys_[k] == key) return state_[it->second][k];
  throw Error(detail::concat("optimizer: no state \"", key, "\" for parameter \"", param_name, "\""));
}

// ---------------------------------------------------------------- AdamW

AdamW::AdamW(const NamedParameters& params, const AdamWOptions& opts)
    : AdamW(std::vector<ParamGroup>{{params, opts.lr, opts.weight_decay}}, opts) {}

AdamW::AdamW(std::vector<ParamGroup> groups, const AdamWOptions& opts)
    : Optimizer(std::move(groups), {"m", "v"}), opts_(opts) {
  DILATRON_CHECK(opts.beta1 >= 0.0 && opts.beta1 < 1.0 && opts.beta2 >= 0.0 && opts.beta2 < 1.0,
                 "AdamW: betas must be in [0, 1), got (", opts.beta1, ", ", opts.beta2, ")");
  DILATRON_CHECK(opts.eps >= 0.0, "AdamW: eps must be >= 0, got ", opts.eps);
}

void AdamW::step() {
  ++step_count_;
  size_t index = 0;
  for (auto& g : groups_) {
    const kernels::AdamWParams hp{g.lr, opts_.beta1, opts_.beta2, opts_.eps, g.weight_decay, step_count_};
    for (auto& [name, p] : g.params) {
      const Tensor grad = p.grad();
      if (grad.defined()) kernels::backend_of(p).adamw_step(p, grad, state_at(index, 0), state_at(index, 1), hp);
      ++index;
    }
  }
}

// ---------------------------------------------------------------- SGD

SGD::SGD(const NamedParameters& params, const SGDOptions& opts)
    : SGD(std::vector<ParamGroup>{{params, opts.lr, opts.weight_decay}}, opts) {}

SGD::SGD(std::vector<ParamGroup> groups, const SGDOptions& opts)
    : Optimizer(std::move(groups), opts.momentum != 0.0 ? std::vector<std::string>{"momentum"}
                                                        : std::vector<std::string>{}),
      opts_(opts) {
  DILATRON_CHECK(opts.momentum >= 0.0, "SGD: momentum must be >= 0, got ", opts.momentum);
  DILATRON_CHECK(!opts.nesterov || opts.momentum > 0.0, "SGD: nesterov needs momentum > 0");
}

void SGD::step() {
  autograd::NoGradGuard no_grad;
  ++step_count_;
  size_t index = 0;
  for (auto& g : groups_) {
    for (auto& [name, p] : g.params) {
      Tensor d = p.grad();
      if (d.defined()) {
        if (g.weight_decay != 0.0) d = add(d, mul(p, g.weight_decay));
        if (opts_.momentum != 0.0) {
          Tensor& buf = state_at(index, 0);
          buf.copy_(add(mul(buf, opts_.momentum), d));
          d = opts_.nesterov ? add(d, mul(buf, opts_.momentum)) : buf;
        }
        p.copy_(sub(p, mul(d, g.lr)));
      }
      ++index;
    }
  }
}

// ---------------------------------------------------------------- helpers

std::vector<ParamGroup> weight_decay_groups(const NamedParameters& params, double lr, double weight_decay) {
  ParamGroup decay{{}, lr, weight_decay}, no_decay{{}, lr, 0.0};
  for (const auto& named : params) (named.second.dim() >= 2 ? decay : no_decay).params.push_back(named);
  return {decay, no_decay};
}

double clip_grad_norm_(const std::vector<Tensor>& params, double max_norm) {
  DILATRON_CHECK(max_norm > 0.0, "clip_grad_norm_: max_norm must be > 0, got ", max_norm);
  double sum_sq = 0.0;
  for (const auto& p : params) {
    const Tensor g = p.grad();
    if (g.defined()) sum_sq += kernels::backend_of(g).sum_squares(g);
  }
  const double norm = std::sqrt(sum_sq);
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    autograd::NoGradGuard no_grad;
    for (Tensor p : params) {
      const Tensor g = p.grad();
      if (g.defined()) p.set_grad(mul(g, coef));
    }
  }
  return norm;
}

// ---------------------------------------------------------------- schedules

WarmupCosine::WarmupCosine(double base_lr, int64_t warmup_steps, int64_t total_steps, double min_lr)
    : base_lr_(base_lr), warmup_steps_(warmup_steps), total_steps_(total_steps), min_lr_(min_lr) {
  DILATRON_CHECK(warmup_steps >= 0 && total_steps >= 0, "WarmupCosine: steps must be >= 0, got warmup_steps ",
                 warmup_steps, ", total_steps ", total_steps);
  DILATRON_CHECK(base_lr >= min_lr && min_lr >= 0.0, "WarmupCosine: need 0 <= min_lr (", min_lr, ") <= base_lr (",
                 base_lr, ")");
}

double WarmupCosine::lr_at(int64_t step) const {
  DILATRON_CHECK(step >= 0, "WarmupCosine: step must be >= 0, got ", step);
  if (step < warmup_steps_) return base_lr_ * static_cast<double>(step + 1) / static_cast<double>(warmup_steps_);
  if (step >= total_steps_) return min_lr_;
  const double progress =
      static_cast<double>(step - warmup_steps_) / static_cast<double>(total_steps_ - warmup_steps_);
  return min_lr_ + 0.5 * (1.0 + std::cos(std::numbers::pi * progress)) * (base_lr_ - min_lr_);
}

}  // namespace dilatron::optim
