#include "dilatron/trainer.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <iterator>
#include <sstream>
#include <string_view>

#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/checkpoint.h"
#include "dilatron/data_parallel.h"
#include "dilatron/fileio.h"
#include "dilatron/hdf5.h"
#include "dilatron/ops.h"
#include "dilatron/optim.h"
#include "dilatron/profiler.h"

namespace dilatron {
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

// A bfloat16 run keeps float32 parameters (its master weights): compute_dtype.
TensorOptions model_options(const RunConfig& c) {
  return TensorOptions(compute_dtype(dtype_from_name(c.train.dtype))).with_device(Device::parse(c.train.device));
}

std::string format_eta(double seconds) {
  const auto s = static_cast<int64_t>(std::max(0.0, seconds));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  return buf;
}

// Training batches of either task in each stage's shape, all drawn from one generator (so its
// offset stays the whole loader state across stages).
class Batches {
 public:
  Batches(const RunConfig& c, const std::vector<StageConfig>& stages) : stages_(stages) {
    if (c.data.task == "passkey") {
      for (size_t i = 0; i < stages.size(); ++i) {
        data::PasskeyOptions po = passkey_options(c, false);
        po.seq_len = stages[i].seq_len;
        try {
          passkey_.push_back(std::make_unique<data::PasskeyTask>(po));  // built up front: bad shapes fail now
        } catch (const Error& e) {
          if (c.train.stages.empty()) throw;
          throw Error(c.source + ": train.stages[" + std::to_string(i) + "].seq_len = " + std::to_string(po.seq_len) +
                      ": " + e.what());
        }
      }
    } else {
      DILATRON_CHECK(!c.data.path.empty(), c.source, ": data.task = \"text\" needs data.path (a UTF-8 file)");
      text_ = std::make_unique<data::TextDataset>(c.data.path, c.data.val_fraction);
    }
  }
  data::Batch next(Generator& gen, size_t stage) const {
    const StageConfig& s = stages_[stage];
    return text_ ? data::Batch{text_->sample_batch(data::Split::Train, s.batch_size, s.seq_len, gen), Tensor()}
                 : passkey_[stage]->batch(gen, s.batch_size);
  }
  const data::TextDataset* text() const { return text_.get(); }

 private:
  std::vector<StageConfig> stages_;
  std::vector<std::unique_ptr<data::PasskeyTask>> passkey_;  // one per stage
  std::unique_ptr<data::TextDataset> text_;
};

// Tokens of steps (from, to]: the ETA weighs the remaining steps by their stage's shape.
double tokens_in_steps(const std::vector<StageConfig>& stages, int64_t from, int64_t to) {
  double tokens = 0.0;
  int64_t end = 0;
  for (const StageConfig& s : stages) {
    const int64_t begin = end;
    end += s.steps;
    const int64_t n = std::max<int64_t>(0, std::min(end, to) - std::max(begin, from));
    tokens += static_cast<double>(n) * static_cast<double>(s.batch_size * s.seq_len);
  }
  return tokens;
}

// A metrics line. A failed write (a full disk) stops the run with an error naming the file.
void append_line(const std::string& path, const std::string& line) { append_to_file(path, line + "\n"); }

// After a resume the steps past the checkpoint run again: their lines from before (a kill, a crash) go,
// and so does a line cut short, so each step is logged once. metrics.jsonl is rewritten atomically.
void drop_metrics_after(const std::string& path, int64_t step) {
  // None yet, or not a file to rewrite (a device such as /dev/full never ends; appends report its errors).
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return;
  std::ifstream in(path, std::ios::binary);
  DILATRON_CHECK(in.is_open(), "cannot open '", path, "'");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  DILATRON_CHECK(!in.bad(), "cannot read '", path, "'");
  constexpr std::string_view prefix = "{\"step\": ";  // how every line starts
  std::string kept;
  int64_t dropped = 0;
  for (size_t start = 0; start < text.size();) {
    const size_t end = text.find('\n', start);
    if (end == std::string::npos) {  // cut short
      ++dropped;
      break;
    }
    const std::string_view line(text.data() + start, end - start);
    int64_t line_step = 0;
    const bool ours = line.starts_with(prefix) &&
                      std::from_chars(line.data() + prefix.size(), line.data() + line.size(), line_step).ec == std::errc();
    if (ours && line_step > step) {
      ++dropped;
    } else {
      kept.append(line).append("\n");
    }
    start = end + 1;
  }
  if (dropped == 0) return;
  write_file_atomically(path, kept);
  std::fprintf(stderr, "%s: dropped %lld lines past step %lld (those steps run again)\n", path.c_str(),
               static_cast<long long>(dropped), static_cast<long long>(step));
}

std::string passkey_json(int64_t step, size_t stage, const PasskeyReport& r) {
  std::ostringstream os;
  os << "{\"step\": " << step << ", \"stage\": " << stage << ", \"eval\": \"passkey\", \"by_length\": {";
  bool first = true;
  for (const auto& [len, acc] : r.by_length) {
    os << (first ? "" : ", ") << "\"" << len << "\": " << acc.accuracy();
    first = false;
  }
  os << "}, \"by_distance\": {";
  first = true;
  for (const auto& [len, buckets] : r.by_length_distance)
    for (const auto& [bucket, acc] : buckets) {
      os << (first ? "" : ", ") << "\"" << len << " " << bucket.label() << "\": " << acc.accuracy();
      first = false;
    }
  os << "}, \"residue_modulus\": " << r.residue_modulus << ", \"by_residue\": {";
  first = true;
  for (const auto& [len, residues] : r.by_length_residue)
    for (const auto& [residue, acc] : residues) {
      if (acc.total == 0) continue;
      os << (first ? "" : ", ") << "\"" << len << " " << residue << "\": " << acc.accuracy();
      first = false;
    }
  os << "}}";
  return os.str();
}

// The shortest text that reads back as the same double.
std::string json_number(double v) {
  char buf[32];
  return std::string(buf, std::to_chars(buf, buf + sizeof buf, v).ptr);
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
      out += buf;
    } else {
      out += c;  // bytes >= 0x80 pass through: a UTF-8 path stays UTF-8
    }
  }
  return out + "\"";
}

// "samples": n, "accuracy": a, "digit_accuracy": d
std::string json_accuracy(const PasskeyAccuracy& a) {
  return "\"samples\": " + std::to_string(a.total) + ", \"accuracy\": " + json_number(a.accuracy()) +
         ", \"digit_accuracy\": " + json_number(a.digit_accuracy());
}

// Residue 0 is aligned, every other residue unaligned.
std::pair<PasskeyAccuracy, PasskeyAccuracy> aligned_unaligned(const std::map<int64_t, PasskeyAccuracy>& residues) {
  std::pair<PasskeyAccuracy, PasskeyAccuracy> out;
  for (const auto& [residue, a] : residues) {
    PasskeyAccuracy& into = residue == 0 ? out.first : out.second;
    into.correct += a.correct;
    into.total += a.total;
    into.digits_correct += a.digits_correct;
    into.digits_total += a.digits_total;
  }
  return out;
}

// An exclusive flock on dir/.lock while a run writes there: a second `train` on the same directory
// would interleave its checkpoints and metrics with the first's. The file stays (removing it would let
// a third run lock a new file while the second still holds the old one).
class RunLock {
 public:
  explicit RunLock(const fs::path& dir) : path_((dir / ".lock").string()) {
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    DILATRON_CHECK(fd_ >= 0, "cannot open lock file '", path_, "': ", std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      ::close(fd_);
      DILATRON_CHECK(err != EWOULDBLOCK, "run directory '", dir.string(), "' is in use by another dilatron train ('",
                     path_, "' is locked); wait for it to finish or give another --out");
      throw Error("cannot lock '" + path_ + "': " + std::strerror(err));
    }
  }
  ~RunLock() { ::close(fd_); }
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  std::string path_;
  int fd_ = -1;
};

// The changes from the checkpoint's stored config to c, checked against the resume policy: model.*
// keys never change (the checkpoint holds that model); the others, but kFreeOnResume, only when allowed.
// Every refusal names the checkpoint and each changed key with both values.
std::vector<ConfigChange> resume_config_changes(const std::string& ckpt, const RunConfig& c, bool allowed) {
  const RunConfig stored = parse_config(read_checkpoint_summary(ckpt).config_toml, ckpt + " (stored config)");
  const std::vector<ConfigChange> changes = config_changes(stored, c);
  std::string listed;
  bool model = false, needs_allow = false;
  for (const ConfigChange& ch : changes) {
    listed += "\n  " + format_change(ch);
    model |= ch.key.starts_with("model.");
    needs_allow |= std::find(kFreeOnResume.begin(), kFreeOnResume.end(), ch.key) == kFreeOnResume.end();
  }
  DILATRON_CHECK(!model, "cannot resume from '", ckpt, "': ", c.source, " changes the model, which the checkpoint ",
                 "holds (model.* keys cannot change on resume; train a new run instead). Changed keys:", listed);
  DILATRON_CHECK(allowed || !needs_allow, "resuming from '", ckpt, "': ", c.source, " differs from the config the ",
                 "checkpoint was trained with. Changed keys:", listed, "\nPass --allow-config-change to continue with ",
                 "the new values (recorded in config-changes.log), or resume with the checkpoint's config (dilatron ",
                 "inspect shows it).");
  return changes;
}

// One block per resume that changed the config: when, at which step, from which checkpoint, what.
std::string config_change_block(const std::vector<ConfigChange>& changes, int64_t step, const std::string& ckpt) {
  char when[32];
  const std::time_t now = std::time(nullptr);
  std::tm local{};
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S%z", localtime_r(&now, &local));
  std::string block = std::string(when) + " resumed at step " + std::to_string(step) + " from '" + ckpt + "'\n";
  for (const ConfigChange& ch : changes) block += "  " + format_change(ch) + "\n";
  return block;
}

// ---------------------------------------------------------------- data parallel

// What cross_entropy's mean divides a batch's loss by: its targets' count, or their weights' sum.
double loss_weight(const data::Batch& b) {
  if (!b.weights.defined()) return static_cast<double>(b.tokens.size(0) * (b.tokens.size(1) - 1));
  double total = 0.0;
  for (const double w : b.weights.to_vector<double>()) total += w;
  return total;
}

data::Batch batch_rows(const data::Batch& b, int64_t first, int64_t count) {
  return {b.tokens.narrow(0, first, count), b.weights.defined() ? b.weights.narrow(0, first, count) : Tensor()};
}

// The global batch's loss, with its gradient left in the parameters' grads. One process without
// deterministic shards runs the batch at once, as it always has. Otherwise the batch is cut into equal
// parts (each rank's slice, or the K shards), each part's mean loss weighted by its share of the
// batch's loss weight, and each rank runs its consecutive parts: slices' gradients and losses are
// all-reduced; shards' are summed in shard order, the same bits for any number of ranks dividing K.
double forward_backward(TransformerLM& model, const data::Batch& batch, int64_t shards, dist::ProcessGroup& group) {
  if (group.world_size() == 1 && shards == 0) {
    Tensor loss = model.loss(batch.tokens, batch.weights);
    loss.backward();
    return loss.item();
  }
  const int64_t parts = shards > 0 ? shards : group.world_size(), per_rank = parts / group.world_size();
  const int64_t rows = batch.tokens.size(0) / parts;
  const double total = loss_weight(batch);
  std::vector<Tensor> params;  // those the loss reaches (the same on every rank: the model decides)
  std::vector<Tensor> shard_grads;
  std::vector<double> losses;
  for (int64_t k = group.rank() * per_rank; k < (group.rank() + 1) * per_rank; ++k) {
    const data::Batch part = batch_rows(batch, k * rows, rows);
    Tensor loss = mul(model.loss(part.tokens, part.weights), loss_weight(part) / total);
    loss.backward();
    losses.push_back(loss.item());
    if (params.empty())
      for (const Tensor& p : model.parameters())
        if (p.grad().defined()) params.push_back(p);
    if (shards == 0) continue;
    const Tensor flat = dist::flatten_gradients(params);
    shard_grads.push_back(reshape(flat, {1, flat.numel()}));
    for (Tensor p : params) p.set_grad(Tensor());
  }
  if (shards == 0) {
    dist::all_reduce_gradients(group, params);
    Tensor loss = Tensor::from_vector(losses, {1});
    group.all_reduce(loss);
    return loss.item();
  }
  dist::set_gradients(params, dist::sum_shards_in_order(group, cat(shard_grads, 0)));
  Tensor all = Tensor::empty({parts}, DType::Float64);
  group.all_gather(Tensor::from_vector(losses, {per_rank}), all);
  double loss = 0.0;
  for (const double l : all.to_vector<double>()) loss += l;
  return loss;
}

// Whether any rank asks to stop (a signal reaches the ranks at different steps; all stop together).
bool any_rank(dist::ProcessGroup& group, bool flag) {
  if (group.world_size() == 1) return flag;
  Tensor t = Tensor::from_vector(std::vector<double>{flag ? 1.0 : 0.0}, {1});
  group.all_reduce(t);
  return t.item() > 0.0;
}

// For the tests of a failing rank: DILATRON_DIST_FAULT="<rank>:<step>:exit|hang" makes that rank
// exit (code 3) or hang as it starts that step.
void simulate_rank_fault(int rank, int64_t step) {
  static const char* const spec = std::getenv("DILATRON_DIST_FAULT");
  if (spec == nullptr) return;
  int fault_rank = 0;
  long long fault_step = 0;
  char mode[8] = "";
  DILATRON_CHECK(std::sscanf(spec, "%d:%lld:%7s", &fault_rank, &fault_step, mode) == 3 &&
                     (std::strcmp(mode, "exit") == 0 || std::strcmp(mode, "hang") == 0),
                 "DILATRON_DIST_FAULT = '", spec, "': expected <rank>:<step>:exit or <rank>:<step>:hang");
  if (fault_rank != rank || fault_step != step) return;
  if (std::strcmp(mode, "exit") == 0) std::_Exit(3);
  for (;;) ::pause();
}

// The config each rank trains: on CUDA, rank r of a group takes the GPU of its local rank. Refuses
// what a group cannot split: a batch that the ranks (or the deterministic shards) do not divide, dropout
// (each rank would draw the masks of its rows as if they were a whole batch).
RunConfig rank_config(const RunConfig& config, const std::vector<StageConfig>& stages, const dist::ProcessGroup& group) {
  const int world = group.world_size();
  RunConfig c = config;
  if (world == 1) return c;
  const int64_t shards = c.train.deterministic_shards;
  DILATRON_CHECK(shards == 0 || shards % world == 0, c.source, ": train.deterministic_shards = ", shards,
                 " must be a multiple of the number of ranks (", world, "): each rank runs an equal number of shards");
  for (size_t i = 0; i < stages.size(); ++i)
    DILATRON_CHECK(stages[i].batch_size % world == 0, c.source, ": the global batch size ", stages[i].batch_size, " (",
                   c.train.stages.empty() ? "data.batch_size" : "train.stages[" + std::to_string(i) + "].batch_size",
                   ") must be a multiple of the number of ranks (", world, "): each rank trains on an equal slice");
  DILATRON_CHECK(c.model.dropout == 0.0 && c.model.attn_dropout == 0.0, c.source, ": model.dropout = ",
                 c.model.dropout, " and model.attn_dropout = ", c.model.attn_dropout, ": data parallel training ",
                 "(", world, " ranks) needs both 0 (a rank's masks would not be those of its rows in one process)");
  if (Device::parse(c.train.device).is_cuda()) c.train.device = Device::cuda(group.local_rank()).str();
  return c;
}

}  // namespace

data::PasskeyOptions passkey_eval_options(const data::PasskeyOptions& base, int64_t len) {
  data::PasskeyOptions po = base;
  po.seq_len = len;
  po.min_distance = std::min(base.min_distance, len);
  return po;
}

void check_passkey_lengths(const std::vector<int64_t>& lengths, const data::PasskeyOptions& base) {
  for (const int64_t len : lengths) {
    try {
      const data::PasskeyTask task(passkey_eval_options(base, len));
    } catch (const Error& e) {
      throw Error("length " + std::to_string(len) + " cannot hold a passkey evaluation sample: " + e.what());
    }
  }
}

data::PasskeyOptions passkey_options(const RunConfig& c, bool for_eval) {
  data::PasskeyOptions o;
  o.seq_len = c.model.seq_len;
  o.seed = c.train.seed;
  o.min_distance = for_eval ? c.eval.min_distance : c.data.min_distance;
  o.filler = c.data.filler == "random" ? data::PasskeyOptions::Filler::Random : data::PasskeyOptions::Filler::Repeat;
  // Evaluation asks one question and scores it; the extra questions and weights are training signal.
  o.questions = for_eval ? 1 : c.data.questions;
  o.answer_weight = for_eval ? 1.0 : c.data.answer_weight;
  return o;
}

std::unique_ptr<TransformerLM> build_model(const RunConfig& config, std::shared_ptr<Generator> dropout_gen) {
  return std::make_unique<TransformerLM>(config.model, config.train.seed, std::move(dropout_gen), model_options(config));
}

void verify_checkpoint(const std::string& path) {
  const CheckpointSummary s = read_checkpoint_summary(path);
  RunConfig c = parse_config(s.config_toml, path + " (stored config)");
  c.train.device = "cpu";
  auto model = build_model(c, std::make_shared<Generator>(0));
  optim::AdamW opt(model->named_parameters());
  load_checkpoint(path, *model, s.has_optimizer ? &opt : nullptr);
}

TrainResult train(const RunConfig& config, const TrainOptions& o) {
  std::unique_ptr<dist::ProcessGroup> alone;
  dist::ProcessGroup& group = o.group ? *o.group : *(alone = dist::single_process_group());
  const int world = group.world_size();
  const bool writer = group.rank() == 0;  // the rank that writes out_dir and shows progress
  const RunConfig c = rank_config(config, training_stages(config), group);
  const std::string metrics_path = (fs::path(o.out_dir) / "metrics.jsonl").string();
  // Stream ids keep data and dropout apart from the parameter init stream (seed itself).
  auto dropout_gen = std::make_shared<Generator>(c.train.seed ^ 0x64726f706f7574ull);
  Generator data_gen(c.train.seed ^ 0x64617461ull);
  auto model = build_model(c, dropout_gen);
  model->set_compute_dtype(dtype_from_name(c.train.dtype));  // training only: eval and sample run in float32
  optim::AdamWOptions ao;
  ao.beta1 = c.train.beta1;
  ao.beta2 = c.train.beta2;
  optim::AdamW opt(optim::weight_decay_groups(model->named_parameters(), c.train.lr, c.train.weight_decay), ao);
  const optim::WarmupCosine schedule(c.train.lr, std::min(c.train.warmup_steps, c.train.steps), c.train.steps,
                                     c.train.min_lr);
  const std::vector<StageConfig> stages = training_stages(c);
  const bool staged = !c.train.stages.empty();
  const Batches batches(c, stages);
  // Stages count from 1 in metrics, progress and checkpoints; after n steps, the stage is step n's.
  const auto stage_number = [&](int64_t step) { return stage_of_step(stages, step) + 1; };

  // Nothing is written before here, so a run that cannot start leaves out_dir as it was. An existing
  // out_dir is locked before its checkpoints are read; a new one once it is made.
  std::optional<RunLock> lock;
  if (writer && fs::exists(o.out_dir)) lock.emplace(o.out_dir);
  const std::string ckpt_dir = (fs::path(o.out_dir) / "checkpoints").string();
  TrainingState st;
  st.data_seed = data_gen.seed();
  st.dropout_seed = dropout_gen->seed();
  std::string resume_path = o.resume;
  if (resume_path == "auto") {
    resume_path = fs::exists(ckpt_dir) ? CheckpointDir(ckpt_dir, c.train.keep_checkpoints).latest().value_or("") : "";
    if (resume_path.empty() && writer)
      std::fprintf(stderr, "--resume auto: no checkpoint in %s; starting fresh\n", ckpt_dir.c_str());
  }
  std::vector<ConfigChange> changes;
  if (!resume_path.empty()) {
    changes = resume_config_changes(resume_path, c, o.allow_config_change);
    st = load_checkpoint(resume_path, *model, &opt);
    data_gen.set_state(st.data_seed, st.data_offset);
    dropout_gen->set_state(st.dropout_seed, st.dropout_offset);
    DILATRON_CHECK(st.stage == 0 || st.stage == static_cast<int64_t>(stage_number(st.step)), "checkpoint '",
                   resume_path, "' was saved in stage ", st.stage, " at step ", st.step, ", but ", c.source,
                   " puts step ", st.step, " in stage ", stage_number(st.step), " (were train.stages changed?)");
    if (writer) {
      std::fprintf(stderr, "resumed from %s at step %lld\n", resume_path.c_str(), static_cast<long long>(st.step));
      for (const ConfigChange& ch : changes)
        std::fprintf(stderr, "config changed on resume at step %lld: %s\n", static_cast<long long>(st.step),
                     format_change(ch).c_str());
    }
  }
  // Every rank has read the checkpoint it resumes from before rank 0 writes here (they wait for it
  // in their first collective).
  std::optional<CheckpointDir> ckpts;
  if (writer) {
    // A fresh start (--resume auto with no checkpoint, after a kill before the first one) runs every step
    // again too.
    drop_metrics_after(metrics_path, st.step);
    fs::create_directories(o.out_dir);
    if (!lock) lock.emplace(o.out_dir);
    if (!changes.empty())
      append_to_file((fs::path(o.out_dir) / "config-changes.log").string(),
                     config_change_block(changes, st.step, resume_path));
    write_file_atomically((fs::path(o.out_dir) / "config.toml").string(), c.toml);
    ckpts.emplace(ckpt_dir, c.train.keep_checkpoints);
    for (const std::string& tmp : h5::remove_orphaned_temporaries(ckpts->dir()))
      std::fprintf(stderr, "removed '%s', left by a process that is no longer running\n", tmp.c_str());
    if (world > 1)
      std::fprintf(stderr, "data parallel: %d ranks (%s), each a 1/%d slice of the global batch%s\n", world,
                   group.backend().c_str(), world,
                   c.train.deterministic_shards > 0 ? " (deterministic shards)" : "");
  }
  const bool progress = o.progress && writer;

  TrainResult res;
  res.first_step = st.step;
  size_t stage = stages.size();  // the stage whose schedules the model holds; none yet
  auto save = [&] {
    st.stage = static_cast<int64_t>(stage_number(st.step));
    st.data_offset = data_gen.offset();
    st.dropout_offset = dropout_gen->offset();
    if (writer) res.last_checkpoint = ckpts->save(*model, &opt, st, c.toml);
  };
  auto evaluate = [&] {
    // With the model's own schedules ([attention]), as `dilatron eval` sees it, in any stage.
    model->set_attention_schedules(c.model.layer_schedules);
    model->eval();
    if (c.data.task == "passkey") {
      const PasskeyReport r = evaluate_passkey(*model, c.eval.lengths, c.train.eval_samples, c.eval.seed,
                                               passkey_options(c, true), c.data.batch_size);
      if (writer) append_line(metrics_path, passkey_json(st.step, stage_number(st.step), r));
      if (progress) std::fprintf(stderr, "\n%s", format_passkey_report(r).c_str());
    } else {
      const double vl = evaluate_text_loss(*model, *batches.text(), c.model.seq_len, c.train.eval_samples,
                                           c.data.batch_size);
      if (writer)
        append_line(metrics_path, "{\"step\": " + std::to_string(st.step) + ", \"stage\": " +
                                      std::to_string(stage_number(st.step)) + ", \"val_loss\": " + std::to_string(vl) + "}");
      if (progress) std::fprintf(stderr, "\nstep %lld: val loss %.4f\n", static_cast<long long>(st.step), vl);
    }
    model->train();
    if (stage < stages.size()) model->set_attention_schedules(stages[stage].layer_schedules);
  };

  const bool tty = isatty(STDERR_FILENO);
  const auto t0 = Clock::now();
  model->train();
  while (st.step < c.train.steps) {
    if (any_rank(group, (o.stop && o.stop->load()) || (o.stop_at_step >= 0 && st.step >= o.stop_at_step))) {
      res.interrupted = true;
      break;
    }
    simulate_rank_fault(group.rank(), st.step + 1);
    if (const size_t k = stage_of_step(stages, st.step + 1); k != stage) {
      stage = k;
      model->set_attention_schedules(stages[k].layer_schedules);
    }
    const StageConfig& sc = stages[stage];
    const int64_t tokens_per_step = sc.batch_size * sc.seq_len;
    if (o.profile_from_step >= 0 && st.step == o.profile_from_step) profiler::set_enabled(true);
    const auto ts = Clock::now();
    const double lr = schedule.lr_at(st.step);
    opt.set_lr(lr);
    data::Batch batch;
    {
      profiler::Scope scope("data");
      batch = batches.next(data_gen, stage);
      batch.tokens = batch.tokens.to(Device::parse(c.train.device));
    }
    const int64_t bytes_before = group.stats().bytes_sent();
    const double l = forward_backward(*model, batch, c.train.deterministic_shards, group);
    double gnorm = 0.0;
    {
      profiler::Scope scope("optimizer");
      if (c.train.grad_clip > 0) gnorm = optim::clip_grad_norm_(model->parameters(), c.train.grad_clip);
      opt.step();
      opt.zero_grad();
    }
    ++st.step;
    st.tokens_seen += tokens_per_step;
    res.losses.push_back(l);
    DILATRON_CHECK(std::isfinite(l), "training diverged at step ", st.step, ": loss ", l, " (lower train.lr?)");

    const double step_s = std::chrono::duration<double>(Clock::now() - ts).count();
    const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    const double tok_s = static_cast<double>(tokens_per_step) / step_s;
    const double eta = elapsed / tokens_in_steps(stages, res.first_step, st.step) *
                       tokens_in_steps(stages, st.step, c.train.steps);
    // With ranks: the bytes this one sent in the step's collectives (docs/distributed.md).
    char comm[48] = "";
    if (world > 1)
      std::snprintf(comm, sizeof comm, ", \"comm_bytes\": %lld",
                    static_cast<long long>(group.stats().bytes_sent() - bytes_before));
    char line[384];
    std::snprintf(line, sizeof line, "{\"step\": %lld, \"stage\": %zu, \"seq_len\": %lld, \"batch_size\": %lld, "
                  "\"loss\": %.6f, \"lr\": %.6g, \"grad_norm\": %.4f, \"tokens_per_s\": %.1f, \"elapsed_s\": %.2f%s}",
                  static_cast<long long>(st.step), stage + 1, static_cast<long long>(sc.seq_len),
                  static_cast<long long>(sc.batch_size), l, lr, gnorm, tok_s, elapsed, comm);
    if (writer) append_line(metrics_path, line);
    if (progress && (st.step % c.train.log_every == 0 || st.step == c.train.steps)) {
      char stage_part[48] = "";
      if (staged) std::snprintf(stage_part, sizeof stage_part, "stage %zu/%zu | ", stage + 1, stages.size());
      std::fprintf(stderr, "%s%sstep %lld/%lld | loss %.4f | %.0f tok/s | lr %.2e | ETA %s%s", tty ? "\r" : "",
                   stage_part, static_cast<long long>(st.step), static_cast<long long>(c.train.steps), l, tok_s, lr,
                   format_eta(eta).c_str(), tty ? "   " : "\n");
    }
    if (c.train.eval_every > 0 && st.step % c.train.eval_every == 0 && st.step < c.train.steps) evaluate();
    if (c.train.checkpoint_every > 0 && st.step % c.train.checkpoint_every == 0) save();
  }
  if (progress && tty) std::fprintf(stderr, "\n");
  if (res.last_checkpoint.empty() || st.step % std::max<int64_t>(c.train.checkpoint_every, 1) != 0 ||
      res.interrupted)
    save();
  if (!res.interrupted && c.train.eval_every > 0) evaluate();
  res.steps_done = st.step;
  return res;
}

// ---------------------------------------------------------------- evaluation

PasskeyReport evaluate_passkey(TransformerLM& model, const std::vector<int64_t>& lengths, int64_t samples,
                               uint64_t seed, const data::PasskeyOptions& base, int64_t batch_size) {
  autograd::NoGradGuard no_grad;
  const Device device = model.tok->weight.device();
  const ModelConfig& mc = model.config();
  PasskeyReport report;
  // A dilation past the longest length gives the same residues as that length (distances are shorter),
  // and keeps the residue table small.
  const int64_t longest = lengths.empty() ? 1 : *std::max_element(lengths.begin(), lengths.end());
  for (const Schedule& schedule : mc.layer_schedules)
    for (const AttentionBranch& b : schedule)
      report.residue_modulus = std::max(report.residue_modulus, std::min(b.dilation, longest));
  for (int64_t len : lengths) {
    const data::PasskeyOptions po = passkey_eval_options(base, len);
    const data::PasskeyTask task(po);
    double pairs = 0.0;
    for (const Schedule& schedule : mc.layer_schedules)
      pairs += static_cast<double>(visited_pairs(schedule, mc.n_heads, len, /*causal=*/true));
    report.visited_pairs_per_token[len] = pairs / static_cast<double>(len) / static_cast<double>(mc.n_heads);
    for (int64_t k = 0; k < report.residue_modulus; ++k) report.by_length_residue[len][k];  // every residue listed
    const std::vector<data::PasskeySample> set = task.eval_set(samples, seed);
    for (size_t first = 0; first < set.size(); first += static_cast<size_t>(batch_size)) {
      const size_t count = std::min(set.size() - first, static_cast<size_t>(batch_size));
      std::vector<int64_t> ids;
      for (size_t i = 0; i < count; ++i)
        ids.insert(ids.end(), set[first + i].tokens.begin(), set[first + i].tokens.end() - 1);
      Tensor logits = model.forward(Tensor::from_vector(ids, {static_cast<int64_t>(count), len}).to(device));
      const int64_t digits = po.digits;
      for (size_t i = 0; i < count; ++i) {
        const data::PasskeySample& s = set[first + i];
        // The digit at tokens[answer_start + d] is predicted at input position answer_start + d - 1.
        Tensor rows = narrow(narrow(logits, 0, static_cast<int64_t>(i), 1), 1, s.answer_start - 1, digits);
        const std::vector<int64_t> pred = max(rows, -1).indices.to_vector<int64_t>();
        int64_t right = 0;
        for (int64_t d = 0; d < digits; ++d)
          right += pred[static_cast<size_t>(d)] == s.tokens[static_cast<size_t>(s.answer_start + d)];
        for (PasskeyAccuracy* acc : {&report.by_length[len], &report.by_length_distance[len][data::distance_bucket(s.distance)],
                                     &report.by_length_residue[len][(s.distance - 1) % report.residue_modulus]}) {
          acc->correct += right == digits;
          acc->total += 1;
          acc->digits_correct += right;
          acc->digits_total += digits;
        }
      }
    }
  }
  return report;
}

std::string format_passkey_report(const PasskeyReport& r) {
  std::ostringstream os;
  char buf[128];
  os << "passkey accuracy: all digits right (greedy decoding); digit acc: each digit, given the true ones before it\n";
  std::snprintf(buf, sizeof buf, "%-8s %-18s %8s %9s %10s\n", "length", "needle distance", "samples", "accuracy",
                "digit acc");
  os << buf;
  const auto row = [&](int64_t len, const std::string& label, const PasskeyAccuracy& a) {
    std::snprintf(buf, sizeof buf, "%-8lld %-18s %8lld %8.1f%% %9.1f%%\n", static_cast<long long>(len), label.c_str(),
                  static_cast<long long>(a.total), 100.0 * a.accuracy(), 100.0 * a.digit_accuracy());
    os << buf;
  };
  for (const auto& [len, acc] : r.by_length) {
    for (const auto& [bucket, b] : r.by_length_distance.at(len)) row(len, bucket.label(), b);
    row(len, "all", acc);
  }
  const int64_t m = r.residue_modulus;
  if (m == 1) {
    os << "residue alignment: the largest dilation is 1, so every sample is aligned\n";
  } else {
    os << "residue alignment: (answer_start - 1 - needle_position) mod " << m << " (the largest dilation), from the "
       << "position that outputs the first digit to the needle's first digit; aligned when 0 (residues without samples "
       << "left out)\n";
    std::snprintf(buf, sizeof buf, "%-8s %-18s %8s %9s %10s\n", "length", "residue", "samples", "accuracy", "digit acc");
    os << buf;
    for (const auto& [len, residues] : r.by_length_residue) {
      const auto [aligned, unaligned] = aligned_unaligned(residues);
      row(len, "aligned", aligned);
      row(len, "unaligned", unaligned);
      for (const auto& [residue, a] : residues)
        if (a.total > 0) row(len, std::to_string(residue), a);
    }
  }
  for (const auto& [len, pairs] : r.visited_pairs_per_token) {
    std::snprintf(buf, sizeof buf,
                  "attention at length %lld: %.2f visited (query, key) pairs per token per head (sum over layers)\n",
                  static_cast<long long>(len), pairs);
    os << buf;
  }
  return os.str();
}

std::string passkey_report_json(const PasskeyReport& r, const std::string& checkpoint, int64_t step) {
  std::ostringstream os;
  os << "{\"checkpoint\": " << json_string(checkpoint) << ", \"step\": " << step << ", \"lengths\": [";
  bool first = true;
  for (const auto& [len, acc] : r.by_length) {
    os << (first ? "" : ", ") << "{\"length\": " << len << ", " << json_accuracy(acc) << ", \"by_distance\": [";
    first = false;
    bool first_bucket = true;
    for (const auto& [bucket, b] : r.by_length_distance.at(len)) {
      os << (first_bucket ? "" : ", ") << "{\"lo\": " << bucket.lo << ", \"hi\": " << bucket.hi << ", "
         << json_accuracy(b) << "}";
      first_bucket = false;
    }
    const auto& residues = r.by_length_residue.at(len);
    const auto [aligned, unaligned] = aligned_unaligned(residues);
    os << "], \"residue_modulus\": " << r.residue_modulus << ", \"aligned\": {" << json_accuracy(aligned)
       << "}, \"unaligned\": {" << json_accuracy(unaligned) << "}, \"by_residue\": [";
    for (const auto& [residue, a] : residues)
      os << (residue == 0 ? "" : ", ") << "{\"residue\": " << residue << ", " << json_accuracy(a) << "}";
    os << "], \"visited_pairs_per_token\": " << json_number(r.visited_pairs_per_token.at(len)) << "}";
  }
  os << "], \"visited_pairs_per_token\": "
     << (r.visited_pairs_per_token.empty() ? "null" : json_number(r.visited_pairs_per_token.rbegin()->second))
     << "}\n";
  return os.str();
}

double evaluate_text_loss(TransformerLM& model, const data::TextDataset& text, int64_t seq_len, int64_t max_windows,
                          int64_t batch_size) {
  autograd::NoGradGuard no_grad;
  const int64_t n = std::min(text.num_windows(data::Split::Validation, seq_len), max_windows);
  DILATRON_CHECK(n > 0, "'", text.path(), "': the validation split holds no window of ", seq_len + 1, " bytes");
  double total = 0.0;
  for (int64_t first = 0; first < n; first += batch_size) {
    const int64_t count = std::min(batch_size, n - first);
    Tensor w = text.windows(data::Split::Validation, seq_len, first, count).to(model.tok->weight.device());
    total += model.loss(w).item() * static_cast<double>(count);
  }
  return total / static_cast<double>(n);
}

}  // namespace dilatron
