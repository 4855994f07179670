// `dilatron gradcheck`: float64 finite-difference checks of every differentiable op, as a table.
#include <cstdio>
#include <string>

#include "commands.h"
#include "dilatron/gradcheck.h"

namespace dilatron::cli {
namespace {

struct GradcheckArgs {
  std::string op = "all";
  std::string dtype = "float64";
};

void run_gradcheck(const GradcheckArgs& a) {
  DILATRON_CHECK(a.dtype == "float64", "--dtype ", a.dtype, ": finite-difference checks run in float64 only");
  const auto& cases = builtin_gradcheck_cases();
  int ran = 0, failed = 0;
  std::printf("%-30s %12s %12s  %s\n", "op", "max abs err", "max rel err", "result");
  for (const auto& c : cases) {
    if (a.op != "all" && a.op != c.op) continue;
    ++ran;
    GradcheckResult r;
    try {
      r = c.run();
    } catch (const std::exception& e) {
      r.ok = false;
      r.message = e.what();
    }
    failed += !r.ok;
    std::printf("%-30s %12.3e %12.3e  %s\n", c.op.c_str(), r.max_abs_error, r.max_rel_error,
                r.ok ? "pass" : ("FAIL: " + r.message).c_str());
  }
  if (ran == 0) {
    std::string names;
    for (const auto& c : cases) names += (names.empty() ? "" : ", ") + c.op;
    throw Error("--op " + a.op + ": no such op (ops: " + names + ")");
  }
  std::printf("%d passed, %d failed\n", ran - failed, failed);
  if (failed) throw Error(std::to_string(failed) + " gradient check(s) failed");
}

}  // namespace

void add_gradcheck_command(CLI::App& app) {
  auto [cmd, args] =
      add_command(app, "gradcheck", "Finite-difference gradient checks of the ops (attention included)", run_gradcheck);
  cmd->add_option("--op", args->op, "one op name, or all");
  cmd->add_option("--dtype", args->dtype, "float64 (the only precision finite differences are checked in)");
}

}  // namespace dilatron::cli
