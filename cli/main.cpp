// dilatron: train, evaluate and study long-context LMs with flash dilated attention.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>

#include "commands.h"
#include "dilatron/error.h"
#include "dilatron/version.h"

namespace {

// OpenMP threads (ours and OpenBLAS's) that spin while they wait take the cores from any other
// process, and lose theirs in turn: on the 2-core dev machine a `configs/passkey.toml` training
// step took 1.8 s beside one busy process with libgomp's default (spin, then sleep) and 1.26 s with
// PASSIVE, while alone both ran at 0.7-0.9 s (README, Performance). libgomp reads OMP_WAIT_POLICY
// once, when it loads, before main, so a run that did not choose a policy restarts itself with
// PASSIVE; a policy the user set is kept, and a failed exec just runs on with the default.
void prefer_passive_openmp_waits(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  ::execv("/proc/self/exe", argv);
}

}  // namespace

int main(int argc, char** argv) {
  prefer_passive_openmp_waits(argv);
  CLI::App app{"dilatron: long-context language models with flash dilated attention"};
  app.require_subcommand(1);
  app.set_version_flag("--version", dilatron::version());
  dilatron::cli::add_attention_command(app);
  dilatron::cli::add_gradcheck_command(app);
  dilatron::cli::add_train_commands(app);
  dilatron::cli::add_plot_command(app);
  dilatron::cli::add_bench_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dilatron: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
