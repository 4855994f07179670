// The benchmark tooling, without asserting any speed: the FLOP count the figures divide by, and
// that each `dilatron bench` subcommand runs and reports the numbers it claims (a finite positive
// peak, the attention FLOPs of the library's count, a child process's own peak memory, the
// trainer's tokens/s).
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/config.h"
#include "dilatron/ops.h"
#include "dilatron/profiler.h"
#include "dilatron/random.h"
#include "dilatron/trainer.h"
#include "test_helpers.h"

using namespace dilatron;
namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------- FLOP counting

TEST(BenchFlops, SmallScheduleCountedByHand) {
  // "4:2", H = 2, N = 10, non-causal. Head 0 (offset 0): segments [0,4) and [4,8) have grid {0, 2}
  // and {4, 6}, 2 x 2 = 4 pairs each; the ragged [8,10) has {8}, 1 pair: 9. Head 1 (offset 1):
  // {1, 3}, {5, 7} and {9}: 9. 18 pairs per batch element.
  const auto schedule = parse_schedule("4:2");
  ASSERT_EQ(visited_pairs(schedule, 2, 10, false), 18);
  const AttentionFlops f = attention_flops(schedule, 3, 2, 10, 16, false);
  EXPECT_EQ(f.forward, 4.0 * 16 * 3 * 18);  // 4*D per pair, B = 3
  EXPECT_EQ(f.backward, 2.5 * f.forward);
  EXPECT_EQ(f.forward_backward(), 3.5 * f.forward);
  // Causal: g(g+1)/2 per segment: 3 + 3 + 1 per head.
  EXPECT_EQ(attention_flops(schedule, 1, 2, 10, 16, true).forward, 4.0 * 16 * 14);
}

TEST(BenchFlops, TheIssueShapeCountedByHand) {
  // B = 1, H = 8, D = 64, causal, 1024:1,4096:4,16384:16, N = 16K: every branch has 1024 grid
  // points per segment (1024/1, 4096/4, 16384/16), so 1024 * 1025 / 2 pairs per segment, and
  // 16 + 4 + 1 segments per head.
  const int64_t per_segment = 1024 * 1025 / 2;
  const int64_t pairs = 8 * (16 + 4 + 1) * per_segment;
  const auto schedule = parse_schedule("1024:1,4096:4,16384:16");
  EXPECT_EQ(visited_pairs(schedule, 8, 16384, true), pairs);
  const AttentionFlops f = attention_flops(schedule, 1, 8, 16384, 64, true);
  EXPECT_EQ(f.forward, 4.0 * 64 * static_cast<double>(pairs));
  EXPECT_DOUBLE_EQ(f.forward_backward(), 3.5 * 4.0 * 64 * static_cast<double>(pairs));
}

TEST(BenchFlops, RejectsBadArguments) {
  EXPECT_THROW(attention_flops(parse_schedule("4:1"), -1, 2, 8, 16, true), Error);
  EXPECT_THROW(attention_flops({}, 1, 2, 8, 16, true), Error);  // visited_pairs validates the schedule
}

// ---------------------------------------------------------------- the profiler

// An op whose forward and backward call other ops: the profile owes all of it to the outer op.
struct TwiceThenAdd : autograd::Function<TwiceThenAdd> {
  static const char* name() { return "twice_then_add"; }
  static Tensor forward(autograd::Context&, const Tensor& x) { return add(mul(x, 2.0), x); }
  static std::vector<Tensor> backward(autograd::Context&, const std::vector<Tensor>& g) { return {mul(g[0], 3.0)}; }
};

const profiler::Entry* find_entry(const std::vector<profiler::Entry>& entries, const std::string& name) {
  for (const auto& e : entries)
    if (e.name == name) return &e;
  return nullptr;
}

TEST(Profiler, CountsOutermostOpsForwardAndBackward) {
  profiler::reset();
  profiler::set_enabled(true);
  Tensor x = Tensor::ones({64, 64}).requires_grad_();
  Tensor y = matmul(TwiceThenAdd::apply(x), x);
  {
    profiler::Scope scope("outside");
    y = matmul(y, x);  // inside a named scope: the scope's
  }
  sum(y).backward();
  profiler::set_enabled(false);
  const auto entries = profiler::entries();
  profiler::reset();

  const auto calls = [&](const std::string& name) {
    const profiler::Entry* e = find_entry(entries, name);
    return e ? e->calls : 0;
  };
  EXPECT_EQ(calls("twice_then_add"), 1);
  EXPECT_EQ(calls("twice_then_add backward"), 1);
  EXPECT_EQ(calls("matmul"), 1);
  EXPECT_EQ(calls("outside"), 1);
  EXPECT_EQ(calls("matmul backward"), 2);
  EXPECT_EQ(calls("sum"), 1);
  EXPECT_EQ(calls("mul"), 0);  // only inside twice_then_add's forward and backward
  EXPECT_EQ(calls("add"), 0);
  for (size_t i = 1; i < entries.size(); ++i) EXPECT_GE(entries[i - 1].seconds, entries[i].seconds);
  for (const auto& e : entries) EXPECT_GE(e.seconds, 0.0) << e.name;

  // Off: nothing is recorded.
  sum(matmul(x, x)).backward();
  EXPECT_TRUE(profiler::entries().empty());
}

// ---------------------------------------------------------------- the command

#ifdef DILATRON_CLI  // the dilatron command is built (tests/CMakeLists.txt)

class BenchCommand : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dilatron_test_bench_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "_" +
            std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure() && !dir_.empty()) fs::remove_all(dir_);
  }
  static std::string binary() { return DILATRON_CLI; }

  // Runs `[ENV] dilatron bench ARGS --json FILE`; returns the JSON lines (asserting a zero exit status).
  std::vector<std::string> bench(const std::string& args, const std::string& env = "") {
    const std::string json = (dir_ / "out.jsonl").string(), log = (dir_ / "log").string();
    fs::remove(json);
    const int status =
        std::system((env + " " + binary() + " bench " + args + " --json " + json + " > " + log + " 2>&1").c_str());
    log_ = test::read_file(log);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "dilatron bench " << args << ":\n" << log_;
    std::vector<std::string> lines;
    std::ifstream in(json);
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  }

  // A number field of a JSON line (NaN when absent or null).
  static double field(const std::string& line, const std::string& key) {
    std::smatch m;
    if (!std::regex_search(line, m, std::regex("\"" + key + "\": ([-0-9.eE+]+)"))) return NAN;
    return std::stod(m[1]);
  }

  fs::path dir_;
  std::string log_;
};

TEST_F(BenchCommand, PeakIsAPositiveFiniteRateOverAllThreads) {
  const auto lines = bench("peak --seconds 0.2");
  ASSERT_EQ(lines.size(), 1u) << log_;
  const double gflops = field(lines[0], "gflops"), threads = field(lines[0], "threads");
  EXPECT_TRUE(std::isfinite(gflops) && gflops > 0.0) << lines[0];
  EXPECT_GE(threads, 1.0) << lines[0];
  EXPECT_NEAR(field(lines[0], "gflops_per_thread") * threads, gflops, 1e-5 * gflops);
  // It runs for the time asked (a deadline, not a fixed count), give or take the scheduler.
  EXPECT_GE(field(lines[0], "seconds"), 0.2);
  EXPECT_LT(field(lines[0], "seconds"), 10.0);
  EXPECT_NE(lines[0].find("\"isa\": "), std::string::npos);
}

TEST_F(BenchCommand, OpenMpThreadsWaitPassivelyUnlessTheUserChose) {
  // libgomp reads the policy before main: the command restarts itself to set it (main.cpp).
  auto lines = bench("peak --seconds 0.05", "env -u OMP_WAIT_POLICY");
  ASSERT_EQ(lines.size(), 1u) << log_;
  EXPECT_NE(lines[0].find("\"omp_wait_policy\": \"PASSIVE\""), std::string::npos) << lines[0];
  lines = bench("peak --seconds 0.05", "env OMP_WAIT_POLICY=active");
  ASSERT_EQ(lines.size(), 1u) << log_;
  EXPECT_NE(lines[0].find("\"omp_wait_policy\": \"active\""), std::string::npos) << lines[0];
}

TEST_F(BenchCommand, AttentionReportsTheLibrarysFlopCount) {
  const auto lines = bench("attention --n 1000,4096 --heads 2 --dim 16 --schedule 256:1,1024:4 --reps 1 --peak 100");
  ASSERT_EQ(lines.size(), 2u) << log_;
  const auto schedule = parse_schedule("256:1,1024:4");
  for (const auto& line : lines) {
    const auto N = static_cast<int64_t>(field(line, "n"));
    const AttentionFlops f = attention_flops(schedule, 1, 2, N, 16, true);
    EXPECT_DOUBLE_EQ(field(line, "visited_pairs"), static_cast<double>(visited_pairs(schedule, 2, N, true)));
    EXPECT_NEAR(field(line, "forward_flops"), f.forward, 1e-5 * f.forward) << line;
    EXPECT_NEAR(field(line, "forward_backward_flops"), f.forward_backward(), 1e-5 * f.forward_backward()) << line;
    const double fs_ = field(line, "forward_s"), fbs = field(line, "forward_backward_s");
    ASSERT_TRUE(fs_ > 0.0 && fbs > 0.0) << line;
    EXPECT_NEAR(field(line, "forward_gflops"), f.forward / fs_ * 1e-9, 1e-5 * f.forward / fs_ * 1e-9) << line;
    EXPECT_NEAR(field(line, "forward_backward_fraction_of_peak"), f.forward_backward() / fbs * 1e-9 / 100.0,
                1e-5 * f.forward_backward() / fbs * 1e-9 / 100.0) << line;
    // Memory of the forward+backward beyond the inputs: o, dq, dk, dv and [B, H, N] rows; O(N).
    const double X = N * 2 * 16 * 4.0;
    EXPECT_GE(field(line, "attention_peak_bytes"), 4 * X) << line;
    EXPECT_LE(field(line, "attention_peak_bytes"), 4 * X + 3 * N * 2 * 4.0 + (1 << 20)) << line;
  }
}

TEST_F(BenchCommand, AttentionTimesEachDtypeAtEveryN) {
  const auto lines = bench("attention --n 97,300 --heads 2 --dim 16 --schedule 64:1,256:4k --reps 1 --peak 100"
                           " --dtype float32,bfloat16");
  ASSERT_EQ(lines.size(), 4u) << log_;
  const char* expected[][2] = {{"97", "float32"}, {"97", "bfloat16"}, {"300", "float32"}, {"300", "bfloat16"}};
  for (size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(field(lines[i], "n"), std::stod(expected[i][0])) << lines[i];
    EXPECT_NE(lines[i].find(std::string("\"dtype\": \"") + expected[i][1] + "\""), std::string::npos) << lines[i];
    EXPECT_GT(field(lines[i], "forward_backward_s"), 0.0) << lines[i];
  }
  EXPECT_NE(log_.find("float32 and bfloat16"), std::string::npos) << log_;
  const std::string log = (dir_ / "bad.log").string();
  EXPECT_NE(std::system((binary() + " bench attention --n 97 --dtype float16 > " + log + " 2>&1").c_str()), 0);
  EXPECT_NE(test::read_file(log).find("float16"), std::string::npos) << test::read_file(log);
}

TEST_F(BenchCommand, ScalingMeasuresEachNInItsOwnProcess) {
  // A 16x larger N must show in the child's peak resident set: it is that process's own, not
  // the parent's (or the previous child's) high-water mark.
  const auto lines = bench("scaling --n 4096,65536 --heads 2 --dim 16 --schedule 256:1,1024:4");
  ASSERT_EQ(lines.size(), 2u) << log_;
  double rss[2], inputs[2];
  for (int i = 0; i < 2; ++i) {
    rss[i] = field(lines[i], "peak_rss_bytes");
    inputs[i] = field(lines[i], "input_bytes");
    EXPECT_GT(field(lines[i], "us_per_token"), 0.0) << lines[i];
    EXPECT_GT(field(lines[i], "attention_peak_bytes"), 0.0) << lines[i];
    EXPECT_GT(rss[i], inputs[i]) << lines[i];  // q, k, v, do are resident in the child
  }
  EXPECT_EQ(inputs[0], 4096 * 2 * 16 * 4 * 4.0);
  EXPECT_EQ(inputs[1], 16 * inputs[0]);
  // Inputs, output and gradients (8 blocks of [B, N, H, D], twice the inputs) are all resident
  // in the larger child at once: its peak grows by well over the inputs' growth.
  EXPECT_GT(rss[1] - rss[0], 1.5 * (inputs[1] - inputs[0])) << lines[0] << "\n" << lines[1];
}

TEST_F(BenchCommand, DecodeKeepsTheCacheFlatAndTimesOneLargestSegmentByDefault) {
  // tiny.toml: 2 layers of "16:1,64:4,128:8"; contexts below, at and far beyond its 128-token segment.
  const std::string tiny = std::string(DILATRON_SOURCE_DIR) + "/configs/tiny.toml";
  const auto lines = bench("decode " + tiny + " --contexts 50,128,1000 --no-cache-max 128");
  ASSERT_EQ(lines.size(), 3u) << log_;
  for (const auto& line : lines) {
    EXPECT_EQ(field(line, "tokens"), 128.0) << line;  // one period of the largest segment
    const double tps = field(line, "tokens_per_s");
    EXPECT_TRUE(std::isfinite(tps) && tps > 0.0) << line;
  }
  // Past the largest segment the cache holds a fixed set of grid keys: the same bytes at 128 + 128
  // decoded positions and at 1000 + 128.
  EXPECT_GT(field(lines[1], "cache_bytes"), 0.0) << lines[1];
  EXPECT_EQ(field(lines[1], "cache_bytes"), field(lines[2], "cache_bytes")) << lines[1] << "\n" << lines[2];
  // The uncached forward is timed only up to --no-cache-max.
  EXPECT_GT(field(lines[0], "no_cache_step_s"), 0.0) << lines[0];
  EXPECT_TRUE(std::isnan(field(lines[2], "no_cache_step_s"))) << lines[2];
  // --tokens overrides the default.
  const auto one = bench("decode " + tiny + " --contexts 64 --tokens 3");
  ASSERT_EQ(one.size(), 1u) << log_;
  EXPECT_EQ(field(one[0], "tokens"), 3.0) << one[0];
}

TEST_F(BenchCommand, TrainReportsTheTrainersTokensPerSecond) {
  const std::string tiny = std::string(DILATRON_SOURCE_DIR) + "/configs/tiny.toml";
  const auto lines = bench("train " + tiny + " --steps 4 --warmup 1");
  ASSERT_EQ(lines.size(), 1u) << log_;
  const RunConfig cfg = load_config(tiny);
  EXPECT_EQ(field(lines[0], "batch"), static_cast<double>(cfg.data.batch_size));
  EXPECT_EQ(field(lines[0], "seq_len"), static_cast<double>(cfg.model.seq_len));
  EXPECT_EQ(field(lines[0], "parameters"),
            static_cast<double>(build_model(cfg, std::make_shared<Generator>(0))->num_parameters()));
  const double tps = field(lines[0], "tokens_per_s");
  EXPECT_TRUE(std::isfinite(tps) && tps > 0.0) << lines[0];
  EXPECT_NEAR(field(lines[0], "median_step_s") * tps, static_cast<double>(cfg.data.batch_size * cfg.model.seq_len),
              1e-3 * cfg.data.batch_size * cfg.model.seq_len);
  EXPECT_TRUE(std::isfinite(field(lines[0], "last_loss"))) << lines[0];
}

TEST_F(BenchCommand, TrainProfileBreaksTheStepIntoOps) {
  const std::string tiny = std::string(DILATRON_SOURCE_DIR) + "/configs/tiny.toml";
  const auto lines = bench("train " + tiny + " --steps 4 --warmup 1 --profile");
  ASSERT_EQ(lines.size(), 1u) << log_;
  // | name | calls per step | ms per step | % of step |
  std::map<std::string, std::pair<double, double>> rows;
  std::smatch m;
  const std::regex row(R"(\| ([^|]+) \| ([0-9]+) \| ([0-9.]+) \| ([0-9.]+) \|)");
  for (auto it = log_.cbegin(); std::regex_search(it, log_.cend(), m, row); it = m[0].second)
    rows[m[1]] = {std::stod(m[2]), std::stod(m[3])};
  const RunConfig cfg = load_config(tiny);
  for (const std::string op : {"dilated_attention", "dilated_attention backward"})
    EXPECT_EQ(rows[op].first, static_cast<double>(cfg.model.n_layers)) << op << "\n" << log_;
  EXPECT_EQ(rows["optimizer"].first, 1.0) << log_;
  EXPECT_EQ(rows["data"].first, 1.0) << log_;
  ASSERT_TRUE(rows.count("**step**")) << log_;
  double ops = 0.0;
  for (const auto& [name, r] : rows)
    if (name != "**step**") ops += r.second;
  // The rows (the framework's own time included) add up to the step, to the table's rounding.
  EXPECT_NEAR(ops, rows["**step**"].second, 0.01 * static_cast<double>(rows.size()) + 1e-3 * rows["**step**"].second)
      << log_;
  EXPECT_GT(rows["**step**"].second, 0.0) << log_;
}

#endif  // DILATRON_CLI

}  // namespace
