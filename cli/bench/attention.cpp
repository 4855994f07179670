// `dilatron bench attention`: forward and forward+backward time of the attention op, effective
// GFLOP/s over the visited pairs (attention_flops) and the fraction of the peak.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "dilatron/attention.h"

namespace dilatron::cli::bench {
namespace {

struct AttentionArgs {
  AttentionShape shape;
  std::vector<int64_t> n = {16384, 65536, 262144};
  std::vector<std::string> dtypes = {"float32"};
  int reps = 3;
  double long_s = 5.0, peak = 0.0, budget = 0.0;
  std::string json;
};

void run_attention_bench(const AttentionArgs& a) {
  const auto schedule = parse_schedule(a.shape.schedule);
  const bool cpu = Device::parse(a.shape.device).is_cpu();
  Peak peak;
  if (a.peak > 0.0) {
    peak.gflops = a.peak;
    peak.isa = "given (--peak)";
  } else if (cpu) {
    peak = measure_peak(0.5);
  }
  AttentionShape label = a.shape;
  label.dtype.clear();
  for (const std::string& d : a.dtypes) label.dtype += (label.dtype.empty() ? "" : " and ") + d;
  std::printf("Dilated attention, %s, %d threads", shape_label(label).c_str(), omp_get_max_threads());
  if (peak.gflops > 0.0) std::printf("; peak %.1f GFLOP/s (%s)", peak.gflops, peak.isa.c_str());
  std::printf("\n\n| N | dtype | visited pairs | forward ms | forward GFLOP/s | of peak | fwd+bwd ms | fwd+bwd GFLOP/s "
              "| of peak | reps fwd/fwd+bwd | attention memory MiB |\n");
  std::printf("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  std::fflush(stdout);
  Budget budget(a.budget);
  for (const int64_t N : a.n) {
    for (const std::string& dtype : a.dtypes) {
      AttentionShape shape = a.shape;
      shape.dtype = dtype;
      const AttentionFlops f = attention_flops(schedule, shape.batch, shape.heads, N, shape.dim, shape.causal);
      const int64_t pairs = shape.batch * visited_pairs(schedule, shape.heads, N, shape.causal);
      if (!budget.fits(f.forward)) {
        std::printf("| %lld | %s | %lld | skipped: over the %.0f s budget | | | | | | | |\n", static_cast<long long>(N),
                    dtype.c_str(), static_cast<long long>(pairs), a.budget);
        JsonLine("attention").add("n", N).add("dtype", dtype).add("skipped", "budget").append_to(a.json);
        continue;
      }
      const AttentionTiming t =
          budget.measure(f.forward, [&] { return time_attention(shape, N, a.reps, a.long_s, true); });
      const double fwd_gflops = f.forward / t.forward_s * 1e-9;
      const double fb_gflops = f.forward_backward() / t.forward_backward_s * 1e-9;
      auto frac = [&](double g) { return peak.gflops > 0.0 ? g / peak.gflops : NAN; };
      std::printf("| %lld | %s | %lld | %.1f | %.2f | %.1f%% | %.1f | %.2f | %.1f%% | %d/%d | %.1f |\n",
                  static_cast<long long>(N), dtype.c_str(), static_cast<long long>(pairs), 1e3 * t.forward_s,
                  fwd_gflops, 100.0 * frac(fwd_gflops), 1e3 * t.forward_backward_s, fb_gflops,
                  100.0 * frac(fb_gflops), t.forward_reps, t.forward_backward_reps,
                  static_cast<double>(t.peak_extra_bytes) / (1 << 20));
      std::fflush(stdout);
      shape_json_line("attention", N, shape)
          .add("visited_pairs", pairs)
          .add("forward_flops", f.forward)
          .add("forward_backward_flops", f.forward_backward())
          .add("forward_s", t.forward_s)
          .add("forward_backward_s", t.forward_backward_s)
          .add("forward_reps", t.forward_reps)
          .add("forward_backward_reps", t.forward_backward_reps)
          .add("forward_gflops", fwd_gflops)
          .add("forward_backward_gflops", fb_gflops)
          .add("peak_gflops", peak.gflops > 0.0 ? peak.gflops : NAN)
          .add("forward_fraction_of_peak", frac(fwd_gflops))
          .add("forward_backward_fraction_of_peak", frac(fb_gflops))
          .add("attention_peak_bytes", t.peak_extra_bytes)
          .append_to(a.json);
    }
  }
}

}  // namespace

void add_attention(CLI::App& bench) {
  auto [attention, at] = add_command(
      bench, "attention",
      "Forward and forward+backward time of dilated attention, GFLOP/s over visited pairs, % of peak",
      run_attention_bench);
  attention->add_option("--n", at->n, "sequence lengths, e.g. 16384,65536,262144")->delimiter(',');
  add_shape_options(attention, at->shape);
  attention->add_option("--reps", at->reps, "timed repetitions after one warm-up run (median)");
  attention->add_option("--long-seconds", at->long_s, "a first run at least this long is the only one timed");
  attention->add_option("--peak", at->peak, "peak GFLOP/s to divide by (default: measured, 0.5 s, on the CPU)");
  attention->add_option("--budget", at->budget, "skip the sizes that would end past this many seconds (0: none)");
  attention->add_option("--dtype", at->dtypes,
                        "dtypes of q, k, v, each timed at every N, e.g. float32,bfloat16 (bfloat16: float32 "
                        "compute, one rounding, on the CPU; the tensor-core kernels on CUDA)")
      ->delimiter(',')
      ->check(CLI::IsMember({"float32", "float64", "bfloat16"}));
  attention->add_option("--json", at->json, "append one JSON line per (N, dtype) to this file");
}

}  // namespace dilatron::cli::bench
