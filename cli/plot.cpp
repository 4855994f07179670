// `dilatron plot RUN_DIR`: loss curves (and passkey accuracy by needle distance) as a PNG, drawn by
// gnuplot from the run's metrics.jsonl.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>

#include "commands.h"
#include "dilatron/error.h"

namespace dilatron::cli {
namespace {
namespace fs = std::filesystem;

void run_plot(const std::string& run_dir) {
  const fs::path metrics = fs::path(run_dir) / "metrics.jsonl";
  std::ifstream in(metrics);
  DILATRON_CHECK(in.good(), "cannot read '", metrics.string(), "' (is '", run_dir, "' a run directory?)");
  DILATRON_CHECK(std::system("command -v gnuplot >/dev/null 2>&1") == 0,
                 "plot needs gnuplot (Debian: apt-get install gnuplot-nox; scripts/install-deps.sh installs it)");

  const fs::path dir = fs::path(run_dir) / "plot";
  fs::create_directories(dir);
  std::ofstream train(dir / "train.dat"), val(dir / "val.dat");
  const std::regex step_re(R"("step": (\d+))"), loss_re(R"("loss": ([-0-9.eE+naif]+))"),
      val_re(R"("val_loss": ([-0-9.eE+naif]+))"), dist_re(R"x("(\d+) \[(\d+), (\d+)\)": ([0-9.eE+-]+))x");
  // Latest passkey accuracy per (length, bucket): the curve shows the final model.
  std::map<std::pair<long, long>, double> last_acc;
  int64_t train_points = 0;
  std::string line;
  std::smatch m;
  while (std::getline(in, line)) {
    if (!std::regex_search(line, m, step_re)) continue;
    const std::string step = m[1];
    if (line.find("\"eval\": \"passkey\"") != std::string::npos) {
      for (auto it = std::sregex_iterator(line.begin(), line.end(), dist_re); it != std::sregex_iterator(); ++it)
        last_acc[{std::stol((*it)[1]), std::stol((*it)[2])}] = std::stod((*it)[4]);
    } else if (std::regex_search(line, m, val_re)) {
      val << step << " " << m[1] << "\n";
    } else if (std::regex_search(line, m, loss_re)) {
      train << step << " " << m[1] << "\n";
      ++train_points;
    }
  }
  DILATRON_CHECK(train_points > 0, "'", metrics.string(), "' holds no training steps yet");
  std::map<long, std::string> acc_files;  // one data file per context length
  for (const auto& [key, a] : last_acc) {
    const fs::path f = dir / ("passkey_" + std::to_string(key.first) + ".dat");
    std::ofstream(f, acc_files.count(key.first) ? std::ios::app : std::ios::trunc) << key.second << " " << 100.0 * a << "\n";
    acc_files[key.first] = f.string();
  }
  train.close();
  val.close();

  const fs::path png = fs::path(run_dir) / "plot.png";
  std::ofstream gp(dir / "plot.gp");
  gp << "set terminal pngcairo size 1200,500 noenhanced\n"
     << "set output '" << png.string() << "'\n";
  const bool has_acc = !last_acc.empty();
  gp << (has_acc ? "set multiplot layout 1,2\n" : "");
  gp << "set title 'loss'\nset xlabel 'step'\nset ylabel 'nats/token'\nset logscale y\nset grid\n"
     << "plot '" << (dir / "train.dat").string() << "' using 1:2 with lines title 'train'";
  if (fs::file_size(dir / "val.dat") > 0) gp << ", '" << (dir / "val.dat").string() << "' using 1:2 with linespoints title 'validation'";
  gp << "\n";
  if (has_acc) {
    gp << "unset logscale y\nset title 'passkey accuracy by needle distance (last eval)'\n"
       << "set xlabel 'needle distance (tokens, bucket start)'\nset ylabel '% correct'\nset yrange [0:100]\n"
       << "set logscale x 2\nplot ";
    bool first = true;
    for (const auto& [len, f] : acc_files) {
      gp << (first ? "" : ", ") << "'" << f << "' using 1:2 with linespoints title 'context " << len << "'";
      first = false;
    }
    gp << "\n";
  }
  gp.close();
  const std::string cmd = "gnuplot '" + (dir / "plot.gp").string() + "'";
  DILATRON_CHECK(std::system(cmd.c_str()) == 0, "gnuplot failed on ", (dir / "plot.gp").string());
  std::printf("wrote %s\n", png.string().c_str());
}

}  // namespace

void add_plot_command(CLI::App& app) {
  auto [cmd, dir] =
      add_command(app, "plot", "Plot a run's loss curves and passkey accuracy to RUN_DIR/plot.png", run_plot);
  cmd->add_option("run_dir", *dir, "a run directory (holds metrics.jsonl)")->required();
}

}  // namespace dilatron::cli
