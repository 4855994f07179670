// Finite-difference gradient check, as torch.autograd.gradcheck: central differences in float64
// against the analytic Jacobian from backward(), elementwise |a - n| <= atol + rtol * |n|.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "dilatron/tensor.h"

namespace dilatron {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-5;
  double rtol = 1e-3;
};

struct GradcheckResult {
  bool ok = true;
  double max_abs_error = 0.0;  // over all Jacobian entries
  double max_rel_error = 0.0;  // |a - n| / max(|n|, tiny)
  std::string message;         // the first failing entry, or empty
};

// f maps the inputs to one floating output. Inputs that require grad are perturbed and checked;
// they must be float64. Undefined gradients count as zeros.
GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& opts = {});

}  // namespace dilatron

namespace dilatron {

// The library's own gradient checks: one representative awkward case per differentiable op
// (attention included), run by `dilatron gradcheck` and by the test suite.
struct GradcheckCase {
  std::string op;
  std::function<GradcheckResult()> run;
};
const std::vector<GradcheckCase>& builtin_gradcheck_cases();

}  // namespace dilatron

namespace dilatron {

// The same check for a scalar loss of parameters held elsewhere (a model's): analytic gradients from
// one backward, central differences by perturbing each parameter element in place (every element, or
// an evenly spaced max_elements of each parameter). Parameters must be float64 leaves.
GradcheckResult gradcheck_parameters(const std::function<Tensor()>& loss, const std::vector<Tensor>& params,
                                     int64_t max_elements = 1 << 30, const GradcheckOptions& opts = {});

}  // namespace dilatron
