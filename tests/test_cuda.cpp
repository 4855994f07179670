// The CUDA backend against the CPU backend: every Backend method forward and backward through the
// ops on awkward shapes, the attention kernels (CUDA float32 vs CPU float64 within the contract's
// 1e-5, float64 vs float64 within 1e-10), dropout bits identical to the CPU's, bitwise
// reproducibility, and the caching allocator. Built only with the CUDA backend; a test that needs
// a GPU skips when there is none, so the suite runs (and skips) on machines without one.
#ifdef DILATRON_WITH_CUDA

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <curand.h>

#include "attention_cases.h"
#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/kernels/cuda.h"
#include "dilatron/ops.h"
#include "dilatron/philox.h"
#include "dilatron/random.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::AttentionCase;
using dilatron::test::error_message;

namespace {

#define REQUIRE_CUDA()                                                                            \
  do {                                                                                            \
    if (kernels::cuda_device_count() == 0)                                                        \
      GTEST_SKIP() << "no CUDA device: this machine has no GPU or no NVIDIA driver (cudaGetDeviceCount)"; \
  } while (0)

const Device kGpu = Device::cuda(0);

// max over elements of |a - ref| / max(|ref|, 1), the contract's error measure (infinities must match).
double max_error(const Tensor& a, const Tensor& ref) {
  EXPECT_EQ(a.shape(), ref.shape());
  const std::vector<double> x = a.to_vector<double>(), y = ref.to_vector<double>();
  double err = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isinf(y[i]) || std::isinf(x[i])) {
      if (x[i] != y[i]) return std::numeric_limits<double>::infinity();
      continue;
    }
    err = std::max(err, std::abs(x[i] - y[i]) / std::max(std::abs(y[i]), 1.0));
  }
  return err;
}

// A leaf copy of t with the given dtype and device (Int64/Bool inputs keep their dtype).
Tensor leaf(const Tensor& t, DType dtype, Device device, bool requires_grad) {
  Tensor out = t.detach().to(is_floating(t.dtype()) ? dtype : t.dtype()).to(device).detach();
  if (requires_grad) out.requires_grad_(true);
  return out;
}

// Runs f on the inputs in `dtype` on the CPU and on the GPU and compares the outputs and, through
// one backward pass with a random upstream gradient, the gradients of the inputs marked in
// `differentiable`. Both sides start from the same values, so only the kernels can differ.
void check_parity(const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Tensor>& inputs,
                  const std::vector<bool>& differentiable, DType dtype, double tol) {
  SCOPED_TRACE(dtype_name(dtype));
  std::vector<Tensor> cpu, gpu;
  for (size_t i = 0; i < inputs.size(); ++i) {
    cpu.push_back(leaf(inputs[i], dtype, Device::cpu(), differentiable[i]));
    gpu.push_back(leaf(inputs[i], dtype, kGpu, differentiable[i]));
  }
  const Tensor want = f(cpu), got = f(gpu);
  ASSERT_EQ(got.device(), kGpu);
  ASSERT_EQ(got.dtype(), want.dtype());
  EXPECT_LE(max_error(got, want), tol) << "forward";
  if (!want.requires_grad()) return;
  Generator gen(99);
  const Tensor upstream = Tensor::randn(want.shape(), gen, TensorOptions(DType::Float64));
  want.backward(upstream.to(want.dtype()));
  got.backward(upstream.to(got.dtype()).to(kGpu));
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!differentiable[i]) continue;
    SCOPED_TRACE("gradient of input " + std::to_string(i));
    ASSERT_TRUE(cpu[i].grad().defined() && gpu[i].grad().defined());
    EXPECT_EQ(gpu[i].grad().device(), kGpu);
    EXPECT_LE(max_error(gpu[i].grad(), cpu[i].grad()), tol);
  }
}

void check_parity_both(const std::function<Tensor(const std::vector<Tensor>&)>& f, const std::vector<Tensor>& inputs,
                       const std::vector<bool>& differentiable) {
  check_parity(f, inputs, differentiable, DType::Float32, 2e-6);
  check_parity(f, inputs, differentiable, DType::Float64, 1e-13);
}

Tensor randn(const Shape& shape, uint64_t seed, double mean = 0.0, double std = 1.0) {
  Generator gen(seed);
  return Tensor::randn(shape, gen, TensorOptions(DType::Float64), mean, std);
}
Tensor positive(const Shape& shape, uint64_t seed) {
  Generator gen(seed);
  return Tensor::uniform(shape, 0.2, 3.0, gen, TensorOptions(DType::Float64));
}

// ---------------------------------------------------------------- device and allocator

TEST(CudaDevice, MissingDeviceIsAnErrorNamingIt) {
  // Needs no GPU: on a machine without one, cuda:0 is the missing device.
  const int n = kernels::cuda_device_count();
  EXPECT_TRUE(kernels::cuda_compiled());
  const std::string msg = error_message([&] { kernels::backend(Device::cuda(n)); });
  EXPECT_NE(msg.find("cuda:" + std::to_string(n)), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
}

TEST(CudaAllocator, SteadyStateMakesNoDeviceAllocations) {
  REQUIRE_CUDA();
  auto step = [] {
    Generator gen(1);
    Tensor a = Tensor::randn({333, 77}, gen, kGpu);
    Tensor b = Tensor::randn({77, 5}, gen, kGpu);
    Tensor c = matmul(a, b).sum();
    Tensor big = Tensor::zeros({3 << 20}, kGpu);  // a 12 MiB block (large size class)
    return c.item() + big.sum().item();
  };
  const double first = step();
  const int64_t mallocs = kernels::cuda::cache_stats(0).device_mallocs;
  for (int i = 0; i < 5; ++i) EXPECT_EQ(step(), first);
  EXPECT_EQ(kernels::cuda::cache_stats(0).device_mallocs, mallocs) << "a repeated step reached cudaMalloc";
  EXPECT_GT(kernels::cuda::cache_stats(0).cached_bytes, 0);
  kernels::cuda::empty_cache();
  EXPECT_EQ(kernels::cuda::cache_stats(0).cached_bytes, 0);
  EXPECT_EQ(memory_stats(kGpu).current_bytes, 0);
}

TEST(CudaPhilox, DeviceCurandGeneratorMatchesPhiloxHeader) {
  REQUIRE_CUDA();
  // cuRAND's PHILOX4_32_10 device generator puts word 4s + w at counter {0, 0, s, 0}, key = seed.
  const uint64_t seed = 0x0123456789abcdefULL;
  constexpr size_t kWords = 4096;
  Tensor words = Tensor::empty({kWords / 2}, TensorOptions(DType::Int64).with_device(kGpu));  // 4096 uint32
  curandGenerator_t gen = nullptr;
  ASSERT_EQ(curandCreateGenerator(&gen, CURAND_RNG_PSEUDO_PHILOX4_32_10), CURAND_STATUS_SUCCESS);
  ASSERT_EQ(curandSetPseudoRandomGeneratorSeed(gen, seed), CURAND_STATUS_SUCCESS);
  ASSERT_EQ(curandGenerate(gen, static_cast<unsigned int*>(words.raw_data()), kWords), CURAND_STATUS_SUCCESS);
  ASSERT_EQ(curandDestroyGenerator(gen), CURAND_STATUS_SUCCESS);
  const std::vector<int64_t> host = words.to_vector<int64_t>();
  const auto* got = reinterpret_cast<const uint32_t*>(host.data());
  for (size_t i = 0; i < kWords; ++i) {
    const Philox4 want = philox4x32_10(Philox4{{0, 0, static_cast<uint32_t>(i / 4), 0}}, static_cast<uint32_t>(seed),
                                       static_cast<uint32_t>(seed >> 32));
    ASSERT_EQ(got[i], want.x[i % 4]) << "word " << i;
  }
}

// ---------------------------------------------------------------- memory

TEST(CudaMemory, CopiesAcrossDevicesStridesAndDtypes) {
  REQUIRE_CUDA();
  const Tensor x = randn({5, 7, 3}, 1);
  for (DType dtype : {DType::Float32, DType::Float64, DType::Int64, DType::Bool}) {
    SCOPED_TRACE(dtype_name(dtype));
    const Tensor host = mul(x, 3.0).to(dtype);
    const Tensor dev = host.to(kGpu);
    EXPECT_EQ(max_error(dev, host), 0.0);
    // device -> host of a strided view with a dtype change, and a device-side strided gather
    const Tensor view = dev.permute({2, 0, 1}).narrow(1, 1, 3);
    EXPECT_EQ(max_error(view.to(DType::Float64), host.permute({2, 0, 1}).narrow(1, 1, 3).to(DType::Float64)), 0.0);
    EXPECT_EQ(max_error(view.contiguous(), host.permute({2, 0, 1}).narrow(1, 1, 3).contiguous()), 0.0);
    // host strided -> device (converted on the host first)
    Tensor dst = Tensor::empty({3, 3, 7}, TensorOptions(DType::Float32).with_device(kGpu));
    dst.copy_(host.permute({2, 0, 1}).narrow(1, 2, 3));
    EXPECT_EQ(max_error(dst, host.permute({2, 0, 1}).narrow(1, 2, 3).to(DType::Float32)), 0.0);
  }
  // broadcast (stride 0) source
  const Tensor row = randn({1, 9}, 2).to(kGpu);
  EXPECT_EQ(max_error(expand(row, {4, 9}).contiguous(), expand(row.to(Device::cpu()), {4, 9}).contiguous()), 0.0);
}

// bfloat16 on the GPU. The conversions are one formula on both sides (dilatron/bfloat16.h), so they,
// and float32 ops that IEEE rounds exactly (add, mul), agree with the CPU bit for bit; the other ops
// run the CUDA float32 kernels, whose last-bit differences from the CPU's may move a bf16 rounding by
// one step: at most 2^-7 relative. Attention runs the tensor-core kernels (P rounded to bf16 inside,
// an error far below 2^-7 of max(|o|, 1) here; CudaAttentionBf16 measures it properly).
TEST(CudaBFloat16, MatchesTheCpuReference) {
  REQUIRE_CUDA();
  constexpr DType kBF16 = DType::BFloat16;
  auto bits = [](const Tensor& t) {
    std::vector<uint16_t> out;
    for (bfloat16 b : t.to(Device::cpu()).to_vector<bfloat16>()) out.push_back(b.bits);
    return out;
  };
  const Tensor x = randn({64, 33}, 3), y = randn({64, 33}, 4), w = randn({33, 17}, 5);
  const Tensor xb = x.to(kBF16), yb = y.to(kBF16), wb = w.to(kBF16);
  const Tensor xg = xb.to(kGpu), yg = yb.to(kGpu), wg = wb.to(kGpu);
  EXPECT_EQ(bits(x.to(kGpu).to(kBF16)), bits(xb));
  EXPECT_EQ(max_error(xg.to(DType::Float32), xb.to(DType::Float32)), 0.0);
  EXPECT_EQ(bits(add(xg, yg)), bits(add(xb, yb)));
  EXPECT_EQ(bits(mul(xg, yg)), bits(mul(xb, yb)));
  const double one_step = std::ldexp(1.0, -7);
  EXPECT_LE(max_error(matmul(xg, wg).to(DType::Float32), matmul(xb, wb).to(DType::Float32)), one_step);
  EXPECT_LE(max_error(softmax(xg, -1).to(DType::Float32), softmax(xb, -1).to(DType::Float32)), one_step);
  EXPECT_LE(max_error(gelu(xg).to(DType::Float32), gelu(xb).to(DType::Float32)), one_step);
  EXPECT_LE(max_error(layer_norm(xg, Tensor(), Tensor()).to(DType::Float32),
                      layer_norm(xb, Tensor(), Tensor()).to(DType::Float32)),
            one_step);
  const Tensor q = randn({1, 97, 2, 16}, 6).to(kBF16), k = randn({1, 97, 2, 16}, 7).to(kBF16),
               v = randn({1, 97, 2, 16}, 8).to(kBF16);
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("32:1,97:4");
  opts.causal = true;
  const AttentionOutput cpu = dilated_attention_with_lse(q, k, v, opts);
  const AttentionOutput gpu = dilated_attention_with_lse(q.to(kGpu), k.to(kGpu), v.to(kGpu), opts);
  EXPECT_EQ(gpu.o.dtype(), kBF16);
  EXPECT_EQ(gpu.lse.dtype(), DType::Float32);
  EXPECT_LE(max_error(gpu.o.to(DType::Float32), cpu.o.to(DType::Float32)), one_step);
  EXPECT_LE(max_error(gpu.lse, cpu.lse), 1e-5);
}

// The bf16 gemm is cuBLAS's own (bf16 operands, float32 accumulation, one rounding), not the float32
// one on converted copies: transposed operands, a broadcast batch and beta = 1 against the CPU's.
TEST(CudaBFloat16, CublasGemmMatchesTheCpuReference) {
  REQUIRE_CUDA();
  constexpr DType kBF16 = DType::BFloat16;
  const double one_step = std::ldexp(1.0, -7);
  const Tensor a = randn({3, 7, 40}, 21).to(kBF16), b = randn({1, 24, 7}, 22).to(kBF16);
  const Tensor c = randn({3, 40, 24}, 23).to(kBF16);
  Tensor cpu = c.clone(), gpu = c.to(kGpu);
  // out [3, 40, 24] = 0.5 a^T b^T + out: both operands transposed, b's batch broadcast.
  kernels::backend(Device::cpu()).gemm(cpu, a, b, true, true, 0.5, 1.0);
  kernels::backend(kGpu).gemm(gpu, a.to(kGpu), b.to(kGpu), true, true, 0.5, 1.0);
  EXPECT_EQ(gpu.dtype(), kBF16);
  EXPECT_LE(max_error(gpu.to(DType::Float32), cpu.to(DType::Float32)), one_step);
}

// Copies into strided views (cat and the narrow/split backward write their pieces this way), from
// each side, converting dtypes.
TEST(CudaMemory, CopiesIntoStridedViews) {
  REQUIRE_CUDA();
  const Tensor src = randn({4, 3, 5}, 3).to(DType::Float32);
  const TensorOptions f64(DType::Float64);
  const Tensor want = cat({Tensor::zeros({4, 2, 5}, f64), src.to(DType::Float64), Tensor::zeros({4, 1, 5}, f64)}, 1);
  for (Device from : {Device::cpu(), kGpu}) {
    for (Device to : {Device::cpu(), kGpu}) {
      if (from.is_cpu() && to.is_cpu()) continue;
      SCOPED_TRACE(from.str() + " -> " + to.str());
      const Tensor dst = Tensor::zeros({4, 6, 5}, TensorOptions(DType::Float64).with_device(to));
      narrow(dst, 1, 2, 3).copy_(src.to(from));
      EXPECT_EQ(max_error(dst, want), 0.0);
      // A transposed destination: the innermost stride is not 1.
      const Tensor dst_t = Tensor::zeros({5, 3, 4}, TensorOptions(DType::Float32).with_device(to));
      permute(dst_t, {2, 1, 0}).copy_(src.to(from));
      EXPECT_EQ(max_error(dst_t, permute(src, {2, 1, 0})), 0.0);
    }
  }
  // cat of GPU tensors along a middle dim writes each piece in place.
  const Tensor a = randn({2, 3, 4}, 4), b = randn({2, 1, 4}, 5);
  EXPECT_EQ(max_error(cat({a.to(kGpu), b.to(kGpu)}, 1), cat({a, b}, 1)), 0.0);
}

TEST(CudaMemory, FillsMatchTheCpuValues) {
  REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::Float64}) {
    SCOPED_TRACE(dtype_name(dtype));
    for (int64_t n : {1, 2, 3, 1001, 4099}) {
      Generator a(77, 5), b(77, 5);
      // Uniform: the same Philox bits and formula, so float32 is bit-identical; a float64 value may
      // differ in its last bit where the host compiler fused low + (high - low) * u into an FMA.
      const Tensor want_u = Tensor::uniform({n}, -2.0, 3.0, a, dtype);
      const Tensor got_u = Tensor::uniform({n}, -2.0, 3.0, b, TensorOptions(dtype).with_device(kGpu));
      if (dtype == DType::Float32) EXPECT_EQ(got_u.to_vector<double>(), want_u.to_vector<double>());
      else EXPECT_LE(max_error(got_u, want_u), 4.5e-16);
      // Normal: the device's log/sin/cos may differ from glibc's in the last bit of a double.
      const Tensor want = Tensor::randn({n}, a, dtype, 0.5, 2.0);
      const Tensor got = Tensor::randn({n}, b, TensorOptions(dtype).with_device(kGpu), 0.5, 2.0);
      EXPECT_LE(max_error(got, want), dtype == DType::Float32 ? 2.5e-7 : 1e-14);
    }
    EXPECT_EQ(Tensor::full({3, 5}, -1.25, TensorOptions(dtype).with_device(kGpu)).to_vector<double>(),
              std::vector<double>(15, -1.25));
  }
  EXPECT_EQ(Tensor::full({4}, 7.0, TensorOptions(DType::Int64).with_device(kGpu)).to_vector<int64_t>(),
            std::vector<int64_t>(4, 7));
}

// ---------------------------------------------------------------- elementwise

TEST(CudaElementwise, UnaryOpsForwardAndBackward) {
  REQUIRE_CUDA();
  using Op = std::function<Tensor(const Tensor&)>;
  const std::vector<std::pair<std::string, Op>> any_sign = {
      {"neg", [](const Tensor& x) { return neg(x); }},
      {"exp", [](const Tensor& x) { return exp(x); }},
      {"tanh", [](const Tensor& x) { return tanh(x); }},
      {"sigmoid", [](const Tensor& x) { return sigmoid(x); }},
      {"abs", [](const Tensor& x) { return abs(x); }},
      {"relu", [](const Tensor& x) { return relu(x); }},
      {"gelu", [](const Tensor& x) { return gelu(x); }},
      {"gelu_tanh", [](const Tensor& x) { return gelu(x, "tanh"); }},
      {"square", [](const Tensor& x) { return pow(x, 2.0); }},
      {"pow3", [](const Tensor& x) { return pow(x, 3.0); }},
  };
  const std::vector<std::pair<std::string, Op>> positive_only = {
      {"log", [](const Tensor& x) { return log(x); }},
      {"sqrt", [](const Tensor& x) { return sqrt(x); }},
      {"rsqrt", [](const Tensor& x) { return rsqrt(x); }},
      {"reciprocal", [](const Tensor& x) { return rdiv(x, 1.0); }},
  };
  const Tensor x = randn({37, 11}, 3), xp = positive({37, 11}, 4);
  for (const auto& [name, op] : any_sign) {
    SCOPED_TRACE(name);
    // a transposed (strided) input
    check_parity_both([&](const std::vector<Tensor>& in) { return op(in[0].transpose(0, 1)); }, {x}, {true});
  }
  for (const auto& [name, op] : positive_only) {
    SCOPED_TRACE(name);
    check_parity_both([&](const std::vector<Tensor>& in) { return op(in[0]); }, {xp}, {true});
  }
}

TEST(CudaElementwise, BinaryScalarAndWhereWithBroadcasting) {
  REQUIRE_CUDA();
  const Tensor a = randn({3, 1, 13}, 5), b = randn({4, 13}, 6), bp = positive({4, 13}, 7);
  check_parity_both([](const std::vector<Tensor>& in) { return in[0] + in[1]; }, {a, b}, {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return in[0] - in[1]; }, {a, b}, {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return in[0] * in[1]; }, {a, b}, {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return in[0] / in[1]; }, {a, bp}, {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return maximum(in[0], in[1]); }, {a, b}, {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return 2.5 - in[0] * 0.5 + 1.0; }, {a}, {true});
  check_parity_both([](const std::vector<Tensor>& in) { return 3.0 / in[0] - in[0] / 4.0; }, {bp}, {true});
  check_parity_both(
      [](const std::vector<Tensor>& in) { return where(gt(in[0], in[1]), in[0], in[1] * 2.0); }, {a, b},
      {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return masked_fill(in[0], lt(in[1], 0.0 * in[1]), -7.0); },
                    {a, randn({1, 13}, 8)}, {true, false});
  // comparisons write bool, identical on both devices (compared as 0/1)
  using Cmp = Tensor (*)(const Tensor&, const Tensor&);
  for (Cmp cmp : {Cmp(eq), Cmp(ne), Cmp(lt), Cmp(le), Cmp(gt), Cmp(ge)}) {
    const Tensor rounded_a = mul(a, 2.0).to(DType::Int64).to(DType::Float64);  // ties occur
    const Tensor rounded_b = mul(b, 2.0).to(DType::Int64).to(DType::Float64);
    const Tensor want = cmp(rounded_a, rounded_b), got = cmp(rounded_a.to(kGpu), rounded_b.to(kGpu));
    EXPECT_EQ(got.dtype(), DType::Bool);
    EXPECT_EQ(max_error(got, want), 0.0);
  }
}

// ---------------------------------------------------------------- reductions and GEMM

TEST(CudaReduce, SumsMeansAndMaxOverAwkwardShapes) {
  REQUIRE_CUDA();
  const Tensor x = randn({6, 45, 7}, 8);
  check_parity_both([](const std::vector<Tensor>& in) { return in[0].sum(); }, {x}, {true});
  check_parity_both([](const std::vector<Tensor>& in) { return sum(in[0], {1}); }, {x}, {true});
  check_parity_both([](const std::vector<Tensor>& in) { return sum(in[0], {0, 2}, true); }, {x}, {true});
  check_parity_both([](const std::vector<Tensor>& in) { return mean(in[0], {-1}); }, {x}, {true});
  check_parity_both([](const std::vector<Tensor>& in) { return sum_to(in[0], {1, 45, 1}); }, {x}, {true});
  // a long row: several chunks summed in order
  check_parity_both([](const std::vector<Tensor>& in) { return in[0].sum(); }, {randn({200003}, 9)}, {true});
  // max: values and the first index of the maximum
  const Tensor ties = mul(randn({9, 33}, 10), 2.0).to(DType::Int64).to(DType::Float64);
  for (int64_t dim : {0, 1}) {
    const MaxResult want = max(ties, dim), got = max(ties.to(kGpu), dim);
    EXPECT_EQ(max_error(got.values, want.values), 0.0);
    EXPECT_EQ(got.indices.to_vector<int64_t>(), want.indices.to_vector<int64_t>());
  }
  EXPECT_EQ(max(x.to(kGpu)).item(), max(x).item());
}

TEST(CudaGemm, MatmulTransposesAndBroadcastBatches) {
  REQUIRE_CUDA();
  check_parity_both([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); },
                    {randn({13, 7}, 11), randn({7, 5}, 12)}, {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return matmul(in[0].transpose(0, 1), in[1]); },
                    {randn({7, 13}, 13), randn({7, 9}, 14)}, {true, true});
  // batch broadcast: [2, 1, 5, 7] @ [3, 7, 4] -> [2, 3, 5, 4]
  check_parity_both([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); },
                    {randn({2, 1, 5, 7}, 15), randn({3, 7, 4}, 16)}, {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return matmul(in[0], in[1].transpose(-1, -2)); },
                    {randn({4, 3, 6}, 17), randn({4, 8, 6}, 18)}, {true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); },
                    {randn({9}, 19), randn({9, 2}, 20)}, {true, true});
}

// ---------------------------------------------------------------- nn

TEST(CudaNn, SoftmaxLogSoftmaxAndLayerNorm) {
  REQUIRE_CUDA();
  const Tensor x = randn({5, 3, 301}, 21, 0.0, 3.0);
  check_parity_both([](const std::vector<Tensor>& in) { return softmax(in[0], -1); }, {x}, {true});
  check_parity_both([](const std::vector<Tensor>& in) { return softmax(in[0], 1); }, {x}, {true});
  check_parity_both([](const std::vector<Tensor>& in) { return log_softmax(in[0], -1); }, {x}, {true});
  const Tensor w = randn({301}, 22), b = randn({301}, 23);
  check_parity_both([](const std::vector<Tensor>& in) { return layer_norm(in[0], in[1], in[2]); },
                    {randn({7, 5, 301}, 24, 4.0, 2.0), w, b}, {true, true, true});
  check_parity_both([](const std::vector<Tensor>& in) { return layer_norm(in[0], Tensor(), Tensor(), 1e-3); },
                    {randn({4, 33}, 25)}, {true});
  // a row long enough for several block passes
  check_parity_both([](const std::vector<Tensor>& in) { return log_softmax(in[0], -1); },
                    {randn({3, 50257}, 26, 0.0, 4.0)}, {true});
}

TEST(CudaNn, CrossEntropyWithIgnoredTargets) {
  REQUIRE_CUDA();
  const Tensor logits = randn({2, 9, 37}, 27, 0.0, 2.0);
  const Tensor targets = Tensor::from_vector<int64_t>(
      {0, 36, 5, -100, 7, 7, 12, -100, 1, 2, 3, 4, 35, 36, 0, -100, 18, 9}, {2, 9});
  for (const char* reduction : {"mean", "sum", "none"}) {
    SCOPED_TRACE(reduction);
    check_parity_both(
        [&](const std::vector<Tensor>& in) { return cross_entropy(in[0], in[1], -100, reduction); },
        {logits, targets}, {true, false});
    // Per-target weights (a constant input: mul's kernels scale the rows).
    check_parity_both(
        [&](const std::vector<Tensor>& in) { return cross_entropy(in[0], in[1], -100, reduction, in[2]); },
        {logits, targets, positive({2, 9}, 29)}, {true, false, false});
  }
  const Tensor bad = Tensor::from_vector<int64_t>({0, 1, 37}, {3});
  const std::string msg = error_message([&] { cross_entropy(randn({3, 37}, 28).to(kGpu), bad.to(kGpu)); });
  EXPECT_NE(msg.find("target 37 at position 2"), std::string::npos) << msg;
}

TEST(CudaNn, EmbeddingGradientIsTheCpuSumInTheSameOrder) {
  REQUIRE_CUDA();
  const Tensor weight = randn({11, 19}, 29);
  const Tensor indices = Tensor::from_vector<int64_t>({3, 0, 3, 10, 3, 7, 0, 3, 5, 10, 3, 1, 2, 3}, {2, 7});
  check_parity_both([](const std::vector<Tensor>& in) { return embedding(in[0], in[1]); }, {weight, indices},
                    {true, false});
  // Repeated indices are summed in position order without atomics: bit-identical to the CPU.
  for (DType dtype : {DType::Float32, DType::Float64}) {
    const Tensor dout = randn({14, 19}, 30).to(dtype);
    Tensor want = Tensor::empty({11, 19}, dtype), got = Tensor::empty({11, 19}, TensorOptions(dtype).with_device(kGpu));
    kernels::cpu_backend().embedding_backward(want, dout, indices.reshape({14}));
    kernels::backend(kGpu).embedding_backward(got, dout.to(kGpu), indices.reshape({14}).to(kGpu));
    EXPECT_EQ(got.to_vector<double>(), want.to_vector<double>());
  }
  const std::string msg = error_message([&] {
    embedding(weight.to(kGpu), Tensor::from_vector<int64_t>({1, -2}, {2}).to(kGpu));
  });
  EXPECT_NE(msg.find("index -2 at position 1"), std::string::npos) << msg;
}

TEST(CudaNn, DropoutKeepsExactlyTheCpuElements) {
  REQUIRE_CUDA();
  for (int64_t n : {1, 5, 1023, 100001}) {
    for (DType dtype : {DType::Float32, DType::Float64}) {
      const Tensor x = randn({n}, 31).to(dtype);
      const Tensor want = dropout(x, 0.3, true, 0xfeedULL, 17), got = dropout(x.to(kGpu), 0.3, true, 0xfeedULL, 17);
      const std::vector<double> w = want.to_vector<double>(), g = got.to_vector<double>();
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(g[static_cast<size_t>(i)] == 0.0, w[static_cast<size_t>(i)] == 0.0) << i;
      EXPECT_EQ(max_error(got, want), 0.0);
    }
  }
  check_parity_both([](const std::vector<Tensor>& in) { return dropout(in[0], 0.25, true, 5, 3); },
                    {randn({17, 23}, 32)}, {true});
}

TEST(CudaNn, RotaryOnAStridedInput) {
  REQUIRE_CUDA();
  // x [2, 9, 3, 8] as a transposed view; the cos/sin tables take no gradient.
  check_parity_both([](const std::vector<Tensor>& in) { return rotary(in[0].transpose(1, 2), in[1], in[2]); },
                    {randn({2, 3, 9, 8}, 35), randn({9, 4}, 36), randn({9, 4}, 37)}, {true, false, false});
}

// ---------------------------------------------------------------- optimizer kernels

TEST(CudaOptim, AdamWStepAndSumSquares) {
  REQUIRE_CUDA();
  for (DType dtype : {DType::Float32, DType::Float64}) {
    SCOPED_TRACE(dtype_name(dtype));
    Tensor p_cpu = randn({1000, 3}, 33).to(dtype), m_cpu = Tensor::zeros({1000, 3}, dtype),
           v_cpu = Tensor::zeros({1000, 3}, dtype);
    Tensor p_gpu = p_cpu.to(kGpu), m_gpu = m_cpu.to(kGpu), v_gpu = v_cpu.to(kGpu);
    for (int64_t step = 1; step <= 3; ++step) {
      const Tensor g = randn({1000, 3}, 40 + static_cast<uint64_t>(step)).to(dtype);
      const kernels::AdamWParams hp{1e-2, 0.9, 0.95, 1e-8, 0.1, step};
      kernels::cpu_backend().adamw_step(p_cpu, g, m_cpu, v_cpu, hp);
      kernels::backend(kGpu).adamw_step(p_gpu, g.to(kGpu), m_gpu, v_gpu, hp);
    }
    const double tol = dtype == DType::Float32 ? 1e-6 : 1e-14;
    EXPECT_LE(max_error(p_gpu, p_cpu), tol);
    EXPECT_LE(max_error(m_gpu, m_cpu), tol);
    EXPECT_LE(max_error(v_gpu, v_cpu), tol);
    const Tensor big = randn({300007}, 34).to(dtype);
    const double want = kernels::cpu_backend().sum_squares(big), got = kernels::backend(kGpu).sum_squares(big.to(kGpu));
    EXPECT_NEAR(got, want, 1e-12 * want);
    EXPECT_EQ(kernels::backend(kGpu).sum_squares(big.to(kGpu)), got) << "not reproducible";
  }
}

// ---------------------------------------------------------------- dilated attention

bool quick_mode() {
  const char* v = std::getenv("DILATRON_CUDA_TEST_QUICK");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

struct AttentionResult {
  Tensor o, lse, dq, dk, dv, dbias;
};

// Forward and backward through the op on `device` in `dtype`, from float64 values.
AttentionResult run_attention(const AttentionCase& c, DType dtype, Device device, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& bias, const Tensor& dout) {
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule(c.schedule);
  opts.causal = c.causal;
  opts.dropout = c.dropout;
  opts.seed = 0x9e3779b97f4a7c15ULL;
  opts.offset = 11;
  const Tensor ql = leaf(q, dtype, device, true), kl = leaf(k, dtype, device, true), vl = leaf(v, dtype, device, true);
  const Tensor bl = c.bias ? leaf(bias, dtype, device, true) : Tensor();
  const AttentionOutput out = dilated_attention_with_lse(ql, kl, vl, opts, bl);
  out.o.backward(dout.to(dtype).to(device));
  return {out.o, out.lse, ql.grad(), kl.grad(), vl.grad(), c.bias ? bl.grad() : Tensor()};
}

// dbias sums dS over up to N^2 pairs per head; its float32 error is bounded relative to the whole
// table's scale rather than per element.
double table_error(const Tensor& got, const Tensor& want) {
  const std::vector<double> w = want.to_vector<double>();
  double scale = 1.0;
  for (double x : w) scale = std::max(scale, std::abs(x));
  return max_error(mul(got, 1.0 / scale), mul(want, 1.0 / scale));
}

class CudaAttention : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(CudaAttention, MatchesCpuFloat64) {
  REQUIRE_CUDA();
  const AttentionCase& c = GetParam();
  if (quick_mode() && !c.quick) GTEST_SKIP() << "DILATRON_CUDA_TEST_QUICK: long case skipped";
  const Shape shape{c.B, c.N, c.H, c.D};
  const Tensor q = randn(shape, 51), k = randn(shape, 52), v = randn(shape, 53), dout = randn(shape, 54);
  const Tensor bias = randn({c.H, 32}, 55);
  const AttentionResult want = run_attention(c, DType::Float64, Device::cpu(), q, k, v, bias, dout);
  for (DType dtype : {DType::Float32, DType::Float64}) {
    if (dtype == DType::Float64 && c.D > 64) continue;  // float64 on CUDA: D <= 64
    SCOPED_TRACE(dtype_name(dtype));
    const double tol = dtype == DType::Float32 ? 1e-5 : 1e-10;
    const AttentionResult got = run_attention(c, dtype, kGpu, q, k, v, bias, dout);
    EXPECT_LE(max_error(got.o, want.o), tol) << "o";
    EXPECT_LE(max_error(got.lse, want.lse), tol) << "lse";
    EXPECT_LE(max_error(got.dq, want.dq), tol) << "dq";
    EXPECT_LE(max_error(got.dk, want.dk), tol) << "dk";
    EXPECT_LE(max_error(got.dv, want.dv), tol) << "dv";
    if (c.bias) {
      EXPECT_LE(table_error(got.dbias, want.dbias), tol) << "dbias";
    }
  }
}

// The small cases straight against the float64 oracle (attention_reference.h), as the CPU suite
// does: float32 to the contract's 1e-5 (dbias relative to its table's scale), float64 to 1e-10.
TEST_P(CudaAttention, MatchesFloat64Oracle) {
  REQUIRE_CUDA();
  const AttentionCase& c = GetParam();
  if (quick_mode()) GTEST_SKIP() << "DILATRON_CUDA_TEST_QUICK: the CPU-parity test covers the kernels";
  if (c.N > 100) GTEST_SKIP() << "N = " << c.N << ": the float64 oracle runs on the small (N <= 100) cases only";
  const test::OracleRun run = test::oracle_run(c);
  test::expect_matches_oracle(c, run, DType::Float32, kGpu, 1e-5, true);
  if (c.D <= 64) test::expect_matches_oracle(c, run, DType::Float64, kGpu, 1e-10, true);  // float64 on CUDA: D <= 64
}

INSTANTIATE_TEST_SUITE_P(Cuda, CudaAttention, ::testing::ValuesIn(test::kAttentionCases), test::case_name);

// bf16 on tensor cores (kernels/cuda/dilated_attention_bf16.cu) over the shared cases, against the
// float64 oracle on the same bf16 inputs: the criterion, each output's and gradient's error
// at most twice that of the naive bf16 implementation (attention_reference.h's naive_bf16, itself
// checked on the CPU by BFloat16Attention.NaiveReferenceIsWithinBf16RoundingOfTheOracle). The
// oracle and the naive code are O(N^2) on the host: the N = 1025 cases take seconds each.
class CudaAttentionBf16 : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(CudaAttentionBf16, WithinTwiceTheNaiveBf16Error) {
  REQUIRE_CUDA();
  const AttentionCase& c = GetParam();
  if (quick_mode() && !c.quick) GTEST_SKIP() << "DILATRON_CUDA_TEST_QUICK: long case skipped";
  const test::OracleRun run = test::oracle_run(c, DType::BFloat16);
  const attention_reference::Problem& p = run.problem;
  const attention_reference::NaiveBf16 naive = attention_reference::naive_bf16(p, run.dout);
  const Shape shape{c.B, c.N, c.H, c.D};
  auto leaf = [&](const std::vector<double>& values, const Shape& s) {
    return Tensor::from_vector(values, s, TensorOptions(DType::BFloat16)).to(kGpu).requires_grad_();
  };
  Tensor q = leaf(p.q, shape), k = leaf(p.k, shape), v = leaf(p.v, shape);
  Tensor bias = c.bias ? leaf(p.bias, {c.H, p.num_buckets}) : Tensor();
  const AttentionOutput out = dilated_attention_with_lse(q, k, v, test::oracle_options(p), bias);
  ASSERT_EQ(out.o.dtype(), DType::BFloat16);
  ASSERT_EQ(out.lse.dtype(), DType::Float32);
  out.o.backward(Tensor::from_vector(run.dout, shape, TensorOptions(DType::BFloat16)).to(kGpu));
  auto expect_within_twice_naive = [](const char* name, const std::vector<double>& got,
                                      const std::vector<double>& naive_got, const std::vector<double>& want) {
    const double err = test::max_error(got, want), naive_err = test::max_error(naive_got, want);
    EXPECT_LE(err, 2.0 * naive_err) << name << ": error " << err << ", naive bf16 " << naive_err;
  };
  expect_within_twice_naive("o", out.o.to_vector<double>(), naive.fwd.o, run.want.o);
  expect_within_twice_naive("lse", out.lse.to_vector<double>(), naive.fwd.lse, run.want.lse);
  expect_within_twice_naive("dq", q.grad().to_vector<double>(), naive.grads.dq, run.want_grads.dq);
  expect_within_twice_naive("dk", k.grad().to_vector<double>(), naive.grads.dk, run.want_grads.dk);
  expect_within_twice_naive("dv", v.grad().to_vector<double>(), naive.grads.dv, run.want_grads.dv);
  if (c.bias) {
    ASSERT_EQ(bias.grad().dtype(), DType::BFloat16);
    const double err = test::table_scaled_error(bias.grad().to_vector<double>(), run.want_grads.dbias);
    const double naive_err = test::table_scaled_error(naive.grads.dbias, run.want_grads.dbias);
    EXPECT_LE(err, 2.0 * naive_err) << "dbias: error " << err << ", naive bf16 " << naive_err;
  }
}

INSTANTIATE_TEST_SUITE_P(Cuda, CudaAttentionBf16, ::testing::ValuesIn(test::kAttentionCases), test::case_name);

TEST(CudaAttentionDropout, MaskIsBitIdenticalToTheCpu) {
  REQUIRE_CUDA();
  // With v[j] = e_j (one-hot rows, D >= N) the output row of query t is P(t, j) m(t, j) / (1 - p)
  // per key j, so its zeros are exactly the dropped pairs. float32 runs the SIMT kernels, bf16 the
  // tensor-core ones (o within one bf16 rounding, 2^-8 relative to max(|o|, 1), plus float32's).
  for (const auto& [schedule, dtype] : {std::pair{"64:1", DType::Float32}, std::pair{"64:2", DType::Float32},
                                        std::pair{"32:1,64:4", DType::Float32}, std::pair{"64:1", DType::BFloat16},
                                        std::pair{"64:2", DType::BFloat16}, std::pair{"32:1,64:4k", DType::BFloat16}}) {
    SCOPED_TRACE(std::string(schedule) + " " + dtype_name(dtype));
    const int64_t B = 2, N = 64, H = 3, D = 64;
    std::vector<double> one_hot(static_cast<size_t>(B * N * H * D), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < N; ++j)
        for (int64_t h = 0; h < H; ++h) one_hot[static_cast<size_t>(((b * N + j) * H + h) * D + j)] = 1.0;
    const Tensor v = Tensor::from_vector(one_hot, {B, N, H, D});
    const Tensor q = randn({B, N, H, D}, 61), k = randn({B, N, H, D}, 62);
    DilatedAttentionOptions opts;
    opts.schedule = parse_schedule(schedule);
    opts.causal = true;
    opts.dropout = 0.4;
    opts.seed = 1234567;
    opts.offset = 3;
    // The CPU runs in float64 on the same (dtype-rounded) values.
    const Tensor qd = q.to(dtype).to(DType::Float64), kd = k.to(dtype).to(DType::Float64);
    const Tensor want = dilated_attention(qd, kd, v, opts);
    const Tensor got = dilated_attention(qd.to(dtype).to(kGpu), kd.to(dtype).to(kGpu), v.to(dtype).to(kGpu), opts);
    const std::vector<double> w = want.to_vector<double>(), g = got.to_vector<double>();
    size_t zeros = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      ASSERT_EQ(g[i] == 0.0, w[i] == 0.0) << "element " << i;
      zeros += w[i] == 0.0;
    }
    EXPECT_GT(zeros, w.size() / 2);  // causal masking and dropout both produce zeros
    EXPECT_LE(max_error(got, want), dtype == DType::Float32 ? 1e-5 : std::ldexp(1.0, -8) + 1e-5);
  }
}

// Forward + backward of c twice in dtype: every output and gradient bitwise the same (dq only when
// deterministic).
void expect_reproducible_in(const AttentionCase& c, DType dtype, bool deterministic, const Tensor& q, const Tensor& k,
                            const Tensor& v, const Tensor& bias, const Tensor& dout) {
  std::vector<std::vector<float>> first;
  for (int run = 0; run < 2; ++run) {
    const AttentionResult r = run_attention(c, dtype, kGpu, q, k, v, bias, dout);
    std::vector<std::vector<float>> got = {r.o.to_vector<float>(), r.lse.to_vector<float>(), r.dk.to_vector<float>(),
                                           r.dv.to_vector<float>(), r.dbias.to_vector<float>()};
    if (deterministic) got.push_back(r.dq.to_vector<float>());
    if (run == 0) first = got;
    else EXPECT_EQ(got, first);
  }
}

// Runs forward + backward twice in float32 (SIMT kernels) and in bf16 (tensor-core kernels) and
// expects every output and gradient to match bitwise, dq only in the deterministic mode (the
// default mode adds dq with float atomics).
void expect_reproducible(bool deterministic) {
  const AttentionCase c{"repro", 2, 700, 3, 64, "128:1,256:2,700:3", true, 0.2, true, false};
  const Shape shape{c.B, c.N, c.H, c.D};
  const Tensor q = randn(shape, 71), k = randn(shape, 72), v = randn(shape, 73), dout = randn(shape, 74);
  const Tensor bias = randn({c.H, 32}, 75);
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    SCOPED_TRACE(dtype_name(dtype));
    expect_reproducible_in(c, dtype, deterministic, q, k, v, bias, dout);
  }
}

// DILATRON_DETERMINISTIC=1 for the object's lifetime, then as it was.
class DeterministicMode {
 public:
  DeterministicMode() : had_(std::getenv("DILATRON_DETERMINISTIC") != nullptr) {
    if (had_) saved_ = std::getenv("DILATRON_DETERMINISTIC");
    setenv("DILATRON_DETERMINISTIC", "1", 1);
  }
  ~DeterministicMode() {
    if (had_) setenv("DILATRON_DETERMINISTIC", saved_.c_str(), 1);
    else unsetenv("DILATRON_DETERMINISTIC");
  }

 private:
  bool had_;
  std::string saved_;
};

TEST(CudaAttentionDeterminism, DeterministicModeIsBitwiseReproducible) {
  REQUIRE_CUDA();
  const DeterministicMode mode;
  EXPECT_TRUE(kernels::cuda::deterministic_attention());
  expect_reproducible(true);
}

// bf16: the deterministic mode changes only how dq is summed (a query-major kernel instead of
// atomics), so every other output is bitwise the default mode's and dq agrees to bf16 rounding
// (2^-7 relative to max(|dq|, 1): a rounding step either way).
TEST(CudaAttentionDeterminism, Bf16DeterministicModeChangesOnlyTheDqSummation) {
  REQUIRE_CUDA();
  if (kernels::cuda::deterministic_attention()) GTEST_SKIP() << "DILATRON_DETERMINISTIC is set";
  const AttentionCase c{"repro_bf16", 1, 700, 3, 128, "128:1,256:2k,700:3", true, 0.2, true, false};
  const Shape shape{c.B, c.N, c.H, c.D};
  const Tensor q = randn(shape, 81), k = randn(shape, 82), v = randn(shape, 83), dout = randn(shape, 84);
  const Tensor bias = randn({c.H, 32}, 85);
  const AttentionResult atomic = run_attention(c, DType::BFloat16, kGpu, q, k, v, bias, dout);
  const DeterministicMode mode;
  const AttentionResult ordered = run_attention(c, DType::BFloat16, kGpu, q, k, v, bias, dout);
  for (const auto& [name, a, b] : {std::tuple{"o", &atomic.o, &ordered.o}, std::tuple{"lse", &atomic.lse, &ordered.lse},
                                   std::tuple{"dk", &atomic.dk, &ordered.dk}, std::tuple{"dv", &atomic.dv, &ordered.dv},
                                   std::tuple{"dbias", &atomic.dbias, &ordered.dbias}})
    EXPECT_EQ(a->to_vector<float>(), b->to_vector<float>()) << name;
  EXPECT_LE(max_error(ordered.dq, atomic.dq), std::ldexp(1.0, -7));
}

TEST(CudaAttentionDeterminism, DefaultModeOnlyDqUsesAtomics) {
  REQUIRE_CUDA();
  if (kernels::cuda::deterministic_attention()) GTEST_SKIP() << "DILATRON_DETERMINISTIC is set";
  expect_reproducible(false);  // o, lse, dk, dv and dbias are reproducible in every mode
}

// Head dims up to the largest compiled kernel run (padded); beyond it the error names D and the limit.
TEST(CudaAttention, UnsupportedHeadDimIsAnErrorNamingIt) {
  REQUIRE_CUDA();
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("8:1");
  for (const auto& [D, dtype, limit] : {std::tuple{int64_t{160}, DType::Float32, "at most 128"},
                                        std::tuple{int64_t{96}, DType::Float64, "at most 64"}}) {
    const Tensor x = randn({1, 8, 1, D}, 81).to(dtype).to(kGpu);
    const std::string msg = error_message([&] { dilated_attention(x, x, x, opts); });
    EXPECT_NE(msg.find("D = " + std::to_string(D)), std::string::npos) << msg;
    EXPECT_NE(msg.find(limit), std::string::npos) << msg;
  }
}

}  // namespace

#endif  // DILATRON_WITH_CUDA
