// Flash dilated attention throughput on a GPU (the CPU figures are bench_attention): forward and
// forward+backward through the backend kernels, float32, by default B = 1, H = 8, D = 64,
// schedule 1024:1,4096:4,16384:16, causal, as bench_attention, for N = 4K, 8K, 16K, ... until the
// time budget (default 60 s) or the device memory runs out. TFLOP/s counts the visited
// (query, key) pairs (attention_flops): 4*D flops each forward, 3.5x that forward+backward (the
// backward at FlashAttention's 2.5x).
//
//   bench_attention_cuda [--device cuda:0] [--budget-seconds 60] [--heads 8] [--dim 64] [--batch 1]
//                        [--schedule 1024:1,4096:4,16384:16] [--non-causal] [--max-n 4194304]
//
// Prints one Markdown table (one row per N) on stdout. Runs on any device the build has; on a
// machine or build without CUDA it says so and exits with status 2.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dilatron/attention.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/random.h"

using namespace dilatron;

namespace {

struct Options {
  Device device = Device::cuda(0);
  double budget_seconds = 60.0;
  int64_t B = 1, H = 8, D = 64, max_n = int64_t{1} << 22;
  std::string schedule = "1024:1,4096:4,16384:16";
  bool causal = true;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      DILATRON_CHECK(i + 1 < argc, "bench_attention_cuda: ", a, " needs a value");
      return argv[++i];
    };
    if (a == "--device") o.device = Device::parse(value());
    else if (a == "--budget-seconds") o.budget_seconds = std::stod(value());
    else if (a == "--heads") o.H = std::stoll(value());
    else if (a == "--dim") o.D = std::stoll(value());
    else if (a == "--batch") o.B = std::stoll(value());
    else if (a == "--schedule") o.schedule = value();
    else if (a == "--max-n") o.max_n = std::stoll(value());
    else if (a == "--non-causal") o.causal = false;
    else throw Error("bench_attention_cuda: unknown argument " + a + " (see the comment at the top of the source)");
  }
  return o;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Waits for the device: reading one element back queues behind every kernel launched before it.
void sync(const Tensor& t) { (void)make_view(t, {}, {}, t.offset()).item(); }

struct Timing {
  double forward_ms = 0.0, forward_backward_ms = 0.0;
};

// Mean over repetitions after one warm-up of each, running for at least `min_seconds` (and at
// least three repetitions) per phase.
Timing time_attention(const Options& opt, int64_t N, double min_seconds) {
  const Shape shape{opt.B, N, opt.H, opt.D};
  const TensorOptions to = TensorOptions(DType::Float32).with_device(opt.device);
  Generator gen(1);
  const Tensor q = Tensor::randn(shape, gen, to), k = Tensor::randn(shape, gen, to), v = Tensor::randn(shape, gen, to);
  const Tensor dout = Tensor::randn(shape, gen, to);
  Tensor o = Tensor::empty(shape, to), lse = Tensor::empty({opt.B, opt.H, N}, to);
  Tensor dq = Tensor::empty(shape, to), dk = Tensor::empty(shape, to), dv = Tensor::empty(shape, to), dbias;
  kernels::AttentionParams params;
  params.schedule = parse_schedule(opt.schedule);
  params.causal = opt.causal;
  params.scale = 1.0 / std::sqrt(static_cast<double>(opt.D));
  kernels::Backend& backend = kernels::backend(opt.device);
  auto forward = [&] { backend.dilated_attention_forward(o, lse, q, k, v, Tensor(), params); };
  auto forward_backward = [&] {
    forward();
    backend.dilated_attention_backward(dq, dk, dv, dbias, dout, q, k, v, o, lse, Tensor(), params);
  };
  auto mean_ms = [&](const auto& run) {
    run();
    sync(o);
    int reps = 0;
    const double start = now_seconds();
    double elapsed = 0.0;
    while (reps < 3 || elapsed < min_seconds) {
      run();
      sync(o);
      ++reps;
      elapsed = now_seconds() - start;
    }
    return 1e3 * elapsed / reps;
  };
  return {mean_ms(forward), mean_ms(forward_backward)};
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options opt = parse(argc, argv);
    if (opt.device.is_cuda() && opt.device.index >= kernels::cuda_device_count()) {
      std::fprintf(stderr, "bench_attention_cuda: %s is not available (%s; %d CUDA devices)\n", opt.device.str().c_str(),
                   kernels::cuda_compiled() ? "CUDA backend built" : "built without CUDA", kernels::cuda_device_count());
      return 2;
    }
    const std::vector<AttentionBranch> schedule = parse_schedule(opt.schedule);
    std::printf("Dilated attention on %s: B = %lld, H = %lld, D = %lld, float32, %s, schedule %s\n\n",
                opt.device.str().c_str(), static_cast<long long>(opt.B), static_cast<long long>(opt.H),
                static_cast<long long>(opt.D), opt.causal ? "causal" : "non-causal", opt.schedule.c_str());
    std::printf("| N | visited pairs | forward ms | forward TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |\n");
    std::printf("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    std::fflush(stdout);
    const double start = now_seconds();
    double last_cost = 0.0;  // seconds the previous N took, timing included
    for (int64_t N = 4096; N <= opt.max_n; N *= 2) {
      const double left = opt.budget_seconds - (now_seconds() - start);
      // The work grows at least linearly in N: stop when the doubled size would not fit.
      if (last_cost > 0.0 && 2.2 * last_cost > left) break;
      const double t0 = now_seconds();
      Timing t;
      try {
        t = time_attention(opt, N, std::min(1.0, 0.05 * opt.budget_seconds));
      } catch (const Error& e) {
        std::printf("\nStopped at N = %lld: %s\n", static_cast<long long>(N), e.what());
        break;
      }
      last_cost = now_seconds() - t0;
      const double pairs = static_cast<double>(opt.B * visited_pairs(schedule, opt.H, N, opt.causal));
      const AttentionFlops flops = attention_flops(schedule, opt.B, opt.H, N, opt.D, opt.causal);
      std::printf("| %lld | %.4g | %.3f | %.2f | %.3f | %.2f |\n", static_cast<long long>(N), pairs, t.forward_ms,
                  flops.forward / (t.forward_ms * 1e-3) * 1e-12, t.forward_backward_ms,
                  flops.forward_backward() / (t.forward_backward_ms * 1e-3) * 1e-12);
      std::fflush(stdout);
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_attention_cuda: %s\n", e.what());
    return 1;
  }
}
