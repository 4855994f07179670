// `dilatron train`, `eval`, `sample` and `inspect`: the model's life cycle from the command line.
#include <csignal>
#include <cstdio>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <optional>

#include "commands.h"
#include "dilatron/autograd.h"
#include "dilatron/checkpoint.h"
#include "dilatron/data.h"
#include "dilatron/dist.h"
#include "dilatron/fileio.h"
#include "dilatron/ops.h"
#include "dilatron/trainer.h"

namespace dilatron::cli {
namespace {

// SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) both checkpoint and stop; the exit code is 128 + the
// signal, as the shell reports a process the signal ended.
std::atomic<bool> g_stop{false};
volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_stop_signal(int sig) {
  g_signal = sig;
  g_stop.store(true);
}

struct TrainArgs {
  std::string config;
  std::vector<std::string> set;
  std::string resume;
  std::string out;
  bool allow_config_change = false;
  int64_t stop_at_step = -1;
  double dist_timeout_s = 300.0;
};

// The curriculum, one line per stage (nothing without [[train.stages]]).
void print_stages(const RunConfig& cfg) {
  int64_t first = 1;
  for (size_t i = 0; i < cfg.train.stages.size(); ++i) {
    const StageConfig& s = cfg.train.stages[i];
    // One schedule when all layers share it, else each layer's, separated by " | ".
    const bool shared = std::all_of(s.layer_schedules.begin(), s.layer_schedules.end(),
                                    [&](const Schedule& l) { return l == s.layer_schedules.front(); });
    std::string schedules;
    for (size_t l = 0; l < (shared ? 1 : s.layer_schedules.size()); ++l)
      schedules += (l ? " | " : "") + format_schedule(s.layer_schedules[l]);
    std::fprintf(stderr, "  stage %zu/%zu: steps %lld-%lld, batch %lld x %lld tokens, attention %s\n", i + 1,
                 cfg.train.stages.size(), static_cast<long long>(first), static_cast<long long>(first + s.steps - 1),
                 static_cast<long long>(s.batch_size), static_cast<long long>(s.seq_len), schedules.c_str());
    first += s.steps;
  }
}

void run_train(const TrainArgs& a) {
  const RunConfig cfg = load_config(a.config, a.set);
  // Under mpirun, every rank of the job; else this process alone.
  dist::InitOptions init;
  init.timeout_s = a.dist_timeout_s;
  std::unique_ptr<dist::ProcessGroup> group = dist::init_process_group(init);
  const bool rank0 = group->rank() == 0;
  TrainOptions o;
  o.group = group.get();
  o.out_dir = a.out.empty() ? "runs/" + std::filesystem::path(a.config).stem().string() : a.out;
  o.resume = a.resume;
  o.allow_config_change = a.allow_config_change;
  o.stop_at_step = a.stop_at_step;
  o.stop = &g_stop;
  for (const int sig : {SIGINT, SIGTERM}) std::signal(sig, on_stop_signal);
  if (rank0) {
    std::fprintf(stderr, "training %s -> %s (%lld steps, batch %lld x %lld tokens, %s on %s)\n", a.config.c_str(),
                 o.out_dir.c_str(), static_cast<long long>(cfg.train.steps), static_cast<long long>(cfg.data.batch_size),
                 static_cast<long long>(cfg.model.seq_len), cfg.train.dtype.c_str(), cfg.train.device.c_str());
    print_stages(cfg);
  }
  TrainResult r;
  try {
    r = train(cfg, o);
  } catch (const std::exception& e) {
    if (group->world_size() == 1) throw;
    // The other ranks would wait for this one in their next collective: end them all.
    std::fprintf(stderr, "dilatron: error on rank %d of %d: %s\n", group->rank(), group->world_size(), e.what());
    group->abort(1);
  }
  for (const int sig : {SIGINT, SIGTERM}) std::signal(sig, SIG_DFL);
  group.reset();  // MPI ends here, before any exit below
  if (rank0) std::printf("checkpoint: %s\n", r.last_checkpoint.c_str());
  if (r.interrupted && !g_stop.load()) {  // --stop-at-step: a planned stop, not a failure
    if (rank0)
      std::fprintf(stderr, "stopped at step %lld (--stop-at-step); continue with --resume\n",
                   static_cast<long long>(r.steps_done));
    return;
  }
  if (r.interrupted) {
    const int sig = g_signal ? static_cast<int>(g_signal) : SIGINT;
    if (rank0)
      std::fprintf(stderr, "interrupted by %s at step %lld; resume with --resume auto\n",
                   sig == SIGTERM ? "SIGTERM" : "SIGINT", static_cast<long long>(r.steps_done));
    std::exit(128 + sig);
  }
}

}  // namespace

std::string resolve_checkpoint(const std::string& path) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(path)) return path;
  for (const fs::path& dir : {fs::path(path) / "checkpoints", fs::path(path)})
    if (fs::exists(dir / "latest")) return *CheckpointDir(dir.string(), 1).latest();
  throw Error("'" + path + "' is a directory without checkpoints (expected a run directory or a .h5 file)");
}

Loaded load_model(const std::string& path) {
  const std::string ckpt = resolve_checkpoint(path);
  const CheckpointSummary s = read_checkpoint_summary(ckpt);
  Loaded l{parse_config(s.config_toml, ckpt + " (stored config)"), nullptr, ckpt, s.state.step};
  l.model = build_model(l.config, std::make_shared<Generator>(0));
  load_checkpoint(ckpt, *l.model, nullptr);
  l.model->eval();
  return l;
}

namespace {

struct EvalArgs {
  std::string ckpt, task, text, json;
  std::vector<int64_t> lengths;
  std::optional<int64_t> samples, min_distance;
  int64_t batch = 8;
};

void run_eval(const EvalArgs& a) {
  // Checked before anything loads (--batch 0 looped forever); the ranges are the config's.
  DILATRON_CHECK(a.batch >= 1 && a.batch <= (1 << 20), "--batch must be in [1, 1048576], got ", a.batch);
  DILATRON_CHECK(!a.samples || *a.samples >= 1, "--samples must be >= 1, got ", a.samples.value_or(0));
  DILATRON_CHECK(!a.min_distance || *a.min_distance >= 0, "--min-distance must be >= 0, got ",
                 a.min_distance.value_or(0));
  for (const int64_t len : a.lengths)
    DILATRON_CHECK(len >= 8 && len <= (1 << 24), "--lengths: each length must be in [8, 16777216], got ", len);
  Loaded l = load_model(a.ckpt);
  const std::string task = a.task.empty() ? (a.text.empty() ? l.config.data.task : "text") : a.task;
  DILATRON_CHECK(a.json.empty() || task == "passkey", "--json: only the passkey report is written as JSON");
  if (task == "passkey") {
    DILATRON_CHECK(!a.samples || *a.samples <= (1 << 20), "--samples: passkey evaluates at most 1048576 samples per "
                   "length, got ", *a.samples);
    const auto lengths = a.lengths.empty() ? l.config.eval.lengths : a.lengths;
    const int64_t samples = a.samples.value_or(l.config.eval.samples);
    data::PasskeyOptions base = passkey_options(l.config, true);
    if (a.min_distance) base.min_distance = *a.min_distance;
    try {
      check_passkey_lengths(lengths, base);
    } catch (const Error& e) {
      throw Error((a.lengths.empty() ? "eval.lengths of " + l.path : std::string("--lengths")) + ": " + e.what());
    }
    const PasskeyReport report = evaluate_passkey(*l.model, lengths, samples, l.config.eval.seed, base, a.batch);
    std::printf("%s", format_passkey_report(report).c_str());
    // Written beside and renamed, so a reader never sees half a report.
    if (!a.json.empty()) write_file_atomically(a.json, passkey_report_json(report, l.path, l.step));
  } else if (task == "text") {
    const std::string path = a.text.empty() ? l.config.data.path : a.text;
    DILATRON_CHECK(!path.empty(), "eval --task text needs --text FILE");
    const data::TextDataset text(path, l.config.data.val_fraction);
    const double loss = evaluate_text_loss(*l.model, text, l.config.model.seq_len,
                                           a.samples.value_or(1 << 30), a.batch);
    std::printf("%s validation: loss %.4f nats/byte, perplexity %.3f, %.4f bits/byte\n", path.c_str(), loss,
                std::exp(loss), loss / std::log(2.0));
  } else {
    throw Error("--task " + task + ": expected passkey or text");
  }
}

struct SampleArgs {
  std::string ckpt, prompt;
  int64_t tokens = 200, top_k = 0;
  double temperature = 1.0;
  uint64_t seed = 0;
  bool no_cache = false;
};

void run_sample(const SampleArgs& a) {
  DILATRON_CHECK(a.temperature >= 0.0, "--temperature must be >= 0, got ", a.temperature);
  DILATRON_CHECK(a.top_k >= 0, "--top-k must be >= 0, got ", a.top_k);
  Loaded l = load_model(a.ckpt);
  autograd::NoGradGuard no_grad;
  std::vector<int64_t> ids = data::encode(a.prompt);
  ids.insert(ids.begin(), data::kBos);
  Generator gen(a.seed);
  const Device device = l.model->tok->weight.device();
  const auto as_tensor = [&](std::vector<int64_t>::const_iterator first) {
    return Tensor::from_vector(std::vector<int64_t>(first, ids.cend()), {1, ids.cend() - first}).to(device);
  };
  // Positions run on past seq_len (the schedule's segments repeat). With the cache, the prompt is
  // one flash forward and each new token one decode step over the cached keys; without it, every
  // token recomputes the whole sequence.
  KVCache cache;
  size_t fed = 0;  // tokens the cache holds
  std::fputs(a.prompt.c_str(), stdout);
  for (int64_t i = 0; i < a.tokens; ++i) {
    Tensor logits = a.no_cache ? l.model->forward(as_tensor(ids.cbegin()))
                               : l.model->forward(as_tensor(ids.cbegin() + static_cast<std::ptrdiff_t>(fed)), cache);
    fed = ids.size();
    std::vector<double> row = narrow(logits, 1, logits.size(1) - 1, 1).to_vector<double>();
    int64_t next = 0;
    if (a.temperature == 0.0) {
      next = std::max_element(row.begin(), row.end()) - row.begin();
    } else {
      // Softmax at the temperature over the top-k logits, then one uniform draw.
      std::vector<int64_t> order(row.size());
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return row[x] > row[y]; });
      const size_t k = a.top_k > 0 ? std::min(order.size(), static_cast<size_t>(a.top_k)) : order.size();
      std::vector<double> p(k);
      double z = 0.0;
      for (size_t j = 0; j < k; ++j) z += p[j] = std::exp((row[order[j]] - row[order[0]]) / a.temperature);
      double u = gen.next_uniform() * z;
      next = order[k - 1];
      for (size_t j = 0; j < k; ++j)
        if ((u -= p[j]) < 0) {
          next = order[j];
          break;
        }
    }
    if (next == data::kEos) break;
    ids.push_back(next);
    if (next < 256) std::fputc(static_cast<int>(next), stdout);
    std::fflush(stdout);
  }
  std::fputc('\n', stdout);
}

void run_inspect(const std::string& path) {
  const std::string ckpt = resolve_checkpoint(path);
  const CheckpointSummary s = read_checkpoint_summary(ckpt);
  verify_checkpoint(ckpt);  // checksums, and parameters against the stored config, before showing anything
  std::printf("checkpoint: %s\nversion: %s\nstep: %lld\n", ckpt.c_str(), s.version.c_str(),
              static_cast<long long>(s.state.step));
  if (s.state.stage > 0) {
    // "of N" from the stored config, when this dilatron still reads it.
    std::string of;
    try {
      of = " of " + std::to_string(training_stages(parse_config(s.config_toml, ckpt + " (stored config)")).size());
    } catch (const Error&) {
    }
    std::printf("stage: %lld%s\n", static_cast<long long>(s.state.stage), of.c_str());
  }
  std::printf("tokens seen: %lld\nparameters: %lld\n\n", static_cast<long long>(s.state.tokens_seen),
              static_cast<long long>(s.num_parameters));
  for (const auto& [name, shape] : s.parameters) std::printf("  %-40s %s\n", name.c_str(), shape_str(shape).c_str());
  std::printf("\nconfig:\n%s\n", s.config_toml.c_str());
}

// The checkpoint that eval, sample and inspect read.
void add_checkpoint_argument(CLI::App* cmd, std::string& path) {
  cmd->add_option("checkpoint", path, "checkpoint .h5, or a run directory (its latest)")->required();
}

}  // namespace

void add_train_commands(CLI::App& app) {
  auto [train, t] = add_command(app, "train", "Train a model from a TOML config", run_train);
  train->add_option("config", t->config, "config file, e.g. configs/passkey.toml")->required()->check(CLI::ExistingFile);
  train->add_option("--set", t->set, "override a config key: section.key=value (repeatable)");
  train->add_option("--resume", t->resume, "auto (the latest checkpoint in --out) or a checkpoint path");
  train->add_option("--out", t->out, "run directory (default runs/<config name>)");
  train->add_flag("--allow-config-change", t->allow_config_change,
                  "resume although the config differs from the checkpoint's (not in model.*); the changes are "
                  "recorded in OUT/config-changes.log");
  train->add_option("--stop-at-step", t->stop_at_step,
                    "checkpoint and exit (code 0) on reaching this step, e.g. to share a curriculum's first stage "
                    "between runs")
      ->check(CLI::NonNegativeNumber);
  train->add_option("--dist-timeout", t->dist_timeout_s,
                    "under mpirun: seconds a collective waits for the other ranks before the run stops with an error "
                    "(a rank died or hangs)")
      ->check(CLI::PositiveNumber);

  auto [eval, e] = add_command(app, "eval", "Evaluate a checkpoint: passkey accuracy or text loss", run_eval);
  add_checkpoint_argument(eval, e->ckpt);
  eval->add_option("--task", e->task, "passkey or text (default: the task it was trained on)");
  eval->add_option("--lengths", e->lengths, "passkey context lengths, e.g. 512,1024,2048")->delimiter(',');
  eval->add_option("--samples", e->samples, "samples per length (passkey) or max windows (text)");
  eval->add_option("--min-distance", e->min_distance, "passkey: only needles at least this far from the answer");
  eval->add_option("--text", e->text, "a UTF-8 file whose validation split to score");
  eval->add_option("--batch", e->batch, "sequences per forward pass");
  eval->add_option("--json", e->json, "passkey: also write the whole report to this JSON file");

  auto [sample, s] = add_command(app, "sample", "Generate text from a checkpoint", run_sample);
  add_checkpoint_argument(sample, s->ckpt);
  sample->add_option("--prompt", s->prompt, "text to continue");
  sample->add_option("--tokens", s->tokens, "bytes to generate");
  sample->add_option("--temperature", s->temperature, "0 for greedy");
  sample->add_option("--top-k", s->top_k, "sample among the k most likely bytes (0: all)");
  sample->add_option("--seed", s->seed, "sampling seed");
  sample->add_flag("--no-cache", s->no_cache, "recompute the whole sequence for every token (no KV cache; for comparison)");

  auto [inspect, ckpt] = add_command(app, "inspect", "Show a checkpoint's config, step and parameters", run_inspect);
  add_checkpoint_argument(inspect, *ckpt);
}

}  // namespace dilatron::cli
