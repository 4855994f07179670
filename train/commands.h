// The dilatron command's subcommands; each file train/cmd_<name>.cpp adds one.
#pragma once

#include <CLI/CLI.hpp>

namespace dilatron::cli {

void add_attention_command(CLI::App& app);
void add_bench_command(CLI::App& app);     // bench peak, attention, scaling, train
void add_gradcheck_command(CLI::App& app);
void add_train_commands(CLI::App& app);    // train, eval, sample, inspect
void add_plot_command(CLI::App& app);

}  // namespace dilatron::cli
