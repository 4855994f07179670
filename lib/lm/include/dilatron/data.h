// Training data for dilatron's byte-level language models: the tokenizer, any UTF-8 text file, and the
// synthetic passkey-retrieval task. Batches are Int64 tensors [batch, seq_len + 1]: a model reads columns
// [0, seq_len) and predicts columns [1, seq_len + 1). Random batches take all their randomness from a
// Generator, so its (seed, offset) is the whole loader state a checkpoint has to store.
#pragma once

#include <compare>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dilatron/random.h"
#include "dilatron/tensor.h"

namespace dilatron::data {

// ---- tokens: ids 0..255 are bytes, then three specials ----
inline constexpr int64_t kBos = 256;  // begins every passkey sample
inline constexpr int64_t kEos = 257;  // ends every passkey sample; also the separator for callers joining texts
inline constexpr int64_t kPad = 258;  // never produced here: for callers that pad sequences of unequal length
constexpr int64_t vocab_size() { return 259; }

// The bytes of `text` as ids 0..255.
std::vector<int64_t> encode(std::string_view text);
// Bytes are written back as they are (bytes a model samples need not form valid UTF-8); specials become
// the markers "<bos>", "<eos>" and "<pad>", so decode(encode(s)) == s for every s. Throws on an id outside
// [0, vocab_size()), naming it and its position.
std::string decode(std::span<const int64_t> ids);

// ---- a text file ----
enum class Split { Train, Validation };
const char* split_name(Split split);

// A UTF-8 text file held as bytes. The split is a cut: the last llround(val_fraction * bytes) bytes are
// the validation split, everything before them the training split.
class TextDataset {
 public:
  // Throws naming the file when it cannot be read, is empty, or is not valid UTF-8 (naming the offset of
  // the first bad byte). A byte-level model would train on any bytes; the check catches the wrong file
  // (a checkpoint, an archive, a Latin-1 text). val_fraction is in [0, 1).
  explicit TextDataset(std::string path, double val_fraction = 0.05);

  const std::string& path() const { return path_; }
  int64_t size(Split split) const;  // in bytes (= tokens)

  // `batch` windows of seq_len + 1 bytes at uniform random starts in the split, one gen draw per row.
  Tensor sample_batch(Split split, int64_t batch, int64_t seq_len, Generator& gen) const;

  // Evaluation windows, in order and without randomness: window k holds bytes [k * seq_len,
  // (k + 1) * seq_len] of the split, so consecutive windows share one byte and every byte after the first
  // is a target exactly once. The tail after the last whole window (under seq_len bytes) is left out.
  int64_t num_windows(Split split, int64_t seq_len) const;
  Tensor windows(Split split, int64_t seq_len, int64_t first, int64_t count) const;  // [count, seq_len + 1]

 private:
  std::string_view split_bytes(Split split) const;
  void check_window_fits(Split split, int64_t seq_len) const;

  std::string path_;
  std::string bytes_;
  int64_t train_size_;
};

// ---- passkey retrieval ----
// A sample, seq_len + 1 tokens (the landmark-attention passkey prompt, Mohtashami & Jaggi 2023):
//   <bos> filler... The pass key is 71432. Remember it. 71432 is the pass key. filler... What is the pass
//   key? The pass key is 71432<eos>
// The filler is whole English sentences drawn at random from a fixed list, sized so that the sample ends
// exactly at seq_len + 1 tokens, with at least one sentence on either side of the needle. The answer's
// digits are tokens[answer_start, answer_start + digits) with answer_start = seq_len - digits, so a model
// is scored on its predictions at input positions answer_start - 1 .. answer_start + digits - 2.
// With questions = K > 1 (training), K - 1 more question-answer pairs "What is the pass key? The pass key
// is 71432. " stand between the needle and the final question, at random sentence boundaries, so one
// sample supervises K retrievals at K distances.
struct PasskeyOptions {
  int64_t seq_len = 2048;  // T: a sample has T + 1 tokens
  int64_t digits = 5;      // the key is uniform over the numbers with this many digits, in [1, 18]
  // Where the needle goes, as the fraction of the filler bytes that come before it: 0 right after <bos>,
  // 1 right before the question. The number of filler bytes before the needle is uniform between
  // llround(min_depth * filler) and llround(max_depth * filler), both kept one shortest filler sentence
  // away from either end.
  double min_depth = 0.0;
  double max_depth = 1.0;
  // Only needles at least this many tokens from the answer (distance, below): puts keys beyond a local
  // attention window.
  int64_t min_distance = 0;
  uint64_t seed = 0;  // the training stream; sample(index) depends on (seed, index) only
  // Random: sentences drawn at random from a fixed list (the filler carries entropy of its own).
  // Repeat: the landmark-attention passage "The grass is green. The sky is blue. ..." repeated, cut
  // to length (the filler becomes predictable, so nearly all the loss left is the key's).
  enum class Filler { Random, Repeat } filler = Filler::Random;
  int64_t questions = 1;       // K >= 1 question-answer pairs per sample; 1 is the prompt above exactly
  double answer_weight = 1.0;  // > 0: the loss weight batch() gives every answer-digit target (others 1)
};

struct PasskeySample {
  std::vector<int64_t> tokens;  // seq_len + 1 ids
  std::string key;              // the digits
  // tokens[needle_position, + digits) is the copy of the key in the needle that is nearest the answer
  // (its second copy), so distance is how far an answer position has to look back at least.
  int64_t needle_position = 0;
  int64_t answer_start = 0;  // seq_len - digits
  int64_t distance = 0;      // answer_start - needle_position
  double depth = 0.0;        // filler bytes before the needle / all filler bytes
  std::vector<int64_t> answer_starts;  // each answer's first digit, one per question in order; last: answer_start
};

// A training batch: tokens Int64 [batch, seq_len + 1]; weights Float64 [batch, seq_len], the loss weight
// of each target (tokens column 1..seq_len), or undefined when every target weighs 1.
struct Batch {
  Tensor tokens;
  Tensor weights;
};

class PasskeyTask {
 public:
  // Throws, naming the values, when no sample fits: digits outside [1, 18], a depth range outside [0, 1]
  // or reversed, min_distance outside [0, seq_len], questions < 1, answer_weight not finite and > 0,
  // seq_len too short for the needle and the questions, or a min_distance no needle in the depth range
  // can reach.
  explicit PasskeyTask(PasskeyOptions options);

  // The shortest seq_len that holds a needle and `questions` questions with one filler sentence or more
  // between consecutive parts.
  static int64_t min_seq_len(int64_t digits, int64_t questions);

  const PasskeyOptions& options() const { return options_; }

  // Training sample `index` of the stream options().seed.
  PasskeySample sample(uint64_t index) const;
  // `batch` training samples: row r is sample(gen.next_below(2^64 - 1)).tokens, one draw per row; the
  // targets of every answer's digits weigh options().answer_weight.
  Batch batch(Generator& gen, int64_t batch) const;
  // Samples 0..count-1 of an evaluation stream. Evaluation and training streams are derived apart, so
  // no evaluation sample is a training sample, even with eval_seed == options().seed.
  std::vector<PasskeySample> eval_set(int64_t count, uint64_t eval_seed) const;

 private:
  PasskeySample make_sample(Generator gen) const;
  // Writes one sample's seq_len + 1 tokens and its questions answer starts; returns the key and the
  // filler bytes before the needle.
  std::pair<uint64_t, int64_t> write_sample(Generator& gen, int64_t* tokens, std::span<int64_t> answer_starts) const;

  PasskeyOptions options_;
  int64_t filler_;                 // filler bytes per sample (around the needle and the questions)
  int64_t before_lo_, before_hi_;  // the range of filler bytes before the needle
  int64_t key_low_;                // 10^(digits - 1)
};

// Report buckets by distance: [0, 256), [256, 512), [512, 1024), ..., each after the first twice as wide.
// Ordered by lo, so a std::map keyed by bucket lists them in distance order.
struct DistanceBucket {
  int64_t lo = 0;
  int64_t hi = 0;
  std::string label() const;  // "[256, 512)"
  auto operator<=>(const DistanceBucket&) const = default;
};
DistanceBucket distance_bucket(int64_t distance);

}  // namespace dilatron::data
