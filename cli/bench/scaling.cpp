// `dilatron bench scaling`: forward+backward time per token and peak memory against N, each N in a
// fresh process so its peak resident set is its own.
#include <omp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "dilatron/attention.h"

namespace dilatron::cli::bench {
namespace {

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
  Budget budget(a.budget);
  for (const int64_t N : a.n) {
    const AttentionFlops f = attention_flops(schedule, a.shape.batch, a.shape.heads, N, a.shape.dim, a.shape.causal);
    if (!budget.fits(f.forward)) {
      std::printf("| %lld | skipped: over the %.0f s budget | | | | | | |\n", static_cast<long long>(N), a.budget);
      JsonLine("scaling").add("n", N).add("skipped", "budget").append_to(a.json);
      continue;
    }
    const ChildResult r = budget.measure(f.forward, [&] { return run_scaling_in_child(a, N); });
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
    shape_json_line("scaling", N, a.shape)
        .add("forward_backward_s", r.forward_backward_s)
        .add("us_per_token", 1e6 * r.forward_backward_s / tokens)
        .add("forward_backward_gflops", f.forward_backward() / r.forward_backward_s * 1e-9)
        .add("peak_rss_bytes", static_cast<int64_t>(rss))
        .add("attention_peak_bytes", static_cast<int64_t>(r.attention_peak_bytes))
        .add("input_bytes", static_cast<int64_t>(r.input_bytes))
        .append_to(a.json);
  }
}

}  // namespace

void add_scaling(CLI::App& bench) {
  auto [scaling, sc] = add_command(
      bench, "scaling", "Forward+backward time per token and peak memory against N (each N in a fresh process)",
      run_scaling);
  scaling->add_option("--n", sc->n, "sequence lengths, e.g. 65536,131072,262144,524288,1048576")->delimiter(',');
  add_shape_options(scaling, sc->shape);
  scaling->add_option("--budget", sc->budget, "skip the sizes that would end past this many seconds (0: none)");
  scaling->add_option("--json", sc->json, "append one JSON line per N to this file");
  scaling->add_flag("--child", sc->child, "internal: measure one N in this process")->group("");
}

}  // namespace dilatron::cli::bench
