#include "dilatron/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <iterator>
#include <string_view>

#include "dilatron/autograd.h"
#include "dilatron/fileio.h"
#include "dilatron/hdf5.h"
#include "dilatron/version.h"

namespace dilatron {
namespace fs = std::filesystem;

namespace {

constexpr int64_t kFormat = 1;

std::string model_key(const std::string& name) { return "model/" + name; }
std::string optim_key(const std::string& name, const std::string& state) { return "optimizer/" + name + "/" + state; }

// Reads `key` and checks it against the tensor it will be copied into. The shape is checked before the
// read: a dataset declaring huge dimensions would otherwise be allocated first.
Tensor read_matching(const h5::File& f, const std::string& key, const Tensor& like) {
  DILATRON_CHECK(f.has(key), "checkpoint '", f.path(), "' has no dataset '", key, "' (a different model?)");
  const Shape stored = f.info(key).shape;
  DILATRON_CHECK(stored == like.shape(), "checkpoint '", f.path(), "': '", key, "' has shape ", shape_str(stored),
                 " but the model expects ", shape_str(like.shape()));
  Tensor t = f.read(key);
  DILATRON_CHECK(t.dtype() == like.dtype(), "checkpoint '", f.path(), "': '", key, "' is ", dtype_name(t.dtype()),
                 " but the model is ", dtype_name(like.dtype()));
  return t;
}

uint64_t get_u64(const h5::File& f, const std::string& key) { return static_cast<uint64_t>(f.get_attr_int("/", key)); }

TrainingState read_state(const h5::File& f) {
  const int64_t format = f.get_attr_int("/", "format");
  DILATRON_CHECK(format == kFormat, "checkpoint '", f.path(), "' has format ", format, "; this dilatron reads ", kFormat);
  TrainingState s;
  s.step = f.get_attr_int("/", "step");
  DILATRON_CHECK(s.step >= 0, "checkpoint '", f.path(), "': attribute 'step' is ", s.step, "; expected >= 0");
  s.tokens_seen = f.get_attr_int("/", "tokens_seen");
  s.data_seed = get_u64(f, "data_rng_seed");
  s.data_offset = get_u64(f, "data_rng_offset");
  s.dropout_seed = get_u64(f, "dropout_rng_seed");
  s.dropout_offset = get_u64(f, "dropout_rng_offset");
  if (f.has_attr("/", "stage")) s.stage = f.get_attr_int("/", "stage");  // absent before curriculum stages
  return s;
}

// Seeds and offsets are uint64; HDF5 attributes here are int64, so store the bit pattern.
int64_t bits(uint64_t v) { return static_cast<int64_t>(v); }

// "ckpt-<digits>.h5", the only names `latest` may hold (nothing outside the folder).
bool is_checkpoint_name(const std::string& name) {
  constexpr std::string_view prefix = "ckpt-", suffix = ".h5";
  if (name.size() <= prefix.size() + suffix.size() || !name.starts_with(prefix) || !name.ends_with(suffix)) return false;
  return std::all_of(name.begin() + prefix.size(), name.end() - suffix.size(), [](char c) { return c >= '0' && c <= '9'; });
}

// What a file holds, quoted for an error message: "it is empty" or "it holds 'ab?c'" (shortened, unprintables as '?').
std::string describe_content(const std::string& text) {
  if (text.empty()) return "it is empty";
  std::string shown;
  for (const char c : text.substr(0, 60)) shown += (c >= 0x20 && c < 0x7f) ? c : '?';
  return "it holds '" + shown + (text.size() > 60 ? "...'" : "'");
}

}  // namespace

void save_checkpoint(const std::string& path, const nn::Module& model, const optim::Optimizer* opt,
                     const TrainingState& s, const std::string& config_toml) {
  h5::atomic_write(path, [&](h5::File& f) {
    for (const auto& [name, p] : model.named_parameters()) {
      f.write(model_key(name), p.detach());
      if (opt)
        for (const auto& key : opt->state_keys()) f.write(optim_key(name, key), opt->state(name, key));
    }
    f.set_attr("/", "format", kFormat);
    // Strings live outside HDF5's checksummed headers: each gets its own checksum.
    f.set_attr_checksummed("/", "version", version());
    f.set_attr_checksummed("/", "config", config_toml);
    f.set_attr("/", "step", s.step);
    f.set_attr("/", "tokens_seen", s.tokens_seen);
    f.set_attr("/", "optimizer_step", opt ? opt->step_count() : int64_t{0});
    f.set_attr("/", "data_rng_seed", bits(s.data_seed));
    f.set_attr("/", "data_rng_offset", bits(s.data_offset));
    f.set_attr("/", "dropout_rng_seed", bits(s.dropout_seed));
    f.set_attr("/", "dropout_rng_offset", bits(s.dropout_offset));
    f.set_attr("/", "stage", s.stage);
  });
}

TrainingState load_checkpoint(const std::string& path, nn::Module& model, optim::Optimizer* opt) {
  const h5::File f = h5::File::open(path, h5::Mode::ReadOnly);
  const TrainingState state = read_state(f);
  // Read and check everything first; copy only once all of it is known to fit.
  const nn::NamedParameters params = model.named_parameters();
  std::vector<Tensor> values;
  std::vector<std::pair<Tensor, Tensor>> moments;  // (destination, value)
  for (const auto& [name, p] : params) {
    values.push_back(read_matching(f, model_key(name), p));
    if (opt)
      for (const auto& key : opt->state_keys()) {
        Tensor dst = opt->state(name, key);
        moments.emplace_back(dst, read_matching(f, optim_key(name, key), dst));
      }
  }
  const std::vector<std::string> stored = f.list("model", true);
  if (stored.size() != params.size()) {
    std::map<std::string, bool> expected;
    for (const auto& [name, p] : params) expected[name] = true;
    for (const auto& s : stored)
      DILATRON_CHECK(expected.count(s), "checkpoint '", path, "' has parameter '", s,
                     "' that this model does not (a different model?)");
  }
  const int64_t opt_step = f.get_attr_int("/", "optimizer_step");

  autograd::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) Tensor(params[i].second).copy_(values[i]);
  for (auto& [dst, v] : moments) dst.copy_(v);
  if (opt) opt->set_step_count(opt_step);
  return state;
}

CheckpointSummary read_checkpoint_summary(const std::string& path) {
  const h5::File f = h5::File::open(path, h5::Mode::ReadOnly);
  CheckpointSummary s;
  s.state = read_state(f);
  s.config_toml = f.get_attr_string("/", "config");
  s.version = f.get_attr_string("/", "version");
  for (const auto& name : f.list("model", true)) {
    const Shape shape = f.info(model_key(name)).shape;
    s.parameters.emplace_back(name, shape);
    s.num_parameters += shape_numel(shape);
  }
  s.has_optimizer = !s.parameters.empty() && f.has(optim_key(s.parameters.front().first, "m"));
  return s;
}

CheckpointDir::CheckpointDir(std::string dir, int64_t keep) : dir_(std::move(dir)), keep_(keep) {
  fs::create_directories(dir_);
}

std::string CheckpointDir::save(const nn::Module& model, const optim::Optimizer* opt, const TrainingState& state,
                                const std::string& config_toml) {
  char name[64];
  std::snprintf(name, sizeof name, "ckpt-%09lld.h5", static_cast<long long>(state.step));
  const std::string path = (fs::path(dir_) / name).string();
  std::error_code ec;
  const bool replaces = fs::exists(path, ec);  // the same step saved again: `latest` may name it already
  save_checkpoint(path, model, opt, state, config_toml);
  try {
    write_file_atomically((fs::path(dir_) / "latest").string(), std::string(name) + "\n");
  } catch (...) {
    // A new checkpoint that `latest` does not name would be skipped by --resume auto, yet kept and
    // counted as the newest when pruning: remove it.
    if (!replaces) fs::remove(path, ec);
    throw;
  }
  // Drop all but the newest keep_ (names sort by step).
  std::vector<std::string> all;
  for (const auto& e : fs::directory_iterator(dir_)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("ckpt-", 0) == 0 && e.path().extension() == ".h5") all.push_back(e.path().string());
  }
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + static_cast<size_t>(keep_) < all.size(); ++i)
    if (all[i] != path) fs::remove(all[i]);
  return path;
}

std::optional<std::string> CheckpointDir::latest() const {
  const std::string file = (fs::path(dir_) / "latest").string();
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(file, ec))) return std::nullopt;
  DILATRON_CHECK(fs::is_regular_file(file, ec), "'", file, "' is not a regular file (expected one line naming the "
                 "newest checkpoint)");
  std::ifstream in(file, std::ios::binary);
  DILATRON_CHECK(in.is_open(), "cannot open '", file, "'");
  const std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  DILATRON_CHECK(!in.bad(), "cannot read '", file, "'");
  // An empty or garbled `latest` (a full disk, a hand edit) is an error: guessing would resume from
  // the wrong step, and starting afresh would overwrite the run's checkpoints.
  const size_t begin = content.find_first_not_of(" \t\r\n"), end = content.find_last_not_of(" \t\r\n");
  const std::string name = begin == std::string::npos ? "" : content.substr(begin, end - begin + 1);
  DILATRON_CHECK(is_checkpoint_name(name), "'", file, "' does not name a checkpoint: ", describe_content(content),
                 " (expected one line like ckpt-000000100.h5; write the newest checkpoint's name into it, or remove it "
                 "to start afresh)");
  const fs::path p = fs::path(dir_) / name;
  DILATRON_CHECK(fs::exists(p), "'", file, "' names '", name, "', which does not exist");
  return p.string();
}

}  // namespace dilatron
