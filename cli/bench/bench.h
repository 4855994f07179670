// What the `dilatron bench` figures share: a clock, medians, JSON lines, the FP32 peak (peak.cpp),
// the attention timing and the --budget over sizes (attention_timing.cpp); and the function by which
// each figure's file adds its subcommand to `bench` (bench.cpp).
#pragma once

#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "commands.h"
#include "dilatron/error.h"

namespace dilatron::cli::bench {

double now_seconds();
double median(std::vector<double> v);
std::string json_string(const std::string& s);

// One JSON object per line, appended: {"bench": ..., key: value, ...}.
class JsonLine {
 public:
  explicit JsonLine(const std::string& bench) { os_ << "{\"bench\": " << json_string(bench); }
  JsonLine& add(const std::string& key, const std::string& v) { return raw(key, json_string(v)); }
  JsonLine& add(const std::string& key, const char* v) { return raw(key, json_string(v)); }
  JsonLine& add(const std::string& key, bool v) { return raw(key, v ? "true" : "false"); }
  JsonLine& add(const std::string& key, int64_t v) { return raw(key, std::to_string(v)); }
  JsonLine& add(const std::string& key, int v) { return raw(key, std::to_string(v)); }
  JsonLine& add(const std::string& key, double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    return raw(key, std::isfinite(v) ? buf : "null");
  }
  void append_to(const std::string& path) const {
    if (path.empty()) return;
    std::ofstream out(path, std::ios::app);
    DILATRON_CHECK(out.good(), "cannot write '", path, "'");
    out << os_.str() << "}\n";
  }

 private:
  JsonLine& raw(const std::string& key, const std::string& v) {
    os_ << ", " << json_string(key) << ": " << v;
    return *this;
  }
  std::ostringstream os_;
};

struct Peak {
  double gflops = 0.0;  // all threads together
  int threads = 0;
  double seconds = 0.0;
  std::string isa;
};

// The FP32 peak over omp_get_max_threads() threads: a warm-up (clocks ramp up), then trials of
// about 0.25 s in which every thread runs the loop until a common deadline, each giving the flops
// over its wall time; the best trial is the peak (other processes on the machine can only lower a
// trial). `seconds` is the time of all trials together.
Peak measure_peak(double seconds);

struct AttentionShape {
  int64_t batch = 1, heads = 8, dim = 64;
  std::string schedule = "1024:1,4096:4,16384:16";
  bool causal = true;
  std::string device = "cpu";
  std::string dtype = "float32";  // of q, k, v (float32, float64 or bfloat16)
};

struct AttentionTiming {
  double forward_s = NAN, forward_backward_s = NAN;
  int forward_reps = 0, forward_backward_reps = 0;
  int64_t peak_extra_bytes = 0;  // library-accounted memory of one forward+backward beyond its inputs
  int64_t input_bytes = 0;       // q, k, v and do
};

// The attention op's forward (when `forward`) and forward+backward on random q, k, v of length N,
// each timed as time_runs (attention_timing.cpp) says.
AttentionTiming time_attention(const AttentionShape& s, int64_t N, int reps, double long_s, bool forward);
std::string shape_label(const AttentionShape& s);
void add_shape_options(CLI::App* cmd, AttentionShape& s);
// The JSON line of one length N of s: bench, n, the shape and the thread count; the figures follow.
JsonLine shape_json_line(const std::string& bench, int64_t N, const AttentionShape& s);

// A --budget in seconds over a series of sizes: a size fits when its cost, estimated from the last
// one measured (time scales with the FLOPs), still ends within it; any size fits with none (0).
class Budget {
 public:
  explicit Budget(double seconds) : seconds_(seconds), started_(now_seconds()) {}
  bool fits(double flops) const;
  // f() for a size of `flops`, its time kept for the next estimate.
  template <typename F>
  auto measure(double flops, F&& f) {
    const double t0 = now_seconds();
    auto result = f();
    last_s_ = now_seconds() - t0;
    last_flops_ = flops;
    return result;
  }

 private:
  double seconds_, started_, last_s_ = 0.0, last_flops_ = 0.0;
};

// Each figure's subcommand of `bench`.
void add_peak(CLI::App& bench);
void add_attention(CLI::App& bench);
void add_scaling(CLI::App& bench);
void add_train(CLI::App& bench);
void add_decode(CLI::App& bench);

}  // namespace dilatron::cli::bench
