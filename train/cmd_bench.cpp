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
// Each prints a Markdown table on stdout and, with --json FILE, appends one JSON object per row to
// FILE (what scripts/bench-report.sh reads).
#include <omp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DILATRON_BENCH_X86 1
#endif

#include "commands.h"
#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/config.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/profiler.h"
#include "dilatron/random.h"
#include "dilatron/storage.h"
#include "dilatron/trainer.h"

namespace dilatron::cli {
namespace {
namespace fs = std::filesystem;

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

// ---------------------------------------------------------------- peak

// Each thread runs kChains independent FMA chains acc = acc * a + b on full vectors, all in
// registers: more chains than (FMA latency) x (FMA pipes), so the pipes never wait. The chains
// converge to b / (1 - a) = 1 (no overflow, no denormals); their sum goes to a volatile sink and
// the loop runs until a deadline read from the clock, so none of it can be folded away.
constexpr int kChains = 12;
constexpr int kInner = 512;  // iterations between clock reads (~3 us)
volatile float g_sink = 0.0f;

struct FmaLoop {
  const char* isa;
  int lanes;            // floats per vector
  double flops_per_op;  // 2 for a fused multiply-add or a multiply and an add
  uint64_t (*run)(double deadline, float seed);  // returns the blocks of kInner iterations run
};

#ifdef DILATRON_BENCH_X86
// One loop per ISA, stamped from one body: each needs its own target attribute and intrinsics, which
// a template cannot switch per instantiation.
#define DILATRON_FMA_LOOP(NAME, TARGET, V, SET1, FMADD, ADD, STORE, LANES)                  \
  __attribute__((target(TARGET))) uint64_t NAME(double deadline, float seed) {            \
    const V a = SET1(0.999999f), b = SET1(1e-6f);                                         \
    V acc[kChains];                                                                        \
    for (int c = 0; c < kChains; ++c) acc[c] = SET1(seed + static_cast<float>(c));        \
    uint64_t blocks = 0;                                                                   \
    do {                                                                                   \
      for (int i = 0; i < kInner; ++i) {                                                   \
        _Pragma("GCC unroll 12") for (int c = 0; c < kChains; ++c) acc[c] = FMADD(acc[c], a, b);  \
      }                                                                                    \
      ++blocks;                                                                            \
    } while (now_seconds() < deadline);                                                    \
    V s = acc[0];                                                                          \
    for (int c = 1; c < kChains; ++c) s = ADD(s, acc[c]);                                  \
    alignas(64) float lanes[LANES];                                                        \
    STORE(lanes, s);                                                                       \
    float total = 0.0f;                                                                    \
    for (const float x : lanes) total += x;                                                \
    g_sink = g_sink + total;                                                               \
    return blocks;                                                                         \
  }

DILATRON_FMA_LOOP(fma_loop_avx512, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps,
                  _mm512_store_ps, 16)
DILATRON_FMA_LOOP(fma_loop_avx2, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps,
                  _mm256_store_ps, 8)
#undef DILATRON_FMA_LOOP
#endif

// Portable: 128-bit GCC vectors, a multiply and an add (SSE2 on any x86-64, NEON on arm64).
uint64_t fma_loop_generic(double deadline, float seed) {
  typedef float v4 __attribute__((vector_size(16)));
  const v4 a = {0.999999f, 0.999999f, 0.999999f, 0.999999f}, b = {1e-6f, 1e-6f, 1e-6f, 1e-6f};
  v4 acc[kChains];
#pragma GCC unroll 12
  for (int c = 0; c < kChains; ++c) acc[c] = v4{} + (seed + static_cast<float>(c));
  uint64_t blocks = 0;
  do {
    for (int i = 0; i < kInner; ++i) {
#pragma GCC unroll 12
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * a + b;
    }
    ++blocks;
  } while (now_seconds() < deadline);
  v4 s = acc[0];
  for (int c = 1; c < kChains; ++c) s += acc[c];
  g_sink = g_sink + s[0] + s[1] + s[2] + s[3];
  return blocks;
}

// The widest loop this CPU runs (the CPU, not the build flags: the library's kernels are built
// with -march=native by default, so this is also the ISA they use).
FmaLoop best_fma_loop() {
#ifdef DILATRON_BENCH_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {"AVX-512F FMA (512-bit)", 16, 2.0, fma_loop_avx512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {"AVX2 FMA (256-bit)", 8, 2.0, fma_loop_avx2};
  return {"SSE2 mul+add (128-bit, no FMA)", 4, 2.0, fma_loop_generic};
#else
  return {"generic 128-bit mul+add", 4, 2.0, fma_loop_generic};
#endif
}

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
Peak measure_peak(double seconds) {
  DILATRON_CHECK(seconds > 0.0 && seconds <= 600.0, "--seconds must be in (0, 600], got ", seconds);
  const FmaLoop loop = best_fma_loop();
  const int threads = omp_get_max_threads();
  const int trials = std::max(1, static_cast<int>(std::lround(seconds / 0.25)));
  std::vector<uint64_t> blocks(static_cast<size_t>(threads), 0);
  double start = 0.0, elapsed = 0.0, best = 0.0;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    (void)loop.run(now_seconds() + std::min(0.2, 0.25 * seconds), static_cast<float>(t));
    for (int trial = 0; trial < trials; ++trial) {
#pragma omp barrier
#pragma omp single
      start = now_seconds();
      blocks[static_cast<size_t>(t)] = loop.run(start + seconds / trials, static_cast<float>(t));
#pragma omp barrier
#pragma omp single
      {
        const double wall = now_seconds() - start;
        double ops = 0.0;
        for (const uint64_t b : blocks) ops += static_cast<double>(b) * kInner * kChains * loop.lanes;
        best = std::max(best, ops * loop.flops_per_op / wall * 1e-9);
        elapsed += wall;
      }
    }
  }
  return {best, threads, elapsed, loop.isa};
}

struct PeakArgs {
  double seconds = 1.0;
  std::string json;
};

void run_peak(const PeakArgs& a) {
  const Peak p = measure_peak(a.seconds);
  std::printf("| ISA | threads | GFLOP/s (FP32, all threads) | GFLOP/s per thread | seconds |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: |\n");
  std::printf("| %s | %d | %.1f | %.1f | %.2f |\n", p.isa.c_str(), p.threads, p.gflops, p.gflops / p.threads,
              p.seconds);
  JsonLine("peak")
      .add("isa", p.isa)
      .add("threads", p.threads)
      .add("hardware_threads", static_cast<int>(std::thread::hardware_concurrency()))
      .add("gflops", p.gflops)
      .add("gflops_per_thread", p.gflops / p.threads)
      .add("seconds", p.seconds)
      .add("omp_wait_policy", std::getenv("OMP_WAIT_POLICY"))  // main sets PASSIVE unless the user chose
      .append_to(a.json);
}

// ---------------------------------------------------------------- attention timing

struct AttentionShape {
  int64_t batch = 1, heads = 8, dim = 64;
  std::string schedule = "1024:1,4096:4,16384:16";
  bool causal = true;
  std::string device = "cpu";
};

struct AttentionTiming {
  double forward_s = NAN, forward_backward_s = NAN;
  int forward_reps = 0, forward_backward_reps = 0;
  int64_t peak_extra_bytes = 0;  // library-accounted memory of one forward+backward beyond its inputs
  int64_t input_bytes = 0;       // q, k, v and do
};

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

AttentionTiming time_attention(const AttentionShape& s, int64_t N, int reps, double long_s, bool forward) {
  const Device device = Device::parse(s.device);
  const Shape shape{s.batch, N, s.heads, s.dim};
  const TensorOptions to = TensorOptions(DType::Float32).with_device(device);
  Generator gen(1);
  Tensor q = Tensor::randn(shape, gen, to).requires_grad_(), k = Tensor::randn(shape, gen, to).requires_grad_(),
         v = Tensor::randn(shape, gen, to).requires_grad_();
  const Tensor dout = Tensor::randn(shape, gen, to);
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule(s.schedule);
  opts.causal = s.causal;
  kernels::Backend& backend = kernels::backend(device);  // timed runs end when the device has finished

  AttentionTiming t;
  t.input_bytes = 4 * shape_numel(shape) * static_cast<int64_t>(sizeof(float));
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
  std::snprintf(buf, sizeof buf, "B = %lld, H = %lld, D = %lld, float32, %s, schedule %s, %s",
                static_cast<long long>(s.batch), static_cast<long long>(s.heads), static_cast<long long>(s.dim),
                s.causal ? "causal" : "non-causal", s.schedule.c_str(), s.device.c_str());
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

// Only the sizes whose cost, estimated from the last one measured (time scales with the FLOPs),
// still fits the budget (0: no budget).
bool fits_budget(double budget_s, double started, double last_s, double last_flops, double flops) {
  if (budget_s <= 0.0 || last_s <= 0.0) return true;
  return now_seconds() - started + last_s * flops / last_flops <= budget_s;
}

// ---------------------------------------------------------------- attention

struct AttentionArgs {
  AttentionShape shape;
  std::vector<int64_t> n = {16384, 65536, 262144};
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
  std::printf("Dilated attention, %s, %d threads", shape_label(a.shape).c_str(), omp_get_max_threads());
  if (peak.gflops > 0.0) std::printf("; peak %.1f GFLOP/s (%s)", peak.gflops, peak.isa.c_str());
  std::printf("\n\n| N | visited pairs | forward ms | forward GFLOP/s | of peak | fwd+bwd ms | fwd+bwd GFLOP/s "
              "| of peak | reps fwd/fwd+bwd | attention memory MiB |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  std::fflush(stdout);
  const double started = now_seconds();
  double last_s = 0.0, last_flops = 0.0;
  for (const int64_t N : a.n) {
    const AttentionFlops f = attention_flops(schedule, a.shape.batch, a.shape.heads, N, a.shape.dim, a.shape.causal);
    const int64_t pairs = a.shape.batch * visited_pairs(schedule, a.shape.heads, N, a.shape.causal);
    if (!fits_budget(a.budget, started, last_s, last_flops, f.forward)) {
      std::printf("| %lld | %lld | skipped: over the %.0f s budget | | | | | | | |\n", static_cast<long long>(N),
                  static_cast<long long>(pairs), a.budget);
      JsonLine("attention").add("n", N).add("skipped", "budget").append_to(a.json);
      continue;
    }
    const double t0 = now_seconds();
    const AttentionTiming t = time_attention(a.shape, N, a.reps, a.long_s, true);
    last_s = now_seconds() - t0;
    last_flops = f.forward;
    const double fwd_gflops = f.forward / t.forward_s * 1e-9;
    const double fb_gflops = f.forward_backward() / t.forward_backward_s * 1e-9;
    auto frac = [&](double g) { return peak.gflops > 0.0 ? g / peak.gflops : NAN; };
    std::printf("| %lld | %lld | %.1f | %.2f | %.1f%% | %.1f | %.2f | %.1f%% | %d/%d | %.1f |\n",
                static_cast<long long>(N), static_cast<long long>(pairs), 1e3 * t.forward_s, fwd_gflops,
                100.0 * frac(fwd_gflops), 1e3 * t.forward_backward_s, fb_gflops, 100.0 * frac(fb_gflops),
                t.forward_reps, t.forward_backward_reps, static_cast<double>(t.peak_extra_bytes) / (1 << 20));
    std::fflush(stdout);
    JsonLine("attention")
        .add("n", N)
        .add("batch", a.shape.batch)
        .add("heads", a.shape.heads)
        .add("dim", a.shape.dim)
        .add("schedule", a.shape.schedule)
        .add("causal", a.shape.causal)
        .add("device", a.shape.device)
        .add("threads", omp_get_max_threads())
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

// ---------------------------------------------------------------- scaling

struct ScalingArgs {
  AttentionShape shape{1, 4, 64, "1024:1,4096:4,16384:16", true, "cpu"};
  std::vector<int64_t> n = {65536, 131072, 262144, 524288, 1048576};
  double budget = 0.0;
  std::string json;
  bool child = false;  // internal: measure one N in this process and report to the parent
};

// This process's peak resident set: VmHWM of /proc/self/status, which belongs to the address
// space made at exec. (Not getrusage's ru_maxrss: Linux folds the pre-exec image into it, i.e. the
// parent's resident set at fork.)
int64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // "VmHWM:   1234 kB"
  throw Error("no VmHWM in /proc/self/status");
}

// The child's side: one forward+backward, then its numbers on one line of stdout.
void run_scaling_child(const ScalingArgs& a) {
  DILATRON_CHECK(a.n.size() == 1, "bench scaling --child takes one --n");
  const AttentionTiming t = time_attention(a.shape, a.n[0], 0, 0.0, false);
  std::printf("forward_backward_s=%.9g attention_peak_bytes=%lld input_bytes=%lld peak_rss_bytes=%lld\n",
              t.forward_backward_s, static_cast<long long>(t.peak_extra_bytes),
              static_cast<long long>(t.input_bytes), static_cast<long long>(peak_rss_bytes()));
}

struct ChildResult {
  double forward_backward_s = NAN;
  long long attention_peak_bytes = 0, input_bytes = 0, peak_rss_bytes = 0;
  std::string error;
};

// Runs this program again (/proc/self/exe) as `bench scaling --child --n N ...`: a fresh process,
// so its peak resident set is that of this N alone.
ChildResult run_scaling_in_child(const ScalingArgs& a, int64_t N) {
  std::vector<std::string> args = {"dilatron", "bench", "scaling", "--child", "--n", std::to_string(N),
                                   "--batch", std::to_string(a.shape.batch), "--heads", std::to_string(a.shape.heads),
                                   "--dim", std::to_string(a.shape.dim), "--schedule", a.shape.schedule,
                                   a.shape.causal ? "--causal" : "--no-causal", "--device", a.shape.device};
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  int fds[2];
  DILATRON_CHECK(pipe(fds) == 0, "pipe: ", std::strerror(errno));
  std::fflush(stdout);
  const pid_t pid = fork();
  DILATRON_CHECK(pid >= 0, "fork: ", std::strerror(errno));
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    execv("/proc/self/exe", argv.data());
    std::fprintf(stderr, "dilatron bench scaling: exec /proc/self/exe: %s\n", std::strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  for (ssize_t got; (got = read(fds[0], buf, sizeof buf)) != 0;) {
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) break;
    out.append(buf, static_cast<size_t>(got));
  }
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  ChildResult r;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    r.error = WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                                  : "exit status " + std::to_string(WEXITSTATUS(status));
    return r;
  }
  if (std::sscanf(out.c_str(), "forward_backward_s=%lf attention_peak_bytes=%lld input_bytes=%lld peak_rss_bytes=%lld",
                  &r.forward_backward_s, &r.attention_peak_bytes, &r.input_bytes, &r.peak_rss_bytes) != 4)
    r.error = "unreadable child output: " + out;
  return r;
}

void run_scaling(const ScalingArgs& a) {
  if (a.child) return run_scaling_child(a);
  const auto schedule = parse_schedule(a.shape.schedule);
  std::printf("Forward+backward scaling, %s, %d threads, each N in a fresh process\n\n",
              shape_label(a.shape).c_str(), omp_get_max_threads());
  std::printf("| N | fwd+bwd s | us per token | GFLOP/s | peak RSS MiB | bytes per token (RSS) | "
              "attention memory MiB | inputs MiB |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  std::fflush(stdout);
  const double started = now_seconds();
  double last_s = 0.0, last_flops = 0.0;
  for (const int64_t N : a.n) {
    const AttentionFlops f = attention_flops(schedule, a.shape.batch, a.shape.heads, N, a.shape.dim, a.shape.causal);
    if (!fits_budget(a.budget, started, last_s, last_flops, f.forward)) {
      std::printf("| %lld | skipped: over the %.0f s budget | | | | | | |\n", static_cast<long long>(N), a.budget);
      JsonLine("scaling").add("n", N).add("skipped", "budget").append_to(a.json);
      continue;
    }
    const double t0 = now_seconds();
    const ChildResult r = run_scaling_in_child(a, N);
    last_s = now_seconds() - t0;
    last_flops = f.forward;
    if (!r.error.empty()) {
      std::printf("| %lld | failed: %s | | | | | | |\n", static_cast<long long>(N), r.error.c_str());
      JsonLine("scaling").add("n", N).add("skipped", r.error).append_to(a.json);
      continue;
    }
    const double tokens = static_cast<double>(a.shape.batch * N);
    const double rss = static_cast<double>(r.peak_rss_bytes);
    std::printf("| %lld | %.2f | %.2f | %.2f | %.1f | %.0f | %.1f | %.1f |\n", static_cast<long long>(N),
                r.forward_backward_s, 1e6 * r.forward_backward_s / tokens,
                f.forward_backward() / r.forward_backward_s * 1e-9, rss / (1 << 20), rss / tokens,
                static_cast<double>(r.attention_peak_bytes) / (1 << 20), static_cast<double>(r.input_bytes) / (1 << 20));
    std::fflush(stdout);
    JsonLine("scaling")
        .add("n", N)
        .add("batch", a.shape.batch)
        .add("heads", a.shape.heads)
        .add("dim", a.shape.dim)
        .add("schedule", a.shape.schedule)
        .add("causal", a.shape.causal)
        .add("device", a.shape.device)
        .add("threads", omp_get_max_threads())
        .add("forward_backward_s", r.forward_backward_s)
        .add("us_per_token", 1e6 * r.forward_backward_s / tokens)
        .add("forward_backward_gflops", f.forward_backward() / r.forward_backward_s * 1e-9)
        .add("peak_rss_bytes", static_cast<int64_t>(rss))
        .add("attention_peak_bytes", static_cast<int64_t>(r.attention_peak_bytes))
        .add("input_bytes", static_cast<int64_t>(r.input_bytes))
        .append_to(a.json);
  }
}

// ---------------------------------------------------------------- train

struct TrainBenchArgs {
  std::string config, json;
  std::vector<std::string> set;
  int64_t steps = 20, warmup = 2;
  bool profile = false;
};

// Where the profiled steps' time went, by op (forward and backward apart) and the time outside every
// op, data and optimizer scope: the framework's own (graph bookkeeping, allocation, the loss read).
void print_train_profile(const std::vector<profiler::Entry>& entries, double step_seconds, int64_t steps) {
  double in_scopes = 0.0;
  for (const profiler::Entry& e : entries) in_scopes += e.seconds;
  const double per_step = 1e3 / static_cast<double>(steps);
  std::printf("\n| op | calls per step | ms per step | %% of step |\n| --- | ---: | ---: | ---: |\n");
  const auto row = [&](const std::string& name, double calls, double seconds) {
    std::printf("| %s | %.0f | %.2f | %.1f |\n", name.c_str(), calls, seconds * per_step, 100.0 * seconds / step_seconds);
  };
  for (const profiler::Entry& e : entries)
    row(e.name, static_cast<double>(e.calls) / static_cast<double>(steps), e.seconds);
  row("(framework: outside every op)", 0, std::max(0.0, step_seconds - in_scopes));
  row("**step**", 0, step_seconds);
}

// The trainer's own loop (train()) over `steps` steps into a scratch run directory (removed after),
// evaluation and periodic checkpoints off; tokens/s from its metrics.jsonl, the median over the
// steps after the warm-up ones.
void run_train_bench(const TrainBenchArgs& a) {
  DILATRON_CHECK(a.steps > a.warmup && a.warmup >= 0, "--steps (", a.steps, ") must exceed --warmup (", a.warmup, ")");
  std::vector<std::string> set = a.set;
  // The model's own shape: no curriculum stages (an empty train.stages is none).
  for (const std::string& s : {"train.steps=" + std::to_string(a.steps), std::string("train.stages=[]"),
                               std::string("train.eval_every=0"),
                               std::string("train.checkpoint_every=0"), std::string("train.keep_checkpoints=1")})
    set.push_back(s);
  const RunConfig cfg = load_config(a.config, set);
  const fs::path out = fs::temp_directory_path() / ("dilatron-bench-train-" + std::to_string(getpid()));
  fs::remove_all(out);
  struct RemoveAtExit {
    fs::path dir;
    ~RemoveAtExit() {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } remove_at_exit{out};
  TrainOptions o;
  o.out_dir = out.string();
  o.progress = false;
  std::fprintf(stderr, "bench train: %s, %lld steps of %lld x %lld tokens in %s\n", a.config.c_str(),
               static_cast<long long>(a.steps), static_cast<long long>(cfg.data.batch_size),
               static_cast<long long>(cfg.model.seq_len), out.c_str());
  if (a.profile) {
    o.profile_from_step = a.warmup;
    profiler::reset();
    if (Device::parse(cfg.train.device).type == DeviceType::CUDA)
      profiler::set_synchronize([] { kernels::backend(Device::cuda()).synchronize(); });
  }
  const TrainResult r = train(cfg, o);
  profiler::set_enabled(false);
  profiler::set_synchronize(nullptr);

  std::vector<double> tok_s;
  std::ifstream in(out / "metrics.jsonl");
  const std::string key = "\"tokens_per_s\": ";
  for (std::string line; std::getline(in, line);)
    if (const size_t p = line.find(key); p != std::string::npos) tok_s.push_back(std::stod(line.substr(p + key.size())));
  DILATRON_CHECK(static_cast<int64_t>(tok_s.size()) == a.steps, "bench train: expected ", a.steps,
                 " steps in metrics.jsonl, read ", tok_s.size());
  const std::vector<double> steady(tok_s.begin() + a.warmup, tok_s.end());
  const double tps = median(steady);
  const int64_t tokens_per_step = cfg.data.batch_size * cfg.model.seq_len;
  const int64_t params = build_model(cfg, std::make_shared<Generator>(0))->num_parameters();

  std::printf("| config | device | threads | parameters | batch x seq_len | steps (warm-up) | median step s | "
              "tokens/s | loss first -> last |\n");
  std::printf("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
  std::printf("| %s | %s | %d | %lld | %lld x %lld | %lld (%lld) | %.3f | %.0f | %.3f -> %.3f |\n", a.config.c_str(),
              cfg.train.device.c_str(), omp_get_max_threads(), static_cast<long long>(params),
              static_cast<long long>(cfg.data.batch_size), static_cast<long long>(cfg.model.seq_len),
              static_cast<long long>(a.steps), static_cast<long long>(a.warmup),
              static_cast<double>(tokens_per_step) / tps, tps, r.losses.front(), r.losses.back());
  JsonLine("train")
      .add("config", a.config)
      .add("device", cfg.train.device)
      .add("threads", omp_get_max_threads())
      .add("parameters", params)
      .add("batch", cfg.data.batch_size)
      .add("seq_len", cfg.model.seq_len)
      .add("steps", a.steps)
      .add("warmup", a.warmup)
      .add("median_step_s", static_cast<double>(tokens_per_step) / tps)
      .add("tokens_per_s", tps)
      .add("first_loss", r.losses.front())
      .add("last_loss", r.losses.back())
      .append_to(a.json);
  if (a.profile) {
    double step_seconds = 0.0;  // the profiled steps' own times, as metrics.jsonl has them
    for (const double t : steady) step_seconds += static_cast<double>(tokens_per_step) / t;
    print_train_profile(profiler::entries(), step_seconds, a.steps - a.warmup);
  }
}

struct DecodeBenchArgs {
  std::string source, json;  // a config (.toml: random weights) or a checkpoint / run directory
  std::vector<std::string> set;
  std::vector<int64_t> contexts{1024, 4096, 16384, 65536};
  int64_t tokens = 0;  // 0: one period of the largest segment
  int64_t no_cache_max = 8192;
};

// Generation speed with the KV cache at several context lengths: a prompt of `context` random bytes
// (prefill), then `tokens` decode steps (the median step counts); without the cache one token costs
// a forward over the whole context, timed once for the contexts up to --no-cache-max. A step's cost
// depends on where the token falls in its segments (how many grid keys precede it), not on the
// context, so by default each context decodes one whole period of the largest segment: contexts
// that are multiples of it would otherwise time only cheap early-segment steps.
void run_decode_bench(const DecodeBenchArgs& a) {
  DILATRON_CHECK(a.tokens >= 0, "--tokens must be >= 0 (0: one period of the largest segment), got ", a.tokens);
  for (const int64_t c : a.contexts) DILATRON_CHECK(c >= 1, "--contexts: each must be >= 1, got ", c);
  Loaded l;
  if (fs::path(a.source).extension() == ".toml") {
    l.config = load_config(a.source, a.set);
    l.model = build_model(l.config, std::make_shared<Generator>(0));
    l.model->eval();
  } else {
    DILATRON_CHECK(a.set.empty(), "--set applies to a config, not to the checkpoint '", a.source, "'");
    l = load_model(a.source);
  }
  TransformerLM& model = *l.model;
  int64_t tokens = a.tokens;
  if (tokens == 0)
    for (const Schedule& schedule : model.config().layer_schedules)
      for (const AttentionBranch& b : schedule) tokens = std::max(tokens, b.segment);
  const Device device = model.tok->weight.device();
  kernels::Backend& backend = kernels::backend(device);
  autograd::NoGradGuard no_grad;
  Generator gen(0);
  const auto random_tokens = [&](int64_t n) {
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (int64_t& id : ids) id = static_cast<int64_t>(gen.next_below(256));
    return Tensor::from_vector(ids, {1, n}).to(device);
  };
  // Seconds of f(), the device finished.
  const auto timed = [&](auto&& f) {
    const double t0 = now_seconds();
    f();
    backend.synchronize();
    return now_seconds() - t0;
  };
  std::printf("| context | prefill s | decode tokens/s | ms per token | cache MiB | no-cache s per token | speed-up |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const int64_t context : a.contexts) {
    KVCache cache;
    const Tensor prompt = random_tokens(context);
    const double prefill_s = timed([&] { model.forward(prompt, cache); });
    std::vector<double> steps;
    for (int64_t i = 0; i < tokens; ++i) {
      const Tensor next = random_tokens(1);
      steps.push_back(timed([&] { model.forward(next, cache); }));
    }
    const double step_s = median(steps);
    double no_cache_s = NAN;
    if (context <= a.no_cache_max) {
      const Tensor whole = random_tokens(context + 1);
      no_cache_s = timed([&] { model.forward(whole); });
    }
    const double mib = static_cast<double>(cache.bytes()) / (1 << 20);
    std::printf("| %lld | %.3f | %.1f | %.3f | %.3f | %s | %s |\n", static_cast<long long>(context), prefill_s,
                1.0 / step_s, 1e3 * step_s, mib,
                std::isfinite(no_cache_s) ? std::to_string(no_cache_s).c_str() : "-",
                std::isfinite(no_cache_s) ? (std::to_string(static_cast<int64_t>(no_cache_s / step_s)) + "x").c_str()
                                          : "-");
    JsonLine("decode")
        .add("source", a.source)
        .add("device", device.str())
        .add("threads", omp_get_max_threads())
        .add("context", context)
        .add("prefill_s", prefill_s)
        .add("tokens_per_s", 1.0 / step_s)
        .add("tokens", tokens)
        .add("step_s", step_s)
        .add("cache_bytes", cache.bytes())
        .add("no_cache_step_s", no_cache_s)
        .append_to(a.json);
  }
}

}  // namespace

void add_bench_command(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Performance figures: FMA peak, attention, scaling in N, training, decoding");
  bench->require_subcommand(1);

  auto p = std::make_shared<PeakArgs>();
  CLI::App* peak = bench->add_subcommand("peak", "The machine's FP32 FMA peak over all threads (register-only loop)");
  peak->add_option("--seconds", p->seconds, "how long to run the loop (in trials of 0.25 s; the best one counts)");
  peak->add_option("--json", p->json, "append the result as a JSON line to this file");
  peak->callback([p] { run_peak(*p); });

  auto at = std::make_shared<AttentionArgs>();
  CLI::App* attention = bench->add_subcommand(
      "attention", "Forward and forward+backward time of dilated attention, GFLOP/s over visited pairs, % of peak");
  attention->add_option("--n", at->n, "sequence lengths, e.g. 16384,65536,262144")->delimiter(',');
  add_shape_options(attention, at->shape);
  attention->add_option("--reps", at->reps, "timed repetitions after one warm-up run (median)");
  attention->add_option("--long-seconds", at->long_s, "a first run at least this long is the only one timed");
  attention->add_option("--peak", at->peak, "peak GFLOP/s to divide by (default: measured, 0.5 s, on the CPU)");
  attention->add_option("--budget", at->budget, "skip the sizes that would end past this many seconds (0: none)");
  attention->add_option("--json", at->json, "append one JSON line per N to this file");
  attention->callback([at] { run_attention_bench(*at); });

  auto sc = std::make_shared<ScalingArgs>();
  CLI::App* scaling = bench->add_subcommand(
      "scaling", "Forward+backward time per token and peak memory against N (each N in a fresh process)");
  scaling->add_option("--n", sc->n, "sequence lengths, e.g. 65536,131072,262144,524288,1048576")->delimiter(',');
  add_shape_options(scaling, sc->shape);
  scaling->add_option("--budget", sc->budget, "skip the sizes that would end past this many seconds (0: none)");
  scaling->add_option("--json", sc->json, "append one JSON line per N to this file");
  scaling->add_flag("--child", sc->child, "internal: measure one N in this process")->group("");
  scaling->callback([sc] { run_scaling(*sc); });

  auto tr = std::make_shared<TrainBenchArgs>();
  CLI::App* train = bench->add_subcommand("train", "Training tokens/s of a config (the trainer's loop, median step)");
  train->add_option("config", tr->config, "config file, e.g. configs/passkey.toml")->required()->check(CLI::ExistingFile);
  train->add_option("--steps", tr->steps, "steps to run");
  train->add_option("--warmup", tr->warmup, "first steps left out of the median");
  train->add_option("--set", tr->set, "override a config key: section.key=value (repeatable)");
  train->add_option("--json", tr->json, "append the result as a JSON line to this file");
  train->add_flag("--profile", tr->profile, "also break the steps after the warm-up into ops (forward, backward), "
                  "data, optimizer and framework time");
  train->callback([tr] { run_train_bench(*tr); });

  auto de = std::make_shared<DecodeBenchArgs>();
  CLI::App* decode = bench->add_subcommand(
      "decode", "Generation tokens/s and KV-cache memory at several context lengths, against recomputing without the cache");
  decode->add_option("source", de->source, "a config (.toml, random weights) or a checkpoint / run directory")->required();
  decode->add_option("--contexts", de->contexts, "context lengths (prompt tokens), e.g. 1024,4096,16384,65536")
      ->delimiter(',');
  decode->add_option("--tokens", de->tokens,
                     "decode steps per context (the median counts; default 0: one period of the largest segment)");
  decode->add_option("--no-cache-max", de->no_cache_max, "time the uncached token only up to this context");
  decode->add_option("--set", de->set, "override a config key: section.key=value (repeatable; configs only)");
  decode->add_option("--json", de->json, "append one JSON line per context to this file");
  decode->callback([de] { run_decode_bench(*de); });
}

}  // namespace dilatron::cli
