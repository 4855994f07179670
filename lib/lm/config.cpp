// TOML run configs. Every key is read through Reader, which checks its type and range and remembers
// it; whatever is left unread at the end is an unknown key and an error.
#include "dilatron/config.h"

#include <charconv>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "dilatron/attention.h"
#include "dilatron/data.h"
#include "dilatron/error.h"
#include "dilatron/trainer.h"

namespace dilatron {
namespace {

// A value as TOML text, so that equal values compare equal however they were spelt (3e-3, 0.003).
// Floats are written shortest-first (toml++ writes 0.003 as 0.0030000000000000001), with a ".0" when
// they would otherwise read as an integer.
template <typename T>
std::string toml_text(const T& v) {
  std::ostringstream os;
  if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
    toml::array a;
    for (const int64_t x : v) a.push_back(x);
    os << a;
  } else if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, std::string>) {
    os << toml::value<T>(v);
  } else if constexpr (std::is_integral_v<T>) {
    os << toml::value<int64_t>(static_cast<int64_t>(v));
  } else {
    char buf[32];
    std::string text(buf, std::to_chars(buf, buf + sizeof buf, static_cast<double>(v)).ptr);
    if (text.find_first_not_of("-0123456789") == std::string::npos) text += ".0";
    return text;
  }
  return os.str();
}

class Reader {
 public:
  Reader(toml::table& root, std::string source) : root_(root), source_(std::move(source)) {}

  // Returns whether the key is present (out keeps its default otherwise). Either way the value is noted.
  template <typename T>
  bool read(const std::string& key, T& out) {
    const bool present = read_node(key, out);
    note(key, out);
    return present;
  }

  // The effective value of key (after a default was filled in), for RunConfig::values.
  template <typename T>
  void note(const std::string& key, const T& value) {
    values_[key] = toml_text(value);
  }
  const std::map<std::string, std::string>& values() const { return values_; }

  template <typename T>
  bool read_range(const std::string& key, T& out, double lo, double hi) {
    const bool present = read(key, out);
    const double v = static_cast<double>(out);
    if (!(v >= lo && v <= hi)) {
      std::ostringstream os;
      os << "must be in [" << lo << ", " << hi << "], got " << v;
      fail(key, os.str());
    }
    return present;
  }

  // Keys of a table (for per-layer schedules), marking the table itself as known.
  std::vector<std::string> table_keys(const std::string& key) {
    const toml::node* node = find(key);
    if (!node) return {};
    const toml::table* t = node->as_table();
    if (!t) type_error(key, *node, "a table");
    std::vector<std::string> keys;
    for (const auto& [k, v] : *t) keys.emplace_back(k.str());
    return keys;
  }

  // Length of an array of tables ([[train.stages]]), marking the array itself as known; its
  // elements are read as "key[i].name".
  size_t table_array_size(const std::string& key) {
    const toml::node* node = find(key);
    if (!node) return 0;
    const toml::array* a = node->as_array();
    if (!a) type_error(key, *node, "an array of tables");
    for (size_t i = 0; i < a->size(); ++i)
      if (!(*a)[i].is_table()) type_error(key + "[" + std::to_string(i) + "]", (*a)[i], "a table");
    return a->size();
  }

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw Error(source_ + ": key '" + key + "' " + what);
  }

  // Anything present but never read is a typo or an unsupported option.
  void reject_unknown() const {
    std::vector<std::string> unknown;
    collect_unknown(root_, "", unknown);
    if (unknown.empty()) return;
    std::string list;
    for (const auto& k : unknown) list += (list.empty() ? "'" : ", '") + k + "'";
    throw Error(source_ + ": unknown key " + list);
  }

 private:
  // The reading behind read(): type checks, no note.
  template <typename T>
  bool read_node(const std::string& key, T& out) {
    const toml::node* node = find(key);
    if (!node) return false;
    if constexpr (std::is_same_v<T, bool>) {
      if (!node->is_boolean()) type_error(key, *node, "a boolean");
      out = node->as_boolean()->get();
    } else if constexpr (std::is_integral_v<T>) {
      if (!node->is_integer()) type_error(key, *node, "an integer");
      const int64_t v = node->as_integer()->get();
      if (std::is_unsigned_v<T> && v < 0) fail(key, "must be >= 0, got " + std::to_string(v));
      out = static_cast<T>(v);
    } else if constexpr (std::is_floating_point_v<T>) {
      if (node->is_integer()) out = static_cast<T>(node->as_integer()->get());
      else if (node->is_floating_point()) out = static_cast<T>(node->as_floating_point()->get());
      else type_error(key, *node, "a number");
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (!node->is_string()) type_error(key, *node, "a string");
      out = node->as_string()->get();
    } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
      const toml::array* arr = node->as_array();
      if (!arr) type_error(key, *node, "an array of integers");
      out.clear();
      for (const auto& el : *arr) {
        if (!el.is_integer()) type_error(key, el, "an array of integers");
        out.push_back(el.as_integer()->get());
      }
    }
    return true;
  }

  const toml::node* find(const std::string& key) {
    known_.insert(key);
    for (size_t p = key.find('.'); p != std::string::npos; p = key.find('.', p + 1)) {
      // A section given as a value (`train = 5`) would hide all its keys, which then keep their defaults.
      const std::string section = key.substr(0, p);
      const toml::node* node = root_.at_path(section).node();
      if (node && !node->is_table()) type_error(section, *node, "a table (a section)");
      known_.insert(section);
    }
    return root_.at_path(key).node();
  }
  [[noreturn]] void type_error(const std::string& key, const toml::node& node, const char* expected) const {
    std::ostringstream os;
    os << "must be " << expected << ", got " << node.type();
    if (node.is_value()) os << " " << toml::node_view<const toml::node>(&node);
    fail(key, os.str());
  }
  void collect_unknown(const toml::table& t, const std::string& prefix, std::vector<std::string>& out) const {
    for (const auto& [k, v] : t) {
      const std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
      if (!known_.count(key)) {
        out.push_back(key);
      } else if (const toml::table* sub = v.as_table()) {
        collect_unknown(*sub, key, out);
      } else if (const toml::array* arr = v.as_array()) {
        for (size_t i = 0; i < arr->size(); ++i)
          if (const toml::table* el = (*arr)[i].as_table()) collect_unknown(*el, key + "[" + std::to_string(i) + "]", out);
      }
    }
  }

  toml::table& root_;
  std::string source_;
  std::set<std::string> known_;
  std::map<std::string, std::string> values_;
};

// "section.key=value": value parsed as TOML (number, bool, array, quoted string), else a bare string.
void apply_override(toml::table& root, const std::string& assignment, const std::string& source) {
  const size_t eq = assignment.find('=');
  DILATRON_CHECK(eq != std::string::npos && eq > 0, "--set ", assignment, ": expected section.key=value");
  const std::string key = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  DILATRON_CHECK(key.front() != '.' && key.back() != '.' && key.find("..") == std::string::npos, source, ": --set ",
                 assignment, ": malformed key '", key, "' (expected section.key, e.g. model.seq_len)");
  // A whole section replaced by a value, or by an empty table, would silently leave all its keys at
  // their defaults (`--set train=x` trained 1000 steps).
  DILATRON_CHECK(key.find('.') != std::string::npos, source, ": --set ", assignment, ": '", key,
                 "' names a section; set one of its keys (section.key=value)");
  toml::table parsed;
  try {
    parsed = toml::parse("v = " + text);
  } catch (const toml::parse_error&) {
    parsed.insert_or_assign("v", text);
  }
  toml::node& value = *parsed.get("v");
  DILATRON_CHECK(!(value.is_table() && value.as_table()->empty()), source, ": --set ", assignment,
                 ": an empty table sets nothing; set the keys inside '", key, "'");
  toml::table* t = &root;
  std::string rest = key;
  for (size_t dot; (dot = rest.find('.')) != std::string::npos; rest = rest.substr(dot + 1)) {
    const std::string part = rest.substr(0, dot);
    toml::node* child = t->get(part);
    if (!child) child = &t->insert_or_assign(part, toml::table{}).first->second;
    DILATRON_CHECK(child->is_table(), source, ": --set ", key, ": '", part, "' is not a section");
    t = child->as_table();
  }
  const toml::node* old = t->get(rest);
  DILATRON_CHECK(!(old && old->is_table() && !value.is_table()), source, ": --set ", assignment, ": '", key,
                 "' is a section; set one of its keys (", key, ".key=value)");
  t->insert_or_assign(rest, value);
}

Schedule read_schedule(Reader& r, const std::string& key, const std::string& text) {
  try {
    return parse_schedule(text);
  } catch (const Error& e) {
    r.fail(key, "is not a valid schedule (\"" + text + "\"): " + e.what());
  }
}

// Per-layer schedules from the table `key` ([attention.layers], a stage's layers): layer number -> schedule.
void read_layer_overrides(Reader& r, const std::string& key, std::vector<Schedule>& schedules) {
  const auto n_layers = static_cast<long>(schedules.size());
  for (const std::string& k : r.table_keys(key)) {
    char* end = nullptr;
    const long l = std::strtol(k.c_str(), &end, 10);
    const std::string layer_key = key + "." + k;
    if (*end != '\0' || l < 0 || l >= n_layers)
      r.fail(layer_key, "names no layer (layers are 0.." + std::to_string(n_layers - 1) + ")");
    std::string text;
    r.read(layer_key, text);
    schedules[static_cast<size_t>(l)] = read_schedule(r, layer_key, text);
  }
}

// Every layer's schedule must reach every (t, h) at length n; `where` begins the message.
void check_coverage(const std::string& where, const std::vector<Schedule>& schedules, int64_t n_heads, int64_t n) {
  for (size_t l = 0; l < schedules.size(); ++l) {
    const Coverage cov = schedule_coverage(schedules[l], n_heads, n, /*causal=*/true);
    if (!cov.full) {
      throw Error(where + "layer " + std::to_string(l) + " schedule leaves position " +
                  std::to_string(cov.first_uncovered_t) + " of head " + std::to_string(cov.first_uncovered_h) +
                  " unattended (add a branch with dilation 1, or more heads)");
    }
  }
}

void read_attention(Reader& r, RunConfig& c) {
  ModelConfig& m = c.model;
  // One of: schedule (all layers), generator = "geometric" | "local_then_dilated"; then per-layer overrides.
  std::string schedule, generator;
  int64_t w0 = 256, ratio = 4, local_segment = 256, local_layers = 1;
  r.read("attention.schedule", schedule);
  r.read("attention.generator", generator);
  r.read_range("attention.w0", w0, 1, 1 << 30);
  r.read_range("attention.ratio", ratio, 2, 1024);
  r.read_range("attention.local_segment", local_segment, 1, 1 << 30);
  r.read_range("attention.local_layers", local_layers, 0, 1 << 20);
  if (!schedule.empty() && !generator.empty())
    r.fail("attention.generator", "conflicts with attention.schedule (give one)");
  Schedule base;
  if (!schedule.empty()) base = read_schedule(r, "attention.schedule", schedule);
  m.layer_schedules.clear();
  for (int64_t l = 0; l < m.n_layers; ++l) {
    if (generator.empty()) {
      if (schedule.empty()) r.fail("attention.schedule", "is missing (or give attention.generator)");
      m.layer_schedules.push_back(base);
    } else if (generator == "geometric") {
      m.layer_schedules.push_back(geometric_schedule(w0, ratio, m.seq_len));
    } else if (generator == "local_then_dilated") {
      m.layer_schedules.push_back(l < local_layers ? Schedule{{std::min(local_segment, m.seq_len), 1}}
                                                   : geometric_schedule(w0, ratio, m.seq_len));
    } else {
      r.fail("attention.generator", "must be \"geometric\" or \"local_then_dilated\", got \"" + generator + "\"");
    }
  }
  read_layer_overrides(r, "attention.layers", m.layer_schedules);
  check_coverage(c.source + ": ", m.layer_schedules, m.n_heads, m.seq_len);
}

// [[train.stages]]: each stage's defaults come from the model, data and attention sections; with
// stages, train.steps is their sum (given or not).
void read_stages(Reader& r, RunConfig& c, bool steps_given) {
  const ModelConfig& m = c.model;
  TrainConfig& t = c.train;
  const size_t n = r.table_array_size("train.stages");
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string stage = "train.stages[" + std::to_string(i) + "]", at = stage + ".";
    StageConfig s{0, m.seq_len, c.data.batch_size, m.layer_schedules};
    if (!r.read(at + "steps", s.steps)) r.fail(at + "steps", "is missing (each stage needs its number of steps)");
    r.read_range(at + "steps", s.steps, 1, int64_t{1} << 40);
    r.read_range(at + "seq_len", s.seq_len, 8, 1 << 24);
    if (s.seq_len > m.seq_len)
      r.fail(at + "seq_len", "must be <= model.seq_len = " + std::to_string(m.seq_len) + ", got " + std::to_string(s.seq_len));
    if (c.data.task == "passkey" && s.seq_len < c.data.min_distance)
      r.fail(at + "seq_len", "must be >= data.min_distance = " + std::to_string(c.data.min_distance) + ", got " +
                                 std::to_string(s.seq_len));
    r.read_range(at + "batch_size", s.batch_size, 1, 1 << 20);
    std::string schedule;
    if (r.read(at + "schedule", schedule))
      s.layer_schedules.assign(static_cast<size_t>(m.n_layers), read_schedule(r, at + "schedule", schedule));
    read_layer_overrides(r, at + "layers", s.layer_schedules);
    check_coverage(c.source + ": " + stage + " (seq_len " + std::to_string(s.seq_len) + "): ", s.layer_schedules,
                   m.n_heads, s.seq_len);
    total += s.steps;
    t.stages.push_back(std::move(s));
  }
  if (t.stages.empty()) return;
  if (!steps_given) {
    t.steps = total;
    r.note("train.steps", t.steps);
  }
  if (t.steps != total)
    r.fail("train.steps", "is " + std::to_string(t.steps) + " but the steps of train.stages sum to " +
                              std::to_string(total) + " (leave train.steps out, or match them)");
}

}  // namespace

RunConfig parse_config(const std::string& text, const std::string& source, const std::vector<std::string>& overrides) {
  toml::table root;
  try {
    root = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << source << ":" << e.source().begin.line << ":" << e.source().begin.column << ": " << e.description();
    throw Error(os.str());
  }
  for (const auto& o : overrides) apply_override(root, o, source);

  RunConfig c;
  c.source = source;
  std::ostringstream effective;
  effective << root;
  c.toml = effective.str();
  Reader r(root, source);

  ModelConfig& m = c.model;
  r.read_range("model.seq_len", m.seq_len, 8, 1 << 24);
  r.read_range("model.d_model", m.d_model, 1, 1 << 16);
  r.read_range("model.n_layers", m.n_layers, 1, 1024);
  r.read_range("model.n_heads", m.n_heads, 1, 1024);
  r.read_range("model.d_ff", m.d_ff, 1, 1 << 18);
  r.read_range("model.dropout", m.dropout, 0.0, 0.999);
  r.read_range("model.attn_dropout", m.attn_dropout, 0.0, 0.999);
  r.read("model.positional", m.positional);
  r.read_range("model.xpos_scale_base", m.xpos_scale_base, 1.0, 1e9);
  r.read("model.rel_pos_bias", m.rel_pos_bias);
  r.read_range("model.bias_buckets", m.bias_buckets, 2, 1 << 16);
  r.read_range("model.bias_max_distance", m.bias_max_distance, 2, 1 << 30);
  r.read("model.tie_embeddings", m.tie_embeddings);
  r.read_range("model.init_std", m.init_std, 1e-6, 10.0);
  if (m.d_model % m.n_heads != 0)
    r.fail("model.n_heads", "must divide model.d_model = " + std::to_string(m.d_model) + ", got " +
                                std::to_string(m.n_heads));
  if (m.positional != "none" && m.positional != "rotary" && m.positional != "xpos")
    r.fail("model.positional", "must be \"none\", \"rotary\" or \"xpos\", got \"" + m.positional + "\"");
  if (m.positional != "none" && (m.d_model / m.n_heads) % 2 != 0)
    r.fail("model.positional", "needs an even head dimension, got d_model / n_heads = " +
                                   std::to_string(m.d_model / m.n_heads));
  read_attention(r, c);

  DataConfig& d = c.data;
  r.read("data.task", d.task);
  r.read("data.path", d.path);
  r.read_range("data.batch_size", d.batch_size, 1, 1 << 20);
  r.read_range("data.val_fraction", d.val_fraction, 1e-6, 0.5);
  r.read_range("data.min_distance", d.min_distance, 0, m.seq_len);
  r.read("data.filler", d.filler);
  if (d.filler != "repeat" && d.filler != "random")
    r.fail("data.filler", "must be \"repeat\" or \"random\", got \"" + d.filler + "\"");
  if (d.task != "passkey" && d.task != "text") r.fail("data.task", "must be \"passkey\" or \"text\", got \"" + d.task + "\"");
  r.read_range("data.questions", d.questions, 1, 1 << 20);
  const int64_t digits = data::PasskeyOptions{}.digits;
  if (d.task == "passkey" && d.questions > 1 && m.seq_len < data::PasskeyTask::min_seq_len(digits, d.questions))
    r.fail("data.questions", "= " + std::to_string(d.questions) + " does not fit model.seq_len = " +
                                 std::to_string(m.seq_len) + ": a needle and " + std::to_string(d.questions) +
                                 " questions need seq_len >= " +
                                 std::to_string(data::PasskeyTask::min_seq_len(digits, d.questions)));
  r.read("data.answer_weight", d.answer_weight);
  if (!(std::isfinite(d.answer_weight) && d.answer_weight > 0.0)) {
    std::ostringstream os;
    os << "must be a finite number > 0, got " << d.answer_weight;
    r.fail("data.answer_weight", os.str());
  }

  TrainConfig& t = c.train;
  const bool steps_given = r.read_range("train.steps", t.steps, 0, int64_t{1} << 40);
  r.read_range("train.lr", t.lr, 0.0, 10.0);
  r.read_range("train.min_lr", t.min_lr, 0.0, 10.0);
  if (t.min_lr > t.lr) {
    std::ostringstream os;
    os << "must be <= train.lr = " << t.lr << ", got " << t.min_lr << " (the schedule decays from lr to min_lr)";
    r.fail("train.min_lr", os.str());
  }
  r.read_range("train.warmup_steps", t.warmup_steps, 0, int64_t{1} << 40);
  r.read_range("train.weight_decay", t.weight_decay, 0.0, 10.0);
  r.read_range("train.beta1", t.beta1, 0.0, 0.999999);
  r.read_range("train.beta2", t.beta2, 0.0, 0.999999);
  r.read_range("train.grad_clip", t.grad_clip, 0.0, 1e9);
  r.read("train.seed", t.seed);
  r.read_range("train.eval_every", t.eval_every, 0, int64_t{1} << 40);
  r.read_range("train.eval_samples", t.eval_samples, 1, 1 << 20);
  r.read_range("train.checkpoint_every", t.checkpoint_every, 0, int64_t{1} << 40);
  r.read_range("train.keep_checkpoints", t.keep_checkpoints, 1, 1 << 20);
  r.read_range("train.log_every", t.log_every, 1, int64_t{1} << 40);
  r.read("train.device", t.device);
  r.read("train.dtype", t.dtype);
  if (t.dtype != "float32" && t.dtype != "float64" && t.dtype != "bfloat16")
    r.fail("train.dtype",
           "must be \"float32\", \"float64\" or \"bfloat16\" (mixed precision), got \"" + t.dtype + "\"");
  try {
    Device::parse(t.device);
  } catch (const Error& e) {
    r.fail("train.device", e.what());
  }
  read_stages(r, c, steps_given);
  r.read_range("train.deterministic_shards", t.deterministic_shards, 0, 1 << 20);
  if (t.deterministic_shards > 0)
    for (const StageConfig& s : training_stages(c))
      if (s.batch_size % t.deterministic_shards != 0)
        r.fail("train.deterministic_shards", "must divide the batch size (each shard is an equal part of it), got " +
                                                 std::to_string(t.deterministic_shards) + " for a batch of " +
                                                 std::to_string(s.batch_size));

  EvalConfig& e = c.eval;
  const bool lengths_given = r.read("eval.lengths", e.lengths);
  r.read_range("eval.samples", e.samples, 1, 1 << 20);
  r.read("eval.seed", e.seed);
  const bool min_distance_given = r.read_range("eval.min_distance", e.min_distance, 0, int64_t{1} << 30);
  if (e.lengths.empty()) {
    e.lengths = {m.seq_len};
    r.note("eval.lengths", e.lengths);
  }
  for (int64_t len : e.lengths)
    if (len < 8 || len > (1 << 24)) r.fail("eval.lengths", "entries must be in [8, 16777216], got " + std::to_string(len));
  // Each length must hold the evaluation sample, or training fails at its first evaluation. (The
  // default, model.seq_len, fits unless the training task does not, which training reports.)
  if (d.task == "passkey" && (lengths_given || min_distance_given)) {
    try {
      check_passkey_lengths(e.lengths, passkey_options(c, /*for_eval=*/true));
    } catch (const Error& err) {
      r.fail(lengths_given ? "eval.lengths" : "eval.min_distance", err.what());
    }
  }

  r.reject_unknown();
  c.values = r.values();
  return c;
}

std::vector<StageConfig> training_stages(const RunConfig& c) {
  if (!c.train.stages.empty()) return c.train.stages;
  return {StageConfig{c.train.steps, c.model.seq_len, c.data.batch_size, c.model.layer_schedules}};
}

std::vector<ConfigChange> config_changes(const RunConfig& before, const RunConfig& after) {
  std::vector<ConfigChange> changes;
  auto b = before.values.begin(), a = after.values.begin();
  while (b != before.values.end() || a != after.values.end()) {
    if (a == after.values.end() || (b != before.values.end() && b->first < a->first)) {
      changes.push_back({b->first, b->second, ""});
      ++b;
    } else if (b == before.values.end() || a->first < b->first) {
      changes.push_back({a->first, "", a->second});
      ++a;
    } else {
      if (b->second != a->second) changes.push_back({b->first, b->second, a->second});
      ++b, ++a;
    }
  }
  return changes;
}

std::string format_change(const ConfigChange& c) {
  return c.key + ": " + (c.before.empty() ? "(none)" : c.before) + " -> " + (c.after.empty() ? "(none)" : c.after);
}

size_t stage_of_step(const std::vector<StageConfig>& stages, int64_t step) {
  int64_t end = 0;
  for (size_t i = 0; i < stages.size(); ++i)
    if (step <= (end += stages[i].steps)) return i;
  return stages.empty() ? 0 : stages.size() - 1;
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  DILATRON_CHECK(in.good(), "cannot open config '", path, "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config(ss.str(), path, overrides);
}

}  // namespace dilatron
