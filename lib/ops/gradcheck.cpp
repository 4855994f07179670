#include "dilatron/gradcheck.h"

#include <algorithm>
#include <cmath>
#include <ostream>
#include <sstream>

#include "dilatron/autograd.h"
#include "dilatron/ops.h"

namespace dilatron {
namespace {

// Folds one (analytic, numerical) pair into the result; the first failure names `where` (called
// only then) in its message.
template <typename Where>
void compare(GradcheckResult& result, double analytic, double numerical, const GradcheckOptions& opts,
             Where&& where) {
  const double err = std::abs(analytic - numerical);
  result.max_abs_error = std::max(result.max_abs_error, err);
  result.max_rel_error = std::max(result.max_rel_error, err / std::max(std::abs(numerical), 1e-12));
  if (!(err <= opts.atol + opts.rtol * std::abs(numerical)) && result.ok) {
    result.ok = false;
    std::ostringstream os;
    where(os);
    os << ": analytic " << analytic << " vs numerical " << numerical;
    result.message = os.str();
  }
}

}  // namespace

GradcheckResult gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                          const std::vector<Tensor>& inputs, const GradcheckOptions& opts) {
  std::vector<Tensor> xs;
  std::vector<size_t> checked;
  for (size_t k = 0; k < inputs.size(); ++k) {
    const Tensor& in = inputs[k];
    if (in.defined() && in.requires_grad()) {
      DILATRON_CHECK(in.dtype() == DType::Float64, "gradcheck: input ", k, " is ", dtype_name(in.dtype()),
                     "; finite differences need float64");
      // Private contiguous leaf copies, so perturbing them cannot touch the caller's tensors.
      Tensor x;
      {
        autograd::NoGradGuard g;
        x = in.detach().contiguous().clone();
      }
      x.requires_grad_(true);
      xs.push_back(x);
      checked.push_back(k);
    } else {
      xs.push_back(in);
    }
  }
  DILATRON_CHECK(!checked.empty(), "gradcheck: no input requires grad");

  Tensor out0;
  {
    autograd::NoGradGuard g;
    out0 = f(xs);
  }
  const int64_t n_out = out0.numel();

  // Analytic Jacobian rows: one backward per output element.
  std::vector<std::vector<double>> analytic(checked.size());
  for (size_t c = 0; c < checked.size(); ++c)
    analytic[c].assign(static_cast<size_t>(xs[checked[c]].numel() * n_out), 0.0);
  for (int64_t o = 0; o < n_out; ++o) {
    for (size_t c : checked) xs[c].set_grad(Tensor());
    Tensor out = f(xs);
    DILATRON_CHECK(out.requires_grad(), "gradcheck: the output does not depend on any checked input");
    std::vector<double> seed(static_cast<size_t>(n_out), 0.0);
    seed[static_cast<size_t>(o)] = 1.0;
    out.backward(Tensor::from_vector(seed, out.shape(), out.options()));
    for (size_t c = 0; c < checked.size(); ++c) {
      Tensor g = xs[checked[c]].grad();
      if (!g.defined()) continue;
      const std::vector<double> gv = g.to_vector<double>();
      for (size_t i = 0; i < gv.size(); ++i) analytic[c][i * static_cast<size_t>(n_out) + static_cast<size_t>(o)] = gv[i];
    }
  }

  GradcheckResult result;
  autograd::NoGradGuard no_grad;
  for (size_t c = 0; c < checked.size(); ++c) {
    Tensor& x = xs[checked[c]];
    double* p = x.data<double>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double orig = p[i];
      p[i] = orig + opts.eps;
      const std::vector<double> plus = f(xs).to_vector<double>();
      p[i] = orig - opts.eps;
      const std::vector<double> minus = f(xs).to_vector<double>();
      p[i] = orig;
      for (int64_t o = 0; o < n_out; ++o) {
        const double num = (plus[static_cast<size_t>(o)] - minus[static_cast<size_t>(o)]) / (2.0 * opts.eps);
        compare(result, analytic[c][static_cast<size_t>(i * n_out + o)], num, opts, [&](std::ostream& os) {
          os << "input " << checked[c] << " element " << i << ", output element " << o;
        });
      }
    }
  }
  return result;
}

GradcheckResult gradcheck_parameters(const std::function<Tensor()>& loss, const std::vector<Tensor>& params,
                                     int64_t max_elements, const GradcheckOptions& opts) {
  for (size_t k = 0; k < params.size(); ++k) {
    DILATRON_CHECK(params[k].dtype() == DType::Float64 && params[k].is_leaf() && params[k].is_contiguous(),
                   "gradcheck_parameters: parameter ", k, " must be a contiguous float64 leaf");
    Tensor(params[k]).set_grad(Tensor());
  }
  Tensor l = loss();
  DILATRON_CHECK(l.numel() == 1, "gradcheck_parameters: the loss must be a scalar, got shape ", shape_str(l.shape()));
  l.backward();
  GradcheckResult result;
  autograd::NoGradGuard no_grad;
  for (size_t k = 0; k < params.size(); ++k) {
    const Tensor& p = params[k];
    const std::vector<double> analytic =
        p.grad().defined() ? p.grad().to_vector<double>() : std::vector<double>(static_cast<size_t>(p.numel()), 0.0);
    double* data = p.data<double>();
    const int64_t stride = std::max<int64_t>(1, p.numel() / std::max<int64_t>(max_elements, 1));
    for (int64_t i = 0; i < p.numel(); i += stride) {
      const double orig = data[i];
      data[i] = orig + opts.eps;
      const double plus = loss().item();
      data[i] = orig - opts.eps;
      const double minus = loss().item();
      data[i] = orig;
      compare(result, analytic[static_cast<size_t>(i)], (plus - minus) / (2.0 * opts.eps), opts,
              [&](std::ostream& os) { os << "parameter " << k << " element " << i; });
    }
  }
  return result;
}

}  // namespace dilatron
