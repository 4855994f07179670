// Byte tokens, text datasets and the passkey-retrieval task.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <string>

#include "dilatron/data.h"
#include "dilatron/error.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::error_message;
using namespace dilatron::data;

namespace {

// A file in the temp directory, unique per test and process, removed at the end of the test.
class TempFile {
 public:
  explicit TempFile(const std::string& contents) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = (std::filesystem::temp_directory_path() /
             ("dilatron_" + std::string(info->name()) + "_" + std::to_string(getpid()) + "_" +
              std::to_string(count_++) + ".txt"))
                .string();
    std::ofstream(path_, std::ios::binary) << contents;
  }
  ~TempFile() { std::filesystem::remove(path_); }
  const std::string& path() const { return path_; }

 private:
  static inline int count_ = 0;
  std::string path_;
};

// `n` random letters from 'first' .. 'first' + 25, so any window of a few bytes occurs once.
std::string random_letters(int64_t n, char first, uint64_t seed) {
  Generator gen(seed);
  std::string s;
  for (int64_t i = 0; i < n; ++i) s.push_back(static_cast<char>(first + gen.next_below(26)));
  return s;
}

std::string row_bytes(const Tensor& batch, int64_t r) {
  const int64_t width = batch.size(1);
  const int64_t* row = batch.data<int64_t>() + r * width;
  return decode(std::span<const int64_t>(row, static_cast<size_t>(width)));
}

std::vector<int64_t> row_ids(const Tensor& batch, int64_t r) {
  const int64_t width = batch.size(1);
  const int64_t* row = batch.data<int64_t>() + r * width;
  return {row, row + width};
}

}  // namespace

// ---------------------------------------------------------------- tokens

TEST(DataTokens, RoundTripsAsciiAndUtf8Bytes) {
  const std::string text = std::string("Hello, w\xC3\xB6rld! \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x99\x82\n\t") +
                           std::string(1, '\0') + "end";
  const std::vector<int64_t> ids = encode(text);
  ASSERT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[8], 0xC3);
  EXPECT_EQ(ids[9], 0xB6);
  for (int64_t id : ids) EXPECT_TRUE(id >= 0 && id < 256) << id;
  EXPECT_EQ(decode(ids), text);
  EXPECT_EQ(vocab_size(), 259);
}

TEST(DataTokens, DecodesSpecialsAsMarkersAndRejectsUnknownIds) {
  EXPECT_EQ(decode(std::vector<int64_t>{kBos, 'a', kEos, 'b', kPad}), "<bos>a<eos>b<pad>");
  const std::string msg = error_message([] { decode(std::vector<int64_t>{'a', 259}); });
  EXPECT_NE(msg.find("259"), std::string::npos) << msg;
  EXPECT_NE(msg.find("position 1"), std::string::npos) << msg;
  EXPECT_NE(error_message([] { decode(std::vector<int64_t>{-1}); }).find("-1"), std::string::npos);
}

// ---------------------------------------------------------------- text files

TEST(DataText, SplitsTheLastFractionOffForValidation) {
  TempFile file(random_letters(1001, 'a', 1));
  const TextDataset five(file.path());
  EXPECT_EQ(five.size(Split::Validation), 50);  // llround(0.05 * 1001)
  EXPECT_EQ(five.size(Split::Train), 951);
  const TextDataset tenth(file.path(), 0.1);
  EXPECT_EQ(tenth.size(Split::Validation), 100);
  EXPECT_EQ(tenth.size(Split::Train), 901);
  const TextDataset none(file.path(), 0.0);
  EXPECT_EQ(none.size(Split::Validation), 0);
  EXPECT_NE(error_message([&] { TextDataset(file.path(), 1.0); }).find("val_fraction 1"), std::string::npos);
}

TEST(DataText, RejectsMissingEmptyAndNonUtf8FilesNamingThem) {
  const std::string missing = "/nonexistent/dilatron_no_such_file.txt";
  EXPECT_NE(error_message([&] { TextDataset{missing}; }).find(missing), std::string::npos);

  TempFile empty("");
  const std::string empty_msg = error_message([&] { TextDataset{empty.path()}; });
  EXPECT_NE(empty_msg.find(empty.path()), std::string::npos) << empty_msg;
  EXPECT_NE(empty_msg.find("empty"), std::string::npos) << empty_msg;

  // A stray byte, an overlong '/', a UTF-16 surrogate, a code point above U+10FFFF, a cut sequence.
  const std::pair<std::string, std::string> bad[] = {
      {"abc\xFF" "def", "0xFF at offset 3"}, {"ab\xC0\xAF", "0xC0 at offset 2"},
      {"\xED\xA0\x80", "0xED at offset 0"},  {"x\xF4\x90\x80\x80", "0xF4 at offset 1"},
      {"ok \xE2\x82", "0xE2 at offset 3"},
  };
  for (const auto& [contents, where] : bad) {
    TempFile file(contents);
    const std::string msg = error_message([&] { TextDataset{file.path()}; });
    EXPECT_NE(msg.find(file.path()), std::string::npos) << msg;
    EXPECT_NE(msg.find(where), std::string::npos) << msg;
  }
  TempFile good("\xE2\x82\xAC \xF0\x9F\x99\x82 \xF4\x8F\xBF\xBF \xED\x9F\xBF");  // up to U+10FFFF, below surrogates
  EXPECT_EQ(TextDataset(good.path()).size(Split::Train), 16);
}

TEST(DataText, RejectsWindowsLongerThanTheSplit) {
  TempFile file(random_letters(100, 'a', 2));
  const TextDataset ds(file.path(), 0.1);  // 90 train, 10 validation bytes
  Generator gen(0);
  EXPECT_NO_THROW(ds.sample_batch(Split::Validation, 1, 9, gen));
  const std::string msg = error_message([&] { ds.sample_batch(Split::Validation, 1, 10, gen); });
  EXPECT_NE(msg.find("validation split has 10 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("11"), std::string::npos) << msg;
  EXPECT_NE(msg.find(file.path()), std::string::npos) << msg;
  EXPECT_NE(error_message([&] { ds.num_windows(Split::Train, 90); }).find("90 bytes"), std::string::npos);
}

TEST(DataText, RandomWindowsAreContiguousAndStayInTheirSplit) {
  // Lowercase training bytes, uppercase validation bytes: a window crossing the cut would mix them.
  const std::string train = random_letters(900, 'a', 3), val = random_letters(100, 'A', 4);
  TempFile file(train + val);
  const TextDataset ds(file.path(), 0.1);
  Generator gen(5);
  const Tensor tb = ds.sample_batch(Split::Train, 64, 31, gen);
  const Tensor vb = ds.sample_batch(Split::Validation, 64, 31, gen);
  ASSERT_EQ(tb.shape(), (Shape{64, 32}));
  EXPECT_EQ(tb.dtype(), DType::Int64);
  for (int64_t r = 0; r < 64; ++r) {
    EXPECT_NE(train.find(row_bytes(tb, r)), std::string::npos) << row_bytes(tb, r);
    EXPECT_NE(val.find(row_bytes(vb, r)), std::string::npos) << row_bytes(vb, r);
  }
}

TEST(DataText, EveryStartIsReachableAndNoneBeyond) {
  std::string train;
  for (int i = 0; i < 20; ++i) train.push_back(static_cast<char>('a' + i));
  TempFile file(train);
  const TextDataset ds(file.path(), 0.0);
  Generator gen(6);
  const Tensor b = ds.sample_batch(Split::Train, 400, 16, gen);  // windows of 17 bytes: starts 0..3
  std::set<int64_t> starts;
  for (int64_t r = 0; r < 400; ++r) {
    const int64_t start = b.data<int64_t>()[r * 17] - 'a';
    EXPECT_EQ(row_bytes(b, r), train.substr(static_cast<size_t>(start), 17));
    starts.insert(start);
  }
  EXPECT_EQ(starts, (std::set<int64_t>{0, 1, 2, 3}));
}

TEST(DataText, BatchesFollowTheGeneratorState) {
  TempFile file(random_letters(5000, 'a', 7));
  const TextDataset ds(file.path());
  Generator gen(11, 3);
  Generator same = gen;
  const Tensor a = ds.sample_batch(Split::Train, 8, 64, gen);
  EXPECT_EQ(gen.offset(), 3u + 8u);  // one draw per row: (seed, offset) is the whole loader state
  EXPECT_EQ(a.to_vector<int64_t>(), ds.sample_batch(Split::Train, 8, 64, same).to_vector<int64_t>());
  EXPECT_NE(a.to_vector<int64_t>(), ds.sample_batch(Split::Train, 8, 64, gen).to_vector<int64_t>());
  Generator other(12, 3);
  EXPECT_NE(a.to_vector<int64_t>(), ds.sample_batch(Split::Train, 8, 64, other).to_vector<int64_t>());
}

TEST(DataText, EvaluationWindowsTileTheSplit) {
  const std::string train = random_letters(897, 'a', 8), val = random_letters(103, 'A', 9);
  TempFile file(train + val);
  const TextDataset ds(file.path(), 0.103);
  ASSERT_EQ(ds.size(Split::Validation), 103);
  const int64_t T = 10;
  const int64_t n = ds.num_windows(Split::Validation, T);
  ASSERT_EQ(n, 10);  // 102 targets after the first byte: ten whole windows, two bytes left out
  const Tensor all = ds.windows(Split::Validation, T, 0, n);
  ASSERT_EQ(all.shape(), (Shape{n, T + 1}));
  std::string targets;
  for (int64_t k = 0; k < n; ++k) {
    const std::string w = row_bytes(all, k);
    EXPECT_EQ(w, val.substr(static_cast<size_t>(k * T), T + 1));
    targets += w.substr(1);
  }
  EXPECT_EQ(targets, val.substr(1, static_cast<size_t>(n * T)));  // each byte a target once, in order
  // Any chunking gives the same windows.
  const Tensor tail = ds.windows(Split::Validation, T, 7, 3);
  for (int64_t k = 0; k < 3; ++k) EXPECT_EQ(row_bytes(tail, k), row_bytes(all, 7 + k));
  const std::string msg = error_message([&] { ds.windows(Split::Validation, T, 8, 3); });
  EXPECT_NE(msg.find("[8, 11)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("10 validation windows"), std::string::npos) << msg;
}

// ---------------------------------------------------------------- passkey

namespace {

// Whole sentences: nonempty, each one ending in ". " and starting with a capital letter.
bool whole_sentences(std::string_view text) {
  if (text.empty() || !text.ends_with(". ")) return false;
  for (size_t begin = 0; begin < text.size();) {
    const size_t end = text.find(". ", begin);
    const std::string_view sentence = text.substr(begin, end - begin);
    if (sentence.empty() || !std::isupper(static_cast<unsigned char>(sentence[0])) ||
        sentence.find('.') != std::string_view::npos)
      return false;
    begin = end + 2;
  }
  return true;
}

// Checks the whole layout of one sample: <bos> filler needle filler question key <eos>.
void expect_layout(const PasskeySample& s, const PasskeyOptions& o) {
  const int64_t T = o.seq_len, d = o.digits;
  ASSERT_EQ(static_cast<int64_t>(s.tokens.size()), T + 1);
  ASSERT_EQ(static_cast<int64_t>(s.key.size()), d);
  EXPECT_NE(s.key[0], '0');
  EXPECT_EQ(s.tokens[0], kBos);
  EXPECT_EQ(s.tokens[T], kEos);
  EXPECT_EQ(s.answer_start, T - d);
  EXPECT_EQ(s.answer_starts, std::vector<int64_t>{s.answer_start});
  EXPECT_EQ(s.distance, s.answer_start - s.needle_position);
  EXPECT_EQ(decode(std::vector<int64_t>(s.tokens.begin() + s.answer_start, s.tokens.begin() + T)), s.key);
  EXPECT_EQ(decode(std::vector<int64_t>(s.tokens.begin() + s.needle_position,
                                        s.tokens.begin() + s.needle_position + d)),
            s.key);

  const std::string text = decode(s.tokens);
  const std::string needle = "The pass key is " + s.key + ". Remember it. " + s.key + " is the pass key. ";
  const std::string question = "What is the pass key? The pass key is " + s.key + "<eos>";
  ASSERT_TRUE(text.ends_with(question)) << text;
  const size_t at = text.find(needle);
  ASSERT_NE(at, std::string::npos) << text;
  // "<bos>" is 5 characters for 1 token; the second key copy sits before " is the pass key. ".
  EXPECT_EQ(static_cast<int64_t>(at + needle.size() - 18 - d - 4), s.needle_position);
  const std::string_view before = std::string_view(text).substr(5, at - 5);
  const std::string_view after =
      std::string_view(text).substr(at + needle.size(), text.size() - question.size() - at - needle.size());
  EXPECT_TRUE(whole_sentences(before)) << before;
  EXPECT_TRUE(whole_sentences(after)) << after;
  EXPECT_NEAR(s.depth, static_cast<double>(before.size()) / static_cast<double>(before.size() + after.size()),
              1e-12);
}

// seq_len `shortest` (what the error for a shorter one named) makes a task whose first samples pass
// `check`, and seq_len shortest - 1 is refused.
void expect_shortest_seq_len(PasskeyOptions o, int64_t shortest,
                             const std::function<void(const PasskeySample&, const PasskeyOptions&)>& check) {
  o.seq_len = shortest;
  const PasskeyTask task(o);
  for (uint64_t i = 0; i < 20; ++i) check(task.sample(i), o);
  o.seq_len = shortest - 1;
  EXPECT_THROW(PasskeyTask{o}, Error);
}

}  // namespace

TEST(DataPasskey, EverySampleHasTheExactLayout) {
  for (int64_t digits : {1, 5, 9}) {
    for (int64_t seq_len : {160, 257, 1000, 4097}) {
      PasskeyOptions o;
      o.seq_len = seq_len;
      o.digits = digits;
      const PasskeyTask task(o);
      for (uint64_t i = 0; i < 40; ++i) {
        SCOPED_TRACE(testing::Message() << "digits " << digits << " seq_len " << seq_len << " index " << i);
        expect_layout(task.sample(i), o);
      }
    }
  }
}

TEST(DataPasskey, ShortestSeqLenIsTheOneTheErrorNames) {
  PasskeyOptions o;
  o.seq_len = 50;
  const std::string msg = error_message([&] { PasskeyTask{o}; });
  EXPECT_NE(msg.find("seq_len 50"), std::string::npos) << msg;
  const size_t at = msg.find("needs at least ");
  ASSERT_NE(at, std::string::npos) << msg;
  expect_shortest_seq_len(o, std::stoll(msg.substr(at + 15)), expect_layout);
}

TEST(DataPasskey, SamplesDependOnlyOnSeedAndIndex) {
  PasskeyOptions o;
  o.seq_len = 512;
  o.seed = 42;
  const PasskeyTask task(o), twin(o);
  EXPECT_EQ(task.sample(7).tokens, twin.sample(7).tokens);
  EXPECT_EQ(task.sample(7).tokens, task.sample(7).tokens);
  EXPECT_NE(task.sample(7).tokens, task.sample(8).tokens);
  o.seed = 43;
  EXPECT_NE(task.sample(7).tokens, PasskeyTask(o).sample(7).tokens);
}

TEST(DataPasskey, TrainingBatchRowsAreSamplesAtDrawnIndices) {
  PasskeyOptions o;
  o.seq_len = 300;
  const PasskeyTask task(o);
  Generator gen(3, 10);
  Generator replay = gen;
  const Batch batch = task.batch(gen, 4);
  const Tensor& b = batch.tokens;
  ASSERT_EQ(b.shape(), (Shape{4, 301}));
  EXPECT_FALSE(batch.weights.defined());  // answer_weight 1: every target weighs the same
  EXPECT_EQ(gen.offset(), 14u);
  for (int64_t r = 0; r < 4; ++r)
    EXPECT_EQ(row_ids(b, r), task.sample(replay.next_below(std::numeric_limits<uint64_t>::max())).tokens);
  EXPECT_NE(row_ids(b, 0), row_ids(b, 1));
  EXPECT_NE(b.to_vector<int64_t>(), task.batch(gen, 4).tokens.to_vector<int64_t>());
}

// Sample 0 of seed 7 at seq_len 200 as the code wrote it before questions and answer weights existed:
// one question (the default) must still be that prompt, token for token.
TEST(DataPasskey, OneQuestionIsTheOriginalPromptBitForBit) {
  PasskeyOptions o;
  o.seq_len = 200;
  o.seed = 7;
  EXPECT_EQ(decode(PasskeyTask(o).sample(0).tokens),
            "<bos>Fire is hot. Here we go. The pass key is 90516. Remember it. 90516 is the pass key. The cat sleeps by "
            "the fire. Fish swim in the lake. The fields are wide. What is the pass key? The pass key is 90516<eos>");
  o.filler = PasskeyOptions::Filler::Repeat;
  EXPECT_EQ(decode(PasskeyTask(o).sample(0).tokens),
            "<bos>The grass is green. The sThe pass key is 90516. Remember it. 90516 is the pass key. ky is blue. The "
            "sun is yellow. Here we go. There and back again. The graWhat is the pass key? The pass key is 90516<eos>");
  o.answer_weight = 3.0;  // weights the loss only
  EXPECT_EQ(decode(PasskeyTask(o).sample(0).tokens).substr(0, 30), "<bos>The grass is green. The s");
}

TEST(DataPasskey, SeveralQuestionsFollowTheNeedleWithTheKeyAsAnswer) {
  for (const auto filler : {PasskeyOptions::Filler::Random, PasskeyOptions::Filler::Repeat}) {
    PasskeyOptions o;
    o.seq_len = 600;
    o.questions = 3;
    o.filler = filler;
    const PasskeyTask task(o);
    const int64_t T = o.seq_len, d = o.digits;
    std::set<int64_t> first_answers;
    for (uint64_t i = 0; i < 40; ++i) {
      SCOPED_TRACE(testing::Message() << "repeat " << (filler == PasskeyOptions::Filler::Repeat) << " index " << i);
      const PasskeySample s = task.sample(i);
      EXPECT_EQ(s.tokens, task.sample(i).tokens);  // from (seed, index) alone
      ASSERT_EQ(static_cast<int64_t>(s.tokens.size()), T + 1);
      EXPECT_EQ(s.tokens[0], kBos);
      EXPECT_EQ(s.tokens[T], kEos);
      ASSERT_EQ(s.answer_starts.size(), 3u);
      EXPECT_EQ(s.answer_starts.back(), s.answer_start);
      EXPECT_EQ(s.answer_start, T - d);
      EXPECT_EQ(s.distance, s.answer_start - s.needle_position);
      EXPECT_EQ(decode(std::vector<int64_t>(s.tokens.begin() + s.needle_position,
                                            s.tokens.begin() + s.needle_position + d)),
                s.key);
      const std::string question = "What is the pass key? The pass key is ";
      int64_t previous = s.needle_position + d;
      for (size_t q = 0; q < 3; ++q) {
        const int64_t a = s.answer_starts[q];
        EXPECT_GT(a, previous);
        EXPECT_EQ(decode(std::vector<int64_t>(s.tokens.begin() + a - static_cast<int64_t>(question.size()),
                                              s.tokens.begin() + a + d)),
                  question + s.key);
        if (q < 2) {
          EXPECT_EQ(decode(std::vector<int64_t>(s.tokens.begin() + a + d, s.tokens.begin() + a + d + 2)), ". ");
          // Filler between this answer and the next question: whole sentences for the random filler.
          const int64_t next_question = s.answer_starts[q + 1] - static_cast<int64_t>(question.size());
          const std::string between = decode(std::vector<int64_t>(s.tokens.begin() + a + d + 2,
                                                                   s.tokens.begin() + next_question));
          EXPECT_GE(between.size(), 12u);
          if (filler == PasskeyOptions::Filler::Random) {
            EXPECT_TRUE(whole_sentences(between)) << between;
          }
        }
        previous = a + d;
      }
      const std::string text = decode(s.tokens);
      size_t count = 0;
      for (size_t at = text.find(question); at != std::string::npos; at = text.find(question, at + 1)) ++count;
      EXPECT_EQ(count, 3u);
      EXPECT_TRUE(text.ends_with(question + s.key + "<eos>"));
      first_answers.insert(s.answer_starts[0]);
    }
    EXPECT_GT(first_answers.size(), 20u);  // the questions move around
  }
}

TEST(DataPasskey, AnswerWeightsMarkEveryAnswerDigitTarget) {
  PasskeyOptions o;
  o.seq_len = 400;
  o.questions = 3;
  o.answer_weight = 4.5;
  const PasskeyTask task(o);
  Generator gen(11), replay(11);
  const Batch b = task.batch(gen, 3);
  ASSERT_TRUE(b.weights.defined());
  ASSERT_EQ(b.weights.shape(), (Shape{3, 400}));
  ASSERT_EQ(b.weights.dtype(), DType::Float64);
  const std::vector<double> w = b.weights.to_vector<double>();
  for (int64_t r = 0; r < 3; ++r) {
    const PasskeySample s = task.sample(replay.next_below(std::numeric_limits<uint64_t>::max()));
    EXPECT_EQ(row_ids(b.tokens, r), s.tokens);
    // Weight column j belongs to the target tokens[j + 1].
    std::vector<double> want(400, 1.0);
    for (int64_t a : s.answer_starts)
      for (int64_t k = 0; k < o.digits; ++k) {
        want[static_cast<size_t>(a + k - 1)] = 4.5;
        EXPECT_TRUE(std::isdigit(static_cast<int>(s.tokens[static_cast<size_t>(a + k)])));
      }
    EXPECT_EQ(std::vector<double>(w.begin() + r * 400, w.begin() + (r + 1) * 400), want) << "row " << r;
  }
  EXPECT_EQ(std::count(w.begin(), w.end(), 4.5), 3 * 3 * 5);
}

TEST(DataPasskey, QuestionsAndAnswerWeightAreValidated) {
  const auto message = [](auto edit) {
    PasskeyOptions o;
    edit(o);
    return error_message([&] { PasskeyTask{o}; });
  };
  EXPECT_NE(message([](PasskeyOptions& o) { o.questions = 0; }).find("questions 0"), std::string::npos);
  for (double w : {0.0, -1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    const std::string msg = message([w](PasskeyOptions& o) { o.answer_weight = w; });
    EXPECT_NE(msg.find("answer_weight"), std::string::npos) << msg;
  }
  // The shortest seq_len for 4 questions is the one the error names, and min_seq_len agrees.
  PasskeyOptions o;
  o.seq_len = 200;
  o.questions = 4;
  const std::string msg = error_message([&] { PasskeyTask{o}; });
  EXPECT_NE(msg.find("seq_len 200"), std::string::npos) << msg;
  EXPECT_NE(msg.find("4 questions"), std::string::npos) << msg;
  const int64_t shortest = PasskeyTask::min_seq_len(o.digits, 4);
  EXPECT_NE(msg.find("needs at least " + std::to_string(shortest)), std::string::npos) << msg;
  expect_shortest_seq_len(o, shortest, [](const PasskeySample& s, const PasskeyOptions&) {
    EXPECT_EQ(s.answer_starts.size(), 4u);
  });
}

TEST(DataPasskey, EvaluationSetIsDeterministicAndApartFromTraining) {
  PasskeyOptions o;
  o.seq_len = 256;
  o.seed = 5;
  const PasskeyTask task(o);
  const auto eval = task.eval_set(30, 5);
  ASSERT_EQ(eval.size(), 30u);
  const auto again = task.eval_set(30, 5);
  const auto other = task.eval_set(30, 6);
  for (size_t i = 0; i < eval.size(); ++i) {
    expect_layout(eval[i], o);
    EXPECT_EQ(eval[i].tokens, again[i].tokens);
    EXPECT_NE(eval[i].tokens, other[i].tokens);
    EXPECT_NE(eval[i].tokens, task.sample(i).tokens);  // same seed and index, other stream
  }
}

TEST(DataPasskey, KeysAreUniformOverFiveDigitNumbers) {
  PasskeyOptions o;
  o.seq_len = 160;
  const PasskeyTask task(o);
  const int n = 3000;
  std::set<std::string> keys;
  std::map<char, int> first, last;
  for (int i = 0; i < n; ++i) {
    const std::string key = task.sample(static_cast<uint64_t>(i)).key;
    const int value = std::stoi(key);
    EXPECT_TRUE(value >= 10000 && value <= 99999) << key;
    keys.insert(key);
    ++first[key.front()];
    ++last[key.back()];
  }
  EXPECT_GT(keys.size(), 2900u);  // about 50 repeats expected among 3000 draws from 90000
  EXPECT_EQ(first.size(), 9u);    // 1..9, each expected 333 times
  for (const auto& [digit, count] : first) EXPECT_TRUE(count > 250 && count < 420) << digit << ": " << count;
  EXPECT_EQ(last.size(), 10u);  // 0..9, each expected 300 times
  for (const auto& [digit, count] : last) EXPECT_TRUE(count > 220 && count < 380) << digit << ": " << count;
}

TEST(DataPasskey, NeedleDepthsSpreadOverTheRange) {
  PasskeyOptions o;
  o.seq_len = 1024;
  o.min_depth = 0.2;
  o.max_depth = 0.6;
  const PasskeyTask task(o);
  int bins[4] = {0, 0, 0, 0};
  for (uint64_t i = 0; i < 1000; ++i) {
    const double depth = task.sample(i).depth;
    ASSERT_TRUE(depth >= 0.2 - 1e-3 && depth <= 0.6 + 1e-3) << depth;
    ++bins[std::min(3, static_cast<int>((depth - 0.2) / 0.1))];
  }
  for (int b : bins) EXPECT_TRUE(b > 190 && b < 310) << b;  // 250 expected in each

  o.min_depth = 0.0;
  o.max_depth = 1.0;
  const PasskeyTask full(o);
  double lo = 1.0, hi = 0.0;
  for (uint64_t i = 0; i < 300; ++i) {
    lo = std::min(lo, full.sample(i).depth);
    hi = std::max(hi, full.sample(i).depth);
  }
  EXPECT_LT(lo, 0.05);
  EXPECT_GT(hi, 0.95);

  o.min_depth = o.max_depth = 0.5;  // a fixed depth is one needle position
  const PasskeyTask fixed(o);
  EXPECT_EQ(fixed.sample(1).needle_position, fixed.sample(2).needle_position);
}

TEST(DataPasskey, DistancesRespectMinDistance) {
  PasskeyOptions o;
  o.seq_len = 2048;
  o.min_distance = 1500;
  const PasskeyTask task(o);
  int64_t closest = o.seq_len;
  for (const PasskeySample& s : task.eval_set(300, 1)) {
    EXPECT_GE(s.distance, 1500);
    closest = std::min(closest, s.distance);
  }
  EXPECT_LT(closest, 1520);  // the range runs down to min_distance, not a sentence short of it
}

TEST(DataPasskey, ImpossibleConfigurationsNameTheirValues) {
  const auto message = [](auto edit) {
    PasskeyOptions o;
    edit(o);
    return error_message([&] { PasskeyTask{o}; });
  };
  std::string msg = message([](PasskeyOptions& o) { o.seq_len = 4096; o.min_distance = 5000; });
  EXPECT_NE(msg.find("min_distance 5000"), std::string::npos) << msg;
  EXPECT_NE(msg.find("4096"), std::string::npos) << msg;
  // Reachable distances end a needle and a question short of seq_len, and depth narrows them further.
  msg = message([](PasskeyOptions& o) { o.seq_len = 1024; o.min_distance = 1000; });
  EXPECT_NE(msg.find("min_distance 1000"), std::string::npos) << msg;
  EXPECT_NE(msg.find("seq_len 1024"), std::string::npos) << msg;
  msg = message([](PasskeyOptions& o) { o.seq_len = 1024; o.min_distance = 600; o.min_depth = 0.5; });
  EXPECT_NE(msg.find("min_distance 600"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[0.5, 1]"), std::string::npos) << msg;
  msg = message([](PasskeyOptions& o) { o.min_depth = 0.7; o.max_depth = 0.3; });
  EXPECT_NE(msg.find("[0.7, 0.3]"), std::string::npos) << msg;
  EXPECT_NE(message([](PasskeyOptions& o) { o.digits = 19; }).find("digits 19"), std::string::npos);
  EXPECT_NE(message([](PasskeyOptions& o) { o.digits = 0; }).find("digits 0"), std::string::npos);
}

TEST(DataPasskey, DistanceBucketsDoubleFrom256) {
  EXPECT_EQ(distance_bucket(0).label(), "[0, 256)");
  EXPECT_EQ(distance_bucket(255).label(), "[0, 256)");
  EXPECT_EQ(distance_bucket(256).label(), "[256, 512)");
  EXPECT_EQ(distance_bucket(511).label(), "[256, 512)");
  EXPECT_EQ(distance_bucket(512).label(), "[512, 1024)");
  EXPECT_EQ(distance_bucket(4095).label(), "[2048, 4096)");
  EXPECT_EQ(distance_bucket(4096).label(), "[4096, 8192)");
  EXPECT_LT(distance_bucket(300), distance_bucket(1500));
  EXPECT_THROW(distance_bucket(-1), Error);
}

TEST(DataPasskey, RepeatFillerCyclesThePassageAroundTheNeedle) {
  PasskeyOptions o;
  o.seq_len = 700;
  o.filler = PasskeyOptions::Filler::Repeat;
  const PasskeyTask task(o);
  const std::string passage = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
  for (uint64_t i = 0; i < 20; ++i) {
    const PasskeySample s = task.sample(i);
    ASSERT_EQ(s.tokens.size(), 701u);
    const std::string text = decode(std::span<const int64_t>(s.tokens).subspan(1, s.tokens.size() - 2));
    const size_t needle = text.find("The pass key is " + s.key);
    ASSERT_NE(needle, std::string::npos);
    const std::string needle_end = s.key + " is the pass key. ";
    const size_t after = text.find(needle_end, needle) + needle_end.size();
    const size_t question = text.rfind("What is the pass key?");
    // Filler before the needle is the passage from its start; after it, the passage continues.
    for (size_t k = 0; k < needle; ++k) ASSERT_EQ(text[k], passage[k % passage.size()]) << "sample " << i << " byte " << k;
    for (size_t k = after; k < question; ++k)
      ASSERT_EQ(text[k], passage[(needle + k - after) % passage.size()]) << "sample " << i << " byte " << k;
    EXPECT_EQ(text.substr(question), "What is the pass key? The pass key is " + s.key);
  }
}
