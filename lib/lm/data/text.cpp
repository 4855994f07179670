// Byte-level tokens and text-file datasets.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "dilatron/data.h"
#include "dilatron/error.h"

namespace dilatron::data {

std::vector<int64_t> encode(std::string_view text) {
  return std::vector<int64_t>(reinterpret_cast<const unsigned char*>(text.data()),
                              reinterpret_cast<const unsigned char*>(text.data()) + text.size());
}

std::string decode(std::span<const int64_t> ids) {
  std::string text;
  text.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids[i];
    if (id >= 0 && id < 256) {
      text.push_back(static_cast<char>(id));
    } else if (id == kBos) {
      text += "<bos>";
    } else if (id == kEos) {
      text += "<eos>";
    } else if (id == kPad) {
      text += "<pad>";
    } else {
      throw Error(detail::concat("decode: token id ", id, " at position ", i, " is outside the vocabulary [0, ",
                                 vocab_size(), ")"));
    }
  }
  return text;
}

const char* split_name(Split split) { return split == Split::Train ? "train" : "validation"; }

namespace {

// Offset of the first byte that does not begin a well-formed UTF-8 sequence (Unicode table 3-7: no
// overlong forms, no surrogates, nothing above U+10FFFF), or -1 when all of `s` is well formed.
int64_t first_invalid_utf8(std::string_view s) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = b[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return static_cast<int64_t>(i);
    }
    if (i + len > n || b[i + 1] < lo || b[i + 1] > hi) return static_cast<int64_t>(i);
    for (size_t k = 2; k < len; ++k)
      if (b[i + k] < 0x80 || b[i + k] > 0xBF) return static_cast<int64_t>(i);
    i += len;
  }
  return -1;
}

// Copies bytes [start, start + length) out as ids.
void write_window(std::string_view bytes, int64_t start, int64_t length, int64_t* out) {
  const auto* b = reinterpret_cast<const unsigned char*>(bytes.data()) + start;
  std::copy(b, b + length, out);
}

}  // namespace

TextDataset::TextDataset(std::string path, double val_fraction) : path_(std::move(path)) {
  DILATRON_CHECK(val_fraction >= 0.0 && val_fraction < 1.0, "TextDataset '", path_, "': val_fraction ",
                 val_fraction, " is outside [0, 1)");
  // A directory opens as a stream and fails only on reading, as "basic_filebuf::underflow".
  DILATRON_CHECK(!std::filesystem::is_directory(path_), "text file '", path_, "' is a directory, not a file");
  std::ifstream in(path_, std::ios::binary);
  DILATRON_CHECK(in, "cannot open text file '", path_, "': ", std::strerror(errno));
  bytes_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  DILATRON_CHECK(!in.bad(), "cannot read text file '", path_, "'");
  DILATRON_CHECK(!bytes_.empty(), "text file '", path_, "' is empty");
  const int64_t bad = first_invalid_utf8(bytes_);
  if (bad >= 0) {
    char byte[8];
    std::snprintf(byte, sizeof byte, "0x%02X", static_cast<unsigned char>(bytes_[bad]));
    throw Error(detail::concat("text file '", path_, "' is not UTF-8: invalid byte ", byte, " at offset ", bad));
  }
  const auto total = static_cast<int64_t>(bytes_.size());
  train_size_ = total - std::llround(val_fraction * static_cast<double>(total));
}

int64_t TextDataset::size(Split split) const {
  return split == Split::Train ? train_size_ : static_cast<int64_t>(bytes_.size()) - train_size_;
}

std::string_view TextDataset::split_bytes(Split split) const {
  const std::string_view all = bytes_;
  return split == Split::Train ? all.substr(0, train_size_) : all.substr(train_size_);
}

void TextDataset::check_window_fits(Split split, int64_t seq_len) const {
  DILATRON_CHECK(seq_len >= 1, "TextDataset '", path_, "': seq_len ", seq_len, " must be at least 1");
  DILATRON_CHECK(size(split) >= seq_len + 1, "text file '", path_, "': the ", split_name(split), " split has ",
                 size(split), " bytes, fewer than one window of seq_len + 1 = ", seq_len + 1);
}

Tensor TextDataset::sample_batch(Split split, int64_t batch, int64_t seq_len, Generator& gen) const {
  DILATRON_CHECK(batch >= 1, "TextDataset::sample_batch: batch ", batch, " must be at least 1");
  check_window_fits(split, seq_len);
  const std::string_view bytes = split_bytes(split);
  const auto starts = static_cast<uint64_t>(size(split) - seq_len);
  Tensor out = Tensor::empty({batch, seq_len + 1}, DType::Int64);
  int64_t* rows = out.data<int64_t>();
  for (int64_t r = 0; r < batch; ++r)
    write_window(bytes, static_cast<int64_t>(gen.next_below(starts)), seq_len + 1, rows + r * (seq_len + 1));
  return out;
}

int64_t TextDataset::num_windows(Split split, int64_t seq_len) const {
  check_window_fits(split, seq_len);
  return (size(split) - 1) / seq_len;
}

Tensor TextDataset::windows(Split split, int64_t seq_len, int64_t first, int64_t count) const {
  const int64_t total = num_windows(split, seq_len);
  DILATRON_CHECK(first >= 0 && count >= 1 && first + count <= total, "TextDataset '", path_, "': windows [", first,
                 ", ", first + count, ") are not within the ", total, " ", split_name(split),
                 " windows of seq_len ", seq_len);
  const std::string_view bytes = split_bytes(split);
  Tensor out = Tensor::empty({count, seq_len + 1}, DType::Int64);
  int64_t* rows = out.data<int64_t>();
  for (int64_t k = 0; k < count; ++k)
    write_window(bytes, (first + k) * seq_len, seq_len + 1, rows + k * (seq_len + 1));
  return out;
}

}  // namespace dilatron::data
