#include "dilatron/autograd.h"

#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron::autograd {
namespace {

thread_local bool t_grad_enabled = true;

// Leaf sink: adds incoming gradients into the leaf's .grad.
struct AccumulateGrad : Node {
  std::weak_ptr<TensorImpl> leaf;
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override {
    auto impl = leaf.lock();
    if (!impl || !grads[0].defined()) return {};
    Tensor g = grads[0];
    if (impl->grad) {
      g = add(Tensor(impl->grad), g);
    } else if (g.storage().use_count() > 1 || !g.is_contiguous() || g.dtype() != impl->dtype) {
      // Own the buffer: optimizers and clipping modify .grad in place.
      g = g.to(impl->dtype).clone();
    }
    impl->grad = g.impl_ptr();
    return {};
  }
  std::string name() const override { return "AccumulateGrad"; }
};

Tensor ones_like_root(const Tensor& root) {
  DILATRON_CHECK(root.numel() == 1, "backward() without a gradient needs a one-element output, got shape ",
                 shape_str(root.shape()), "; pass the output gradient explicitly");
  return Tensor::ones(root.shape(), root.options());
}

}  // namespace

bool grad_enabled() { return t_grad_enabled; }
void set_grad_enabled(bool enabled) { t_grad_enabled = enabled; }

Edge gradient_edge(const Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return {};
  auto& impl = t.impl();
  if (impl.grad_fn) return {impl.grad_fn, impl.output_nr};
  auto acc = impl.grad_accumulator.lock();
  if (!acc) {
    auto a = std::make_shared<AccumulateGrad>();
    a->leaf = t.impl_ptr();
    a->output_shapes = {t.shape()};
    a->output_options = {t.options()};
    impl.grad_accumulator = a;
    acc = a;
  }
  return {acc, 0};
}

bool any_requires_grad(const std::vector<Tensor>& ts) {
  if (!grad_enabled()) return false;
  for (const auto& t : ts)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

void set_history(std::vector<Tensor>& outputs, const std::shared_ptr<Node>& node) {
  node->num_outputs = static_cast<uint32_t>(outputs.size());
  node->output_shapes.clear();
  node->output_options.clear();
  for (uint32_t i = 0; i < outputs.size(); ++i) {
    Tensor& out = outputs[i];
    node->output_shapes.push_back(out.defined() ? out.shape() : Shape{});
    node->output_options.push_back(out.defined() ? out.options() : TensorOptions{});
    if (!out.defined() || !is_floating(out.dtype())) continue;
    auto& impl = out.impl();
    impl.requires_grad = true;
    impl.grad_fn = node;
    impl.output_nr = i;
  }
}

void Context::save_for_backward(std::vector<Tensor> ts) {
  saved_.clear();
  for (auto& t : ts) saved_.push_back(t.defined() ? t.detach() : Tensor());
}

const std::vector<Tensor>& Context::saved() const {
  DILATRON_CHECK(!released_, "trying to backward through the graph a second time: its saved tensors were freed "
                 "by the first backward (pass retain_graph=true to keep them)");
  return saved_;
}

void Context::release() {
  saved_.clear();
  data_.clear();
  released_ = true;
}

namespace detail {

std::vector<Tensor> FunctionNode::apply(std::vector<Tensor>&& grad_outputs) {
  DILATRON_CHECK(backward_fn != nullptr, "trying to backward through the graph a second time (through ", op_name,
                 "): it was freed by the first backward (pass retain_graph=true to keep it)");
  return backward_fn(ctx, grad_outputs);
}

std::vector<Tensor> wrap_outputs(std::vector<Tensor> outputs, const std::vector<Tensor>& inputs,
                                 std::shared_ptr<FunctionNode> node) {
  // An output that is one of the inputs (or already has a history) gets its own TensorImpl.
  for (auto& out : outputs) {
    if (!out.defined()) continue;
    bool aliased = out.grad_fn() != nullptr || out.requires_grad();
    for (const auto& in : inputs) aliased = aliased || (in.defined() && in.same(out));
    if (aliased) out = make_view(out, out.shape(), out.strides(), out.offset());
  }
  if (!any_requires_grad(inputs)) return outputs;
  for (const auto& in : inputs) node->next_edges.push_back(gradient_edge(in));
  set_history(outputs, node);
  return outputs;
}

}  // namespace detail

void backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads, bool retain_graph) {
  DILATRON_CHECK(roots.size() == grads.size(), "backward: ", roots.size(), " outputs but ", grads.size(),
                 " gradients");
  NoGradGuard no_grad;
  // Seed gradients per (node, output slot).
  std::unordered_map<Node*, std::vector<Tensor>> pending;
  std::vector<std::shared_ptr<Node>> root_nodes;
  for (size_t i = 0; i < roots.size(); ++i) {
    const Tensor& r = roots[i];
    DILATRON_CHECK(r.requires_grad(), "backward: output ", i, " (shape ", shape_str(r.shape()),
                   ") does not require grad and has no grad_fn");
    Tensor g = grads[i].defined() ? grads[i] : ones_like_root(r);
    DILATRON_CHECK(g.shape() == r.shape(), "backward: gradient shape ", shape_str(g.shape()),
                   " does not match output shape ", shape_str(r.shape()));
    Edge e = gradient_edge(r);
    auto& slot = pending[e.fn.get()];
    slot.resize(e.fn->num_outputs);
    slot[e.input_nr] = slot[e.input_nr].defined() ? add(slot[e.input_nr], g) : g;
    root_nodes.push_back(e.fn);
  }

  // Count, for every node reachable from the roots, how many edges lead into it.
  std::unordered_map<Node*, int> deps;
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack;
  for (auto& n : root_nodes)
    if (seen.insert(n.get()).second) stack.push_back(n.get());
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (const auto& e : n->next_edges) {
      if (!e.fn) continue;
      deps[e.fn.get()]++;
      if (seen.insert(e.fn.get()).second) stack.push_back(e.fn.get());
    }
  }

  std::vector<std::shared_ptr<Node>> ready;
  for (auto& n : root_nodes)
    if (deps[n.get()] == 0) {
      deps[n.get()] = -1;  // queued
      ready.push_back(n);
    }
  while (!ready.empty()) {
    std::shared_ptr<Node> node = ready.back();
    ready.pop_back();
    std::vector<Tensor> gout = std::move(pending[node.get()]);
    pending.erase(node.get());
    gout.resize(node->num_outputs);
    bool any = false;
    for (uint32_t i = 0; i < gout.size(); ++i) {
      if (gout[i].defined()) {
        any = true;
      } else if (i < node->output_shapes.size()) {
        gout[i] = Tensor::zeros(node->output_shapes[i], node->output_options[i]);
      }
    }
    std::vector<Tensor> gin;
    if (any) {
      DILATRON_CHECK(!node->released, "trying to backward through the graph a second time (through ", node->name(),
                     "): it was freed by the first backward (pass retain_graph=true to keep it)");
      std::optional<profiler::Scope> scope;
      if (profiler::enabled()) scope.emplace(node->name(), /*backward=*/!dynamic_cast<AccumulateGrad*>(node.get()));
      gin = node->apply(std::move(gout));
      DILATRON_CHECK(gin.size() == node->next_edges.size() || node->next_edges.empty(), "autograd: op ",
                     node->name(), " returned ", gin.size(), " gradients for ", node->next_edges.size(), " inputs");
    }
    if (!retain_graph && !dynamic_cast<AccumulateGrad*>(node.get())) {
      node->release();
      node->released = true;
    }
    for (size_t k = 0; k < node->next_edges.size(); ++k) {
      const Edge& e = node->next_edges[k];
      if (!e.fn) continue;
      if (k < gin.size() && gin[k].defined()) {
        auto& slot = pending[e.fn.get()];
        slot.resize(e.fn->num_outputs);
        Tensor& acc = slot[e.input_nr];
        if (acc.defined()) {
          profiler::Scope scope("gradient sum");  // a tensor used more than once
          acc = add(acc, gin[k]);
        } else {
          acc = gin[k];
        }
      }
      if (--deps[e.fn.get()] == 0) ready.push_back(e.fn);
    }
  }
}

}  // namespace dilatron::autograd
