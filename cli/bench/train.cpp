// `dilatron bench train`: tokens/s of a config's training steps (the trainer's own loop).
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "dilatron/config.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/profiler.h"
#include "dilatron/trainer.h"

namespace dilatron::cli::bench {
namespace {
namespace fs = std::filesystem;

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

  std::printf("| config | device | dtype | threads | parameters | batch x seq_len | steps (warm-up) | "
              "median step s | tokens/s | loss first -> last |\n");
  std::printf("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
  std::printf("| %s | %s | %s | %d | %lld | %lld x %lld | %lld (%lld) | %.3f | %.0f | %.3f -> %.3f |\n",
              a.config.c_str(), cfg.train.device.c_str(), cfg.train.dtype.c_str(), omp_get_max_threads(),
              static_cast<long long>(params), static_cast<long long>(cfg.data.batch_size),
              static_cast<long long>(cfg.model.seq_len),
              static_cast<long long>(a.steps), static_cast<long long>(a.warmup),
              static_cast<double>(tokens_per_step) / tps, tps, r.losses.front(), r.losses.back());
  JsonLine("train")
      .add("config", a.config)
      .add("device", cfg.train.device)
      .add("dtype", cfg.train.dtype)
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

}  // namespace

void add_train(CLI::App& bench) {
  auto [train, tr] =
      add_command(bench, "train", "Training tokens/s of a config (the trainer's loop, median step)", run_train_bench);
  train->add_option("config", tr->config, "config file, e.g. configs/passkey.toml")->required()->check(CLI::ExistingFile);
  train->add_option("--steps", tr->steps, "steps to run");
  train->add_option("--warmup", tr->warmup, "first steps left out of the median");
  train->add_option("--set", tr->set, "override a config key: section.key=value (repeatable)");
  train->add_option("--json", tr->json, "append the result as a JSON line to this file");
  train->add_flag("--profile", tr->profile, "also break the steps after the warm-up into ops (forward, backward), "
                  "data, optimizer and framework time");
}

}  // namespace dilatron::cli::bench
