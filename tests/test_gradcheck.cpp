// Every built-in gradient check (the table `dilatron gradcheck` prints) passes, and the checker
// itself catches a wrong backward.
#include <gtest/gtest.h>

#include "dilatron/autograd.h"
#include "dilatron/gradcheck.h"
#include "dilatron/ops.h"
#include "dilatron/random.h"

using namespace dilatron;

namespace {

// exp with a deliberately wrong backward (missing the factor exp(x)).
struct BrokenExp : autograd::Function<BrokenExp> {
  static const char* name() { return "BrokenExp"; }
  static Tensor forward(autograd::Context&, const Tensor& x) { return exp(x); }
  static std::vector<Tensor> backward(autograd::Context&, const std::vector<Tensor>& g) { return {g[0]}; }
};

}  // namespace

TEST(Gradcheck, CatchesAWrongBackward) {
  Generator gen(5);
  Tensor x = Tensor::randn({3, 4}, gen, TensorOptions(DType::Float64).with_requires_grad());
  const GradcheckResult r = gradcheck([](const std::vector<Tensor>& in) { return BrokenExp::apply(in[0]); }, {x});
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.message.find("analytic"), std::string::npos) << r.message;
}

TEST(Gradcheck, RequiresFloat64Inputs) {
  Generator gen(5);
  Tensor x = Tensor::randn({3}, gen, TensorOptions(DType::Float32).with_requires_grad());
  try {
    gradcheck([](const std::vector<Tensor>& in) { return exp(in[0]); }, {x});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("float32"), std::string::npos) << e.what();
  }
}

class BuiltinGradcheck : public ::testing::TestWithParam<size_t> {};

TEST_P(BuiltinGradcheck, Passes) {
  const GradcheckCase& c = builtin_gradcheck_cases().at(GetParam());
  const GradcheckResult r = c.run();
  EXPECT_TRUE(r.ok) << c.op << ": " << r.message;
}

INSTANTIATE_TEST_SUITE_P(AllOps, BuiltinGradcheck, ::testing::Range<size_t>(0, builtin_gradcheck_cases().size()),
                         [](const ::testing::TestParamInfo<size_t>& info) {
                           std::string name;
                           for (char ch : builtin_gradcheck_cases()[info.param].op)
                             name += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return name;
                         });
