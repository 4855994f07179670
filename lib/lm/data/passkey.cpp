// The passkey-retrieval task: samples are written straight into their rows from constant text, so a
// training batch costs a few Philox draws per filler sentence and no allocation per row.
#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>

#include "dilatron/data.h"
#include "dilatron/error.h"
#include "dilatron/philox.h"

namespace dilatron::data {
namespace {

constexpr std::string_view kNeedleHead = "The pass key is ";
constexpr std::string_view kNeedleMid = ". Remember it. ";
constexpr std::string_view kNeedleTail = " is the pass key. ";
constexpr std::string_view kQuestion = "What is the pass key? The pass key is ";
constexpr std::string_view kAnswerTail = ". ";  // ends an answer inside the filler (questions > 1)

// Filler in the style of the landmark-attention prompt, each sentence with its trailing space.
constexpr std::string_view kFillerSentences[] = {
    "The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
    "There and back again. ", "Snow is cold. ", "Fire is hot. ", "The sea is deep. ",
    "The moon is bright. ", "Birds sing at dawn. ", "The river runs to the sea. ", "Trees grow tall. ",
    "Rain falls from the clouds. ", "The road is long. ", "The night is quiet. ", "Stars shine at night. ",
    "The wind blows from the west. ", "Leaves fall in autumn. ", "The cat sleeps by the fire. ", "Time goes on. ",
    "The hills are far away. ", "Fish swim in the lake. ", "Ice is smooth. ", "The day is warm. ",
    "Bees make honey. ", "The door is open. ", "Stones are heavy. ", "Bread is baked in the oven. ",
    "The clock ticks on the wall. ", "Frogs can jump. ", "The fields are wide. ",
};

// The sentences sorted by length. Their lengths cover every value in [shortest, 2 * shortest), which
// is what lets write_filler hit any length >= shortest exactly.
struct FillerTable {
  std::vector<std::string_view> sentences;
  std::vector<int64_t> lengths;  // lengths[i] == sentences[i].size(), ascending
  int64_t shortest = 0;
};

const FillerTable& filler_table() {
  static const FillerTable table = [] {
    FillerTable t;
    t.sentences.assign(std::begin(kFillerSentences), std::end(kFillerSentences));
    std::stable_sort(t.sentences.begin(), t.sentences.end(),
                     [](std::string_view a, std::string_view b) { return a.size() < b.size(); });
    for (std::string_view s : t.sentences) t.lengths.push_back(static_cast<int64_t>(s.size()));
    t.shortest = t.lengths.front();
    for (int64_t len = t.shortest; len < 2 * t.shortest; ++len)
      DILATRON_CHECK(std::binary_search(t.lengths.begin(), t.lengths.end(), len),
                     "passkey filler has no sentence of length ", len);
    return t;
  }();
  return table;
}

int64_t* write_text(std::string_view text, int64_t* out) {
  for (char c : text) *out++ = static_cast<unsigned char>(c);
  return out;
}

int64_t* write_key(uint64_t key, int64_t digits, int64_t* out) {
  for (int64_t k = digits - 1; k >= 0; --k, key /= 10) out[k] = '0' + static_cast<int64_t>(key % 10);
  return out + digits;
}

// Exactly `length` (>= shortest) bytes of random whole sentences. While 2 * shortest or more remain, any
// sentence that leaves at least `shortest` will do; what remains then is below 2 * shortest, the length
// of some sentence, which ends the filler.
int64_t* write_filler(int64_t length, Generator& gen, int64_t* out) {
  const FillerTable& t = filler_table();
  while (length >= 2 * t.shortest) {
    const auto fitting = std::upper_bound(t.lengths.begin(), t.lengths.end(), length - t.shortest) - t.lengths.begin();
    const std::string_view s = t.sentences[gen.next_below(static_cast<uint64_t>(fitting))];
    out = write_text(s, out);
    length -= static_cast<int64_t>(s.size());
  }
  const auto [first, last] = std::equal_range(t.lengths.begin(), t.lengths.end(), length);
  const auto pick = (first - t.lengths.begin()) + static_cast<int64_t>(gen.next_below(last - first));
  return write_text(t.sentences[pick], out);
}

// The landmark-attention passage; Filler::Repeat cycles it, continuing after the needle where it
// stopped before it.
constexpr std::string_view kPassage =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

int64_t* write_passage(int64_t length, int64_t phase, int64_t* out) {
  const auto n = static_cast<int64_t>(kPassage.size());
  for (int64_t i = 0; i < length; ++i) *out++ = static_cast<unsigned char>(kPassage[static_cast<size_t>((phase + i) % n)]);
  return out;
}

enum class Stream : uint32_t { Train = 0, Eval = 1 };

// Every sample has a generator of its own, seeded by Philox of (index, stream) under the key `seed`:
// samples do not depend on each other or on the order they are drawn in, and the streams never meet.
Generator sample_generator(uint64_t seed, Stream stream, uint64_t index) {
  const Philox4 h = philox4x32_10(Philox4{{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                                           static_cast<uint32_t>(stream), 0}},
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return Generator((static_cast<uint64_t>(h.x[1]) << 32) | h.x[0]);
}

int64_t needle_length(int64_t digits) {
  return static_cast<int64_t>(kNeedleHead.size() + kNeedleMid.size() + kNeedleTail.size()) + 2 * digits;
}

// Tokens from the needle's start to the start of its second key copy.
int64_t needle_key_offset(int64_t digits) {
  return static_cast<int64_t>(kNeedleHead.size() + kNeedleMid.size()) + digits;
}

// The tokens of a sample that are not filler: <bos> needle (question key ". ")^(questions - 1) question
// key <eos>.
int64_t fixed_tokens(int64_t digits, int64_t questions) {
  const auto question = static_cast<int64_t>(kQuestion.size()) + digits;
  return 1 + needle_length(digits) + (questions - 1) * (question + static_cast<int64_t>(kAnswerTail.size())) +
         question + 1;
}

}  // namespace

int64_t PasskeyTask::min_seq_len(int64_t digits, int64_t questions) {
  // A sentence or more before the needle and before each question.
  return fixed_tokens(digits, questions) - 1 + (questions + 1) * filler_table().shortest;
}

PasskeyTask::PasskeyTask(PasskeyOptions options) : options_(options) {
  const int64_t T = options_.seq_len, d = options_.digits;
  DILATRON_CHECK(d >= 1 && d <= 18, "PasskeyTask: digits ", d, " is outside [1, 18]");
  DILATRON_CHECK(0.0 <= options_.min_depth && options_.min_depth <= options_.max_depth && options_.max_depth <= 1.0,
                 "PasskeyTask: depth range [", options_.min_depth, ", ", options_.max_depth,
                 "] is not an interval within [0, 1]");
  DILATRON_CHECK(options_.min_distance >= 0 && options_.min_distance <= T, "PasskeyTask: min_distance ",
                 options_.min_distance, " is outside [0, seq_len = ", T, "]");
  const int64_t K = options_.questions;
  DILATRON_CHECK(K >= 1, "PasskeyTask: questions ", K, " must be at least 1");
  DILATRON_CHECK(std::isfinite(options_.answer_weight) && options_.answer_weight > 0.0, "PasskeyTask: answer_weight ",
                 options_.answer_weight, " must be finite and > 0");

  // The fixed tokens and filler make T + 1 tokens, with a sentence or more before the needle and before
  // each question.
  const int64_t shortest = filler_table().shortest;
  filler_ = T + 1 - fixed_tokens(d, K);
  DILATRON_CHECK(T >= min_seq_len(d, K), "PasskeyTask: seq_len ", T, " is too short for a needle and ",
                 K == 1 ? std::string("question") : std::to_string(K) + " questions", " with ", d,
                 " digits: needs at least ", min_seq_len(d, K));

  const auto before_at = [&](double depth) {
    return std::clamp<int64_t>(std::llround(depth * static_cast<double>(filler_)), shortest, filler_ - K * shortest);
  };
  before_lo_ = before_at(options_.min_depth);
  before_hi_ = before_at(options_.max_depth);
  // distance = answer_start - needle_position = (T - d) - (1 + before + needle_key_offset)
  const int64_t distance_at_zero = T - d - 1 - needle_key_offset(d);
  DILATRON_CHECK(distance_at_zero - before_lo_ >= options_.min_distance, "PasskeyTask: min_distance ",
                 options_.min_distance, " cannot be met: with seq_len ", T, ", ", d, " digits and depth range [",
                 options_.min_depth, ", ", options_.max_depth, "] the key is at most ",
                 distance_at_zero - before_lo_, " tokens from the answer");
  before_hi_ = std::min(before_hi_, distance_at_zero - options_.min_distance);

  key_low_ = 1;
  for (int64_t k = 1; k < d; ++k) key_low_ *= 10;
}

std::pair<uint64_t, int64_t> PasskeyTask::write_sample(Generator& gen, int64_t* tokens,
                                                      std::span<int64_t> answer_starts) const {
  const int64_t d = options_.digits, K = options_.questions, shortest = filler_table().shortest;
  const uint64_t key = static_cast<uint64_t>(key_low_) + gen.next_below(9 * static_cast<uint64_t>(key_low_));
  const int64_t before = before_lo_ + static_cast<int64_t>(gen.next_below(before_hi_ - before_lo_ + 1));
  // The filler after the needle is K runs of at least `shortest`, each ended by a question: the spare
  // bytes are cut at K - 1 uniform points (no draws for K = 1, so that sample is the original prompt).
  // answer_starts[q] holds the q-th cut until the q-th answer start replaces it.
  const int64_t spare = filler_ - before - K * shortest;
  for (int64_t q = 0; q + 1 < K; ++q) answer_starts[q] = static_cast<int64_t>(gen.next_below(spare + 1));
  std::sort(answer_starts.begin(), answer_starts.begin() + (K - 1));
  int64_t* out = tokens;
  *out++ = kBos;
  const bool repeat = options_.filler == PasskeyOptions::Filler::Repeat;
  out = repeat ? write_passage(before, 0, out) : write_filler(before, gen, out);
  out = write_text(kNeedleHead, out);
  out = write_key(key, d, out);
  out = write_text(kNeedleMid, out);
  out = write_key(key, d, out);
  out = write_text(kNeedleTail, out);
  int64_t cut = 0, phase = before;
  for (int64_t q = 0; q < K; ++q) {
    const int64_t next_cut = q + 1 < K ? answer_starts[q] : spare;
    const int64_t run = shortest + next_cut - cut;
    out = repeat ? write_passage(run, phase, out) : write_filler(run, gen, out);
    cut = next_cut;
    phase += run;
    out = write_text(kQuestion, out);
    answer_starts[q] = out - tokens;
    out = write_key(key, d, out);
    if (q + 1 < K) out = write_text(kAnswerTail, out);
  }
  *out = kEos;
  return {key, before};
}

PasskeySample PasskeyTask::make_sample(Generator gen) const {
  const int64_t T = options_.seq_len, d = options_.digits;
  PasskeySample s;
  s.tokens.resize(static_cast<size_t>(T + 1));
  s.answer_starts.resize(static_cast<size_t>(options_.questions));
  const auto [key, before] = write_sample(gen, s.tokens.data(), s.answer_starts);
  s.key = std::to_string(key);
  s.needle_position = 1 + before + needle_key_offset(d);
  s.answer_start = T - d;
  s.distance = s.answer_start - s.needle_position;
  s.depth = static_cast<double>(before) / static_cast<double>(filler_);
  return s;
}

PasskeySample PasskeyTask::sample(uint64_t index) const {
  return make_sample(sample_generator(options_.seed, Stream::Train, index));
}

Batch PasskeyTask::batch(Generator& gen, int64_t batch) const {
  DILATRON_CHECK(batch >= 1, "PasskeyTask::batch: batch ", batch, " must be at least 1");
  const int64_t T = options_.seq_len, width = T + 1;
  const double w = options_.answer_weight;
  Batch out{Tensor::empty({batch, width}, DType::Int64), Tensor()};
  if (w != 1.0) out.weights = Tensor::full({batch, T}, 1.0, DType::Float64);
  int64_t* rows = out.tokens.data<int64_t>();
  std::vector<int64_t> answer_starts(static_cast<size_t>(options_.questions));
  for (int64_t r = 0; r < batch; ++r) {
    Generator sample_gen =
        sample_generator(options_.seed, Stream::Train, gen.next_below(std::numeric_limits<uint64_t>::max()));
    write_sample(sample_gen, rows + r * width, answer_starts);
    if (!out.weights.defined()) continue;
    // Token p is the target of input position p - 1.
    for (int64_t a : answer_starts) std::fill_n(out.weights.data<double>() + r * T + a - 1, options_.digits, w);
  }
  return out;
}

std::vector<PasskeySample> PasskeyTask::eval_set(int64_t count, uint64_t eval_seed) const {
  DILATRON_CHECK(count >= 0, "PasskeyTask::eval_set: count ", count, " is negative");
  std::vector<PasskeySample> samples;
  samples.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    samples.push_back(make_sample(sample_generator(eval_seed, Stream::Eval, static_cast<uint64_t>(i))));
  return samples;
}

std::string DistanceBucket::label() const { return detail::concat("[", lo, ", ", hi, ")"); }

DistanceBucket distance_bucket(int64_t distance) {
  DILATRON_CHECK(distance >= 0, "distance_bucket: distance ", distance, " is negative");
  constexpr int64_t kFirst = 256;
  if (distance < kFirst) return {0, kFirst};
  const auto lo = static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(distance)));
  return {lo, 2 * lo};
}

}  // namespace dilatron::data
