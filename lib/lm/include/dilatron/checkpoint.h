// HDF5 checkpoints (layout in docs/checkpoints.md):
//   /model/<parameter name>              one dataset per parameter
//   /optimizer/<parameter name>/{m,v}    optimizer state per parameter
//   attributes on /: step, tokens_seen, optimizer_step, data_rng_{seed,offset},
//                    dropout_rng_{seed,offset}, stage, config (TOML text), version, format, and
//                    config.fnv1a64, version.fnv1a64 (the strings' checksums)
// Written atomically; loading validates every name, shape and dtype before it changes anything.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dilatron/nn.h"
#include "dilatron/optim.h"

namespace dilatron {

// Everything besides parameters and optimizer moments that a run needs to continue exactly.
struct TrainingState {
  int64_t step = 0;  // optimizer steps done (the LR schedule position)
  int64_t tokens_seen = 0;
  uint64_t data_seed = 0, data_offset = 0;        // the data loader's Philox stream
  uint64_t dropout_seed = 0, dropout_offset = 0;  // dropout masks' stream (one offset per call)
  int64_t stage = 0;  // curriculum stage of the last step done, from 1 (the step implies it); 0: not recorded
};

// opt may be null (weights-only checkpoint).
void save_checkpoint(const std::string& path, const nn::Module& model, const optim::Optimizer* opt,
                     const TrainingState& state, const std::string& config_toml);

// Loads into model (and opt when non-null) only after the whole file has been read and checked;
// a missing, truncated or corrupt file, or one from a different model, is an Error naming the file
// and the first mismatch, and leaves model and opt untouched.
TrainingState load_checkpoint(const std::string& path, nn::Module& model, optim::Optimizer* opt);

// What `dilatron inspect` shows, without building a model.
struct CheckpointSummary {
  std::string config_toml, version;
  TrainingState state;
  std::vector<std::pair<std::string, Shape>> parameters;  // in file order
  int64_t num_parameters = 0;
  bool has_optimizer = false;  // optimizer moments stored (not a weights-only checkpoint)
};
CheckpointSummary read_checkpoint_summary(const std::string& path);

// A run's checkpoint folder: ckpt-<step>.h5 files, a `latest` file naming the newest (so it is found
// without opening any checkpoint), and only the newest `keep` kept.
class CheckpointDir {
 public:
  CheckpointDir(std::string dir, int64_t keep);
  std::string save(const nn::Module& model, const optim::Optimizer* opt, const TrainingState& state,
                   const std::string& config_toml);
  std::optional<std::string> latest() const;  // path of the newest checkpoint, if any
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  int64_t keep_;
};

}  // namespace dilatron
