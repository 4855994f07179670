// Timing the attention op: what the attention and scaling figures measure.
#include <omp.h>

#include <functional>
#include <vector>

#include "bench/bench.h"
#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/random.h"
#include "dilatron/storage.h"

namespace dilatron::cli::bench {
namespace {

// One run, then (when it took under `long_s` seconds) `reps` more; the median of those, else the
// one run (at large N a single run is long enough to time, and a warm-up would double the cost).
double time_runs(const std::function<void()>& run, int reps, double long_s, int* reps_used) {
  double t0 = now_seconds();
  run();
  const double first = now_seconds() - t0;
  if (first >= long_s || reps < 1) {
    *reps_used = 1;
    return first;
  }
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    t0 = now_seconds();
    run();
    times.push_back(now_seconds() - t0);
  }
  *reps_used = reps;
  return median(times);
}

}  // namespace

AttentionTiming time_attention(const AttentionShape& s, int64_t N, int reps, double long_s, bool forward) {
  const Device device = Device::parse(s.device);
  const Shape shape{s.batch, N, s.heads, s.dim};
  const DType dtype = dtype_from_name(s.dtype);
  const TensorOptions to = TensorOptions(DType::Float32).with_device(device);
  Generator gen(1);
  // The same float32 draws for every dtype, rounded to it.
  auto input = [&] { return Tensor::randn(shape, gen, to).to(dtype); };
  Tensor q = input().requires_grad_(), k = input().requires_grad_(), v = input().requires_grad_();
  const Tensor dout = input();
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule(s.schedule);
  opts.causal = s.causal;
  kernels::Backend& backend = kernels::backend(device);  // timed runs end when the device has finished

  AttentionTiming t;
  t.input_bytes = 4 * shape_numel(shape) * static_cast<int64_t>(dtype_size(dtype));
  if (forward) {
    t.forward_s = time_runs(
        [&] {
          autograd::NoGradGuard no_grad;
          (void)dilated_attention(q, k, v, opts);
          backend.synchronize();
        },
        reps, long_s, &t.forward_reps);
  }
  const int64_t baseline = memory_stats(device).current_bytes;
  reset_peak_memory_stats(device);
  t.forward_backward_s = time_runs(
      [&] {
        for (Tensor* x : {&q, &k, &v}) x->set_grad(Tensor());
        dilated_attention(q, k, v, opts).backward(dout);
        backend.synchronize();
      },
      reps, long_s, &t.forward_backward_reps);
  // The grads of the last run are still held: they are part of the peak, and are counted as such.
  t.peak_extra_bytes = memory_stats(device).peak_bytes - baseline;
  return t;
}

std::string shape_label(const AttentionShape& s) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "B = %lld, H = %lld, D = %lld, %s, %s, schedule %s, %s",
                static_cast<long long>(s.batch), static_cast<long long>(s.heads), static_cast<long long>(s.dim),
                s.dtype.c_str(), s.causal ? "causal" : "non-causal", s.schedule.c_str(), s.device.c_str());
  return buf;
}

void add_shape_options(CLI::App* cmd, AttentionShape& s) {
  cmd->add_option("--batch", s.batch, "batch size B");
  cmd->add_option("--heads", s.heads, "heads H");
  cmd->add_option("--dim", s.dim, "head dimension D");
  cmd->add_option("--schedule", s.schedule, "branches segment:dilation,...");
  cmd->add_flag("--causal,!--no-causal", s.causal, "causal masking (default on)");
  cmd->add_option("--device", s.device, "cpu or cuda[:N]");
}

JsonLine shape_json_line(const std::string& bench, int64_t N, const AttentionShape& s) {
  JsonLine line(bench);
  line.add("n", N)
      .add("batch", s.batch)
      .add("heads", s.heads)
      .add("dim", s.dim)
      .add("schedule", s.schedule)
      .add("causal", s.causal)
      .add("device", s.device)
      .add("dtype", s.dtype)
      .add("threads", omp_get_max_threads());
  return line;
}

bool Budget::fits(double flops) const {
  if (seconds_ <= 0.0 || last_s_ <= 0.0) return true;
  return now_seconds() - started_ + last_s_ * flops / last_flops_ <= seconds_;
}

}  // namespace dilatron::cli::bench
