// Data-parallel training (issue 15, docs/distributed.md): the process group's collectives and the
// gradient sums in one process, then `mpirun -np 2` and `-np 3` runs of the dilatron command against
// one process: the losses, the deterministic shards bit for bit (across a resume with another number
// of ranks too), the bytes sent, refused splits, and a rank that dies or hangs.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "dilatron/checkpoint.h"
#include "dilatron/config.h"
#include "dilatron/data_parallel.h"
#include "dilatron/dist.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"
#include "dilatron/optim.h"
#include "dilatron/sequence_parallel.h"
#include "dilatron/trainer.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::error_message;
using dilatron::test::read_file;
namespace fs = std::filesystem;

namespace {

const std::string kTinyConfig = std::string(DILATRON_SOURCE_DIR) + "/configs/tiny.toml";

// The environment of every process the tests start: one OpenMP thread each (the ranks share the
// cores); Open MPI allowed as root (CI containers) and without its single-copy shared-memory
// transfers, which containers without ptrace permission refuse.
const std::string kProcessEnv = "OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                                "OMPI_MCA_btl_vader_single_copy_mechanism=none ";

fs::path empty_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("dilatron_dist_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

Tensor tensor(const std::vector<float>& v) { return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}); }

}  // namespace

// ---------------------------------------------------------------- one process

TEST(ProcessGroup, OneProcessIsRankZeroOfOne) {
  auto g = dist::single_process_group();
  EXPECT_EQ(g->rank(), 0);
  EXPECT_EQ(g->world_size(), 1);
  Tensor t = tensor({1.5f, -2.0f});
  g->all_reduce(t);
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{1.5f, -2.0f}));
  Tensor out = Tensor::empty({2});
  g->all_gather(t, out);
  EXPECT_EQ(out.to_vector<float>(), (std::vector<float>{1.5f, -2.0f}));
  Tensor block = Tensor::empty({2});
  g->reduce_scatter(t, block);
  EXPECT_EQ(block.to_vector<float>(), (std::vector<float>{1.5f, -2.0f}));
  const auto sub = g->split(0);
  EXPECT_EQ(sub->world_size(), 1);
  sub->all_reduce(t);
  EXPECT_EQ(g->stats().bytes_sent(), 0);
  EXPECT_EQ(g->stats().all_reduce.calls, 2);  // the split group's call counts in its parent's stats
  EXPECT_EQ(g->stats().reduce_scatter.calls, 1);
}

TEST(ProcessGroup, TimeoutMustBePositive) {
  dist::InitOptions o;
  o.timeout_s = 0.0;
  EXPECT_NE(error_message([&] { dist::init_process_group(o); }).find("must be > 0 seconds, got 0"), std::string::npos);
}

TEST(DataParallelGradients, FlattenAndSetRoundTrip) {
  Tensor a = Tensor::zeros({2, 2}).requires_grad_(), b = Tensor::zeros({3}).requires_grad_();
  a.set_grad(Tensor::from_vector(std::vector<float>{1, 2, 3, 4}, {2, 2}));
  b.set_grad(tensor({5, 6, 7}));
  const Tensor flat = dist::flatten_gradients({a, b});
  EXPECT_EQ(flat.to_vector<float>(), (std::vector<float>{1, 2, 3, 4, 5, 6, 7}));
  dist::set_gradients({a, b}, tensor({-1, -2, -3, -4, -5, -6, -7}));
  EXPECT_EQ(a.grad().shape(), Shape({2, 2}));
  EXPECT_EQ(a.grad().to_vector<float>(), (std::vector<float>{-1, -2, -3, -4}));
  EXPECT_EQ(b.grad().to_vector<float>(), (std::vector<float>{-5, -6, -7}));
  EXPECT_NE(error_message([&] { dist::set_gradients({a, b}, tensor({1, 2})); }).find("fewer than the parameters hold"),
            std::string::npos);
}

TEST(DataParallelGradients, ShardsAreSummedLeftToRight) {
  // 1 + 1e8 - 1e8 + 1 in float: left to right gives 1 ((1 + 1e8) rounds to 1e8), pairwise 0.
  auto g = dist::single_process_group();
  const Tensor shards = Tensor::from_vector(std::vector<float>{1, 1e8f, -1e8f, 1}, {4, 1});
  EXPECT_EQ(dist::sum_shards_in_order(*g, shards).to_vector<float>(), (std::vector<float>{1.0f}));
}

TEST(DataParallelConfig, DeterministicShardsMustDivideTheBatch) {
  const std::string msg =
      error_message([] { load_config(kTinyConfig, {"train.deterministic_shards=3"}); });  // data.batch_size = 4
  EXPECT_NE(msg.find("train.deterministic_shards' must divide the batch size"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got 3 for a batch of 4"), std::string::npos) << msg;
}

// One process with deterministic shards is the same run for K = 1 as without (one part, weight 1).
TEST(DataParallelConfig, OneShardIsThePlainRun) {
  const fs::path dir = empty_dir("one_shard");
  TrainOptions o;
  o.progress = false;
  o.out_dir = (dir / "plain").string();
  const TrainResult plain = train(load_config(kTinyConfig, {"train.steps=3"}), o);
  o.out_dir = (dir / "sharded").string();
  const TrainResult sharded = train(load_config(kTinyConfig, {"train.steps=3", "train.deterministic_shards=1"}), o);
  EXPECT_EQ(plain.losses, sharded.losses);
}

// ---------------------------------------------------------------- sequence parallel

// Every rank of init_process_group's group runs this: one process under ctest (S = 1: every branch
// local, the merge of the branches by their lse against the op's one softmax), S ranks when
// MpiRun.SequenceParallel* starts this binary under mpirun. Each rank draws the whole sequence from
// one seed, runs the op on it, and checks its part of o and of the gradients of sum(o * g) (the
// bias gradient summed over the ranks), and the bytes it sent against the ring's count.
TEST(SequenceParallelRank, MatchesTheOpOnTheWholeSequence) {
  const auto group = dist::init_process_group();
  const int S = group->world_size(), rank = group->rank();
  const int64_t B = 2, n = 16, H = 4, D = 8, N = S * n;
  // Local branches (segments 8 and n) and branches spanning every part (segments of N); with an even
  // S also one spanning pairs of parts. Dilations that do not divide the segment leave ragged grids.
  std::string schedule = "8:1,16:3k," + std::to_string(N) + ":4," + std::to_string(N) + ":3k";
  if (S % 2 == 0) schedule += ",32:2";  // 2n
  for (const DType dtype : {DType::Float64, DType::Float32}) {
    const double tol = dtype == DType::Float64 ? 1e-12 : 1e-5;
    for (const bool causal : {true, false}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + (causal ? " causal " : " ") + schedule + ", S = " +
                   std::to_string(S));
      DilatedAttentionOptions opts;
      opts.schedule = parse_schedule(schedule);
      opts.causal = causal;
      opts.bias_num_buckets = 8;
      opts.bias_max_distance = 32;
      Generator gen(11);
      const TensorOptions to(dtype);
      const Tensor q = Tensor::randn({B, N, H, D}, gen, to), k = Tensor::randn({B, N, H, D}, gen, to),
                   v = Tensor::randn({B, N, H, D}, gen, to), g = Tensor::randn({B, N, H, D}, gen, to);
      const Tensor bias = Tensor::randn({H, 8}, gen, to);

      std::vector<Tensor> full = {q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(),
                                  bias.clone().requires_grad_()};
      const Tensor o_full = dilated_attention(full[0], full[1], full[2], opts, full[3]);
      sum(mul(o_full, g)).backward();

      const auto part = [&](const Tensor& t) { return t.narrow(1, rank * n, n).contiguous(); };
      std::vector<Tensor> mine = {part(q).requires_grad_(), part(k).requires_grad_(), part(v).requires_grad_(),
                                  bias.clone().requires_grad_()};
      const int64_t bytes_before = group->stats().bytes_sent();
      const Tensor o = dist::sequence_parallel_attention(mine[0], mine[1], mine[2], opts, *group, mine[3]);
      sum(mul(o, part(g))).backward();
      const int64_t bytes = group->stats().bytes_sent() - bytes_before;

      const auto expect_close = [&](const Tensor& got, const Tensor& want, const char* what) {
        const std::vector<double> a = got.to_vector<double>(), b = want.to_vector<double>();
        ASSERT_EQ(a.size(), b.size()) << what;
        double worst = 0.0;
        for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
        EXPECT_LE(worst, tol) << what << " differs from the op on the whole sequence";
      };
      expect_close(o, part(o_full.detach()), "o");
      expect_close(mine[0].grad(), part(full[0].grad()), "dq");
      expect_close(mine[1].grad(), part(full[1].grad()), "dk");
      expect_close(mine[2].grad(), part(full[2].grad()), "dv");
      Tensor dbias = mine[3].grad().contiguous();
      group->all_reduce(dbias);
      expect_close(dbias, full[3].grad(), "dbias (summed over the ranks)");

      // Each spanning branch: an all-gather forward and a reduce-scatter backward, each sending
      // (members - 1) blocks of 2 x B x H x ceil(n / r) x D elements.
      int64_t expected = 0;
      for (const AttentionBranch& br : opts.schedule) {
        const int64_t w = std::min(br.segment, N), members = w / n;
        if (n % w == 0) continue;
        expected += 2 * (members - 1) * 2 * B * H * ((n + br.dilation - 1) / br.dilation) * D *
                    static_cast<int64_t>(dtype_size(dtype));
      }
      EXPECT_EQ(bytes, expected);
      if (S > 1) {
        EXPECT_GT(bytes, 0);
      }
    }
  }
}

TEST(SequenceParallelRank, RefusesWhatItCannotSplit) {
  auto group = dist::single_process_group();
  Generator gen(3);
  const Tensor x = Tensor::randn({1, 12, 2, 4}, gen);
  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule("8:2");  // neither divides 12 nor is a multiple of it
  EXPECT_NE(error_message([&] { dist::sequence_parallel_attention(x, x, x, opts, *group); })
                .find("branch 0 (8:2): its segment length 8 must divide the part length n = N / S = 12"),
            std::string::npos);
  opts.schedule = parse_schedule("4:1");
  opts.dropout = 0.1;
  EXPECT_NE(error_message([&] { dist::sequence_parallel_attention(x, x, x, opts, *group); }).find("dropout 0.1 is not supported"),
            std::string::npos);
}

// ---------------------------------------------------------------- mpirun

#ifdef DILATRON_CLI  // the dilatron command is built (tests/CMakeLists.txt)
namespace {

struct Step {
  double loss = 0.0;
  std::string loss_text;  // as printed: what bit-identical runs must share
  int64_t comm_bytes = -1;
};

// The training steps of a run's metrics.jsonl.
std::vector<Step> steps_of(const fs::path& run) {
  std::vector<Step> steps;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const size_t at = line.find("\"loss\": ");
    if (at == std::string::npos) continue;
    Step s;
    s.loss_text = line.substr(at + 8, line.find(',', at) - at - 8);
    s.loss = std::stod(s.loss_text);
    if (const size_t c = line.find("\"comm_bytes\": "); c != std::string::npos) s.comm_bytes = std::stoll(line.substr(c + 14));
    steps.push_back(s);
  }
  return steps;
}

// Every parameter of a checkpoint, as raw bytes.
std::vector<std::string> checkpoint_bits(const std::string& ckpt) {
  const RunConfig c = parse_config(read_checkpoint_summary(ckpt).config_toml, ckpt);
  auto model = build_model(c, std::make_shared<Generator>(0));
  load_checkpoint(ckpt, *model, nullptr);
  std::vector<std::string> bits;
  for (const auto& [name, p] : model->named_parameters())
    bits.emplace_back(static_cast<const char*>(p.raw_data()), p.numel() * dtype_size(p.dtype()));
  return bits;
}

std::string checkpoint_at(const fs::path& run, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "ckpt-%09lld.h5", static_cast<long long>(step));
  return (run / "checkpoints" / name).string();
}

class MpiRun : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!dist::built_with_mpi())
      GTEST_SKIP() << "dilatron was built without MPI (scripts/install-deps.sh installs Open MPI; rebuild)";
    if (std::system("command -v mpirun > /dev/null 2>&1") != 0)
      GTEST_SKIP() << "mpirun is not installed (scripts/install-deps.sh installs Open MPI)";
  }

  struct Outcome {
    int status = -1;  // the exit code, or -1
    std::string log;
    double seconds = 0.0;
  };

  // `dilatron train` on the tiny config in `out`, under `mpirun -np ranks` (ranks > 0) or alone
  // (ranks = 0).
  static Outcome train_run(int ranks, const fs::path& out, const std::string& args, const std::string& env = "") {
    const std::string launcher =
        ranks > 0 ? "mpirun --oversubscribe --bind-to none -np " + std::to_string(ranks) + " " : "";
    const std::string log = out.string() + ".log";
    const std::string cmd = kProcessEnv + env + " " + launcher + DILATRON_CLI + " train " + kTinyConfig + " --out " +
                            out.string() + " " + args + " > " + log + " 2>&1";
    const auto t0 = std::chrono::steady_clock::now();
    const int status = std::system(cmd.c_str());
    Outcome o;
    o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    o.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    o.log = read_file(log);
    return o;
  }

  // The ring all-reduce's bytes per rank for n float32 gradients, plus the float64 loss's.
  static double ring_bytes(int ranks, int64_t n) {
    return 2.0 * (ranks - 1) / ranks * (4.0 * static_cast<double>(n) + 8.0);
  }
};

int64_t tiny_parameters() {
  return build_model(load_config(kTinyConfig), std::make_shared<Generator>(0))->num_parameters();
}


// P ranks sum float32 gradients in another order than one process: the target is 1e-6 relative per
// step. metrics.jsonl prints 6 decimals, so the printed loss may also be off by half a unit there.
void expect_losses_match(const std::vector<double>& reference, const std::vector<Step>& ranks) {
  ASSERT_EQ(ranks.size(), reference.size());
  for (size_t i = 0; i < reference.size(); ++i)
    EXPECT_NEAR(ranks[i].loss, reference[i], 1e-6 * std::abs(reference[i]) + 5e-7) << "step " << i + 1;
}

}  // namespace

TEST_F(MpiRun, TwoRanksMatchOneProcessAndSendTheRingsBytes) {
  const fs::path dir = empty_dir("two_ranks");
  const std::string args = "--set train.steps=50 --set train.checkpoint_every=0";
  TrainOptions o;
  o.progress = false;
  o.out_dir = (dir / "one").string();
  const TrainResult one = train(load_config(kTinyConfig, {"train.steps=50", "train.checkpoint_every=0"}), o);
  const Outcome two = train_run(2, dir / "two", args);
  ASSERT_EQ(two.status, 0) << two.log;
  EXPECT_NE(two.log.find("data parallel: 2 ranks (mpi)"), std::string::npos) << two.log;
  const std::vector<Step> steps = steps_of(dir / "two");
  expect_losses_match(one.losses, steps);
  // Rank 0's bytes per step: the ring's 2 (P - 1) / P of the gradients and the loss, to the byte for P = 2.
  for (const Step& s : steps) EXPECT_EQ(static_cast<double>(s.comm_bytes), ring_bytes(2, tiny_parameters()));
  // Rank 0 alone wrote: one metrics line per step, one progress line per step.
  size_t progress_lines = 0;
  for (size_t at = two.log.find("step 1/50"); at != std::string::npos; at = two.log.find("step 1/50", at + 1))
    ++progress_lines;
  EXPECT_EQ(progress_lines, 1u) << two.log;
}

// Weighted answer digits (data.answer_weight): each slice counts by its share of the loss weight.
TEST_F(MpiRun, ThreeRanksSplitABatchOfSix) {
  const fs::path dir = empty_dir("three_ranks");
  TrainOptions o;
  o.progress = false;
  o.out_dir = (dir / "one").string();
  const TrainResult one =
      train(load_config(kTinyConfig, {"train.steps=20", "train.checkpoint_every=0", "data.batch_size=6",
                                      "data.answer_weight=3"}), o);
  const Outcome three =
      train_run(3, dir / "three", "--set train.steps=20 --set train.checkpoint_every=0 --set data.batch_size=6 "
                                  "--set data.answer_weight=3");
  ASSERT_EQ(three.status, 0) << three.log;
  const std::vector<Step> steps = steps_of(dir / "three");
  expect_losses_match(one.losses, steps);
  // Chunks of n / 3 elements (rounded) go round the ring four times.
  for (const Step& s : steps) EXPECT_NEAR(static_cast<double>(s.comm_bytes), ring_bytes(3, tiny_parameters()), 16.0);
}

// Deterministic shards: one process, 2 ranks and 3 ranks train the same bits; a 2-rank run resumed by
// 3 ranks at step 10 continues exactly as the uninterrupted one-process run.
TEST_F(MpiRun, DeterministicShardsAreBitIdenticalForAnyRankCountAndAcrossAResume) {
  const fs::path dir = empty_dir("deterministic");
  const std::string args = "--set train.steps=20 --set train.checkpoint_every=10 --set train.keep_checkpoints=4 "
                           "--set data.batch_size=6 --set train.deterministic_shards=6";
  const Outcome one = train_run(0, dir / "one", args);
  ASSERT_EQ(one.status, 0) << one.log;
  const Outcome two = train_run(2, dir / "two", args);
  ASSERT_EQ(two.status, 0) << two.log;
  const Outcome resumed = train_run(3, dir / "resumed", args + " --resume " + checkpoint_at(dir / "two", 10));
  ASSERT_EQ(resumed.status, 0) << resumed.log;
  EXPECT_NE(resumed.log.find("resumed from"), std::string::npos) << resumed.log;

  const std::vector<Step> a = steps_of(dir / "one"), b = steps_of(dir / "two"), c = steps_of(dir / "resumed");
  ASSERT_EQ(a.size(), 20u);
  ASSERT_EQ(b.size(), 20u);
  ASSERT_EQ(c.size(), 10u);  // steps 11-20
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(b[i].loss_text, a[i].loss_text) << "step " << i + 1;
  for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(c[i].loss_text, a[i + 10].loss_text) << "step " << i + 11;
  const std::vector<std::string> reference = checkpoint_bits(checkpoint_at(dir / "one", 20));
  EXPECT_TRUE(checkpoint_bits(checkpoint_at(dir / "two", 20)) == reference) << "2 ranks' parameters differ";
  EXPECT_TRUE(checkpoint_bits(checkpoint_at(dir / "resumed", 20)) == reference) << "the resumed parameters differ";
}

TEST_F(MpiRun, BatchesTheRanksCannotSplitAreRefused) {
  const fs::path dir = empty_dir("refused");
  const Outcome odd = train_run(3, dir / "odd", "--set train.steps=2");  // data.batch_size = 4
  EXPECT_NE(odd.status, 0);
  EXPECT_NE(odd.log.find("the global batch size 4 (data.batch_size) must be a multiple of the number of ranks (3)"),
            std::string::npos) << odd.log;
  const Outcome shards = train_run(3, dir / "shards", "--set train.steps=2 --set data.batch_size=6 "
                                                      "--set train.deterministic_shards=2");
  EXPECT_NE(shards.status, 0);
  EXPECT_NE(shards.log.find("train.deterministic_shards = 2 must be a multiple of the number of ranks (3)"),
            std::string::npos) << shards.log;
  const Outcome dropout = train_run(2, dir / "dropout", "--set train.steps=2 --set model.dropout=0.1");
  EXPECT_NE(dropout.status, 0);
  EXPECT_NE(dropout.log.find("model.dropout = 0.1 and model.attn_dropout = 0: data parallel training (2 ranks) needs "
                             "both 0"), std::string::npos) << dropout.log;
}

// NCCL on one GPU (issue 15's check of the NCCL path against the MPI one): deterministic shards send
// every shard's gradient through all_gather, over NCCL for CUDA tensors under mpirun and as a copy
// in one plain process; the two runs must print the same losses. Skips without a GPU or NCCL.
TEST_F(MpiRun, NcclOnOneGpuMatchesOneProcess) {
  if (!dist::built_with_nccl()) GTEST_SKIP() << "dilatron was built without NCCL (a CUDA build finds it in the toolkit)";
  if (kernels::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: the NCCL path needs a GPU";
  const fs::path dir = empty_dir("nccl");
  const std::string args = "--set train.steps=5 --set train.device=cuda --set train.deterministic_shards=2";
  const Outcome alone = train_run(0, dir / "alone", args);
  ASSERT_EQ(alone.status, 0) << alone.log;
  const Outcome nccl = train_run(1, dir / "nccl", args);
  ASSERT_EQ(nccl.status, 0) << nccl.log;
  const std::vector<Step> a = steps_of(dir / "alone"), b = steps_of(dir / "nccl");
  ASSERT_EQ(a.size(), 5u);
  ASSERT_EQ(b.size(), 5u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(b[i].loss_text, a[i].loss_text) << "step " << i + 1;
}

// SequenceParallelRank above, on 2 and 3 ranks (this test binary under mpirun).
TEST_F(MpiRun, SequenceParallelAttentionMatchesTheOpOnTwoAndThreeRanks) {
  const fs::path self = fs::read_symlink("/proc/self/exe");
  const fs::path dir = empty_dir("sequence_parallel");
  for (const int ranks : {2, 3}) {
    const std::string log = (dir / ("np" + std::to_string(ranks) + ".log")).string();
    const std::string cmd = kProcessEnv + "mpirun --oversubscribe --bind-to none -np " + std::to_string(ranks) + " " +
                            self.string() + " --gtest_color=no " +
                            "--gtest_filter=SequenceParallelRank.MatchesTheOpOnTheWholeSequence > " + log + " 2>&1";
    const int status = std::system(cmd.c_str());
    const std::string out = read_file(log);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "mpirun -np " << ranks << ":\n" << out;
    size_t passed = 0;
    for (size_t at = out.find("[  PASSED  ] 1 test"); at != std::string::npos; at = out.find("[  PASSED  ] 1 test", at + 1))
      ++passed;
    EXPECT_EQ(passed, static_cast<size_t>(ranks)) << out;  // every rank ran it and passed
  }
}

TEST_F(MpiRun, ARankThatDiesEndsTheRun) {
  const fs::path dir = empty_dir("dies");
  const Outcome r = train_run(2, dir / "run", "--set train.steps=1000", "DILATRON_DIST_FAULT=1:3:exit");
  EXPECT_LT(r.seconds, 60.0) << r.log;
  EXPECT_EQ(r.status, 3) << r.log;  // mpirun passes on the exit code of the rank that died
  EXPECT_EQ(steps_of(dir / "run").size(), 2u) << "rank 0 went on without rank 1";
}

TEST_F(MpiRun, ARankThatHangsTimesTheCollectiveOut) {
  const fs::path dir = empty_dir("hangs");
  const Outcome r =
      train_run(2, dir / "run", "--set train.steps=1000 --dist-timeout 2", "DILATRON_DIST_FAULT=1:3:hang");
  EXPECT_NE(r.status, 0) << r.log;
  EXPECT_LT(r.seconds, 60.0) << r.log;
  EXPECT_NE(r.log.find("error on rank 0 of 2: dist: all_reduce timed out after 2 s on rank 0 of 2: another rank died "
                       "or hangs"), std::string::npos) << r.log;
}
#endif  // DILATRON_CLI
