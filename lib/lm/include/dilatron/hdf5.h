// Tensors and attributes in HDF5 files, laid out so h5py reads them as numpy arrays:
//   h5::File f = h5::File::create("ckpt.h5");
//   f.write("model/blocks.0.attn.qkv.weight", w);   // intermediate groups are created
//   f.set_attr("/", "step", 1200);
//   Tensor q = h5::File::open("in.h5").read("q");
// Every failure throws dilatron::Error naming the file, the dataset or attribute, and the cause.
// Datasets (but scalar and empty ones) are written with HDF5's Fletcher32 checksum, verified on every
// read: a corrupted byte is an error naming the file and dataset. Files without it still read.
#pragma once

#include <concepts>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "dilatron/tensor.h"

namespace dilatron::h5 {

enum class Mode { ReadOnly, ReadWrite };

struct DatasetInfo {
  Shape shape;        // {} for a scalar dataset
  std::string dtype;  // the stored type in numpy's words: "float32", "int32", "bool", "string", ...
};

class File {
 public:
  static File create(const std::string& path);  // truncates an existing file
  static File open(const std::string& path, Mode mode = Mode::ReadOnly);

  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();  // closes quietly; call close() to see errors

  const std::string& path() const { return path_; }

  // Stores t's dtype and shape (a 0-d tensor becomes a scalar dataset); CUDA and strided tensors are
  // copied to a dense host buffer first. An existing dataset of that name is replaced.
  void write(const std::string& name, const Tensor& t);
  // A CPU tensor. float32/float64/int64 and h5py's bool read as themselves; float16 reads as float32
  // and narrower integers (int32, uint8, ...) as int64. uint64 is refused: it may not fit in int64.
  Tensor read(const std::string& name) const;
  bool has(const std::string& name) const;  // a dataset (not a group) of that name exists
  DatasetInfo info(const std::string& name) const;
  // Dataset names relative to `group` in name order; recursive descends into subgroups ("a/b/c").
  std::vector<std::string> list(const std::string& group = "/", bool recursive = false) const;

  // Attributes on the root ("/"), a group or a dataset; setting an existing key replaces it.
  // Strings are variable-length UTF-8 (h5py reads a str), numbers int64 or float64 (scalars or 1-D).
  void set_attr(const std::string& object, const std::string& key, const std::string& value);
  void set_attr(const std::string& object, const std::string& key, const char* value) {
    set_attr(object, key, std::string(value));
  }
  void set_attr(const std::string& object, const std::string& key, int64_t value);
  void set_attr(const std::string& object, const std::string& key, double value);
  void set_attr(const std::string& object, const std::string& key, const std::vector<int64_t>& values);
  void set_attr(const std::string& object, const std::string& key, const std::vector<double>& values);
  // A string attribute stored fixed-length, with its checksum beside it: key + kChecksumSuffix, an int64
  // holding the FNV-1a 64 hash of the value. A variable-length string (set_attr) lives in HDF5's global
  // heap, which has no checksum: a flipped byte there reads back as another string, or (in its object
  // sizes) hangs HDF5 1.10's reader. A fixed-length one sits in the attribute, inside HDF5's checksummed
  // metadata; the hash also covers an attribute too large for that (HDF5 stores those apart). h5py
  // reads it as bytes.
  void set_attr_checksummed(const std::string& object, const std::string& key, const std::string& value);
  static constexpr const char* kChecksumSuffix = ".fnv1a64";
  // Other integer types (int, size_t, ...) are stored as int64, so set_attr(o, "step", 5) is unambiguous.
  template <std::integral T>
  void set_attr(const std::string& object, const std::string& key, T value) {
    if constexpr (std::is_unsigned_v<T> && sizeof(T) >= sizeof(int64_t))
      DILATRON_CHECK(value <= static_cast<T>(std::numeric_limits<int64_t>::max()), "attribute '", key, "' of '",
                     object, "' in '", path_, "': ", value, " does not fit in int64");
    set_attr(object, key, static_cast<int64_t>(value));
  }

  bool has_attr(const std::string& object, const std::string& key) const;
  // Strings may be variable- or fixed-length; a string with a stored checksum (set_attr_checksummed) is
  // verified, a mismatch being an Error naming the file and the attribute. get_attr_int takes integer
  // attributes only, get_attr_double integers or floats. The scalar getters accept a scalar or a
  // one-element array.
  std::string get_attr_string(const std::string& object, const std::string& key) const;
  int64_t get_attr_int(const std::string& object, const std::string& key) const;
  double get_attr_double(const std::string& object, const std::string& key) const;
  std::vector<int64_t> get_attr_ints(const std::string& object, const std::string& key) const;
  std::vector<double> get_attr_doubles(const std::string& object, const std::string& key) const;

  void flush();
  void close();  // further calls on this File throw

 private:
  File(std::string path, int64_t id) : path_(std::move(path)), id_(id) {}
  int64_t open_id() const;  // the HDF5 file id; throws when closed
  std::string read_attr_string(const std::string& object, const std::string& key) const;  // unverified

  std::string path_;
  int64_t id_ = -1;  // hid_t (int64_t in HDF5 >= 1.10), kept opaque so users need no HDF5 headers
};

// Writes a complete file or nothing: fill() writes into path + ".tmp.<pid>", which is closed, fsync()ed
// and renamed over path (then the directory is fsync()ed). If anything throws, the temporary file is
// removed and an existing file at path is left as it was.
void atomic_write(const std::string& path, const std::function<void(File&)>& fill);

// Removes the temporaries a killed atomic_write left in dir: <name>.tmp.<pid>, or every *.h5.tmp.<pid>
// when name is empty, whose process is no longer running. Returns the paths removed.
std::vector<std::string> remove_orphaned_temporaries(const std::string& dir, const std::string& name = "");

}  // namespace dilatron::h5
