// bfloat16: the conversions' edge cases, tensors, the parity contract (every bf16 op equals the
// float32 op on the bf16 inputs, rounded to bf16 once), gradients, the dilated attention's accuracy
// against the float64 oracle and the naive bf16 implementation (attention_reference.h), which is
// itself checked against the oracle, and HDF5 round trips.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <vector>

#include "attention_cases.h"
#include "attention_reference.h"
#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/hdf5.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"
#include "dilatron/random.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::error_message;

namespace {

constexpr DType kBF16 = DType::BFloat16;

uint16_t bf16_of(float f) { return bfloat16(f).bits; }
uint16_t bf16_of_bits(uint32_t float_bits) {
  float f;
  std::memcpy(&f, &float_bits, sizeof f);
  return bf16_of(f);
}
uint32_t float_bits_of(bfloat16 b) {
  const float f = b;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

std::vector<uint16_t> bits(const Tensor& t) {
  EXPECT_EQ(t.dtype(), kBF16);
  std::vector<uint16_t> out;
  for (bfloat16 b : t.to_vector<bfloat16>()) out.push_back(b.bits);
  return out;
}

// ---------------------------------------------------------------- conversions

TEST(BFloat16Convert, RoundsToNearestEvenBothWays) {
  EXPECT_EQ(bf16_of(1.0f), 0x3f80);
  EXPECT_EQ(bf16_of_bits(0x3f807fff), 0x3f80);  // below the halfway point
  EXPECT_EQ(bf16_of_bits(0x3f808000), 0x3f80);  // a tie, the even neighbour is below
  EXPECT_EQ(bf16_of_bits(0x3f808001), 0x3f81);  // above the halfway point
  EXPECT_EQ(bf16_of_bits(0x3f818000), 0x3f82);  // a tie, the even neighbour is above
  EXPECT_EQ(bf16_of_bits(0xbf818000), 0xbf82);  // the same, negative
  EXPECT_EQ(bf16_of_bits(0x3fffffff), 0x4000);  // a carry into the exponent
}

TEST(BFloat16Convert, MaxFiniteOverflowInfinitiesAndSignedZero) {
  EXPECT_EQ(bf16_of_bits(0x7f7f7fff), 0x7f7f);  // rounds down to the largest finite bf16
  EXPECT_EQ(static_cast<float>(bfloat16::from_bits(0x7f7f)), 3.38953139e38f);
  EXPECT_EQ(bf16_of_bits(0x7f7f8000), 0x7f80);  // the tie above it rounds to even: inf
  EXPECT_EQ(bf16_of(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(bf16_of(-std::numeric_limits<float>::max()), 0xff80);
  EXPECT_EQ(bf16_of(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(bf16_of(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(bf16_of(-0.0f), 0x8000);
  EXPECT_EQ(bf16_of(0.0f), 0x0000);
  EXPECT_EQ(bfloat16(1e300).bits, 0x7f80);  // a double beyond float's range too
}

TEST(BFloat16Convert, NaNStaysAQuietNaNWithItsSign) {
  // A payload only in the low 16 bits would truncate to inf: it must stay a NaN.
  EXPECT_EQ(bf16_of_bits(0x7f800001), 0x7fc0);
  EXPECT_EQ(bf16_of_bits(0xff800001), 0xffc0);
  EXPECT_EQ(bf16_of_bits(0x7fc00000), 0x7fc0);
  EXPECT_EQ(bf16_of_bits(0x7fffffff), 0x7fff);  // the rounding increment must not carry a NaN into inf/zero
  EXPECT_TRUE(std::isnan(static_cast<float>(bfloat16(std::nan("")))));
}

TEST(BFloat16Convert, Subnormals) {
  EXPECT_EQ(bf16_of_bits(0x00010000), 0x0001);  // the smallest bf16 subnormal, exact
  EXPECT_EQ(bf16_of_bits(0x00008000), 0x0000);  // half of it: a tie, to even (zero)
  EXPECT_EQ(bf16_of_bits(0x00018000), 0x0002);  // 1.5 of it: a tie, to even (2)
  EXPECT_EQ(bf16_of_bits(0x80008001), 0x8001);  // just above half, negative
  EXPECT_EQ(bf16_of_bits(0x00000001), 0x0000);  // the smallest float subnormal
  EXPECT_EQ(bf16_of_bits(0x007fffff), 0x0080);  // the largest float subnormal rounds up to the smallest normal
}

TEST(BFloat16Convert, EveryBf16IsExactAsFloatAndRoundTrips) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const auto v = bfloat16::from_bits(static_cast<uint16_t>(b));
    ASSERT_EQ(float_bits_of(v), b << 16) << b;
    const bool nan = (b & 0x7fff) > 0x7f80;
    // A NaN comes back quiet (0x0040 set), everything else unchanged.
    ASSERT_EQ(bf16_of(static_cast<float>(v)), nan ? (b | 0x0040) : b) << b;
  }
}

TEST(BFloat16Convert, DoubleRoundsOnceNotTwice) {
  // 1 + 2^-8 + 2^-30 lies just above the tie between 1 and 1 + 2^-7; through float (which drops
  // the 2^-30) it would become the tie and round to even, down to 1.
  const double above_tie = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30);
  EXPECT_EQ(bfloat16(above_tie).bits, 0x3f81);
  EXPECT_EQ(bfloat16(-above_tie).bits, 0xbf81);
  EXPECT_EQ(bfloat16(1.0 + std::ldexp(1.0, -8)).bits, 0x3f80);  // the exact tie: to even
  EXPECT_EQ(bfloat16(1.0 + std::ldexp(1.0, -8) - std::ldexp(1.0, -40)).bits, 0x3f80);
  EXPECT_EQ(bfloat16(std::ldexp(1.0, -134) * 1.0000001).bits, 0x0001);  // above half the smallest subnormal
  EXPECT_EQ(bfloat16(-std::ldexp(1.0, -160)).bits, 0x8000);
  // Integers: 257 is a tie between 256 and 258 (to 256), 259 between 258 and 260 (to 260).
  EXPECT_EQ(bfloat16(int64_t{257}).bits, bf16_of(256.0f));
  EXPECT_EQ(bfloat16(int64_t{259}).bits, bf16_of(260.0f));
}

// ---------------------------------------------------------------- tensors

TEST(BFloat16Tensor, DtypeBasics) {
  EXPECT_EQ(dtype_size(kBF16), 2u);
  EXPECT_STREQ(dtype_name(kBF16), "bfloat16");
  EXPECT_EQ(dtype_from_name("bfloat16"), kBF16);
  EXPECT_TRUE(is_floating(kBF16));
  EXPECT_EQ(compute_dtype(kBF16), DType::Float32);
  EXPECT_EQ(compute_dtype(DType::Float64), DType::Float64);
  EXPECT_EQ((dtype_of<bfloat16>::value), kBF16);
  EXPECT_NE(error_message([] { dtype_from_name("bf16"); }).find("bfloat16"), std::string::npos);
}

TEST(BFloat16Tensor, ConvertsFromAndToEveryDtype) {
  const std::vector<float> f = {1.0f, 1.00390625f, 1.01171875f, -3.3e38f, 1e-40f, -0.0f, 65504.5f};
  const Tensor b = Tensor::from_vector(f, {7}).to(kBF16);
  ASSERT_EQ(b.dtype(), kBF16);
  std::vector<uint16_t> want;
  for (float x : f) want.push_back(bf16_of(x));
  EXPECT_EQ(bits(b), want);
  // bf16 -> float32 is exact, and back gives the same bits.
  const std::vector<float> back = b.to_vector<float>();
  for (size_t i = 0; i < f.size(); ++i) EXPECT_EQ(back[i], static_cast<float>(bfloat16::from_bits(want[i])));
  EXPECT_EQ(bits(b.to(DType::Float32).to(kBF16)), want);
  // float64 rounds once (see DoubleRoundsOnceNotTwice); int64 and bool convert by value.
  const double above_tie = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30);
  EXPECT_EQ(bits(Tensor::from_vector<double>({above_tie}, {1}).to(kBF16)), std::vector<uint16_t>{0x3f81});
  EXPECT_EQ(bits(Tensor::from_vector<int64_t>({257, 259, -7}, {3}).to(kBF16)),
            (std::vector<uint16_t>{bf16_of(256.0f), bf16_of(260.0f), bf16_of(-7.0f)}));
  EXPECT_EQ(Tensor::from_vector<float>({2.5f, -3.0f, 0.0f}, {3}).to(kBF16).to(DType::Int64).to_vector<int64_t>(),
            (std::vector<int64_t>{2, -3, 0}));
  EXPECT_EQ(Tensor::from_vector<float>({2.5f, 0.0f}, {2}).to(kBF16).to(DType::Bool).to_vector<int64_t>(),
            (std::vector<int64_t>{1, 0}));
}

TEST(BFloat16Tensor, FillItemCopyContiguousAndPrinting) {
  const Tensor t = Tensor::full({2, 3}, 1.0 / 3.0, kBF16);
  EXPECT_EQ(bits(t), std::vector<uint16_t>(6, bfloat16(1.0 / 3.0).bits));
  EXPECT_EQ(t.at({1, 2}), 0.333984375);  // bf16's nearest to 1/3, exactly
  EXPECT_EQ(Tensor::scalar(-2.0, kBF16).item(), -2.0);
  EXPECT_NE(t.str().find("0.33398"), std::string::npos) << t.str();
  EXPECT_NE(t.str().find("dtype=bfloat16"), std::string::npos) << t.str();

  const Tensor x = Tensor::arange(0, 6, 1, kBF16).reshape({2, 3});
  const Tensor xt = x.transpose(0, 1).contiguous();
  EXPECT_EQ(xt.dtype(), kBF16);
  EXPECT_EQ(xt.to_vector<double>(), (std::vector<double>{0, 3, 1, 4, 2, 5}));
  Tensor dst = Tensor::zeros({3, 2}, kBF16);
  dst.copy_(x.transpose(0, 1));
  EXPECT_EQ(bits(dst), bits(xt));
  Tensor from_float = Tensor::zeros({3}, kBF16);
  from_float.copy_(Tensor::from_vector<float>({1.0f, 1.00390625f, 1.01171875f}, {3}));  // converts, rounding
  EXPECT_EQ(bits(from_float), (std::vector<uint16_t>{0x3f80, 0x3f80, 0x3f82}));
}

TEST(BFloat16Tensor, RandomInitIsTheFloat32DrawRounded) {
  Generator g1(7), g2(7);
  EXPECT_EQ(bits(Tensor::randn({100}, g1, kBF16)), bits(Tensor::randn({100}, g2, DType::Float32).to(kBF16)));
  EXPECT_EQ(bits(Tensor::uniform({100}, -2.0, 3.0, g1, kBF16)),
            bits(Tensor::uniform({100}, -2.0, 3.0, g2, DType::Float32).to(kBF16)));
}

// ---------------------------------------------------------------- the parity contract

// f on the bf16 inputs equals f on their float32 values, its bf16 outputs rounded (float32 and bool
// outputs bit for bit as they are).
void expect_parity(const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Tensor>& inputs) {
  std::vector<Tensor> as_float;
  for (const Tensor& t : inputs) as_float.push_back(t.dtype() == kBF16 ? t.to(DType::Float32) : t);
  const Tensor got = f(inputs), want = f(as_float);
  if (want.dtype() == DType::Float32 && got.dtype() == kBF16) {
    EXPECT_EQ(bits(got), bits(want.to(kBF16)));
  } else {
    ASSERT_EQ(got.dtype(), want.dtype());
    const std::vector<double> g = got.to_vector<double>(), w = want.to_vector<double>();
    ASSERT_EQ(g.size(), w.size());
    for (size_t i = 0; i < g.size(); ++i) EXPECT_TRUE(g[i] == w[i] || (std::isnan(g[i]) && std::isnan(w[i]))) << i;
  }
}

struct Inputs {
  Generator gen{2024};
  Tensor randn(const Shape& s) { return Tensor::randn(s, gen, kBF16); }
};

TEST(BFloat16Parity, Elementwise) {
  Inputs in;
  const Tensor x = in.randn({5, 37}), y = in.randn({5, 37}), row = in.randn({37});
  const Tensor pos = add(abs(x), 0.25);
  using V = const std::vector<Tensor>&;
  for (auto f : std::vector<std::function<Tensor(V)>>{
           [](V t) { return neg(t[0]); }, [](V t) { return exp(t[0]); }, [](V t) { return log(t[1]); },
           [](V t) { return tanh(t[0]); }, [](V t) { return sigmoid(t[0]); }, [](V t) { return sqrt(t[1]); },
           [](V t) { return rsqrt(t[1]); }, [](V t) { return abs(t[0]); }, [](V t) { return relu(t[0]); },
           [](V t) { return gelu(t[0]); }, [](V t) { return gelu(t[0], "tanh"); },
           [](V t) { return pow(t[0], 2.0); }, [](V t) { return pow(t[1], 1.5); },
           [](V t) { return add(t[0], t[2]); }, [](V t) { return sub(t[0], t[2]); },
           [](V t) { return mul(t[0], t[2]); }, [](V t) { return div(t[0], t[1]); },
           [](V t) { return maximum(t[0], t[2]); }, [](V t) { return add(t[0], t[3]); },  // broadcast row
           [](V t) { return add(t[0], 0.1); }, [](V t) { return mul(t[0], 1.0 / 3.0); },
           [](V t) { return rsub(t[0], 2.5); }, [](V t) { return rdiv(t[1], 1.0); },
           [](V t) { return lt(t[0], t[2]); }, [](V t) { return eq(t[0], t[0]); },
           [](V t) { return where(gt(t[0], t[2]), t[0], t[2]); },
           [](V t) { return masked_fill(t[0], lt(t[0], t[2]), 0.7); },
       })
    expect_parity(f, {x, pos, y, row});
}

TEST(BFloat16Parity, ReductionsAccumulateInFloat32) {
  Inputs in;
  const Tensor x = in.randn({6, 300});
  using V = const std::vector<Tensor>&;
  for (auto f : std::vector<std::function<Tensor(V)>>{
           [](V t) { return sum(t[0]); }, [](V t) { return sum(t[0], {1}); }, [](V t) { return sum(t[0], {0}); },
           [](V t) { return mean(t[0]); }, [](V t) { return mean(t[0], {-1}, true); },
           [](V t) { return max(t[0], 1).values; }, [](V t) { return max(t[0]); }})
    expect_parity(f, {x});
  // Accumulating in bf16 would stall: 300 ones sum to 256 in bf16 (256 + 1 rounds back to 256).
  EXPECT_EQ(sum(Tensor::ones({300}, kBF16)).item(), 300.0);
}

TEST(BFloat16Parity, MatmulAndNn) {
  Inputs in;
  const Tensor a = in.randn({3, 7, 13}), b = in.randn({13, 5}), x = in.randn({4, 6, 24});
  const Tensor w = add(in.randn({24}), 1.0), bias = in.randn({24});
  const Tensor targets = Tensor::from_vector<int64_t>({0, 5, 23, -100, 7, 1}, {6});
  const Tensor table = in.randn({11, 8});
  const Tensor idx = Tensor::from_vector<int64_t>({3, 0, 10, 3}, {2, 2});
  const Tensor qkv = in.randn({1, 9, 2, 8}), cos = in.randn({9, 4}), sin = in.randn({9, 4});
  using V = const std::vector<Tensor>&;
  for (auto f : std::vector<std::function<Tensor(V)>>{
           [](V t) { return matmul(t[0], t[1]); },
           [](V t) { return matmul(transpose(t[1], 0, 1), transpose(t[0], 1, 2)); },
           [](V t) { return softmax(t[2], -1); }, [](V t) { return log_softmax(t[2], 1); },
           [](V t) { return layer_norm(t[2], t[3], t[4]); }, [](V t) { return layer_norm(t[2], Tensor(), Tensor()); },
           [](V t) { return embedding(t[6], t[7]); },
           [](V t) { return dropout(t[2], 0.3, true, 99, 4); },
           [](V t) { return rotary(t[8], t[9], t[10]); },
       })
    expect_parity(f, {a, b, x, w, bias, targets, table, idx, qkv, cos, sin});
  // cross_entropy's losses are float32 for bf16 logits, as under PyTorch's autocast; they equal the
  // float32 op's on the same logits exactly.
  const Tensor logits = reshape(x, {24, 24}).narrow(0, 0, 6);
  const Tensor loss = cross_entropy(logits, targets, -100, "none");
  EXPECT_EQ(loss.dtype(), DType::Float32);
  expect_parity([](V t) { return cross_entropy(t[0], t[1], -100, "none"); }, {logits, targets});
  expect_parity([](V t) { return cross_entropy(t[0], t[1]); }, {logits, targets});
}

TEST(BFloat16Parity, DilatedAttentionForward) {
  Inputs in;
  const Tensor q = in.randn({2, 97, 3, 16}), k = in.randn({2, 97, 3, 16}), v = in.randn({2, 97, 3, 16});
  const Tensor bias = in.randn({3, 8});
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("32:1,64:2,97:4");
  opts.causal = true;
  opts.bias_num_buckets = 8;
  opts.bias_max_distance = 40;
  using V = const std::vector<Tensor>&;
  expect_parity([&](V t) { return dilated_attention(t[0], t[1], t[2], opts, t[3]); }, {q, k, v, bias});
  // lse stays float32: the float32 op's, bit for bit.
  const AttentionOutput out = dilated_attention_with_lse(q, k, v, opts, bias);
  EXPECT_EQ(out.o.dtype(), kBF16);
  EXPECT_EQ(out.lse.dtype(), DType::Float32);
  EXPECT_EQ(out.lse.to_vector<float>(),
            dilated_attention_with_lse(q.to(DType::Float32), k.to(DType::Float32), v.to(DType::Float32), opts,
                                       bias.to(DType::Float32))
                .lse.to_vector<float>());
}

// Gradients are bf16, and for ops whose backward reads only their inputs (not their rounded
// outputs) equal the float32 gradients on the same values, rounded.
TEST(BFloat16Autograd, GradientsAreBf16AndMatchFloat32Rounded) {
  Inputs in;
  const Tensor a0 = in.randn({7, 13}), b0 = in.randn({13, 5}), c0 = in.randn({7, 13});
  const Tensor g0 = in.randn({7, 5}), g1 = in.randn({7, 13});
  const Tensor x0 = in.randn({6, 24}), w0 = add(in.randn({24}), 1.0), bias0 = in.randn({24});
  const Tensor targets = Tensor::from_vector<int64_t>({0, 5, 23, -100, 7, 1}, {6});
  using Fn = std::function<Tensor(const std::vector<Tensor>&)>;
  auto check = [&](const Fn& f, const std::vector<Tensor>& leaves0, const Tensor& seed) {
    std::vector<Tensor> lb, lf;
    for (const Tensor& t : leaves0) {
      lb.push_back(t.detach().requires_grad_());
      lf.push_back(t.to(DType::Float32).requires_grad_());
    }
    f(lb).backward(seed);
    const Tensor yf = f(lf);
    yf.backward(seed.to(yf.dtype()));
    for (size_t i = 0; i < lb.size(); ++i) {
      ASSERT_TRUE(lb[i].grad().defined()) << i;
      EXPECT_EQ(lb[i].grad().dtype(), kBF16) << i;
      EXPECT_EQ(bits(lb[i].grad()), bits(lf[i].grad().to(kBF16))) << i;
    }
  };
  check([](const std::vector<Tensor>& t) { return matmul(t[0], t[1]); }, {a0, b0}, g0);
  check([](const std::vector<Tensor>& t) { return gelu(t[0]); }, {a0}, a0);
  check([](const std::vector<Tensor>& t) { return mul(t[0], t[1]); }, {a0, c0}, g1);
  check([](const std::vector<Tensor>& t) { return layer_norm(t[0], t[1], t[2]); }, {x0, w0, bias0}, x0);
  check([&](const std::vector<Tensor>& t) { return cross_entropy(t[0], targets); }, {x0},
        Tensor::scalar(1.0, DType::Float32));
}

TEST(BFloat16Autograd, AMlpTrainsItsGradientsInBf16) {
  // A two-layer MLP with layer_norm and cross_entropy: every gradient bf16, within bf16 accuracy of
  // the float32 run (each op rounds once, ~2^-8 relative, through a few ops).
  Inputs in;
  const Tensor x = in.randn({16, 32}), w1 = mul(in.randn({32, 64}), 0.2), w2 = mul(in.randn({64, 10}), 0.2);
  const Tensor lw = Tensor::ones({64}, kBF16), lb = Tensor::zeros({64}, kBF16);
  const Tensor targets = Tensor::from_vector<int64_t>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5}, {16});
  auto run = [&](DType dtype) {
    std::vector<Tensor> p;
    for (const Tensor& t : {w1, w2, lw, lb}) p.push_back(t.to(dtype).detach().requires_grad_());
    const Tensor h = gelu(layer_norm(matmul(x.to(dtype), p[0]), p[2], p[3]));
    const Tensor loss = cross_entropy(matmul(h, p[1]), targets);
    EXPECT_EQ(loss.dtype(), DType::Float32);
    loss.backward();
    return p;
  };
  const std::vector<Tensor> pb = run(kBF16), pf = run(DType::Float32);
  for (size_t i = 0; i < pb.size(); ++i) {
    ASSERT_EQ(pb[i].grad().dtype(), kBF16);
    const std::vector<double> g = pb[i].grad().to_vector<double>(), want = pf[i].grad().to_vector<double>();
    double scale = 0.0, err = 0.0;
    for (size_t j = 0; j < g.size(); ++j) {
      scale = std::max(scale, std::abs(want[j]));
      err = std::max(err, std::abs(g[j] - want[j]));
    }
    EXPECT_GT(scale, 0.0);
    EXPECT_LE(err, 0.05 * scale) << "parameter " << i;
  }
}

// ---------------------------------------------------------------- attention accuracy

struct AccuracyCase {
  const char* name;
  int64_t B, N, H, D;
  const char* schedule;
  bool causal, bias;
};

class BFloat16Attention : public ::testing::TestWithParam<AccuracyCase> {};

// Forward: o is the float32 result rounded once, so |o - exact| <= 2^-8 |exact| (bf16's unit
// roundoff: 8 significant bits) plus the float32 kernel's error, which the float32 suite bounds by
// 1e-5 relative to max(|o|, 1). Gradients: rounded once too, but their float32 computation reads the
// bf16 o (D_t = dout . o), as FlashAttention's does; the bound 2^-6 relative to max(|g|, 1) leaves
// that a factor 4 above one rounding. Both must also be no worse than twice the naive bf16 forward.
TEST_P(BFloat16Attention, WithinBf16RoundingOfTheFloat64OracleAndBeatsNaive) {
  const AccuracyCase& c = GetParam();
  Inputs in;
  const Shape shape{c.B, c.N, c.H, c.D};
  const Tensor q = in.randn(shape), k = in.randn(shape), v = in.randn(shape), dout = in.randn(shape);
  const Tensor bias = c.bias ? in.randn({c.H, 8}) : Tensor();
  attention_reference::Problem p;
  p.B = c.B, p.N = c.N, p.H = c.H, p.D = c.D;
  p.schedule = parse_schedule(c.schedule);
  p.causal = c.causal;
  p.scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  p.num_buckets = 8;
  p.max_distance = 40;
  p.q = q.to_vector<double>(), p.k = k.to_vector<double>(), p.v = v.to_vector<double>();
  if (c.bias) p.bias = bias.to_vector<double>();
  const attention_reference::Forward want = attention_reference::forward(p);
  const attention_reference::Grads want_grads = attention_reference::backward(p, want, dout.to_vector<double>());

  std::vector<Tensor> leaves{q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_()};
  const Tensor b = c.bias ? bias.detach().requires_grad_() : Tensor();
  DilatedAttentionOptions opts;
  opts.schedule = p.schedule;
  opts.causal = c.causal;
  opts.bias_num_buckets = 8;
  opts.bias_max_distance = 40;
  const AttentionOutput out = dilated_attention_with_lse(leaves[0], leaves[1], leaves[2], opts, b);
  ASSERT_EQ(out.o.dtype(), kBF16);
  const std::vector<double> o = out.o.to_vector<double>();
  const std::vector<double> naive = attention_reference::naive_bf16(p, dout.to_vector<double>()).fwd.o;
  double err = 0.0, naive_err = 0.0;
  for (size_t i = 0; i < o.size(); ++i) {
    EXPECT_LE(std::abs(o[i] - want.o[i]), std::ldexp(std::abs(want.o[i]), -8) + 1e-5) << "o[" << i << "]";
    err = std::max(err, std::abs(o[i] - want.o[i]));
    naive_err = std::max(naive_err, std::abs(naive[i] - want.o[i]));
  }
  EXPECT_LE(err, 2.0 * naive_err);
  const std::vector<double> lse = out.lse.to_vector<double>();
  for (size_t i = 0; i < lse.size(); ++i) {
    if (!std::isfinite(want.lse[i])) continue;  // queries on no grid: -inf, as the float32 op's
    EXPECT_LE(std::abs(lse[i] - want.lse[i]), 1e-5 * std::max(std::abs(want.lse[i]), 1.0)) << "lse[" << i << "]";
  }

  out.o.backward(dout);
  const std::vector<const std::vector<double>*> wants{&want_grads.dq, &want_grads.dk, &want_grads.dv};
  for (size_t i = 0; i < leaves.size(); ++i) {
    ASSERT_EQ(leaves[i].grad().dtype(), kBF16);
    const std::vector<double> g = leaves[i].grad().to_vector<double>();
    for (size_t j = 0; j < g.size(); ++j)
      ASSERT_LE(std::abs(g[j] - (*wants[i])[j]), std::ldexp(std::max(std::abs((*wants[i])[j]), 1.0), -6))
          << "gradient " << i << " element " << j;
  }
  if (c.bias) {
    EXPECT_EQ(b.grad().dtype(), kBF16);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BFloat16Attention,
    ::testing::Values(AccuracyCase{"ragged_r_above_h", 1, 97, 5, 16, "16:1,48:4,97:8", false, false},
                      AccuracyCase{"causal_bias_two_branches", 2, 97, 3, 64, "32:1,64:2", true, true},
                      AccuracyCase{"ragged_segments_causal", 1, 97, 4, 32, "13:1,40:3,97:5", true, false}),
    [](const ::testing::TestParamInfo<AccuracyCase>& info) { return std::string(info.param.name); });

// The naive bf16 reference (attention_reference.h), the yardstick of the bf16 kernels' accuracy (the
// CUDA suite's CudaAttentionBf16), against the float64 oracle on the same bf16 inputs over the shared
// small cases: it does round (o off by more than half a bf16 step, 2^-9) and stays within a few bf16
// roundings of the contract. The bounds are twice the worst a correct naive bf16 code reaches on these
// cases (o and gradients 0.031, lse 0.008, dbias 0.019), rounded up to a power of two: 2^-4 relative
// to max(|x|, 1) for o and the gradients, 2^-5 for lse, 2^-4 of its table's scale for dbias.
TEST(BFloat16Attention, NaiveReferenceIsWithinBf16RoundingOfTheOracle) {
  for (const test::AttentionCase& c : test::kAttentionCases) {
    if (c.N > 100) continue;  // the float64 oracle: small cases only
    SCOPED_TRACE(c.name);
    const test::OracleRun run = test::oracle_run(c, kBF16);
    const attention_reference::NaiveBf16 naive = attention_reference::naive_bf16(run.problem, run.dout);
    const double o_err = test::max_error(naive.fwd.o, run.want.o);
    EXPECT_GT(o_err, std::ldexp(1.0, -9));
    EXPECT_LE(o_err, 1.0 / 16) << "o";
    EXPECT_LE(test::max_error(naive.fwd.lse, run.want.lse), 1.0 / 32) << "lse";
    EXPECT_LE(test::max_error(naive.grads.dq, run.want_grads.dq), 1.0 / 16) << "dq";
    EXPECT_LE(test::max_error(naive.grads.dk, run.want_grads.dk), 1.0 / 16) << "dk";
    EXPECT_LE(test::max_error(naive.grads.dv, run.want_grads.dv), 1.0 / 16) << "dv";
    if (c.bias) {
      EXPECT_LE(test::table_scaled_error(naive.grads.dbias, run.want_grads.dbias), 1.0 / 16) << "dbias";
    }
  }
}

// ---------------------------------------------------------------- HDF5 and errors

class BFloat16Hdf5 : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("dilatron_bf16_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
};

TEST_F(BFloat16Hdf5, RoundTripsBitExact) {
  const std::vector<uint16_t> patterns = {0x3f80, 0x8000, 0x0000, 0x7f80, 0xff80, 0x7fc0, 0xffc1,
                                          0x0001, 0x807f, 0x7f7f, 0xff7f, 0x3eab};
  std::vector<bfloat16> values;
  for (uint16_t b : patterns) values.push_back(bfloat16::from_bits(b));
  const Tensor t = Tensor::from_vector(values, {3, 4});
  {
    h5::File f = h5::File::create(file("t.h5"));
    f.write("x", t);
    f.write("strided", t.transpose(0, 1));
  }
  const h5::File f = h5::File::open(file("t.h5"));
  EXPECT_EQ(f.info("x").dtype, "bfloat16");
  const Tensor back = f.read("x");
  ASSERT_EQ(back.dtype(), kBF16);
  EXPECT_EQ(back.shape(), (Shape{3, 4}));
  EXPECT_EQ(bits(back), patterns);
  EXPECT_EQ(bits(f.read("strided")), bits(t.transpose(0, 1).contiguous()));
}

// h5py reads our bf16 through HDF5's conversion to float32, and a 2-byte float of any other
// layout than IEEE half and bf16 is refused rather than read as garbage.
TEST_F(BFloat16Hdf5, InteropWithH5pyAndUnknownLayoutsRefused) {
  constexpr const char* kPython = "/usr/bin/python3";
  if (std::system((std::string(kPython) + " -c 'import h5py' >/dev/null 2>&1").c_str()) != 0)
    GTEST_SKIP() << kPython << " cannot import h5py (install python3-h5py to run this test)";
  const Tensor x = Tensor::from_vector<float>({1.5f, -0.0f, 3.0e38f, 1.0f / 3.0f}, {4}).to(kBF16);
  {
    h5::File f = h5::File::create(file("ours.h5"));
    f.write("x", x);
  }
  std::string want_bits;
  for (uint16_t b : bits(x)) want_bits += std::to_string(b) + ",";
  const std::string script =
      "import sys, h5py, numpy as np\n"
      "with h5py.File(sys.argv[1], 'r') as f:\n"
      "    d = h5py.h5d.open(f.id, b'x'); a = np.empty((4,), np.float32)\n"
      "    d.read(h5py.h5s.ALL, h5py.h5s.ALL, a, mtype=h5py.h5t.NATIVE_FLOAT)\n"
      "    want = (np.array([" + want_bits + "], np.uint32) << 16).view(np.float32)\n"
      "    assert a.tobytes() == want.tobytes(), a\n"
      "t = h5py.h5t.IEEE_F32LE.copy(); t.set_fields(15, 9, 6, 0, 9); t.set_size(2); t.set_ebias(31)\n"
      "with h5py.File(sys.argv[2], 'w') as f:\n"
      "    h5py.h5d.create(f.id, b'odd', t, h5py.h5s.create_simple((2,)))\n";
  const std::string command = std::string(kPython) + " -c \"" + script + "\" '" + file("ours.h5") + "' '" +
                              file("odd.h5") + "'";
  ASSERT_EQ(std::system(command.c_str()), 0) << "h5py did not read our bfloat16 as float32 (its message is above)";
  const h5::File f = h5::File::open(file("odd.h5"));
  EXPECT_EQ(error_message([&] { f.read("odd"); }),
            "dataset 'odd' in '" + file("odd.h5") +
                "' has type float16 of an unknown bit layout, which does not read as a tensor "
                "(supported: float16/32/64, integers up to int64, bool)");
}

TEST(BFloat16Errors, UnsupportedCasesSaySo) {
  Tensor p = Tensor::zeros({4}, kBF16), g = Tensor::zeros({4}, kBF16), m = Tensor::zeros({4}, kBF16),
         v = Tensor::zeros({4}, kBF16);
  const std::string msg = error_message([&] {
    kernels::cpu_backend().adamw_step(p, g, m, v, {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                                                   .weight_decay = 0.0, .step = 1});
  });
  EXPECT_NE(msg.find("adamw_step: bfloat16"), std::string::npos) << msg;
  EXPECT_NE(msg.find("float32 master weights"), std::string::npos) << msg;
  EXPECT_NE(error_message([] { add(Tensor::zeros({2}, kBF16), Tensor::zeros({2})); }).find("bfloat16"),
            std::string::npos);
  EXPECT_NE(error_message([] {
              matmul(Tensor::zeros({2, 2}, kBF16), Tensor::zeros({2, 2}));
            }).find("bfloat16 and float32"),
            std::string::npos);
}

}  // namespace
