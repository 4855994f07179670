// dilatron: train, evaluate and study long-context LMs with flash dilated attention.
#include <cstdio>
#include <exception>

#include "commands.h"
#include "dilatron/error.h"
#include "dilatron/version.h"

int main(int argc, char** argv) {
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
