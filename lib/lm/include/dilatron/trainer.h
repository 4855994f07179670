// The training loop behind `dilatron train`, and the evaluations behind `dilatron eval`.
#pragma once

#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dilatron/config.h"
#include "dilatron/data.h"
#include "dilatron/dist.h"
#include "dilatron/model.h"

namespace dilatron {

struct TrainOptions {
  std::string out_dir = "runs/default";
  std::string resume;                         // "", "auto" (latest in out_dir, if any) or a checkpoint path
  // A resume whose config differs from the checkpoint's in keys other than model.* (refused always)
  // and kFreeOnResume continues only with this set (`--allow-config-change`); the changes go to
  // stderr and out_dir/config-changes.log.
  bool allow_config_change = false;
  const std::atomic<bool>* stop = nullptr;    // set (by SIGINT, SIGTERM) to checkpoint and return early
  int64_t stop_at_step = -1;                  // >= 0: checkpoint and return early on reaching this step
  bool progress = true;                       // the live progress line on stderr
  int64_t profile_from_step = -1;             // >= 0: profile the steps after this one (dilatron/profiler.h)
  // The ranks training together (data parallel: docs/distributed.md); null: this process alone. Rank 0
  // alone writes to out_dir and shows progress; every rank returns the same result.
  dist::ProcessGroup* group = nullptr;
};

struct TrainResult {
  int64_t first_step = 0;  // 0, or the step resumed from
  int64_t steps_done = 0;  // the step reached
  std::vector<double> losses;  // one per step run here
  std::string last_checkpoint;
  bool interrupted = false;
};

// Config keys a resume may change without allow_config_change: they never touch the trained numbers.
inline constexpr std::array<std::string_view, 2> kFreeOnResume = {"train.log_every", "train.checkpoint_every"};

// Builds everything (model on its device, data, the checkpoint to resume) before it writes to
// out_dir, so a run that fails to start leaves the directory as it was; then holds out_dir/.lock
// (flock) to the end, refusing a second run on the same directory. With a group of P ranks, each
// draws the whole global batch (data.batch_size) and trains on its 1/P of it; on a CUDA device each
// rank takes cuda:<local rank>.
TrainResult train(const RunConfig& config, const TrainOptions& options);

// Passkey accuracy: a sample counts when the greedy prediction of all its key digits is right
// (teacher-forced argmax at every digit, which is the same thing for greedy decoding).
struct PasskeyAccuracy {
  int64_t correct = 0, total = 0;
  int64_t digits_correct = 0, digits_total = 0;  // per digit, for partial progress
  double accuracy() const { return total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
  double digit_accuracy() const {
    return digits_total ? static_cast<double>(digits_correct) / static_cast<double>(digits_total) : 0.0;
  }
};
struct PasskeyReport {
  std::map<int64_t, PasskeyAccuracy> by_length;
  std::map<int64_t, std::map<data::DistanceBucket, PasskeyAccuracy>> by_length_distance;
  // By residue (answer_start - 1 - needle_position) mod residue_modulus, the largest dilation of any branch of
  // any layer: the distance from the position whose output is the answer's first digit to the needle's first digit
  // (digit d is read at answer_start - 1 + d, copied from needle_position + d). A dilated branch of dilation r
  // links two positions directly only when r divides their distance, so residue 0 is "aligned". Every residue
  // 0..residue_modulus-1 is listed, with or without samples.
  int64_t residue_modulus = 1;
  std::map<int64_t, std::map<int64_t, PasskeyAccuracy>> by_length_residue;
  // The model's attention cost at each length: visited_pairs (causal) summed over layers, per token per head.
  std::map<int64_t, double> visited_pairs_per_token;
};
// `base` gives the task's shape (filler, min_distance, digits); its seq_len is set from `lengths`.
PasskeyReport evaluate_passkey(TransformerLM& model, const std::vector<int64_t>& lengths, int64_t samples,
                               uint64_t seed, const data::PasskeyOptions& base, int64_t batch_size);
// The passkey task a config trains on (seq_len and seed included) and evaluates on (min_distance).
data::PasskeyOptions passkey_options(const RunConfig& config, bool for_eval);
// The task evaluate_passkey scores at context length `len`: `base` at that length, min_distance capped by it.
data::PasskeyOptions passkey_eval_options(const data::PasskeyOptions& base, int64_t len);
// Throws an Error naming the first length that cannot hold that task, before any evaluation runs.
void check_passkey_lengths(const std::vector<int64_t>& lengths, const data::PasskeyOptions& base);
std::string format_passkey_report(const PasskeyReport& report);
// The whole report as one JSON object (`dilatron eval --json`): {"checkpoint", "step", "lengths": [{"length",
// "samples", "accuracy", "digit_accuracy", "by_distance": [{"lo", "hi", ...}], "residue_modulus", "aligned",
// "unaligned", "by_residue": [{"residue", ...}], "visited_pairs_per_token"}], "visited_pairs_per_token"}; the
// last is that of the longest length. Accuracies are fractions in [0, 1].
std::string passkey_report_json(const PasskeyReport& report, const std::string& checkpoint, int64_t step);

// Mean next-token loss over up to max_windows validation windows of the text.
double evaluate_text_loss(TransformerLM& model, const data::TextDataset& text, int64_t seq_len, int64_t max_windows,
                          int64_t batch_size);

// Builds the model a config describes (parameters from the config's seed).
std::unique_ptr<TransformerLM> build_model(const RunConfig& config, std::shared_ptr<Generator> dropout_gen);

// Reads every dataset of a checkpoint (so each checksum is verified) into the model its stored config
// describes, on the CPU: a corrupted checkpoint, or one whose parameters do not match its config, is an
// Error naming the file and the dataset or parameter. Changes nothing.
void verify_checkpoint(const std::string& path);

}  // namespace dilatron
