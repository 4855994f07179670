// The dilatron command's subcommands, one family per file (cli/<name>.cpp; bench/, one file per figure).
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <string>
#include <utility>

#include "dilatron/config.h"
#include "dilatron/model.h"

namespace dilatron::cli {

void add_attention_command(CLI::App& app);
void add_bench_command(CLI::App& app);     // bench peak, attention, scaling, train, decode
void add_gradcheck_command(CLI::App& app);
void add_train_commands(CLI::App& app);    // train, eval, sample, inspect
void add_plot_command(CLI::App& app);

// A subcommand of `parent` that calls run with the Args its options fill (shared with the callback,
// so they outlive this function); the caller adds the options to the first and binds them to the second.
template <typename Args>
std::pair<CLI::App*, Args*> add_command(CLI::App& parent, const std::string& name, const std::string& description,
                                        void (*run)(const Args&)) {
  auto args = std::make_shared<Args>();
  CLI::App* cmd = parent.add_subcommand(name, description);
  cmd->callback([args, run] { run(*args); });
  return {cmd, args.get()};
}

// The model a checkpoint was trained as, with its weights, in eval mode (train.cpp).
struct Loaded {
  RunConfig config;
  std::unique_ptr<TransformerLM> model;
  std::string path;  // the checkpoint file
  int64_t step = 0;
};
// A checkpoint file, or a run directory (its newest checkpoint).
std::string resolve_checkpoint(const std::string& path);
Loaded load_model(const std::string& path);

}  // namespace dilatron::cli
