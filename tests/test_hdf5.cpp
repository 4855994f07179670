// HDF5 tensor files: bit-exact round trips, names, attributes, error messages, atomic writes, h5py interop.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <numbers>

#include "dilatron/hdf5.h"
#include "dilatron/random.h"
#include "test_helpers.h"

using namespace dilatron;
using dilatron::test::error_message;
using dilatron::test::xor_byte;
namespace fs = std::filesystem;

namespace {

// Each test works in a fresh directory of its own, removed afterwards.
class H5Dir : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("dilatron_h5_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

class H5RoundTrip : public H5Dir {};
class H5Names : public H5Dir {};
class H5Attr : public H5Dir {};
class H5Errors : public H5Dir {};
class H5Atomic : public H5Dir {};
class H5Py : public H5Dir {};

void expect_bit_equal(const Tensor& got, const Tensor& want) {
  ASSERT_EQ(got.dtype(), want.dtype());
  ASSERT_EQ(got.shape(), want.shape());
  ASSERT_TRUE(got.device().is_cpu() && got.is_contiguous() && want.is_contiguous());
  if (want.numel() == 0) return;
  const size_t nbytes = static_cast<size_t>(want.numel()) * dtype_size(want.dtype());
  EXPECT_EQ(std::memcmp(got.raw_data(), want.raw_data(), nbytes), 0);
}

// Random normals with values that only a bit-exact path keeps: NaN, -0, infinities, a denormal.
template <typename T>
Tensor awkward_floats(const Shape& shape, Generator& gen) {
  Tensor t = Tensor::randn(shape, gen, dtype_of<T>::value);
  T* p = t.data<T>();
  const T specials[] = {std::numeric_limits<T>::quiet_NaN(), T(-0.0), std::numeric_limits<T>::infinity(),
                        -std::numeric_limits<T>::infinity(), std::numeric_limits<T>::denorm_min()};
  const int64_t n = t.numel(), count = std::min<int64_t>(n, std::size(specials));
  for (int64_t i = 0; i < count; ++i) p[i * 3 % n] = specials[i];
  return t;
}

Tensor bool_pattern(const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::Bool);
  bool* p = t.data<bool>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = (i * 7 % 3) == 0;
  return t;
}

Tensor int64_pattern(const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::Int64);
  int64_t* p = t.data<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = (i - 50) * 1000003;
  if (t.numel() >= 2) {
    p[0] = std::numeric_limits<int64_t>::min();
    p[1] = std::numeric_limits<int64_t>::max();
  }
  return t;
}

// ---------------------------------------------------------------- round trips

TEST_F(H5RoundTrip, AllDtypesAndShapesAreBitExact) {
  Generator gen(11);
  const std::vector<Shape> shapes = {{}, {1}, {13}, {3, 5, 7}, {0, 4}, {2, 1, 3, 1}};
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const std::string s = std::to_string(i);
    tensors.emplace_back("f32_" + s, awkward_floats<float>(shapes[i], gen));
    tensors.emplace_back("f64_" + s, awkward_floats<double>(shapes[i], gen));
    tensors.emplace_back("i64_" + s, int64_pattern(shapes[i]));
    tensors.emplace_back("bool_" + s, bool_pattern(shapes[i]));
  }
  {
    h5::File f = h5::File::create(file("t.h5"));
    for (const auto& [name, t] : tensors) f.write(name, t);
  }
  const h5::File f = h5::File::open(file("t.h5"));
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name + " " + shape_str(t.shape()));
    expect_bit_equal(f.read(name), t);
    const h5::DatasetInfo info = f.info(name);
    EXPECT_EQ(info.shape, t.shape());
    EXPECT_EQ(info.dtype, dtype_name(t.dtype()));
  }
}

TEST_F(H5RoundTrip, StridedTensorIsWrittenInLogicalOrder) {
  Tensor base = Tensor::arange(0, 15, 1, DType::Float64);  // viewed as 3x5, transposed to 5x3
  const Tensor transposed = make_view(base, {5, 3}, {1, 5}, 0);
  ASSERT_FALSE(transposed.is_contiguous());
  {
    h5::File f = h5::File::create(file("t.h5"));
    f.write("t", transposed);
  }
  const Tensor back = h5::File::open(file("t.h5")).read("t");
  ASSERT_EQ(back.shape(), Shape({5, 3}));
  const double* p = back.data<double>();
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 3; ++j) EXPECT_EQ(p[i * 3 + j], static_cast<double>(j * 5 + i));
}

TEST_F(H5RoundTrip, WritingAnExistingNameReplacesIt) {
  {
    h5::File f = h5::File::create(file("t.h5"));
    f.write("model/w", Tensor::ones({2, 3}));
    f.write("model/w", int64_pattern({4}));
  }
  h5::File f = h5::File::open(file("t.h5"), h5::Mode::ReadWrite);
  expect_bit_equal(f.read("model/w"), int64_pattern({4}));
  f.write("model/w", Tensor::full({}, 2.5, DType::Float64));  // and again after reopening
  EXPECT_EQ(f.read("model/w").data<double>()[0], 2.5);
  EXPECT_EQ(f.list("model"), std::vector<std::string>({"w"}));
}

// ---------------------------------------------------------------- names

TEST_F(H5Names, HierarchicalNamesCreateGroupsAndListInNameOrder) {
  h5::File f = h5::File::create(file("t.h5"));
  f.write("model/blocks.0.attn.qkv.weight", Tensor::zeros({3, 2}));
  f.write("model/blocks.0.attn.proj.bias", Tensor::zeros({2}));
  f.write("model/embed/weight", Tensor::zeros({4, 2}));
  f.write("/loss", Tensor::zeros({}));  // a leading slash names the same root

  EXPECT_EQ(f.list(), std::vector<std::string>({"loss"}));
  EXPECT_EQ(f.list("/", true), std::vector<std::string>({"loss", "model/blocks.0.attn.proj.bias",
                                                         "model/blocks.0.attn.qkv.weight", "model/embed/weight"}));
  EXPECT_EQ(f.list("model"), std::vector<std::string>({"blocks.0.attn.proj.bias", "blocks.0.attn.qkv.weight"}));
  EXPECT_EQ(f.list("model", true), std::vector<std::string>({"blocks.0.attn.proj.bias", "blocks.0.attn.qkv.weight",
                                                             "embed/weight"}));
  EXPECT_TRUE(f.has("model/blocks.0.attn.qkv.weight"));
  EXPECT_TRUE(f.has("loss"));
  EXPECT_FALSE(f.has("model"));  // a group, not a dataset
  EXPECT_FALSE(f.has("model/missing"));
  EXPECT_FALSE(f.has("nowhere/at/all"));
  EXPECT_FALSE(f.has("loss/below_a_dataset"));
  EXPECT_EQ(f.info("model/embed/weight").shape, Shape({4, 2}));
  EXPECT_NE(error_message([&] { f.list("loss"); }).find("has no group 'loss'"), std::string::npos);
}

// ---------------------------------------------------------------- attributes

TEST_F(H5Attr, StringsNumbersAndVectorsOnRootGroupsAndDatasets) {
  {
    h5::File f = h5::File::create(file("t.h5"));
    f.write("model/w", Tensor::zeros({2}));
    f.set_attr("/", "name", "dilatron \u03b1\u03b2\u03b3");
    f.set_attr("/", "empty", std::string());
    f.set_attr("/", "step", 5);  // an int literal stores as int64
    f.set_attr("/", "big", std::numeric_limits<int64_t>::min());
    f.set_attr("model", "lr", 3e-4);
    f.set_attr("model/w", "shape", std::vector<int64_t>{2, 3, 4});
    f.set_attr("model/w", "betas", std::vector<double>{0.9, 0.95});
    f.set_attr("model/w", "none", std::vector<double>{});
    f.set_attr("/", "step", 6);                  // replaced, same type
    f.set_attr("model", "lr", "cosine");         // replaced by another type
  }
  const h5::File f = h5::File::open(file("t.h5"));
  EXPECT_EQ(f.get_attr_string("/", "name"), "dilatron \u03b1\u03b2\u03b3");
  EXPECT_EQ(f.get_attr_string("/", "empty"), "");
  EXPECT_EQ(f.get_attr_int("/", "step"), 6);
  EXPECT_EQ(f.get_attr_double("/", "step"), 6.0);  // integers read as doubles too
  EXPECT_EQ(f.get_attr_int("/", "big"), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(f.get_attr_string("model", "lr"), "cosine");
  EXPECT_EQ(f.get_attr_ints("model/w", "shape"), std::vector<int64_t>({2, 3, 4}));
  EXPECT_EQ(f.get_attr_doubles("model/w", "betas"), std::vector<double>({0.9, 0.95}));
  EXPECT_TRUE(f.get_attr_doubles("model/w", "none").empty());
  EXPECT_EQ(f.get_attr_ints("/", "step"), std::vector<int64_t>({6}));
  EXPECT_TRUE(f.has_attr("/", "name"));
  EXPECT_TRUE(f.has_attr("model/w", "shape"));
  EXPECT_FALSE(f.has_attr("/", "shape"));
  EXPECT_FALSE(f.has_attr("no/such/group", "shape"));
}

TEST_F(H5Attr, WrongTypeOrMissingAttributeNamesTheAttribute) {
  h5::File f = h5::File::create(file("t.h5"));
  f.write("w", Tensor::zeros({2}));
  f.set_attr("w", "name", "x");
  f.set_attr("w", "ratio", 0.5);
  f.set_attr("w", "dims", std::vector<int64_t>{1, 2});
  const std::string where = "attribute 'name' of 'w' in '" + file("t.h5") + "'";
  EXPECT_EQ(error_message([&] { f.get_attr_int("w", "name"); }), where + " is string, not an integer");
  EXPECT_EQ(error_message([&] { f.get_attr_double("w", "name"); }), where + " is string, not a number");
  EXPECT_NE(error_message([&] { f.get_attr_int("w", "ratio"); }).find("'ratio' of 'w'"), std::string::npos);
  EXPECT_NE(error_message([&] { f.get_attr_string("w", "ratio"); }).find("is float64, not a string"), std::string::npos);
  EXPECT_NE(error_message([&] { f.get_attr_int("w", "dims"); }).find("holds 2 values, not one"), std::string::npos);
  EXPECT_EQ(error_message([&] { f.get_attr_int("w", "step"); }),
            "'w' in '" + file("t.h5") + "' has no attribute 'step' (attributes: dims, name, ratio)");
  EXPECT_EQ(error_message([&] { f.set_attr("missing", "step", 1); }),
            "'" + file("t.h5") + "' has no group or dataset 'missing' (looking for attribute 'step')");
  EXPECT_NE(error_message([&] { f.set_attr("w", "bad", std::string("a\0b", 3)); }).find("NUL"), std::string::npos);
}

// ---------------------------------------------------------------- errors

TEST_F(H5Errors, MissingFile) {
  EXPECT_EQ(error_message([&] { h5::File::open(file("x.h5")); }), "cannot open '" + file("x.h5") + "': no such file");
}

TEST_F(H5Errors, NotAnHdf5File) {
  std::ofstream(file("x.txt")) << "q,k,v\n1,2,3\n";
  EXPECT_EQ(error_message([&] { h5::File::open(file("x.txt")); }), "'" + file("x.txt") + "' is not an HDF5 file");
  EXPECT_EQ(error_message([&] { h5::File::open(dir_.string()); }), "cannot open '" + dir_.string() + "': it is a directory");
}

TEST_F(H5Errors, MissingDatasetListsWhatIsThere) {
  {
    h5::File f = h5::File::create(file("in.h5"));
    f.write("k", Tensor::zeros({2}));
    f.write("v", Tensor::zeros({2}));
  }
  const h5::File f = h5::File::open(file("in.h5"));
  EXPECT_EQ(error_message([&] { f.read("q"); }), "'" + file("in.h5") + "' has no dataset 'q' (datasets: k, v)");
  EXPECT_EQ(error_message([&] { f.info("k/q"); }), "'" + file("in.h5") + "' has no dataset 'k/q' (datasets: k, v)");
  const h5::File empty = h5::File::create(file("empty.h5"));
  EXPECT_EQ(error_message([&] { empty.read("q"); }),
            "'" + file("empty.h5") + "' has no dataset 'q' (the file has no datasets)");
}

TEST_F(H5Errors, TruncatedFileThrowsNamingTheFile) {
  Generator gen(3);
  {
    h5::File f = h5::File::create(file("t.h5"));
    f.write("q", Tensor::randn({64, 64}, gen));
    f.set_attr("/", "step", 1);
  }
  fs::resize_file(file("t.h5"), fs::file_size(file("t.h5")) / 2);
  const std::string msg = error_message([&] { h5::File::open(file("t.h5")).read("q"); });
  EXPECT_NE(msg.find("'" + file("t.h5") + "'"), std::string::npos) << msg;
}

TEST_F(H5Errors, WritesToReadOnlyOrClosedFilesAndOverGroupsAreRefused) {
  {
    h5::File f = h5::File::create(file("t.h5"));
    f.write("g/w", Tensor::zeros({2}));
    EXPECT_EQ(error_message([&] { f.write("g", Tensor::zeros({2})); }),
              "cannot write dataset 'g' to '" + file("t.h5") + "': a group of that name exists");
    EXPECT_EQ(error_message([&] { f.write("g/w/below", Tensor::zeros({2})); }),
              "cannot write dataset 'g/w/below' to '" + file("t.h5") + "': 'g/w' is a dataset, not a group");
    f.close();
    EXPECT_EQ(error_message([&] { f.read("g/w"); }), "'" + file("t.h5") + "' is closed");
  }
  h5::File f = h5::File::open(file("t.h5"));
  EXPECT_EQ(error_message([&] { f.write("x", Tensor::zeros({2})); }),
            "cannot write dataset 'x' to '" + file("t.h5") + "': the file is open read-only");
  EXPECT_NE(error_message([&] { f.set_attr("/", "step", 1); }).find("read-only"), std::string::npos);
  const std::string nowhere = file("no/such/dir/t.h5");
  EXPECT_NE(error_message([&] { h5::File::create(nowhere); }).find("cannot create '" + nowhere + "'"), std::string::npos);
}

// Where `bytes` first occurs in the file, or npos.
size_t find_bytes(const std::string& path, const void* bytes, size_t n) {
  std::ifstream in(path, std::ios::binary);
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return data.find(std::string(static_cast<const char*>(bytes), n));
}

TEST_F(H5Errors, FlippedDataBytesAreRefusedNamingTheDataset) {
  // Every flip inside a dataset's stored values changes a value; the Fletcher32 checksum refuses each.
  const std::string path = file("data.h5");
  Generator gen(3);
  const Tensor w = Tensor::randn({64, 16}, gen);
  {
    h5::File f = h5::File::create(path);
    f.write("model/w", w);
    f.write("other", Tensor::ones({5}));
  }
  const size_t nbytes = static_cast<size_t>(w.numel()) * sizeof(float);
  const size_t at = find_bytes(path, w.raw_data(), nbytes);
  ASSERT_NE(at, std::string::npos) << "the values of model/w are not stored verbatim";
  const std::string clean = path + ".clean";
  fs::copy_file(path, clean);
  for (size_t i = 0; i < nbytes; i += 13) {
    fs::copy_file(clean, path, fs::copy_options::overwrite_existing);
    xor_byte(path, at + i, 0xff);
    const h5::File f = h5::File::open(path);
    const std::string msg = error_message([&] { f.read("model/w"); });
    ASSERT_NE(msg.find("'model/w'"), std::string::npos) << "byte " << i << ": " << msg;
    ASSERT_NE(msg.find(path), std::string::npos) << msg;
    ASSERT_NE(msg.find("Fletcher32"), std::string::npos) << msg;
    EXPECT_EQ(f.read("other").to_vector<float>(), std::vector<float>(5, 1.0f));  // the rest still reads
  }
}

// Flips every byte of the file at path outside the stored values of `datasets` (each written as
// name -> tensor) in turn, and returns the offsets where read_all() ran without an error but returned
// false (read something other than what was written); the values have the Fletcher32 test.
template <typename ReadAll>
std::vector<size_t> silent_flips(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& datasets,
                                 const ReadAll& read_all) {
  std::vector<bool> values(fs::file_size(path), false);
  for (const auto& [name, t] : datasets) {
    // Row by row: the chunks of a large dataset (one row each) need not be adjacent.
    const size_t row = static_cast<size_t>(t.numel() / t.shape()[0]) * sizeof(float);
    for (int64_t r = 0; r < t.shape()[0]; ++r) {
      const size_t at = find_bytes(path, static_cast<const char*>(t.raw_data()) + static_cast<size_t>(r) * row, row);
      EXPECT_NE(at, std::string::npos) << name << " is not stored verbatim";
      if (at == std::string::npos) return {};
      std::fill(values.begin() + static_cast<std::ptrdiff_t>(at), values.begin() + static_cast<std::ptrdiff_t>(at + row), true);
    }
  }
  EXPECT_TRUE(read_all());
  std::vector<size_t> silent;
  size_t refused = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    if (values[i]) continue;
    xor_byte(path, i, 0xff);
    try {
      if (!read_all()) silent.push_back(i);
    } catch (const Error&) {
      ++refused;
    }
    xor_byte(path, i, 0xff);  // back
  }
  EXPECT_GT(refused, 0u);
  return silent;
}

// Every byte of a file outside the stored values (superblock, object headers, attributes, chunk
// indexes, free space), flipped in turn: each read either fails or returns exactly what was written,
// and (under AddressSanitizer) HDF5 makes no memory error on the way. In the 1.8 format a flip in a
// chunk's version-1 B-tree key read that dataset as zeros; with a group's links or the root's
// attributes in dense storage (more than 8), HDF5 freed uninitialised pointers listing the group.
TEST_F(H5Errors, EveryFlippedMetadataByteIsRefusedOrHarmless) {
  Generator gen(5);
  // As in a checkpoint: a group of 12 datasets of one chunk each (indexed in the dataset's header),
  // and 12 root attributes, one of them a checksummed string.
  const std::string path = file("ckpt.h5");
  std::vector<std::pair<std::string, Tensor>> datasets = {{"model/a.weight", Tensor::randn({4, 8}, gen)},
                                                          {"optimizer/a.weight/m", Tensor::randn({4, 8}, gen)}};
  for (int i = 0; i < 11; ++i) datasets.emplace_back("model/b" + std::to_string(i) + ".bias", Tensor::randn({3}, gen));
  const std::string config = "[train]\nlr = 0.003\n";
  {
    h5::File f = h5::File::create(path);
    for (const auto& [name, t] : datasets) f.write(name, t);
    f.set_attr_checksummed("/", "config", config);
    for (int64_t i = 0; i < 10; ++i) f.set_attr("/", "step" + std::to_string(i), i);
  }
  std::vector<size_t> silent = silent_flips(path, datasets, [&] {
    const h5::File f = h5::File::open(path);
    if (f.list("model", true).size() != 12) return false;  // iterates the group's links
    for (const auto& [name, t] : datasets)
      if (f.read(name).to_vector<float>() != t.to_vector<float>()) return false;
    for (int64_t i = 0; i < 10; ++i)
      if (f.get_attr_int("/", "step" + std::to_string(i)) != i) return false;
    return f.get_attr_string("/", "config") == config;
  });
  EXPECT_TRUE(silent.empty()) << silent.size() << " flipped bytes read back as other values without an error, "
                              << "the first at offset " << silent.front();
  // Two chunks of 1 MiB: indexed in a fixed array.
  const std::string big_path = file("big.h5");
  const std::vector<std::pair<std::string, Tensor>> big = {{"big", Tensor::randn({2, 1 << 18}, gen)}};
  h5::File::create(big_path).write("big", big[0].second);
  silent = silent_flips(big_path, big, [&] {
    return h5::File::open(big_path).read("big").to_vector<float>() == big[0].second.to_vector<float>();
  });
  EXPECT_TRUE(silent.empty()) << silent.size() << " flipped bytes of a two-chunk dataset read back as other "
                              << "values without an error, the first at offset " << silent.front();
}

// set_attr_checksummed keeps the string in the attribute, inside HDF5's checksummed metadata, and its
// FNV-1a 64 hash beside it: a flipped byte of the value is refused (by HDF5's checksum), and so is a value
// that does not match its hash (a corruption HDF5 cannot see). A variable-length string (set_attr) lives
// in the global heap, without a checksum: it reads back flipped, as it does from older files.
TEST_F(H5Errors, ChecksummedStringAttributesRefuseCorruption) {
  const std::string path = file("attrs.h5");
  const std::string config = "[train]\nlr = 0.003\nsteps = 40\nnote = \"\u00e9\"\n", plain = "[model]\nd_ff = 64\n";
  {
    h5::File f = h5::File::create(path);
    f.set_attr_checksummed("/", "config", config);
    f.set_attr_checksummed("/", "empty", "");
    f.set_attr("/", "plain", plain);
  }
  {
    const h5::File f = h5::File::open(path);
    EXPECT_EQ(f.get_attr_string("/", "config"), config);
    EXPECT_EQ(f.get_attr_string("/", "empty"), "");
    EXPECT_TRUE(f.has_attr("/", std::string("config") + h5::File::kChecksumSuffix));
  }
  const std::string clean = path + ".clean";
  fs::copy_file(path, clean);
  const size_t at = find_bytes(path, config.data(), config.size());
  ASSERT_NE(at, std::string::npos) << "the string is not stored verbatim";
  for (size_t i = 0; i < config.size(); ++i) {
    xor_byte(path, at + i, 0xff);
    const std::string msg = error_message([&] { h5::File::open(path).get_attr_string("/", "config"); });
    EXPECT_NE(msg.find("in '" + path + "'"), std::string::npos) << "byte " << i << ": " << msg;
    EXPECT_NE(msg.find("checksum"), std::string::npos) << "byte " << i << ": " << msg;
    xor_byte(path, at + i, 0xff);  // back
  }
  {
    h5::File f = h5::File::open(path, h5::Mode::ReadWrite);
    f.set_attr("/", std::string("config") + h5::File::kChecksumSuffix, int64_t{12345});
  }
  EXPECT_EQ(error_message([&] { h5::File::open(path).get_attr_string("/", "config"); }),
            "attribute 'config' of '/' in '" + path + "' does not match its checksum ('config.fnv1a64'): the file "
            "is corrupted");
  fs::copy_file(clean, path, fs::copy_options::overwrite_existing);
  xor_byte(path, find_bytes(path, plain.data(), plain.size()) + 15, 0xff);
  std::string flipped = plain;
  flipped[15] = static_cast<char>(flipped[15] ^ 0xff);
  EXPECT_EQ(h5::File::open(path).get_attr_string("/", "plain"), flipped);  // nothing to check it by
}

// ---------------------------------------------------------------- atomic_write

TEST_F(H5Atomic, ReplacesTheFileAndLeavesNoTemporary) {
  const std::string path = file("ckpt.h5");
  h5::atomic_write(path, [](h5::File& f) { f.write("step", Tensor::full({}, 1, DType::Int64)); });
  h5::atomic_write(path, [](h5::File& f) { f.write("step", Tensor::full({}, 2, DType::Int64)); });
  EXPECT_EQ(h5::File::open(path).read("step").data<int64_t>()[0], 2);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

TEST_F(H5Atomic, FailedFillLeavesTheOldFileIntact) {
  const std::string path = file("ckpt.h5");
  h5::atomic_write(path, [](h5::File& f) { f.write("old", Tensor::ones({3})); });
  const auto old_size = fs::file_size(path);
  EXPECT_THROW(h5::atomic_write(path,
                                [](h5::File& f) {
                                  f.write("new", Tensor::zeros({1000}));
                                  throw std::runtime_error("disk full, say");
                                }),
               std::runtime_error);
  EXPECT_EQ(fs::file_size(path), old_size);
  const h5::File f = h5::File::open(path);
  EXPECT_EQ(f.list(), std::vector<std::string>({"old"}));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);  // no ckpt.h5.tmp.<pid>
}

TEST_F(H5Atomic, OrphanedTemporariesOfDeadProcessesAreRemoved) {
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ASSERT_GT(dead, 0);
  ::waitpid(dead, nullptr, 0);  // reaped: no process has this pid now
  const std::string mine = std::to_string(::getpid()), gone = std::to_string(dead);
  for (const std::string& name : {"a.h5.tmp." + gone, "a.h5.tmp." + mine, "b.h5.tmp." + gone, "notes.tmp." + gone,
                                  "a.h5.tmp.x" + gone})
    std::ofstream(file(name)) << "partial";
  EXPECT_EQ(h5::remove_orphaned_temporaries(dir_.string(), "a.h5"), std::vector<std::string>{file("a.h5.tmp." + gone)});
  EXPECT_TRUE(fs::exists(file("b.h5.tmp." + gone)));  // another file's
  EXPECT_EQ(h5::remove_orphaned_temporaries(dir_.string()), std::vector<std::string>{file("b.h5.tmp." + gone)});
  EXPECT_TRUE(fs::exists(file("a.h5.tmp." + mine)));  // its writer (this process) is running
  EXPECT_TRUE(fs::exists(file("notes.tmp." + gone)));  // not an HDF5 temporary
  EXPECT_TRUE(fs::exists(file("a.h5.tmp.x" + gone)));
}

// ---------------------------------------------------------------- h5py

// Debian's python3 (where python3-h5py installs), not whatever python3 is first on PATH.
constexpr const char* kPython = "/usr/bin/python3";

TEST_F(H5Py, ReadsWhatWeWriteAndWeReadWhatItWrites) {
  if (std::system((std::string(kPython) + " -c 'import h5py' >/dev/null 2>&1").c_str()) != 0)
    GTEST_SKIP() << kPython << " cannot import h5py (install python3-h5py to run this test)";

  {
    h5::File f = h5::File::create(file("ours.h5"));
    Tensor x = Tensor::empty({2, 3, 4});
    for (int64_t i = 0; i < 24; ++i) x.data<float>()[i] = static_cast<float>(i) * 0.25f - 3.0f;  // as the script
    f.write("tensors/x", x);
    Tensor mask = Tensor::empty({5}, DType::Bool);
    const bool mask_values[] = {true, false, false, true, true};
    std::memcpy(mask.data<bool>(), mask_values, sizeof(mask_values));
    f.write("mask", mask);
    f.write("ids", Tensor::from_vector<int64_t>({std::numeric_limits<int64_t>::min(), 0,
                                                 std::numeric_limits<int64_t>::max()}, {3}));
    f.write("scale", Tensor::full({}, 0.125, DType::Float64));
    f.write("empty", Tensor::empty({0, 4}));
    f.set_attr("/", "name", "dilatron \u2713");
    f.set_attr("/", "step", 7);
    f.set_attr("/", "lr", 3e-4);
    f.set_attr("/", "dims", std::vector<int64_t>{2, 3, 4});
    f.set_attr("tensors/x", "unit", "m/s");
  }
  const std::string script = std::string(DILATRON_SOURCE_DIR) + "/tests/h5py_roundtrip.py";
  const std::string command =
      std::string(kPython) + " '" + script + "' '" + file("ours.h5") + "' '" + file("theirs.h5") + "'";
  ASSERT_EQ(std::system(command.c_str()), 0) << "h5py_roundtrip.py rejected our file (its message is above)";

  const h5::File f = h5::File::open(file("theirs.h5"));
  expect_bit_equal(f.read("f32"), Tensor::from_vector<float>({1.5f, -2.0f, 0.0f, 3.25f, 1e-3f, -7.0f}, {3, 2}));
  expect_bit_equal(f.read("f64"), Tensor::from_vector<double>({std::numbers::pi, -std::numbers::e, 1e300}, {3}));
  expect_bit_equal(f.read("i64"), Tensor::from_vector<int64_t>({-(int64_t{1} << 62), 5, 7, int64_t{1} << 62}, {2, 2}));
  expect_bit_equal(f.read("i32"), Tensor::from_vector<int64_t>({-(int64_t{1} << 31), (int64_t{1} << 31) - 1, 0}, {3}));
  expect_bit_equal(f.read("u8"), Tensor::from_vector<int64_t>({0, 200, 255}, {3}));
  expect_bit_equal(f.read("f16"), Tensor::from_vector<float>({0.5f, -1.25f, 2048.0f}, {3}));
  expect_bit_equal(f.read("group/nested"), Tensor::full({}, 2.5));
  const Tensor flags = f.read("flags");
  ASSERT_EQ(flags.dtype(), DType::Bool);
  ASSERT_EQ(flags.shape(), Shape({3}));
  EXPECT_TRUE(flags.data<bool>()[0] && !flags.data<bool>()[1] && flags.data<bool>()[2]);
  EXPECT_EQ(f.info("i32").dtype, "int32");
  EXPECT_EQ(f.info("f16").dtype, "float16");
  EXPECT_EQ(f.info("flags").dtype, "bool");
  EXPECT_EQ(f.info("words").dtype, "string");

  EXPECT_EQ(error_message([&] { f.read("u64"); }),
            "dataset 'u64' in '" + file("theirs.h5") +
                "' has type uint64, which does not read as a tensor "
                "(supported: float16/32/64, integers up to int64, bool)");
  EXPECT_NE(error_message([&] { f.read("words"); }).find("dataset 'words' in '" + file("theirs.h5") + "' has type string"),
            std::string::npos);

  EXPECT_EQ(f.get_attr_string("/", "note"), "written by h5py \u00e9");
  EXPECT_EQ(f.get_attr_string("/", "fixed"), "fixed-length");
  EXPECT_EQ(f.get_attr_int("/", "count"), 12);
  EXPECT_EQ(f.get_attr_double("/", "ratio"), 0.75);
  EXPECT_EQ(f.get_attr_ints("/", "sizes"), std::vector<int64_t>({3, 1, 4}));
}

}  // namespace
