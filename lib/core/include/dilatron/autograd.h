// Reverse-mode autograd: ops record Nodes, backward() walks them once and frees them.
//
// Define an op with a hand-written backward the way torch.autograd.Function does it:
//
//   struct Square : autograd::Function<Square> {
//     static Tensor forward(autograd::Context& ctx, const Tensor& x) {
//       ctx.save_for_backward({x});
//       return mul(x, x);                       // runs with grad recording off
//     }
//     static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
//       Tensor x = ctx.saved()[0];
//       return {mul(grads[0], mul_scalar(x, 2.0))};   // one gradient per Tensor argument of forward
//     }
//   };
//   Tensor y = Square::apply(x);
//
// forward may take any extra non-Tensor arguments (stored with ctx.set/ctx.get), and return one
// Tensor or a std::vector<Tensor>. backward receives one gradient per output (undefined when that
// output took no part in the loss, so check .defined()) and returns one per Tensor argument, in
// order (undefined for arguments that need none). backward runs with grad recording off.
#pragma once

#include <any>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dilatron/profiler.h"
#include "dilatron/tensor.h"

namespace dilatron::autograd {

struct Node;

struct Edge {
  std::shared_ptr<Node> fn;  // null: the input needs no gradient
  uint32_t input_nr = 0;     // which output of fn this edge feeds
};

struct Node : std::enable_shared_from_this<Node> {
  virtual ~Node() = default;
  // Gradients w.r.t. this node's outputs -> gradients w.r.t. its inputs (one per next_edges entry).
  virtual std::vector<Tensor> apply(std::vector<Tensor>&& grad_outputs) = 0;
  virtual std::string name() const = 0;
  // Frees saved tensors once backward has run through this node.
  virtual void release() {}

  std::vector<Edge> next_edges;
  uint32_t num_outputs = 1;
  std::vector<Shape> output_shapes;  // to materialise zeros for unused outputs
  std::vector<TensorOptions> output_options;
  bool released = false;
};

// Whether ops record the graph (thread-local, on by default).
bool grad_enabled();
void set_grad_enabled(bool enabled);

struct NoGradGuard {
  NoGradGuard() : prev_(grad_enabled()) { set_grad_enabled(false); }
  ~NoGradGuard() { set_grad_enabled(prev_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// Runs the backward pass from roots seeded with grads (same count; an undefined grad means ones
// for a one-element root and is an error otherwise).
void backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads, bool retain_graph = false);

// The edge through which a gradient for t flows (its grad_fn output, or its leaf accumulator).
Edge gradient_edge(const Tensor& t);

// Attach node as the producer of outputs (sets grad_fn/output_nr and requires_grad).
void set_history(std::vector<Tensor>& outputs, const std::shared_ptr<Node>& node);

// Does any of these tensors need a gradient (and is recording on)?
bool any_requires_grad(const std::vector<Tensor>& ts);

class Context {
 public:
  // Saved tensors are stored detached (storage shared, no graph), so saving an output makes no cycle.
  void save_for_backward(std::vector<Tensor> ts);
  const std::vector<Tensor>& saved() const;
  template <typename T>
  void set(const std::string& key, T value) { data_[key] = std::move(value); }
  template <typename T>
  T get(const std::string& key) const { return std::any_cast<T>(data_.at(key)); }
  // Which Tensor arguments of forward need a gradient (in order); backward may skip the others.
  std::vector<bool> needs_input_grad;
  void release();

 private:
  std::vector<Tensor> saved_;
  std::unordered_map<std::string, std::any> data_;
  bool released_ = false;
};

namespace detail {
inline void collect_tensors(std::vector<Tensor>&) {}
template <typename A, typename... Rest>
void collect_tensors(std::vector<Tensor>& out, const A& a, const Rest&... rest) {
  if constexpr (std::is_same_v<std::decay_t<A>, Tensor>) out.push_back(a);
  collect_tensors(out, rest...);
}

struct FunctionNode : Node {
  std::string op_name;
  Context ctx;
  std::function<std::vector<Tensor>(Context&, const std::vector<Tensor>&)> backward_fn;
  std::vector<Tensor> apply(std::vector<Tensor>&& grad_outputs) override;
  std::string name() const override { return op_name; }
  void release() override { ctx.release(); backward_fn = nullptr; }
};

std::vector<Tensor> wrap_outputs(std::vector<Tensor> outputs, const std::vector<Tensor>& inputs,
                                 std::shared_ptr<FunctionNode> node);
}  // namespace detail

template <typename Derived>
struct Function {
  // The op's name in error messages and graph dumps; override with a static const char* name().
  static const char* name() { return "Function"; }

  template <typename... Args>
  static auto apply(const Args&... args) {
    profiler::Scope scope(Derived::name());
    std::vector<Tensor> inputs;
    detail::collect_tensors(inputs, args...);
    auto node = std::make_shared<detail::FunctionNode>();
    node->op_name = Derived::name();
    for (const auto& t : inputs) node->ctx.needs_input_grad.push_back(t.defined() && t.requires_grad());
    using Result = decltype(Derived::forward(node->ctx, args...));
    std::vector<Tensor> outputs;
    {
      NoGradGuard guard;
      if constexpr (std::is_same_v<Result, Tensor>) {
        outputs.push_back(Derived::forward(node->ctx, args...));
      } else {
        outputs = Derived::forward(node->ctx, args...);
      }
    }
    node->backward_fn = [](Context& ctx, const std::vector<Tensor>& g) { return Derived::backward(ctx, g); };
    outputs = detail::wrap_outputs(std::move(outputs), inputs, std::move(node));
    if constexpr (std::is_same_v<Result, Tensor>) {
      return outputs[0];
    } else {
      return outputs;
    }
  }
};

}  // namespace dilatron::autograd
