// Flash dilated attention throughput through the op, on the CPU and (where there is one) the first
// GPU: forward and forward+backward at B = 1, H = 8, D = 64, schedule 1024:1,4096:4,16384:16,
// causal, float32, N = 1K .. 256K (GPU: .. 4M). GFLOP/s counts the visited (query, key) pairs
// (attention_flops): 4*D flops each forward (QK^T and PV), 2.5x that backward. `dilatron bench
// attention` gives the same figures as a table, with fractions of the machine's peak. For
// comparison, dense causal attention built from the library's ops on the CPU (BLAS GEMMs, one
// materialised N x N score matrix per head) up to N = 8K.
#include <benchmark/benchmark.h>

#include <cmath>
#include <limits>
#include <vector>

#include "dilatron/attention.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"
#include "dilatron/random.h"

using namespace dilatron;

namespace {

constexpr int64_t kB = 1, kH = 8, kD = 64;

DilatedAttentionOptions bench_options() {
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("1024:1,4096:4,16384:16");
  opts.causal = true;
  return opts;
}

AttentionFlops flops(const DilatedAttentionOptions& opts, int64_t N) {
  return attention_flops(opts.schedule, kB, kH, N, kD, opts.causal);
}

void set_rate(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Each iteration ends when the device has finished its work (Backend::synchronize).
void BM_DilatedAttentionForward(benchmark::State& state, Device device) {
  const int64_t N = state.range(0);
  Generator gen(1);
  const Shape shape{kB, N, kH, kD};
  const TensorOptions to = TensorOptions(DType::Float32).with_device(device);
  const Tensor q = Tensor::randn(shape, gen, to), k = Tensor::randn(shape, gen, to), v = Tensor::randn(shape, gen, to);
  const DilatedAttentionOptions opts = bench_options();
  kernels::Backend& backend = kernels::backend(device);
  for (auto _ : state) {
    benchmark::DoNotOptimize(dilated_attention(q, k, v, opts));
    backend.synchronize();
  }
  set_rate(state, flops(opts, N).forward);
}

void BM_DilatedAttentionForwardBackward(benchmark::State& state, Device device) {
  const int64_t N = state.range(0);
  Generator gen(2);
  const Shape shape{kB, N, kH, kD};
  const TensorOptions to = TensorOptions(DType::Float32).with_device(device);
  Tensor q = Tensor::randn(shape, gen, to).requires_grad_(), k = Tensor::randn(shape, gen, to).requires_grad_(),
         v = Tensor::randn(shape, gen, to).requires_grad_();
  const Tensor dout = Tensor::randn(shape, gen, to);
  const DilatedAttentionOptions opts = bench_options();
  kernels::Backend& backend = kernels::backend(device);
  for (auto _ : state) {
    for (Tensor* x : {&q, &k, &v}) x->set_grad(Tensor());
    dilated_attention(q, k, v, opts).backward(dout);
    backend.synchronize();
  }
  set_rate(state, flops(opts, N).forward_backward());
}

// Dense causal attention, one head at a time: S = QK^T * scale, masked, softmax, P V.
void BM_DenseCausalAttentionForward(benchmark::State& state) {
  const int64_t N = state.range(0);
  Generator gen(3);
  const Shape shape{kB, kH, N, kD};  // head-major, as a dense implementation would keep it
  const Tensor q = Tensor::randn(shape, gen), k = Tensor::randn(shape, gen), v = Tensor::randn(shape, gen);
  std::vector<double> upper(static_cast<size_t>(N * N));
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = t + 1; j < N; ++j) upper[static_cast<size_t>(t * N + j)] = 1.0;
  const Tensor above_diagonal = gt(Tensor::from_vector(upper, {N, N}, DType::Float32), Tensor::scalar(0.5));
  const double scale = 1.0 / std::sqrt(static_cast<double>(kD));
  for (auto _ : state) {
    for (int64_t h = 0; h < kH; ++h) {
      auto head = [&](const Tensor& x) { return x.narrow(1, h, 1).reshape({N, kD}); };
      const Tensor s = masked_fill(matmul(head(q), head(k).transpose(0, 1)) * scale, above_diagonal,
                                   -std::numeric_limits<double>::infinity());
      benchmark::DoNotOptimize(matmul(softmax(s, -1), head(v)));
    }
  }
  set_rate(state, 4.0 * kD * static_cast<double>(kB * kH * N * (N + 1) / 2));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  std::vector<Device> devices = {Device::cpu()};
  if (kernels::cuda_device_count() > 0) devices.push_back(Device::cuda(0));
  for (const Device& device : devices) {
    const int64_t max_n = device.is_cpu() ? int64_t{1} << 18 : int64_t{1} << 22;
    benchmark::RegisterBenchmark(("DilatedAttentionForward/" + device.str()).c_str(), BM_DilatedAttentionForward,
                                 device)
        ->RangeMultiplier(4)->Range(1 << 10, max_n)->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("DilatedAttentionForwardBackward/" + device.str()).c_str(),
                                 BM_DilatedAttentionForwardBackward, device)
        ->RangeMultiplier(4)->Range(1 << 10, max_n)->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  benchmark::RegisterBenchmark("DenseCausalAttentionForward/cpu", BM_DenseCausalAttentionForward)
      ->RangeMultiplier(2)->Range(1 << 10, 1 << 13)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
