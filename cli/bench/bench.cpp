// `dilatron bench`: the performance figures, each against something fixed.
//
//   bench peak       the machine's FP32 FMA peak over all threads (a register-only loop), the
//                    yardstick every attention figure is a fraction of
//   bench attention  forward and forward+backward time of the attention op, effective GFLOP/s over
//                    the visited pairs (attention_flops) and the fraction of the peak
//   bench scaling    forward+backward time per token and peak memory against N, each N in a fresh
//                    process so its peak resident set is its own
//   bench train      tokens/s of a config's training steps (the trainer's own loop)
//   bench decode     generation tokens/s and KV-cache memory against the context length
//
// One file per figure in this folder, bench.h for what they share. Each prints a Markdown table on
// stdout and, with --json FILE, appends one JSON object per row to FILE (what
// scripts/bench-report.sh reads).
#include <algorithm>
#include <chrono>

#include "bench/bench.h"
#include "commands.h"

namespace dilatron::cli {
namespace bench {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  DILATRON_CHECK(!v.empty(), "median of no values");
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

}  // namespace bench

void add_bench_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("bench", "Performance figures: FMA peak, attention, scaling in N, training, decoding");
  cmd->require_subcommand(1);
  bench::add_peak(*cmd);
  bench::add_attention(*cmd);
  bench::add_scaling(*cmd);
  bench::add_train(*cmd);
  bench::add_decode(*cmd);
}

}  // namespace dilatron::cli
