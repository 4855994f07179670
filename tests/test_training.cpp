// The training loop end to end on configs/tiny.toml: loss goes down, runs are reproducible bit for
// bit, resuming continues exactly, and bad configs and checkpoints are reported clearly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/checkpoint.h"
#include "dilatron/config.h"
#include "dilatron/gradcheck.h"
#include "dilatron/hdf5.h"
#include "dilatron/ops.h"
#include "dilatron/trainer.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::error_message;
using dilatron::test::read_file;
using dilatron::test::xor_byte;
namespace fs = std::filesystem;

namespace {

const std::string kTiny = std::string(DILATRON_SOURCE_DIR) + "/configs/tiny.toml";

fs::path fresh_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("dilatron_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

TrainOptions quiet(const fs::path& dir) {
  TrainOptions o;
  o.out_dir = dir.string();
  o.progress = false;
  return o;
}

// c trained in dir until step `stop`, where it checkpoints and returns: a run to resume.
TrainResult train_until(const RunConfig& c, const fs::path& dir, int64_t stop) {
  TrainOptions o = quiet(dir);
  o.stop_at_step = stop;
  return train(c, o);
}

// The tiny config trained in dir to step 2 of 4; its checkpoint.
std::string partial_run(const fs::path& dir) {
  return train_until(load_config(kTiny, {"train.steps=4"}), dir, 2).last_checkpoint;
}

// Options that resume the run in dir from its latest checkpoint (--resume auto).
TrainOptions resuming(const fs::path& dir) {
  TrainOptions o = quiet(dir);
  o.resume = "auto";
  return o;
}

// Whether /usr/bin/python3 can import `modules` (e.g. "h5py, numpy"); the tests that need them skip without.
bool python_imports(const std::string& modules) {
  return std::system(("/usr/bin/python3 -c 'import " + modules + "' >/dev/null 2>&1").c_str()) == 0;
}

std::vector<std::vector<double>> parameters_of(const std::string& ckpt) {
  const RunConfig c = parse_config(read_checkpoint_summary(ckpt).config_toml, ckpt);
  auto model = build_model(c, std::make_shared<Generator>(0));
  load_checkpoint(ckpt, *model, nullptr);
  std::vector<std::vector<double>> out;
  for (const auto& [name, p] : model->named_parameters()) out.push_back(p.to_vector<double>());
  return out;
}

// A message that contains every part.
void expect_mentions(const std::string& msg, std::initializer_list<std::string> parts) {
  for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

// A tiny two-stage curriculum: 128 tokens x 2 under a shorter schedule, then the model's 256 x 4
// (passkey samples need at least 127 tokens).
std::vector<std::string> two_stages(int64_t first, int64_t second, std::vector<std::string> more = {}) {
  more.push_back("model.seq_len=256");
  more.push_back("train.stages=[{steps=" + std::to_string(first) +
                 ", seq_len=128, batch_size=2, schedule=\"16:1,128:4\"}, {steps=" + std::to_string(second) + "}]");
  more.push_back("train.steps=" + std::to_string(first + second));
  return more;
}

}  // namespace

TEST(Training, LossGoesDownOnTinyConfig) {
  const RunConfig c = load_config(kTiny, {"train.steps=30", "train.checkpoint_every=0"});
  const TrainResult r = train(c, quiet(fresh_dir("loss")));
  ASSERT_EQ(r.losses.size(), 30u);
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) first += r.losses[static_cast<size_t>(i)], last += r.losses[r.losses.size() - 1 - static_cast<size_t>(i)];
  EXPECT_LT(last, 0.8 * first) << "first five " << first / 5 << ", last five " << last / 5;
}

TEST(Training, SameSeedGivesBitIdenticalRuns) {
  const RunConfig c = load_config(kTiny, {"train.steps=6", "model.dropout=0.1", "model.attn_dropout=0.1"});
  const TrainResult a = train(c, quiet(fresh_dir("det_a")));
  const TrainResult b = train(c, quiet(fresh_dir("det_b")));
  EXPECT_EQ(a.losses, b.losses);
  EXPECT_EQ(parameters_of(a.last_checkpoint), parameters_of(b.last_checkpoint));
}

namespace {

// A run of c in dir stopped at step `stop`, then resumed with --resume auto; joined = the losses of both parts.
struct SplitRun {
  TrainResult part1, part2;
  std::vector<double> joined;
};
SplitRun split_and_resume(const RunConfig& c, const fs::path& dir, int64_t stop) {
  SplitRun r;
  r.part1 = train_until(c, dir, stop);
  r.part2 = train(c, resuming(dir));
  r.joined = r.part1.losses;
  r.joined.insert(r.joined.end(), r.part2.losses.begin(), r.part2.losses.end());
  return r;
}

}  // namespace

TEST(Training, ResumeIsExact) {
  // Dropout on, so the dropout stream's position must be restored as well as the data stream's.
  const RunConfig c = load_config(kTiny, {"train.steps=8", "train.checkpoint_every=3", "model.dropout=0.1",
                                          "model.attn_dropout=0.1"});
  const TrainResult straight = train(c, quiet(fresh_dir("straight")));

  const SplitRun r = split_and_resume(c, fresh_dir("split"), 4);
  EXPECT_TRUE(r.part1.interrupted);
  EXPECT_EQ(r.part1.steps_done, 4);
  EXPECT_EQ(r.part2.first_step, 4);
  EXPECT_EQ(r.joined, straight.losses);  // bit-identical doubles
  EXPECT_EQ(parameters_of(r.part2.last_checkpoint), parameters_of(straight.last_checkpoint));
}

TEST(Training, CurriculumStagesShowInMetricsAndCheckpoints) {
  const fs::path dir = fresh_dir("stages");
  const RunConfig c = load_config(kTiny, two_stages(3, 2, {"train.eval_every=4", "train.checkpoint_every=0"}));
  const TrainResult r = train(c, quiet(dir));
  ASSERT_EQ(r.losses.size(), 5u);
  std::vector<std::string> steps, evals;
  std::istringstream lines(read_file(dir / "metrics.jsonl"));
  for (std::string line; std::getline(lines, line);) (line.find("\"loss\"") != std::string::npos ? steps : evals).push_back(line);
  ASSERT_EQ(steps.size(), 5u);
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::string shape = i < 3 ? "\"stage\": 1, \"seq_len\": 128, \"batch_size\": 2,"
                                    : "\"stage\": 2, \"seq_len\": 256, \"batch_size\": 4,";
    EXPECT_NE(steps[i].find(shape), std::string::npos) << steps[i];
  }
  ASSERT_EQ(evals.size(), 2u);  // at step 4 and at the end, both in stage 2
  for (const std::string& e : evals) EXPECT_NE(e.find("\"stage\": 2, \"eval\": \"passkey\""), std::string::npos) << e;
  const CheckpointSummary s = read_checkpoint_summary(r.last_checkpoint);
  EXPECT_EQ(s.state.stage, 2);
  EXPECT_EQ(s.state.tokens_seen, 3 * 2 * 128 + 2 * 4 * 256);
}

TEST(Training, StageTooShortForTheTaskNamesTheStage) {
  const RunConfig c = load_config(kTiny, {"train.stages=[{steps=1, seq_len=64}, {steps=1}]", "train.steps=2"});
  const std::string msg = error_message([&] { train(c, quiet(fresh_dir("stages_short"))); });
  EXPECT_NE(msg.find("train.stages[0].seq_len = 64"), std::string::npos) << msg;
}

// Stopped inside stage 1, exactly at the boundary, and inside stage 2, then resumed: the same
// losses and parameters as straight through.
TEST(Training, CurriculumResumeIsExactInAndBetweenStages) {
  const RunConfig c = load_config(kTiny, two_stages(3, 4, {"train.checkpoint_every=0", "model.dropout=0.1",
                                                           "model.attn_dropout=0.1"}));
  const TrainResult straight = train(c, quiet(fresh_dir("stages_straight")));
  ASSERT_EQ(straight.losses.size(), 7u);
  for (const int64_t stop : {2, 3, 5}) {
    SCOPED_TRACE("stopped at step " + std::to_string(stop));
    const SplitRun r = split_and_resume(c, fresh_dir("stages_split_" + std::to_string(stop)), stop);
    ASSERT_TRUE(r.part1.interrupted);
    EXPECT_EQ(read_checkpoint_summary(r.part1.last_checkpoint).state.stage, stop <= 3 ? 1 : 2);
    EXPECT_EQ(r.part2.first_step, stop);
    EXPECT_EQ(r.joined, straight.losses);  // bit-identical doubles
    EXPECT_EQ(parameters_of(r.part2.last_checkpoint), parameters_of(straight.last_checkpoint));
  }
}

TEST(Training, ResumeUnderDifferentStagesIsAnError) {
  const fs::path dir = fresh_dir("stages_changed");
  train_until(load_config(kTiny, two_stages(3, 2, {"train.checkpoint_every=0"})), dir, 4);  // step 4 is in stage 2
  TrainOptions o = resuming(dir);
  const RunConfig changed = load_config(kTiny, two_stages(5, 2));
  // A changed config needs allow_config_change; with it, the stages must still agree with the checkpoint.
  const std::string refused = error_message([&] { train(changed, o); });
  EXPECT_NE(refused.find("train.stages[0].steps: 3 -> 5"), std::string::npos) << refused;
  o.allow_config_change = true;
  const std::string msg = error_message([&] { train(changed, o); });
  EXPECT_NE(msg.find("stage 2 at step 4"), std::string::npos) << msg;
  EXPECT_NE(msg.find("in stage 1"), std::string::npos) << msg;
}

// The resume policy: model keys never change, other keys only with allow_config_change (recorded),
// log_every and checkpoint_every freely; an unchanged config resumes silently.
TEST(Training, ResumeRefusesAChangedModelKeyNamingEveryChange) {
  const fs::path dir = fresh_dir("resume_model_change");
  const std::string ckpt = partial_run(dir);
  const std::string config = read_file(dir / "config.toml");
  TrainOptions o = resuming(dir);
  o.allow_config_change = true;  // allows train.*, never model.*
  // Dropout leaves every shape as it was: only the policy can refuse it.
  const std::string msg = error_message(
      [&] { train(load_config(kTiny, {"train.steps=4", "model.dropout=0.1", "train.lr=0.001"}), o); });
  expect_mentions(msg, {ckpt, "model.* keys cannot change", "model.dropout: 0.0 -> 0.1", "train.lr: 0.003 -> 0.001"});
  EXPECT_EQ(read_file(dir / "config.toml"), config);
  EXPECT_FALSE(fs::exists(dir / "config-changes.log"));
}

TEST(Training, ResumeChangingOnlyFreeKeysNeedsNoFlagAndIsRecorded) {
  const fs::path dir = fresh_dir("resume_free_change");
  partial_run(dir);
  TrainOptions o = resuming(dir);
  EXPECT_EQ(train(load_config(kTiny, {"train.steps=4"}), o).steps_done, 4);  // unchanged: as before
  EXPECT_FALSE(fs::exists(dir / "config-changes.log"));
  const RunConfig c = load_config(kTiny, {"train.steps=4", "train.log_every=5", "train.checkpoint_every=1"});
  EXPECT_EQ(train(c, o).steps_done, 4);
  expect_mentions(read_file(dir / "config-changes.log"),
                  {"resumed at step 4 from '", "train.checkpoint_every: 20 -> 1", "train.log_every: 1 -> 5"});
  EXPECT_EQ(read_file(dir / "config.toml"), c.toml);
}

TEST(Config, ChangesCompareEffectiveValuesWithDefaults) {
  const auto changes = [](const std::vector<std::string>& a, const std::vector<std::string>& b) {
    std::string out;
    for (const ConfigChange& c : config_changes(load_config(kTiny, a), load_config(kTiny, b)))
      out += format_change(c) + "\n";
    return out;
  };
  // The same value spelt differently, or a default given explicitly, is no change.
  EXPECT_EQ(changes({}, {"train.lr=0.003", "train.beta1=0.9", "eval.lengths=[128]"}), "");
  EXPECT_EQ(changes({}, {"train.lr=3e-4", "attention.layers={1=\"128:1\"}"}),
            "attention.layers.1: (none) -> '128:1'\ntrain.lr: 0.003 -> 3e-04\n");
}

TEST(Training, KeepsOnlyTheNewestCheckpointsAndFindsLatest) {
  const fs::path dir = fresh_dir("keep");
  train(load_config(kTiny, {"train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2"}), quiet(dir));
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir / "checkpoints"))
    if (e.path().extension() == ".h5") names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"ckpt-000000006.h5", "ckpt-000000008.h5"}));
  EXPECT_EQ(CheckpointDir((dir / "checkpoints").string(), 2).latest().value(),
            (dir / "checkpoints" / "ckpt-000000008.h5").string());
}

class CheckpointErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fresh_dir("ckpt_errors");
    ckpt_ = train(load_config(kTiny, {"train.steps=2"}), quiet(dir_)).last_checkpoint;
    config_ = load_config(kTiny);
  }
  // A fresh model and its parameters, to check that a failed load changes nothing.
  std::string load_into_fresh_model(const RunConfig& c, const std::string& path) {
    auto model = build_model(c, std::make_shared<Generator>(0));
    const auto before = model->named_parameters().front().second.to_vector<double>();
    const std::string msg = error_message([&] { load_checkpoint(path, *model, nullptr); });
    EXPECT_EQ(model->named_parameters().front().second.to_vector<double>(), before) << "a failed load changed the model";
    return msg;
  }
  fs::path dir_;
  std::string ckpt_;
  RunConfig config_;
};

TEST_F(CheckpointErrors, TruncatedFileIsReportedByName) {
  const std::string bad = (dir_ / "truncated.h5").string();
  fs::copy_file(ckpt_, bad);
  fs::resize_file(bad, fs::file_size(bad) / 2);
  EXPECT_NE(load_into_fresh_model(config_, bad).find("truncated.h5"), std::string::npos);
}

TEST_F(CheckpointErrors, CorruptFileIsReportedByName) {
  const std::string bad = (dir_ / "corrupt.h5").string();
  fs::copy_file(ckpt_, bad);
  {
    std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(0);
    f.write("garbage!", 8);  // the HDF5 signature
  }
  EXPECT_NE(load_into_fresh_model(config_, bad).find("corrupt.h5"), std::string::npos);
}

TEST_F(CheckpointErrors, DifferentModelShapeNamesTheParameter) {
  const RunConfig wider = load_config(kTiny, {"model.d_ff=96"});
  const std::string msg = load_into_fresh_model(wider, ckpt_);
  EXPECT_NE(msg.find("fc.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[96, 32]"), std::string::npos) << msg;
}

// The shape is checked before the read: a dataset declaring 2^40 rows (h5py makes one without data) is
// refused naming it, not allocated (an out-of-memory error that named neither file nor dataset).
TEST_F(CheckpointErrors, HugeDeclaredShapeIsRefusedBeforeReading) {
  if (!python_imports("h5py"))
    GTEST_SKIP() << "python3-h5py is not installed (scripts/install-deps.sh installs it)";
  const std::string bad = (dir_ / "huge.h5").string();
  fs::copy_file(ckpt_, bad);
  const std::string script =
      "import h5py, sys\n"
      "with h5py.File(sys.argv[1], 'r+') as f:\n"
      "    del f['model/blocks.0.fc.weight']\n"
      "    f.create_dataset('model/blocks.0.fc.weight', shape=(1 << 40, 32), dtype='f4', chunks=(64, 32))\n"
      "    f.create_dataset('huge', shape=(1 << 61, 4), dtype='f4', chunks=(64, 4))\n";
  ASSERT_EQ(std::system(("/usr/bin/python3 -c \"" + script + "\" " + bad).c_str()), 0);
  expect_mentions(load_into_fresh_model(config_, bad),
                  {bad, "'model/blocks.0.fc.weight' has shape [1099511627776, 32] but the model expects [64, 32]"});
  // A plain read of a shape whose size in bytes overflows names the dataset too.
  expect_mentions(error_message([&] { h5::File::open(bad).read("huge"); }),
                  {"cannot read dataset 'huge' in '" + bad + "': its shape [2305843009213693952, 4] is too large"});
}

TEST_F(CheckpointErrors, ResumeFromMissingFileIsAnErrorAndWritesNothing) {
  TrainOptions o = quiet(dir_);
  o.resume = (dir_ / "nope.h5").string();
  const std::string msg = error_message([&] { train(config_, o); });
  EXPECT_NE(msg.find("nope.h5"), std::string::npos) << msg;
}

namespace {

// Where the stored values of `dataset` begin in the checkpoint file (they are stored verbatim).
size_t data_offset(const std::string& ckpt, const std::string& dataset) {
  const Tensor t = h5::File::open(ckpt).read(dataset);
  const std::string bytes(static_cast<const char*>(t.raw_data()), static_cast<size_t>(t.numel()) * sizeof(float));
  const std::string file = read_file(ckpt);
  const size_t at = file.find(bytes);
  EXPECT_NE(at, std::string::npos) << dataset << " is not stored verbatim in " << ckpt;
  return at;
}

}  // namespace

TEST_F(CheckpointErrors, FlippedByteInAParameterIsRefusedNamingTheDataset) {
  for (const std::string dataset : {"model/blocks.0.fc.weight", "optimizer/blocks.1.attn.qkv.weight/v"}) {
    const std::string bad = (dir_ / "flipped.h5").string();
    fs::copy_file(ckpt_, bad, fs::copy_options::overwrite_existing);
    const size_t at = data_offset(bad, dataset);
    ASSERT_NE(at, std::string::npos);
    xor_byte(bad, at + 37, 0x10);
    // Resuming reads the optimizer state too; both refuse before changing anything.
    auto model = build_model(config_, std::make_shared<Generator>(0));
    optim::AdamW opt(model->named_parameters(), {});
    const auto before = model->named_parameters().front().second.to_vector<double>();
    const std::string msg = error_message([&] { load_checkpoint(bad, *model, &opt); });
    EXPECT_NE(msg.find("'" + dataset + "'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("flipped.h5"), std::string::npos) << msg;
    EXPECT_NE(msg.find("checksum"), std::string::npos) << msg;
    EXPECT_EQ(model->named_parameters().front().second.to_vector<double>(), before);
  }
}

TEST_F(CheckpointErrors, EmptyOrGarbageLatestIsAnErrorNamingItAndResumeRefuses) {
  const fs::path latest = dir_ / "checkpoints" / "latest";
  const auto size = fs::file_size(ckpt_);
  const auto mtime = fs::last_write_time(ckpt_);
  for (const std::string& content : {std::string(), std::string("\n"), std::string("\x01\x7fgar bage\n"),
                                    std::string("../config.toml\n")}) {
    std::ofstream(latest, std::ios::binary | std::ios::trunc) << content;
    const std::string msg = error_message([&] { CheckpointDir((dir_ / "checkpoints").string(), 2).latest(); });
    EXPECT_NE(msg.find(latest.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("does not name a checkpoint"), std::string::npos) << msg;
    // --resume auto refuses: starting from step 0 would overwrite the run's checkpoints.
    TrainOptions o = resuming(dir_);
    const std::string resume = error_message([&] { train(load_config(kTiny, {"train.steps=4"}), o); });
    EXPECT_NE(resume.find(latest.string()), std::string::npos) << resume;
    EXPECT_EQ(fs::file_size(ckpt_), size);
    EXPECT_EQ(fs::last_write_time(ckpt_), mtime);
  }
}

TEST(Training, FailedWriteOfLatestLeavesNoNewCheckpoint) {
  const fs::path dir = fresh_dir("latest_fails");
  const RunConfig c = load_config(kTiny, {"train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5"});
  train_until(c, dir, 2);
  const fs::path ckpts = dir / "checkpoints";
  fs::create_directories(ckpts / "latest.tmp");  // writing latest.tmp fails
  TrainOptions second = resuming(dir);
  const std::string msg = error_message([&] { train(c, second); });
  EXPECT_NE(msg.find("latest.tmp"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(ckpts / "ckpt-000000004.h5")) << "a checkpoint that `latest` does not name was left";
  EXPECT_EQ(CheckpointDir(ckpts.string(), 5).latest().value(), (ckpts / "ckpt-000000002.h5").string());
}

TEST(Training, MetricsWriteErrorStopsTheRunNamingTheFile) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full to stand for a full disk";
  const fs::path dir = fresh_dir("metrics_full");
  fs::create_directories(dir);
  fs::create_symlink("/dev/full", dir / "metrics.jsonl");  // every write fails with ENOSPC
  const std::string msg = error_message([&] { train(load_config(kTiny, {"train.steps=3"}), quiet(dir)); });
  EXPECT_NE(msg.find((dir / "metrics.jsonl").string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("No space left"), std::string::npos) << msg;
}

// The "step" of each line of a metrics.jsonl.
static std::vector<int64_t> metric_steps(const fs::path& path) {
  std::vector<int64_t> steps;
  std::istringstream in(read_file(path));
  for (std::string line; std::getline(in, line);) steps.push_back(std::stoll(line.substr(line.find(':') + 1)));
  return steps;
}

TEST(Training, ResumeDropsTheMetricsOfStepsPastTheCheckpoint) {
  const fs::path dir = fresh_dir("metrics_resume");
  const RunConfig c = load_config(kTiny, {"train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5"});
  train_until(c, dir, 5);
  // As if killed after step 5 and halfway through step 6's line, before checkpoint 5 was written.
  const fs::path ckpts = dir / "checkpoints";
  fs::remove(ckpts / "ckpt-000000005.h5");
  std::ofstream(ckpts / "latest", std::ios::trunc) << "ckpt-000000004.h5\n";
  std::ofstream(dir / "metrics.jsonl", std::ios::app) << "{\"step\": 6, \"stage\": 1, \"lo";
  TrainOptions second = resuming(dir);
  EXPECT_EQ(train(c, second).first_step, 4);
  EXPECT_EQ(metric_steps(dir / "metrics.jsonl"), (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
}

// Killed before its first checkpoint, a run restarts from step 0 under --resume auto: the lines of the
// killed steps go, as after a resume from a checkpoint.
TEST(Training, FreshStartAfterAKillBeforeTheFirstCheckpointLogsEachStepOnce) {
  const fs::path dir = fresh_dir("metrics_fresh");
  const RunConfig c = load_config(kTiny, {"train.steps=3"});
  fs::create_directories(dir);
  std::ofstream(dir / "metrics.jsonl") << "{\"step\": 1, \"stage\": 1, \"loss\": 5.5}\n{\"step\": 2, \"st";
  TrainOptions o = resuming(dir);
  EXPECT_EQ(train(c, o).first_step, 0);
  EXPECT_EQ(metric_steps(dir / "metrics.jsonl"), (std::vector<int64_t>{1, 2, 3}));
}

TEST(Training, OrphanedCheckpointTemporariesAreRemovedOnStart) {
  const fs::path dir = fresh_dir("orphans");
  const fs::path ckpts = dir / "checkpoints";
  fs::create_directories(ckpts);
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ASSERT_GT(dead, 0);
  ::waitpid(dead, nullptr, 0);
  const fs::path orphan = ckpts / ("ckpt-000000020.h5.tmp." + std::to_string(dead));
  const fs::path live = ckpts / ("ckpt-000000020.h5.tmp." + std::to_string(::getpid()));
  std::ofstream(orphan) << "partial";
  std::ofstream(live) << "partial";
  train(load_config(kTiny, {"train.steps=2"}), quiet(dir));
  EXPECT_FALSE(fs::exists(orphan));
  EXPECT_TRUE(fs::exists(live));  // its writer (this process) still runs
}

TEST(Config, ErrorsNameTheKey) {
  const auto err = [](const std::string& toml) {
    return error_message([&] { parse_config(toml, "bad.toml"); });
  };
  const std::string base = "[attention]\nschedule = \"16:1\"\n[model]\nseq_len = 64\n";
  EXPECT_NE(err(base + "d_modle = 3\n").find("model.d_modle"), std::string::npos);
  EXPECT_NE(err(base + "d_model = \"wide\"\n").find("model.d_model"), std::string::npos);
  EXPECT_NE(err(base + "n_heads = 0\n").find("model.n_heads"), std::string::npos);
  EXPECT_NE(err("[attention]\nschedule = \"16:0\"\n").find("attention.schedule"), std::string::npos);
  // Dilation 4 alone leaves three of every four positions of head 0 unattended.
  const std::string uncovered = err("[model]\nn_heads = 1\nd_model = 8\n[attention]\nschedule = \"64:4\"\n");
  EXPECT_NE(uncovered.find("layer 0"), std::string::npos) << uncovered;
  EXPECT_NE(err(base + "[attention.layers]\n9 = \"8:1\"\n").find("attention.layers.9"), std::string::npos);
  EXPECT_NE(err(base + "[train]\ndtype = \"float16\"\n").find("train.dtype"), std::string::npos);
}

TEST(Config, CurriculumStages) {
  const std::string base = "[attention]\nschedule = \"16:1,64:4\"\n[model]\nseq_len = 64\nn_layers = 2\n";
  const RunConfig c = parse_config(base + R"(
[[train.stages]]
steps = 3
seq_len = 32
batch_size = 2
schedule = "32:1"
layers = { 1 = "8:1,32:4" }

[[train.stages]]
steps = 5
)", "stages.toml");
  EXPECT_EQ(c.train.steps, 8);  // absent: the stages' sum
  ASSERT_EQ(c.train.stages.size(), 2u);
  const StageConfig& a = c.train.stages[0];
  EXPECT_EQ(a.steps, 3);
  EXPECT_EQ(a.seq_len, 32);
  EXPECT_EQ(a.batch_size, 2);
  EXPECT_EQ(a.layer_schedules, (std::vector<Schedule>{{{32, 1}}, {{8, 1}, {32, 4}}}));
  const StageConfig& b = c.train.stages[1];  // the model's shape
  EXPECT_EQ(b.seq_len, 64);
  EXPECT_EQ(b.batch_size, c.data.batch_size);
  EXPECT_EQ(b.layer_schedules, c.model.layer_schedules);
  EXPECT_EQ(training_stages(c).size(), 2u);
  EXPECT_EQ(stage_of_step(c.train.stages, 0), 0u);
  EXPECT_EQ(stage_of_step(c.train.stages, 3), 0u);
  EXPECT_EQ(stage_of_step(c.train.stages, 4), 1u);
  EXPECT_EQ(stage_of_step(c.train.stages, 8), 1u);
  // The effective config a checkpoint stores reads back the same.
  const RunConfig stored = parse_config(c.toml, "stored");
  ASSERT_EQ(stored.train.stages.size(), 2u);
  EXPECT_EQ(stored.train.stages[0].layer_schedules, a.layer_schedules);

  // Without stages: one, the model's.
  const RunConfig plain = parse_config(base + "[train]\nsteps = 7\n", "plain.toml");
  const std::vector<StageConfig> one = training_stages(plain);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].steps, 7);
  EXPECT_EQ(one[0].seq_len, 64);
  EXPECT_EQ(one[0].layer_schedules, plain.model.layer_schedules);
  // train.steps equal to the sum is fine; an empty array is no stages.
  EXPECT_EQ(parse_config(base + "[train]\nsteps = 4\n[[train.stages]]\nsteps = 4\n", "s.toml").train.stages.size(), 1u);
  EXPECT_TRUE(parse_config(base + "[train]\nsteps = 9\nstages = []\n", "s.toml").train.stages.empty());
}

TEST(Config, CurriculumStageErrorsNameTheStageAndKey) {
  const std::string base = "[attention]\nschedule = \"16:1,64:4\"\n[model]\nseq_len = 64\nn_layers = 2\n";
  const auto err = [&](const std::string& stages) {
    return error_message([&] { parse_config(base + "[[train.stages]]\nsteps = 2\n" + stages, "bad.toml"); });
  };
  const auto expect_has = [](const std::string& msg, std::initializer_list<const char*> parts) {
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  };
  expect_has(err("[[train.stages]]\nsteps = 2\nseqlen = 32\n"), {"unknown key", "train.stages[1].seqlen"});
  expect_has(err("[[train.stages]]\nsteps = 2\nseq_len = \"long\"\n"), {"train.stages[1].seq_len", "'long'"});
  expect_has(err("[[train.stages]]\nsteps = 2\nseq_len = 128\n"), {"train.stages[1].seq_len", "model.seq_len = 64", "128"});
  expect_has(err("[[train.stages]]\nsteps = 0\n"), {"train.stages[1].steps", "got 0"});
  expect_has(err("[[train.stages]]\nseq_len = 32\n"), {"train.stages[1].steps", "missing"});
  expect_has(err("[[train.stages]]\nsteps = 2\nbatch_size = -1\n"), {"train.stages[1].batch_size", "-1"});
  expect_has(err("[[train.stages]]\nsteps = 2\nschedule = \"16:0\"\n"), {"train.stages[1].schedule", "\"16:0\"", "dilation r = 0"});
  expect_has(err("[[train.stages]]\nsteps = 2\nlayers = { 9 = \"8:1\" }\n"), {"train.stages[1].layers.9", "names no layer"});
  expect_has(err("[[train.stages]]\nsteps = 2\nlayers = { 1 = 5 }\n"), {"train.stages[1].layers.1", "5"});
  expect_has(err("[train]\nsteps = 10\n"), {"train.steps", "is 10", "sum to 2"});
  expect_has(error_message([&] { parse_config(base + "[train]\nstages = 3\n", "bad.toml"); }), {"train.stages", "array of tables"});
  expect_has(error_message([&] { parse_config(base + "[train]\nstages = [{steps = 1}, 2]\n", "bad.toml"); }),
             {"train.stages[1]", "a table"});
  // Coverage at the stage's seq_len: dilation 4 alone (one head) misses positions of layer 0; a
  // per-stage override of layer 1 alone.
  const std::string one_head = "[attention]\nschedule = \"64:1\"\n[model]\nseq_len = 64\nn_layers = 2\nn_heads = 1\nd_model = 8\n";
  expect_has(error_message([&] {
               parse_config(one_head + "[[train.stages]]\nsteps = 1\n[[train.stages]]\nsteps = 1\nseq_len = 32\n"
                                       "schedule = \"32:4\"\n", "bad.toml");
             }),
             {"train.stages[1]", "seq_len 32", "layer 0", "unattended"});
  expect_has(error_message([&] {
               parse_config(one_head + "[[train.stages]]\nsteps = 1\nlayers = { 1 = \"64:2\" }\n", "bad.toml");
             }),
             {"train.stages[0]", "layer 1"});
}

TEST(Config, OverridesAndPerLayerSchedules) {
  const RunConfig c = load_config(kTiny, {"model.n_layers=3", "attention.layers.2=\"32:1,128:4\"", "train.lr=0.01"});
  ASSERT_EQ(c.model.layer_schedules.size(), 3u);
  EXPECT_EQ(c.model.layer_schedules[2], (Schedule{{32, 1}, {128, 4}}));
  EXPECT_EQ(c.model.layer_schedules[0], parse_schedule("16:1,64:4,128:8"));
  EXPECT_DOUBLE_EQ(c.train.lr, 0.01);
  const RunConfig g = load_config(kTiny, {"attention.schedule=\"\"", "attention.generator=\"geometric\"",
                                          "attention.w0=32", "attention.ratio=2"});
  EXPECT_EQ(g.model.layer_schedules[0], (Schedule{{32, 1}, {64, 2}, {128, 4}}));
}

TEST(Config, PasskeyQuestionsAndAnswerWeight) {
  const RunConfig c = load_config(kTiny, {"model.seq_len=256", "data.questions=3", "data.answer_weight=4"});
  EXPECT_EQ(c.data.questions, 3);
  EXPECT_EQ(c.data.answer_weight, 4.0);
  const data::PasskeyOptions train_task = passkey_options(c, false), eval_task = passkey_options(c, true);
  EXPECT_EQ(train_task.questions, 3);
  EXPECT_EQ(train_task.answer_weight, 4.0);
  EXPECT_EQ(eval_task.questions, 1);  // the evaluation prompt is always the one-question prompt
  EXPECT_EQ(eval_task.answer_weight, 1.0);
  const RunConfig d = load_config(kTiny);
  EXPECT_EQ(d.data.questions, 1);
  EXPECT_EQ(d.data.answer_weight, 1.0);

  // Three questions do not fit tiny's 128 tokens: the error names the key, its value and seq_len.
  std::string msg = error_message([&] { load_config(kTiny, {"data.questions=3"}); });
  EXPECT_NE(msg.find("'data.questions' = 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.seq_len = 128"), std::string::npos) << msg;
  EXPECT_NE(msg.find("seq_len >= " + std::to_string(data::PasskeyTask::min_seq_len(5, 3))), std::string::npos) << msg;
  EXPECT_NO_THROW(load_config(kTiny, {"data.questions=3", "data.task=\"text\""}));  // a text run ignores it
  msg = error_message([&] { load_config(kTiny, {"data.questions=0"}); });
  EXPECT_NE(msg.find("'data.questions' must be in [1"), std::string::npos) << msg;
  for (const std::string bad : {"0", "-2", "nan", "inf"}) {
    msg = error_message([&] { load_config(kTiny, {"data.answer_weight=" + bad}); });
    EXPECT_NE(msg.find("'data.answer_weight' must be a finite number > 0, got"), std::string::npos) << msg;
  }
  msg = error_message([&] { load_config(kTiny, {"data.answer_weight=\"heavy\""}); });
  EXPECT_NE(msg.find("data.answer_weight"), std::string::npos) << msg;
}

// A section replaced through --set (or given as a value in the file) would leave all its keys at their
// defaults: `--set train=x` trained 1000 steps.
TEST(Config, OverridesOfWholeSectionsAndMalformedKeysAreErrors) {
  const auto err = [](std::vector<std::string> overrides) {
    return error_message([&] { load_config(kTiny, overrides); });
  };
  expect_mentions(err({"train=x"}), {"--set train=x", "'train' names a section"});
  expect_mentions(err({"model=5"}), {"--set model=5", "'model' names a section"});
  expect_mentions(err({"model={}"}), {"--set model={}", "'model' names a section"});
  expect_mentions(err({"model.extra={}"}), {"--set model.extra={}", "empty table"});
  expect_mentions(err({".seq_len=5"}), {"malformed key '.seq_len'"});
  expect_mentions(err({"model.=5"}), {"malformed key 'model.'"});
  expect_mentions(err({"model..seq_len=5"}), {"malformed key 'model..seq_len'"});
  const std::string layered = "[model]\nseq_len = 64\nn_layers = 2\n[attention]\nschedule = \"16:1\"\n"
                              "[attention.layers]\n1 = \"64:1\"\n";
  expect_mentions(error_message([&] { parse_config(layered, "layers.toml", {"attention.layers=5"}); }),
                  {"--set attention.layers=5", "'attention.layers' is a section"});
  // A table with keys still works, and so does a section given as a value in the file... as an error.
  EXPECT_EQ(parse_config(layered, "layers.toml", {"attention.layers={0=\"32:1\"}"}).model.layer_schedules[0],
            parse_schedule("32:1"));
  expect_mentions(error_message([&] { parse_config("train = 5\n[attention]\nschedule = \"16:1\"\n", "flat.toml"); }),
                  {"flat.toml", "key 'train' must be a table"});
}

TEST(Config, MinLrAboveLrNamesBothKeys) {
  expect_mentions(error_message([&] { load_config(kTiny, {"train.min_lr=0.01"}); }),
                  {"tiny.toml", "'train.min_lr' must be <= train.lr = 0.003", "got 0.01"});
  EXPECT_NO_THROW(load_config(kTiny, {"train.min_lr=0.003"}));
}

// eval.lengths that cannot hold a passkey sample failed only at the first evaluation, mid-run.
TEST(Config, EvalLengthsMustHoldThePasskeyTaskAtConfigTime) {
  const int64_t shortest = data::PasskeyTask::min_seq_len(data::PasskeyOptions{}.digits, 1);
  expect_mentions(error_message([&] { load_config(kTiny, {"eval.lengths=[128, " + std::to_string(shortest - 1) + "]"}); }),
                  {"'eval.lengths'", "length " + std::to_string(shortest - 1), "needs at least " + std::to_string(shortest)});
  EXPECT_NO_THROW(load_config(kTiny, {"eval.lengths=[" + std::to_string(shortest) + "]"}));
  expect_mentions(error_message([&] { load_config(kTiny, {"eval.lengths=[128, 1000000000]"}); }),
                  {"'eval.lengths'", "1000000000"});
  // An eval.min_distance that no sample of a length can meet.
  expect_mentions(error_message([&] { load_config(kTiny, {"eval.min_distance=128"}); }),
                  {"'eval.min_distance'", "length 128", "min_distance 128 cannot be met"});
  EXPECT_NO_THROW(load_config(kTiny, {"data.task=\"text\"", "eval.lengths=[16]"}));  // text runs do not use them
}

TEST(Training, NegativeCheckpointStepNamesTheFileAndAttribute) {
  const fs::path dir = fresh_dir("negative_step");
  const std::string ckpt = train(load_config(kTiny, {"train.steps=1"}), quiet(dir)).last_checkpoint;
  {
    h5::File f = h5::File::open(ckpt, h5::Mode::ReadWrite);
    f.set_attr("/", "step", int64_t{-3});
  }
  expect_mentions(error_message([&] { read_checkpoint_summary(ckpt); }), {ckpt, "'step'", "-3"});
}

// Everything that can fail is built before out_dir is written: a run that cannot start leaves a new
// directory absent and an existing run's config, checkpoints and metrics as they were.
TEST(Training, ARunThatCannotStartWritesNothing) {
  const fs::path text_dir = fresh_dir("text_is_dir");
  fs::create_directories(text_dir);
  std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"data.min_distance=128"}, "cannot be met"},
      {{"data.task=\"text\"", "data.path=\"" + text_dir.string() + "\""}, "is a directory"},
      {{"data.task=\"text\"", "data.path=\"/nonexistent/dilatron.txt\""}, "/nonexistent/dilatron.txt"},
  };
#ifndef DILATRON_WITH_CUDA
  bad.push_back({{"train.device=\"cuda\""}, "CUDA"});
#endif
  for (const auto& [overrides, why] : bad) {
    SCOPED_TRACE(overrides.back());
    const RunConfig c = load_config(kTiny, overrides);
    const fs::path fresh = fresh_dir("cannot_start");
    expect_mentions(error_message([&] { train(c, quiet(fresh)); }), {why});
    EXPECT_FALSE(fs::exists(fresh));
  }

  const fs::path dir = fresh_dir("cannot_start_existing");
  train(load_config(kTiny, {"train.steps=2"}), quiet(dir));
  const std::string config = read_file(dir / "config.toml"), metrics = read_file(dir / "metrics.jsonl");
  const auto listing = [&] {
    std::vector<std::string> names;
    for (const auto& e : fs::recursive_directory_iterator(dir)) names.push_back(e.path().string());
    std::sort(names.begin(), names.end());
    return names;
  };
  const std::vector<std::string> before = listing();
  for (const auto& overrides : std::vector<std::vector<std::string>>{{"data.min_distance=128"}, {"model.d_ff=96"}}) {
    SCOPED_TRACE(overrides.back());
    TrainOptions o = resuming(dir);  // d_ff = 96: the checkpoint does not fit, and the run's config must stay its own
    error_message([&] { train(load_config(kTiny, overrides), o); });
    EXPECT_EQ(read_file(dir / "config.toml"), config);
    EXPECT_EQ(read_file(dir / "metrics.jsonl"), metrics);
    EXPECT_EQ(listing(), before);
  }
}

// TransformerLM::loss with weights against log-softmax by hand over the model's own logits.
TEST(Model, WeightedLossIsTheHandComputedWeightedMean) {
  const RunConfig c = load_config(kTiny, {"model.seq_len=8", "model.d_model=8", "model.n_heads=2", "model.d_ff=8",
                                          "attention.schedule=\"4:1,8:2\"", "train.dtype=\"float64\""});
  auto model = build_model(c, std::make_shared<Generator>(0));
  const Tensor batch = Tensor::from_vector<int64_t>({256, 49, 50, 51, 52, 10, 20, 30, 257,  //
                                                     256, 7, 7, 7, 200, 3, 1, 4, 257},
                                                    {2, 9});
  const std::vector<double> w = {1, 1, 6, 6, 1, 1, 1, 1, 1, 0.5, 1, 1, 3, 3, 3, 1};
  const int64_t V = data::vocab_size();
  const std::vector<double> logits = model->forward(narrow(batch, 1, 0, 8)).to_vector<double>();
  const std::vector<int64_t> ids = batch.to_vector<int64_t>();
  double weighted = 0.0, total_weight = 0.0, plain = 0.0;
  for (size_t b = 0; b < 2; ++b)
    for (size_t t = 0; t < 8; ++t) {
      const double* x = logits.data() + (b * 8 + t) * static_cast<size_t>(V);
      double z = 0.0;
      for (int64_t v = 0; v < V; ++v) z += std::exp(x[v]);
      const double nll = std::log(z) - x[ids[b * 9 + t + 1]];
      weighted += w[b * 8 + t] * nll;
      total_weight += w[b * 8 + t];
      plain += nll;
    }
  const Tensor weights = Tensor::from_vector<double>(w, {2, 8});
  EXPECT_NEAR(model->loss(batch, weights).item(), weighted / total_weight, 1e-12);
  EXPECT_NEAR(model->loss(batch, weights.to(DType::Float32)).item(), weighted / total_weight, 1e-6);
  EXPECT_NEAR(model->loss(batch).item(), plain / 16.0, 1e-12);
  const std::string msg = error_message([&] { model->loss(batch, Tensor::ones({2, 9}, DType::Float64)); });
  EXPECT_NE(msg.find("[2, 8]"), std::string::npos) << msg;
}

TEST(Training, SeveralQuestionsAndAnswerWeightTrainAndReportResidues) {
  const fs::path dir = fresh_dir("questions");
  const RunConfig c = load_config(kTiny, {"model.seq_len=256", "data.questions=3", "data.answer_weight=5",
                                          "train.steps=4", "train.eval_every=2", "train.checkpoint_every=0"});
  const TrainResult r = train(c, quiet(dir));
  ASSERT_EQ(r.losses.size(), 4u);
  for (double l : r.losses) EXPECT_TRUE(std::isfinite(l));
  // The same run with unit weights sees the same batches and scores them differently.
  const RunConfig unit = load_config(kTiny, {"model.seq_len=256", "data.questions=3", "train.steps=1",
                                             "train.eval_every=0", "train.checkpoint_every=0"});
  EXPECT_NE(train(unit, quiet(fresh_dir("questions_unit"))).losses[0], r.losses[0]);
  std::ifstream metrics(dir / "metrics.jsonl");
  std::string line;
  int evals = 0;
  while (std::getline(metrics, line)) {
    if (line.find("\"eval\": \"passkey\"") == std::string::npos) continue;
    ++evals;
    EXPECT_NE(line.find("\"residue_modulus\": 8"), std::string::npos) << line;
    EXPECT_NE(line.find("\"by_residue\": {\"256 "), std::string::npos) << line;
  }
  EXPECT_EQ(evals, 2);
}

TEST(Evaluation, ResidueBreakdownAddsUpOverTheLargestDilationOfAnyLayer) {
  // Layer 1 has the largest dilation, 16; layer 0 keeps tiny's 16:1,64:4,128:8.
  const RunConfig c = load_config(kTiny, {"attention.layers.1=\"16:1,128:16\""});
  auto model = build_model(c, std::make_shared<Generator>(0));
  model->eval();
  const std::vector<int64_t> lengths = {128, 200};
  const PasskeyReport r = evaluate_passkey(*model, lengths, 24, 5, passkey_options(c, true), 8);
  EXPECT_EQ(r.residue_modulus, 16);
  for (int64_t len : lengths) {
    SCOPED_TRACE(len);
    data::PasskeyOptions po = passkey_options(c, true);
    po.seq_len = len;
    std::map<int64_t, int64_t> want;
    for (const data::PasskeySample& s : data::PasskeyTask(po).eval_set(24, 5))
      ++want[(s.answer_start - 1 - s.needle_position) % 16];  // query of the first digit to the needle's
    const auto& residues = r.by_length_residue.at(len);
    ASSERT_EQ(residues.size(), 16u);
    int64_t total = 0, correct = 0;
    for (const auto& [k, a] : residues) {
      EXPECT_EQ(a.total, want.count(k) ? want[k] : 0) << "residue " << k;
      total += a.total;
      correct += a.correct;
    }
    EXPECT_EQ(total, r.by_length.at(len).total);
    EXPECT_EQ(correct, r.by_length.at(len).correct);
    double pairs = 0.0;
    for (const Schedule& s : c.model.layer_schedules) pairs += static_cast<double>(visited_pairs(s, 4, len, true));
    EXPECT_DOUBLE_EQ(r.visited_pairs_per_token.at(len), pairs / static_cast<double>(len) / 4.0);
  }
  const std::string text = format_passkey_report(r);
  EXPECT_NE(text.find("mod 16 (the largest dilation)"), std::string::npos) << text;
  EXPECT_NE(text.find("200      aligned"), std::string::npos) << text;
  EXPECT_NE(text.find("200      unaligned"), std::string::npos) << text;

  // Dilation 1 everywhere: one residue, and the table says so.
  const RunConfig dense = load_config(kTiny, {"attention.schedule=\"128:1\""});
  auto dense_model = build_model(dense, std::make_shared<Generator>(0));
  dense_model->eval();
  const PasskeyReport d = evaluate_passkey(*dense_model, {128}, 6, 5, passkey_options(dense, true), 8);
  EXPECT_EQ(d.residue_modulus, 1);
  ASSERT_EQ(d.by_length_residue.at(128).size(), 1u);
  EXPECT_EQ(d.by_length_residue.at(128).at(0).total, 6);
  EXPECT_NE(format_passkey_report(d).find("every sample is aligned"), std::string::npos);
}

TEST(Evaluation, ReportJsonParsesAndMatchesThePrintedTable) {
  if (!python_imports("json"))
    GTEST_SKIP() << "python3 is not installed (scripts/install-deps.sh installs it)";
  const fs::path dir = fresh_dir("report_json");
  fs::create_directories(dir);
  for (const bool dense : {false, true}) {
    SCOPED_TRACE(dense ? "dense" : "dilated");
    const RunConfig rc = dense ? load_config(kTiny, {"attention.schedule=\"128:1\""}) : load_config(kTiny);
    auto m = build_model(rc, std::make_shared<Generator>(0));
    m->eval();
    const PasskeyReport r = evaluate_passkey(*m, {128, 300}, 10, 3, passkey_options(rc, true), 8);
    // A checkpoint name that needs escaping: a quote, a backslash and a tab.
    const std::string name = "runs/a \"b\" \\c\td.h5";
    std::ofstream(dir / "report.json") << passkey_report_json(r, name, 42);
    std::ofstream(dir / "report.txt") << format_passkey_report(r);
    const std::string cmd = "/usr/bin/python3 " + std::string(DILATRON_SOURCE_DIR) + "/tests/passkey_json_check.py " +
                            (dir / "report.json").string() + " " + (dir / "report.txt").string() + " '" + name +
                            "' 42 > " + (dir / "check.log").string() + " 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << read_file(dir / "check.log");
  }
}

TEST(Model, GradcheckOnATinyFloat64Model) {
  // Every parameter kind of the model, with XPOS, the relative-position bias and attention dropout.
  const RunConfig c = load_config(kTiny, {"model.seq_len=12", "model.d_model=8", "model.n_heads=2", "model.d_ff=12",
                                          "attention.schedule=\"4:1,8:2,12:4\"", "train.dtype=\"float64\"",
                                          "model.rel_pos_bias=true", "model.bias_buckets=6",
                                          "model.bias_max_distance=12", "model.tie_embeddings=false",
                                          "model.dropout=0.2", "model.attn_dropout=0.2"});
  auto dropout_gen = std::make_shared<Generator>(3);
  auto model = build_model(c, dropout_gen);
  // Make the bias table nonzero so its gradient path is exercised away from its init.
  for (const auto& [name, p] : model->named_parameters())
    if (name.find("rel_bias") != std::string::npos) Tensor(p).copy_(Tensor::full(p.shape(), 0.3, DType::Float64));
  const Tensor batch = Tensor::from_vector<int64_t>({1, 5, 9, 2, 7, 7, 3, 0, 4, 8, 6, 2, 5}, {1, 13});
  const GradcheckResult r = gradcheck_parameters(
      [&] {
        dropout_gen->set_state(3, 0);  // the same masks on every evaluation
        return model->loss(batch);
      },
      model->parameters(), /*max_elements=*/8);
  EXPECT_TRUE(r.ok) << r.message << " (max abs error " << r.max_abs_error << ")";
}

// Parameters do not depend on the schedules, so switching them equals building with them.
TEST(Model, SetAttentionSchedulesMatchesAModelBuiltWithThem) {
  const RunConfig a = load_config(kTiny, {"attention.schedule=\"16:1,64:4,128:8\""});
  const RunConfig b = load_config(kTiny, {"attention.schedule=\"32:1\"", "attention.layers.1=\"8:1,128:16\""});
  auto model = build_model(a, std::make_shared<Generator>(0));
  auto reference = build_model(b, std::make_shared<Generator>(0));
  model->set_attention_schedules(b.model.layer_schedules);
  EXPECT_EQ(model->config().layer_schedules, b.model.layer_schedules);
  model->eval();
  reference->eval();
  Generator gen(2);
  std::vector<int64_t> ids(2 * 128);
  for (int64_t& id : ids) id = static_cast<int64_t>(gen.next_below(256));
  const Tensor tokens = Tensor::from_vector(ids, {2, 128});
  EXPECT_EQ(model->forward(tokens).to_vector<double>(), reference->forward(tokens).to_vector<double>());
  EXPECT_NE(error_message([&] { model->set_attention_schedules({{{16, 1}}}); }).find("1 layer schedules"), std::string::npos);
}

// `--set attention.schedule=9223372036854775807:1` trained attending to nothing (the segment count
// overflowed): a huge segment is one of the sequence's length, and a huge dilation does not make the
// passkey report list 2^63 residues.
TEST(Model, HugeSegmentsAndDilationsActAsTheSequenceLength) {
  const std::string max = std::to_string(std::numeric_limits<int64_t>::max());
  const RunConfig huge = load_config(kTiny, {"attention.schedule=\"" + max + ":1\""});
  const RunConfig plain = load_config(kTiny, {"attention.schedule=\"128:1\""});
  Generator gen(4);
  std::vector<int64_t> ids(2 * 128);
  for (int64_t& id : ids) id = static_cast<int64_t>(gen.next_below(256));
  const Tensor tokens = Tensor::from_vector(ids, {2, 128});
  const double loss = build_model(huge, std::make_shared<Generator>(0))->loss(tokens).item();
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_EQ(loss, build_model(plain, std::make_shared<Generator>(0))->loss(tokens).item());

  const RunConfig dilated = load_config(kTiny, {"attention.schedule=\"16:1," + max + ":" + max + "\""});
  auto model = build_model(dilated, std::make_shared<Generator>(0));
  model->eval();
  const PasskeyReport r = evaluate_passkey(*model, {128}, 2, 1, passkey_options(dilated, true), 2);
  EXPECT_EQ(r.residue_modulus, 128);
  EXPECT_EQ(r.by_length.at(128).total, 2);
}

TEST(Model, XposRejectsLengthsWhoseScaleLeavesFloat32) {
  RunConfig c = load_config(kTiny, {"model.seq_len=200000", "attention.schedule=\"16:1\""});
  auto model = build_model(c, std::make_shared<Generator>(0));
  const std::string msg = error_message([&] { model->forward(Tensor::zeros({1, 200000}, DType::Int64)); });
  EXPECT_NE(msg.find("200000"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rotary"), std::string::npos) << msg;
}

// The contract's XPOS, term for term, on q and k as the model passes them (strided views of the
// fused projection); rotary is the same without the scale.
TEST(Model, XposAndRotaryFollowTheirDefinition) {
  const int64_t B = 2, N = 9, H = 2, D = 6;
  Generator gen(5);
  const Tensor fused = Tensor::randn({B, N, 3, H, D}, gen, DType::Float64);
  const Tensor x = reshape(narrow(fused, 2, 1, 1), {B, N, H, D});
  for (const std::string kind : {"xpos", "rotary"}) {
    const RotaryEmbedding emb(kind, D, 512.0);
    for (bool is_key : {false, true}) {
      SCOPED_TRACE(kind + (is_key ? " k" : " q"));
      const Tensor y = emb.apply(x, is_key);
      for (int64_t t = 0; t < N; ++t)
        for (int64_t i = 0; i < D / 2; ++i) {
          const double angle = static_cast<double>(t) * std::pow(10000.0, -2.0 * static_cast<double>(i) / D);
          const double zeta = (2.0 * static_cast<double>(i) + 0.4 * D) / (1.4 * D);
          double scale = kind == "xpos" ? std::pow(zeta, (static_cast<double>(t) + std::floor(-N / 2.0)) / 512.0) : 1.0;
          if (is_key) scale = 1.0 / scale;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t h = 0; h < H; ++h) {
              const double x0 = x.at({b, t, h, 2 * i}), x1 = x.at({b, t, h, 2 * i + 1});
              const double c = std::cos(angle), s = std::sin(angle);
              EXPECT_NEAR(y.at({b, t, h, 2 * i}), scale * (x0 * c - x1 * s), 1e-12);
              EXPECT_NEAR(y.at({b, t, h, 2 * i + 1}), scale * (x1 * c + x0 * s), 1e-12);
            }
        }
    }
  }
}

#ifdef DILATRON_CLI  // the dilatron command is built (tests/CMakeLists.txt)

// The command line: SIGINT saves a loadable checkpoint; h5py reads checkpoints as `inspect` lists them.
class TrainCommand : public ::testing::Test {
 protected:
  static std::string binary() { return DILATRON_CLI; }
  static int run(const std::string& cmd) { return std::system(cmd.c_str()); }
};

TEST_F(TrainCommand, SigintLeavesALoadableCheckpoint) {
  const fs::path dir = fresh_dir("sigint");
  const std::string cmd = "timeout --preserve-status -s INT 3 " + binary() + " train " + kTiny + " --out " + dir.string() +
                          " --set train.steps=1000000 --set train.checkpoint_every=0 > " + (dir.string() + ".log") + " 2>&1";
  const int status = run(cmd);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 130) << "expected the interrupted exit code";
  const auto latest = CheckpointDir((dir / "checkpoints").string(), 1).latest();
  ASSERT_TRUE(latest.has_value());
  EXPECT_GT(parameters_of(*latest).size(), 0u);
  // And the run resumes from it.
  TrainOptions o = resuming(dir);
  o.allow_config_change = true;  // fewer steps
  const int64_t stopped_at = read_checkpoint_summary(*latest).state.step;
  const TrainResult r = train(load_config(kTiny, {"train.checkpoint_every=0", "train.steps=" + std::to_string(stopped_at + 2)}), o);
  EXPECT_EQ(r.first_step, stopped_at);
  EXPECT_EQ(r.steps_done, stopped_at + 2);
}

TEST_F(TrainCommand, TrainPrintsTheStagesAndInspectShowsTheStage) {
  const fs::path dir = fresh_dir("stages_cli");
  fs::create_directories(dir);
  const std::string log = (dir / "train.log").string();
  const int status = run(binary() + " train " + kTiny + " --out " + dir.string() +
                         " --set model.seq_len=256 --set 'train.stages=[{steps=2, seq_len=128, schedule=\"128:1\"}, {steps=1}]'"
                         " --set train.steps=3"
                         " > " + log + " 2>&1");
  const std::string out = read_file(log);
  ASSERT_EQ(status, 0) << out;
  EXPECT_NE(out.find("stage 1/2: steps 1-2, batch 4 x 128 tokens, attention 128:1"), std::string::npos) << out;
  EXPECT_NE(out.find("stage 2/2: steps 3-3, batch 4 x 256 tokens, attention 16:1,64:4,128:8"), std::string::npos) << out;
  EXPECT_NE(out.find("stage 2/2 | step 3/3"), std::string::npos) << out;  // the progress line
  ASSERT_EQ(run(binary() + " inspect " + dir.string() + " > " + (dir / "inspect.txt").string() + " 2>&1"), 0);
  const std::string inspect = read_file(dir / "inspect.txt");
  EXPECT_NE(inspect.find("step: 3\nstage: 2 of 2\n"), std::string::npos) << inspect;
}

TEST_F(TrainCommand, StopAtStepCheckpointsExitsZeroAndResumes) {
  const fs::path dir = fresh_dir("stop_at_step");
  fs::create_directories(dir);
  const std::string log = (dir / "train.log").string();
  const std::string cmd = binary() + " train " + kTiny + " --out " + dir.string() +
                          " --set train.steps=5 --set train.checkpoint_every=0 --stop-at-step 3";
  int status = run(cmd + " > " + log + " 2>&1");
  ASSERT_EQ(status, 0) << read_file(log);
  EXPECT_NE(read_file(log).find("stopped at step 3 (--stop-at-step)"), std::string::npos) << read_file(log);
  const auto latest = CheckpointDir((dir / "checkpoints").string(), 1).latest();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(read_checkpoint_summary(*latest).state.step, 3);
  status = run(binary() + " train " + kTiny + " --out " + dir.string() +
               " --set train.steps=5 --set train.checkpoint_every=0 --resume auto > " + log + " 2>&1");
  ASSERT_EQ(status, 0) << read_file(log);
  EXPECT_EQ(read_checkpoint_summary(*CheckpointDir((dir / "checkpoints").string(), 1).latest()).state.step, 5);
  EXPECT_NE(run(binary() + " train " + kTiny + " --out " + dir.string() + " --stop-at-step -1 > " + log + " 2>&1"), 0);
  EXPECT_NE(read_file(log).find("--stop-at-step"), std::string::npos) << read_file(log);  // names the option
}

TEST_F(TrainCommand, H5pyReadsEveryParameterInspectLists) {
  if (!python_imports("h5py"))
    GTEST_SKIP() << "python3-h5py is not installed (scripts/install-deps.sh installs it)";
  const fs::path dir = fresh_dir("h5py_ckpt");
  const std::string ckpt = train(load_config(kTiny, {"train.steps=2"}), quiet(dir)).last_checkpoint;
  const std::string out = dir.string() + "/compare.log";
  const std::string cmd = binary() + " inspect " + ckpt + " > " + dir.string() + "/inspect.txt && /usr/bin/python3 " +
                          DILATRON_SOURCE_DIR + "/tests/h5py_checkpoint.py " + ckpt + " " + dir.string() +
                          "/inspect.txt > " + out + " 2>&1";
  const int status = run(cmd);
  EXPECT_EQ(status, 0) << read_file(out);
}

TEST_F(TrainCommand, AttentionCommandMatchesTheDenseContractInNumpy) {
  if (!python_imports("h5py, numpy"))
    GTEST_SKIP() << "python3-h5py / python3-numpy are not installed (scripts/install-deps.sh installs them)";
  const fs::path dir = fresh_dir("attention_cli");
  fs::create_directories(dir);
  const std::string cmd = "/usr/bin/python3 " + std::string(DILATRON_SOURCE_DIR) + "/scripts/attention_example.py " +
                          binary() + " " + dir.string() + " > " + dir.string() + "/log 2>&1";
  const int status = run(cmd);
  EXPECT_EQ(status, 0) << read_file(dir / "log");
}

TEST_F(TrainCommand, EvalJsonIsTheReportItPrints) {
  if (!python_imports("json"))
    GTEST_SKIP() << "python3 is not installed (scripts/install-deps.sh installs it)";
  const fs::path dir = fresh_dir("eval_json");
  const std::string ckpt = train(load_config(kTiny, {"train.steps=2"}), quiet(dir)).last_checkpoint;
  const fs::path json = dir / "report.json", text = dir / "report.txt", log = dir / "check.log";
  EXPECT_EQ(run(binary() + " eval " + dir.string() + " --samples 12 --lengths 128,160 --json " + json.string() + " > " +
                text.string() + " 2>&1"),
            0)
      << read_file(text);
  EXPECT_FALSE(fs::exists(json.string() + ".tmp"));
  EXPECT_EQ(run("/usr/bin/python3 " + std::string(DILATRON_SOURCE_DIR) + "/tests/passkey_json_check.py " +
                json.string() + " " + text.string() + " " + ckpt + " 2 > " + log.string() + " 2>&1"),
            0)
      << read_file(log);
  EXPECT_NE(read_file(text).find("mod 8 (the largest dilation)"), std::string::npos) << read_file(text);
  // --json is the passkey report's: a text evaluation refuses it.
  EXPECT_NE(run(binary() + " eval " + ckpt + " --task text --json " + json.string() + " > " + log.string() + " 2>&1"), 0);
  EXPECT_NE(read_file(log).find("--json"), std::string::npos) << read_file(log);
}

TEST_F(TrainCommand, AttentionCommandNamesTheMissingDataset) {
  const fs::path dir = fresh_dir("attention_missing");
  fs::create_directories(dir);
  h5::File f = h5::File::create((dir / "in.h5").string());
  Generator gen(1);
  f.write("q", Tensor::randn({1, 8, 2, 4}, gen));
  f.write("k", Tensor::randn({1, 8, 2, 4}, gen));
  f.close();
  const std::string log = (dir / "log").string();
  const int status = run(binary() + " attention --in " + (dir / "in.h5").string() + " --out " +
                         (dir / "out.h5").string() + " --schedule 4:1 > " + log + " 2>&1");
  EXPECT_NE(status, 0);
  const std::string out = read_file(log);
  EXPECT_NE(out.find("'v'"), std::string::npos) << out;
  EXPECT_NE(out.find("in.h5"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(dir / "out.h5"));
}

// Arguments are checked before anything loads: `eval --batch 0` looped forever.
TEST_F(TrainCommand, EvalRejectsBadBatchSamplesAndLengthsUpFront) {
  const fs::path dir = fresh_dir("eval_args");
  train(load_config(kTiny, {"train.steps=1"}), quiet(dir));
  const std::string text = (dir / "text.txt").string();
  std::ofstream(text) << std::string(4000, 'a');
  const int64_t shortest = data::PasskeyTask::min_seq_len(data::PasskeyOptions{}.digits, 1);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--batch 0", "--batch must be in [1, 1048576], got 0"},
      {"--text " + text + " --batch 0", "--batch must be in [1, 1048576], got 0"},
      {"--batch -3", "got -3"},
      {"--samples 0", "--samples must be >= 1, got 0"},
      {"--text " + text + " --samples -1", "--samples must be >= 1, got -1"},
      {"--samples 2000000", "at most 1048576"},
      {"--lengths 128,4", "--lengths: each length must be in [8, 16777216], got 4"},
      {"--lengths 99999999999", "got 99999999999"},
      {"--lengths 128," + std::to_string(shortest - 1), "--lengths: length " + std::to_string(shortest - 1)},
      {"--min-distance -2", "--min-distance must be >= 0, got -2"},
  };
  const std::string log = (dir / "eval.log").string();
  for (const auto& [args, want] : cases) {
    const int status = run("timeout 120 " + binary() + " eval " + dir.string() + " " + args + " > " + log + " 2>&1");
    ASSERT_TRUE(WIFEXITED(status)) << args;
    EXPECT_EQ(WEXITSTATUS(status), 1) << args << ": " << read_file(log);
    EXPECT_NE(read_file(log).find(want), std::string::npos) << args << ": " << read_file(log);
  }
  // A directory for --text says so.
  EXPECT_EQ(WEXITSTATUS(run(binary() + " eval " + dir.string() + " --text " + dir.string() + " > " + log + " 2>&1")), 1);
  EXPECT_NE(read_file(log).find("is a directory"), std::string::npos) << read_file(log);
  EXPECT_EQ(run(binary() + " eval " + dir.string() + " --samples 2 --batch 1 > " + log + " 2>&1"), 0) << read_file(log);
}

// --out is renamed over: the command refuses to replace anything but a regular file other than --in.
TEST_F(TrainCommand, AttentionOutRefusesSpecialFilesSymlinksAndTheInput) {
  const fs::path dir = fresh_dir("attention_out");
  fs::create_directories(dir / "adir");
  const fs::path in = dir / "in.h5";
  {
    h5::File f = h5::File::create(in.string());
    Generator gen(1);
    for (const char* name : {"q", "k", "v"}) f.write(name, Tensor::randn({1, 8, 2, 4}, gen));
  }
  std::ofstream(dir / "victim.txt") << "keep me";
  fs::create_symlink(dir / "victim.txt", dir / "link.h5");
  fs::create_hard_link(in, dir / "hard.h5");
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0644), 0);
  const std::string log = (dir / "log").string();
  const auto attention = [&](const fs::path& out) {
    const int status = run("timeout 60 " + binary() + " attention --in " + in.string() + " --out " + out.string() +
                           " --schedule 4:1 > " + log + " 2>&1");
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  const std::vector<std::pair<fs::path, std::string>> cases = {
      {dir / "adir", "not a regular file (a directory)"},
      {dir / "fifo", "not a regular file (a device, fifo or socket)"},
      {dir / "link.h5", "is a symbolic link"},
      {in, "is the input file"},
      {dir / "." / "adir" / ".." / "in.h5", "is the input file"},
      {dir / "hard.h5", "is the input file"},
  };
  for (const auto& [out, want] : cases) {
    EXPECT_EQ(attention(out), 1) << out;
    EXPECT_NE(read_file(log).find(want), std::string::npos) << out << ": " << read_file(log);
  }
  EXPECT_TRUE(fs::is_directory(dir / "adir"));
  EXPECT_TRUE(fs::is_fifo(dir / "fifo"));
  EXPECT_TRUE(fs::is_symlink(dir / "link.h5"));
  EXPECT_EQ(read_file(dir / "victim.txt"), "keep me");
  EXPECT_EQ(h5::File::open(in.string(), h5::Mode::ReadOnly).list("/", false).size(), 3u);
  // A new path, and then the regular file it made, are written.
  EXPECT_EQ(attention(dir / "out.h5"), 0) << read_file(log);
  EXPECT_EQ(attention(dir / "out.h5"), 0) << read_file(log);
  // Integer q without --dtype names the dataset, not --dtype.
  {
    h5::File f = h5::File::create((dir / "int.h5").string());
    for (const char* name : {"q", "k", "v"}) f.write(name, Tensor::zeros({1, 8, 2, 4}, TensorOptions(DType::Int64)));
  }
  const int status = run(binary() + " attention --in " + (dir / "int.h5").string() + " --out " +
                         (dir / "int_out.h5").string() + " --schedule 4:1 > " + log + " 2>&1");
  EXPECT_EQ(WEXITSTATUS(status), 1);
  EXPECT_NE(read_file(log).find("dataset 'q' is int64"), std::string::npos) << read_file(log);
  EXPECT_EQ(read_file(log).find("--dtype"), std::string::npos) << read_file(log);
}

// SIGTERM (a scheduler's stop) checkpoints like SIGINT and exits 143; while a run holds its directory,
// a second `train` on it is refused.
TEST_F(TrainCommand, SigtermSavesAndASecondRunOnTheSameDirectoryIsRefused) {
  const fs::path dir = fresh_dir("sigterm");
  const std::string log = dir.string() + ".log", log2 = dir.string() + ".second.log";
  const std::string cmd = "exec " + binary() + " train " + kTiny + " --out " + dir.string() +
                          " --resume auto --set train.steps=1000000 --set train.checkpoint_every=0 > " + log + " 2>&1";
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait for the first step's metrics line.
  bool started = false;
  for (int i = 0; i < 1200 && !started; ++i) {
    started = read_file(dir / "metrics.jsonl").find('\n') != std::string::npos;
    if (!started) ::usleep(100000);
  }
  if (started) {
    const int second = run(binary() + " train " + kTiny + " --out " + dir.string() + " --set train.steps=2 > " + log2 +
                           " 2>&1");
    EXPECT_EQ(WEXITSTATUS(second), 1) << read_file(log2);
    EXPECT_NE(read_file(log2).find("is in use by another dilatron train"), std::string::npos) << read_file(log2);
  }
  ::kill(pid, SIGTERM);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(started) << read_file(log);
  ASSERT_TRUE(WIFEXITED(status)) << read_file(log);
  EXPECT_EQ(WEXITSTATUS(status), 143) << read_file(log);
  const std::string out = read_file(log);
  EXPECT_NE(out.find("no checkpoint in " + (dir / "checkpoints").string() + "; starting fresh"), std::string::npos)
      << out;
  const auto latest = CheckpointDir((dir / "checkpoints").string(), 1).latest();
  ASSERT_TRUE(latest.has_value()) << out;
  const int64_t stopped_at = read_checkpoint_summary(*latest).state.step;
  EXPECT_GE(stopped_at, 1);
  EXPECT_NE(out.find("interrupted by SIGTERM at step " + std::to_string(stopped_at) + ";"), std::string::npos) << out;
  // The lock went with the process, and the run resumes where it stopped.
  TrainOptions o = resuming(dir);
  o.allow_config_change = true;  // fewer steps
  const TrainResult r =
      train(load_config(kTiny, {"train.checkpoint_every=0", "train.steps=" + std::to_string(stopped_at + 2)}), o);
  EXPECT_EQ(r.first_step, stopped_at);
  EXPECT_EQ(r.steps_done, stopped_at + 2);
}

TEST_F(TrainCommand, EmptyOrGarbageLatestIsAClearErrorNotACrash) {
  const fs::path dir = fresh_dir("empty_latest");
  fs::create_directories(dir / "checkpoints");
  const std::string latest = (dir / "checkpoints" / "latest").string();
  for (const std::string& content : {std::string(), std::string("\x01\xfegarbage")}) {
    std::ofstream(latest, std::ios::binary | std::ios::trunc) << content;
    for (const std::string cmd : {"inspect", "eval", "sample"}) {
      const fs::path log = dir / (cmd + ".log");
      const int status = run(binary() + " " + cmd + " " + dir.string() + " > " + log.string() + " 2>&1");
      ASSERT_TRUE(WIFEXITED(status)) << cmd << ": " << read_file(log);
      EXPECT_EQ(WEXITSTATUS(status), 1) << cmd << ": " << read_file(log);
      EXPECT_NE(read_file(log).find("dilatron: error: '" + latest + "' does not name a checkpoint"), std::string::npos)
          << cmd << ": " << read_file(log);
    }
  }
}

TEST_F(TrainCommand, AttentionRemovesOrphanedTemporariesBesideOut) {
  const fs::path dir = fresh_dir("attention_orphans");
  fs::create_directories(dir);
  {
    h5::File f = h5::File::create((dir / "in.h5").string());
    Generator gen(1);
    for (const char* name : {"q", "k", "v"}) f.write(name, Tensor::randn({1, 8, 2, 4}, gen));
  }
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ASSERT_GT(dead, 0);
  ::waitpid(dead, nullptr, 0);
  const fs::path orphan = dir / ("out.h5.tmp." + std::to_string(dead));
  const fs::path other = dir / ("in.h5.tmp." + std::to_string(dead));  // not --out's: left alone
  std::ofstream(orphan) << "partial";
  std::ofstream(other) << "partial";
  const fs::path log = dir / "log";
  ASSERT_EQ(run(binary() + " attention --in " + (dir / "in.h5").string() + " --out " + (dir / "out.h5").string() +
                " --schedule 4:1 > " + log.string() + " 2>&1"),
            0)
      << read_file(log);
  EXPECT_FALSE(fs::exists(orphan));
  EXPECT_TRUE(fs::exists(other));
  EXPECT_NE(read_file(log).find("removed '" + orphan.string() + "'"), std::string::npos) << read_file(log);
}

TEST_F(TrainCommand, CorruptedOrInconsistentCheckpointsAreRefusedByInspectEvalAndSample) {
  const fs::path dir = fresh_dir("refused_cli");
  const std::string ckpt = train(load_config(kTiny, {"train.steps=2"}), quiet(dir)).last_checkpoint;
  // A flipped byte in a moment only resume reads, and a stored config whose d_ff is not the parameters'.
  const std::string flipped = (dir / "flipped.h5").string(), other = (dir / "other_config.h5").string();
  fs::copy_file(ckpt, flipped);
  const size_t at = data_offset(flipped, "optimizer/blocks.0.fc.weight/m");
  ASSERT_NE(at, std::string::npos);
  xor_byte(flipped, at + 5, 0x10);
  fs::copy_file(ckpt, other);
  {
    h5::File f = h5::File::open(other, h5::Mode::ReadWrite);
    std::string toml = f.get_attr_string("/", "config");
    const size_t d_ff = toml.find("d_ff = 64");
    ASSERT_NE(d_ff, std::string::npos) << toml;
    f.set_attr_checksummed("/", "config", toml.replace(d_ff, 9, "d_ff = 96"));  // consistent, but not the model
  }
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {flipped, {"inspect"}}, {other, {"inspect", "eval", "sample"}}};
  for (const auto& [path, commands] : cases)
    for (const std::string& cmd : commands) {
      const fs::path log = dir / (cmd + ".log");
      const int status = run(binary() + " " + cmd + " " + path + " > " + log.string() + " 2>&1");
      const std::string out = read_file(log);
      ASSERT_TRUE(WIFEXITED(status)) << cmd << " " << path << ": " << out;
      EXPECT_EQ(WEXITSTATUS(status), 1) << cmd << " " << path << ": " << out;
      EXPECT_NE(out.find(path), std::string::npos) << out;
      EXPECT_NE(out.find(path == flipped ? "'optimizer/blocks.0.fc.weight/m'" : "blocks.0.fc.weight' has shape [64, 32]"),
                std::string::npos)
          << cmd << ": " << out;
    }
}

// A flipped byte in the stored config could still parse (lr = 0.003 read as lr = 0.00); as a
// variable-length string it was read without a check. Now HDF5's metadata checksum refuses it, and a
// config that does not match its stored hash is refused naming the attribute.
TEST_F(TrainCommand, CorruptedStoredConfigIsRefusedByInspectEvalAndResume) {
  const fs::path dir = fresh_dir("config_flip");
  const std::string ckpt = train(load_config(kTiny, {"train.steps=2"}), quiet(dir)).last_checkpoint;
  const std::string toml = read_checkpoint_summary(ckpt).config_toml;
  const size_t lr = toml.find("\nlr = 0.003");
  ASSERT_NE(lr, std::string::npos) << toml;
  const size_t at = read_file(ckpt).find(toml);
  ASSERT_NE(at, std::string::npos) << "the config is not stored verbatim in " << ckpt;
  const std::string flipped = (dir / "flipped.h5").string(), unhashed = (dir / "unhashed.h5").string();
  fs::copy_file(ckpt, flipped);
  xor_byte(flipped, at + lr + 10, 0x10);  // '3' ^ 0x10 = '#': "lr = 0.00#..."
  fs::copy_file(ckpt, unhashed);
  {
    h5::File f = h5::File::open(unhashed, h5::Mode::ReadWrite);
    f.set_attr("/", "config.fnv1a64", int64_t{7});
  }
  const fs::path resumed = dir / "resumed", log = dir / "refused.log";
  // The attributes live in the root group's header: a flipped byte fails its checksum.
  for (const auto& [path, want] : {std::pair{flipped, "cannot open '/' in '" + flipped + "'"},
                                   std::pair{unhashed, "attribute 'config' of '/' in '" + unhashed +
                                                           "' does not match its checksum ('config.fnv1a64')"}})
    for (const std::string& cmd : {"inspect " + path, "eval " + path,
                                   "train " + kTiny + " --set train.steps=2 --resume " + path + " --out " + resumed.string()}) {
      const int status = run(binary() + " " + cmd + " > " + log.string() + " 2>&1");
      ASSERT_TRUE(WIFEXITED(status)) << cmd << ": " << read_file(log);
      EXPECT_EQ(WEXITSTATUS(status), 1) << cmd << ": " << read_file(log);
      expect_mentions(read_file(log), {want, "checksum"});
    }
  EXPECT_FALSE(fs::exists(resumed));
}

// A resume whose lr differs from the checkpoint's is refused naming it, and with --allow-config-change
// continues under the new lr, recording the change.
TEST_F(TrainCommand, ResumeWithAChangedLrNeedsAllowConfigChangeAndIsRecorded) {
  const fs::path dir = fresh_dir("resume_lr");
  const std::string ckpt = partial_run(dir);
  const std::string config = read_file(dir / "config.toml");
  const fs::path log = dir.string() + ".log";
  const std::string resume = binary() + " train " + kTiny + " --out " + dir.string() +
                             " --resume auto --set train.steps=4 --set train.lr=0.001";
  int status = run(resume + " > " + log.string() + " 2>&1");
  ASSERT_TRUE(WIFEXITED(status)) << read_file(log);
  EXPECT_EQ(WEXITSTATUS(status), 1) << read_file(log);
  expect_mentions(read_file(log), {"dilatron: error: resuming from '" + ckpt + "'", "train.lr: 0.003 -> 0.001",
                               "--allow-config-change"});
  EXPECT_EQ(read_file(dir / "config.toml"), config);
  EXPECT_FALSE(fs::exists(dir / "config-changes.log"));

  status = run(resume + " --allow-config-change > " + log.string() + " 2>&1");
  ASSERT_EQ(status, 0) << read_file(log);
  expect_mentions(read_file(log), {"config changed on resume at step 2: train.lr: 0.003 -> 0.001"});
  expect_mentions(read_file(dir / "config-changes.log"),
                  {"resumed at step 2 from '" + ckpt + "'\n  train.lr: 0.003 -> 0.001\n"});
  EXPECT_EQ(read_file(dir / "config.toml"), load_config(kTiny, {"train.steps=4", "train.lr=0.001"}).toml);
  // Steps 3 and 4 ran at the new schedule's rates (warmup 5 is cut to the run's 4 steps, as train() does).
  const optim::WarmupCosine schedule(0.001, 4, 4, 3e-4);
  std::istringstream lines(read_file(dir / "metrics.jsonl"));
  std::vector<std::string> lrs;
  for (std::string line; std::getline(lines, line);) {
    const size_t at = line.find("\"lr\": ");
    ASSERT_NE(at, std::string::npos) << line;
    lrs.push_back(line.substr(at + 6, line.find(',', at) - at - 6));
  }
  ASSERT_EQ(lrs.size(), 4u);
  for (const int64_t step : {2, 3}) {
    char want[32];
    std::snprintf(want, sizeof want, "%.6g", schedule.lr_at(step));
    EXPECT_EQ(lrs[static_cast<size_t>(step)], want) << "step " << step + 1;
  }
}

// A small tmpfs, unmounted when the test ends.
struct SmallFilesystem {
  fs::path dir;
  bool mounted = false;
  SmallFilesystem(fs::path d, const std::string& size) : dir(std::move(d)) {
    fs::create_directories(dir);
    mounted = std::system(("mount -t tmpfs -o size=" + size + " tmpfs " + dir.string() + " 2>/dev/null").c_str()) == 0;
  }
  ~SmallFilesystem() {
    if (!mounted) return;
    [[maybe_unused]] const int status = std::system(("umount " + dir.string()).c_str());
  }
};

TEST_F(TrainCommand, DiskFullIsAnErrorNotACrashAndLeavesAConsistentRun) {
  const fs::path dir = fresh_dir("disk_full");
  int failures = 0;
  // From no room for the first checkpoint to room for a few (a tiny checkpoint is about 0.3 MB).
  for (int kb = 200; kb <= 1600; kb += 100) {
    const SmallFilesystem small(dir / std::to_string(kb), std::to_string(kb) + "k");
    if (!small.mounted)
      GTEST_SKIP() << "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): the disk-full test is skipped";
    const fs::path run_dir = small.dir / "run", log = dir / (std::to_string(kb) + ".log");
    const int status = run(binary() + " train " + kTiny + " --out " + run_dir.string() +
                           " --set train.steps=8 --set train.checkpoint_every=2 --set train.keep_checkpoints=3 > " +
                           log.string() + " 2>&1");
    const std::string out = read_file(log);
    ASSERT_TRUE(WIFEXITED(status)) << kb << "k: " << out;
    ASSERT_TRUE(WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == 1) << kb << "k: exit " << WEXITSTATUS(status) << "\n" << out;
    if (WEXITSTATUS(status) == 1) {
      ++failures;
      EXPECT_NE(out.find("dilatron: error: "), std::string::npos) << kb << "k: " << out;
      EXPECT_NE(out.find("No space left on device"), std::string::npos) << kb << "k: " << out;
    }
    // Nothing half-written stays: no temporaries, no metrics line cut short, no checkpoint past `latest`.
    ASSERT_TRUE(fs::is_directory(run_dir / "checkpoints")) << kb << "k: " << out;
    std::vector<std::string> ckpts;
    for (const auto& e : fs::recursive_directory_iterator(run_dir)) {
      const std::string name = e.path().filename().string();
      EXPECT_EQ(name.find(".tmp"), std::string::npos) << kb << "k: " << e.path();
      if (name.starts_with("ckpt-")) ckpts.push_back(name);
    }
    const std::string metrics = fs::exists(run_dir / "metrics.jsonl") ? read_file(run_dir / "metrics.jsonl") : "";
    EXPECT_TRUE(metrics.empty() || metrics.back() == '\n') << kb << "k: metrics.jsonl cut short";
    const auto latest = CheckpointDir((run_dir / "checkpoints").string(), 1).latest();
    if (!latest) {
      EXPECT_TRUE(ckpts.empty()) << kb << "k: checkpoints without `latest`";
      continue;
    }
    EXPECT_GT(parameters_of(*latest).size(), 0u);
    for (const std::string& name : ckpts) EXPECT_LE(name, fs::path(*latest).filename().string()) << kb << "k";
  }
  EXPECT_GT(failures, 0) << "no size was small enough to fill the disk";
}

#endif  // DILATRON_CLI
