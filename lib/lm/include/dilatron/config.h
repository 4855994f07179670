// Run configuration from TOML: strict (unknown keys and wrong types are errors naming the key),
// with `--set section.key=value` overrides applied before validation.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dilatron/model.h"

namespace dilatron {

struct DataConfig {
  std::string task = "passkey";  // passkey | text
  std::string path;              // text: a UTF-8 file
  int64_t batch_size = 8;
  double val_fraction = 0.05;    // text
  int64_t min_distance = 0;      // passkey training: needle at least this many tokens before the answer
  std::string filler = "repeat";  // passkey: "repeat" (the landmark passage) or "random" (random sentences)
  int64_t questions = 1;          // passkey training: question-answer pairs per sample, the last at the end
  double answer_weight = 1.0;     // passkey training: loss weight of every answer-digit target (others 1)
};

// One curriculum stage ([[train.stages]]), its defaults resolved from the rest of the config. A
// stage's `schedule` replaces every layer's (the [attention.layers] overrides too); its `layers`
// table then overrides single layers. Every schedule must cover the stage's seq_len.
struct StageConfig {
  int64_t steps = 0;
  int64_t seq_len = 0;                    // <= model.seq_len
  int64_t batch_size = 0;
  std::vector<Schedule> layer_schedules;  // one per layer, each covering seq_len
};

struct TrainConfig {
  int64_t steps = 1000;  // with stages: their sum
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup_steps = 50;
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.95;
  double grad_clip = 1.0;
  uint64_t seed = 1;
  int64_t eval_every = 100;
  int64_t eval_samples = 64;
  int64_t checkpoint_every = 500;
  int64_t keep_checkpoints = 3;
  int64_t log_every = 1;
  std::string device = "cpu";
  // float32, float64, or bfloat16: mixed precision over float32 parameters (TransformerLM::set_compute_dtype)
  std::string dtype = "float32";
  std::vector<StageConfig> stages;  // empty: one stage, the model's shape
  // Data parallel (docs/distributed.md). 0: each rank's gradient is all-reduced (the float sums' order
  // depends on the number of ranks). K > 0: the global batch is K shards whose gradients are summed in
  // shard order: the same bits on any number of ranks that divides K, one process included.
  int64_t deterministic_shards = 0;
};

struct EvalConfig {
  std::vector<int64_t> lengths;  // passkey context lengths (default: the training length)
  int64_t samples = 100;
  uint64_t seed = 12345;
  int64_t min_distance = 0;  // passkey: only needles at least this far from the answer (beyond the local segment)
};

struct RunConfig {
  std::string source;  // file name, for messages
  std::string toml;    // the effective config (overrides applied), stored in checkpoints
  // Every key the config reads, defaults included: dotted name ("train.lr", "train.stages[1].seq_len")
  // -> its value as TOML text ("0.003"), so two configs compare by value however they are written.
  std::map<std::string, std::string> values;
  ModelConfig model;
  DataConfig data;
  TrainConfig train;
  EvalConfig eval;
};

// Parse a TOML document; `source` names it in errors. overrides are "section.key=value" (value
// parsed as TOML, else taken as a string).
RunConfig parse_config(const std::string& text, const std::string& source, const std::vector<std::string>& overrides = {});
RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// One key whose effective value differs between two configs; "" stands for absent (a stage or a
// layer override that one of them does not have).
struct ConfigChange {
  std::string key, before, after;
};
// The keys of RunConfig::values that differ, in key order.
std::vector<ConfigChange> config_changes(const RunConfig& before, const RunConfig& after);
// "train.lr: 0.003 -> 0.001" ("(none)" for an absent value).
std::string format_change(const ConfigChange& change);

// The stages a run trains through: train.stages, or one stage of train.steps at the model's seq_len,
// data.batch_size and layer schedules.
std::vector<StageConfig> training_stages(const RunConfig& config);
// The stage (index into `stages`) that holds step number `step` (1-based: the step-th optimizer
// step); step 0 is in the first stage and steps past the end in the last.
size_t stage_of_step(const std::vector<StageConfig>& stages, int64_t step);

}  // namespace dilatron
