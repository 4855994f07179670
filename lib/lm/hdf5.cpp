// HDF5 tensor files through the C API. Every HDF5 identifier lives in an Id that closes it, so a
// throw never leaks one (a leaked id would keep H5Fclose from really closing the file).
#include "dilatron/hdf5.h"

#include <hdf5.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <utility>

#include "dilatron/fileio.h"

namespace dilatron::h5 {

static_assert(std::is_same_v<hid_t, int64_t>, "File keeps its hid_t in an int64_t");

namespace {

using detail::concat;

// Before any other HDF5 call. HDF5 prints its error stack to stderr by default; we report through
// dilatron::Error instead. And no exit handler: after a failed H5Fclose (a full disk) HDF5 keeps the
// half-closed file, and its handler crashed closing it again at exit. Every File is closed by its owner.
void init_hdf5() {
  static const bool no_atexit = [] { return H5dont_atexit() >= 0; }();
  (void)no_atexit;
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

// The innermost entry of HDF5's error stack, the most specific cause ("truncated file: eof = ...").
// Must run before the next HDF5 call, which clears the stack.
std::string hdf5_reason() {
  std::string reason;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* err, void* out) -> herr_t {
        if (n == 0 && err->desc != nullptr) *static_cast<std::string*>(out) = err->desc;
        return 0;
      },
      &reason);
  return reason;
}

// For a failed HDF5 call: our description of what failed, then HDF5's reason.
template <typename... Args>
[[noreturn]] void throw_hdf5(const Args&... what) {
  const std::string reason = hdf5_reason();
  throw Error(concat(what..., reason.empty() ? "" : ": ", reason));
}

template <typename... Args>
void check(herr_t status, const Args&... what) {
  if (status < 0) throw_hdf5(what...);
}

// An owned HDF5 identifier, closed with the matching H5*close on scope exit.
class Id {
 public:
  Id(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Id(Id&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)), close_(other.close_) {}
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  Id& operator=(Id&&) = delete;
  ~Id() {
    if (id_ >= 0) close_(id_);
  }
  operator hid_t() const { return id_; }  // NOLINT: passed straight to H5* calls
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

template <typename... Args>
Id checked(hid_t id, herr_t (*close)(hid_t), const Args&... what) {
  if (id < 0) throw_hdf5(what...);
  return Id(id, close);
}

// ---------------------------------------------------------------- types and shapes

// h5py's bool: an 8-bit enum {FALSE = 0, TRUE = 1}. It is also the in-memory type of DType::Bool
// (one byte holding 0 or 1), so bool tensors read and write without conversion.
Id bool_type() {
  Id type = checked(H5Tenum_create(H5T_STD_I8LE), H5Tclose, "cannot create the HDF5 bool type");
  const int8_t no = 0, yes = 1;
  check(H5Tenum_insert(type, "FALSE", &no), "cannot create the HDF5 bool type");
  check(H5Tenum_insert(type, "TRUE", &yes), "cannot create the HDF5 bool type");
  return type;
}

bool is_bool_enum(hid_t type) {
  if (H5Tget_class(type) != H5T_ENUM || H5Tget_size(type) != 1 || H5Tget_nmembers(type) != 2) return false;
  int8_t no = -1, yes = -1;
  return H5Tenum_valueof(type, "FALSE", &no) >= 0 && H5Tenum_valueof(type, "TRUE", &yes) >= 0 && no == 0 &&
         yes == 1;
}

Id copy_type(hid_t predefined) { return checked(H5Tcopy(predefined), H5Tclose, "cannot copy an HDF5 type"); }

// A 2-byte float's bit layout: {sign position, exponent position, size, mantissa position, size, bias}.
struct FloatLayout {
  size_t sign, exp_pos, exp_size, mant_pos, mant_size, bias;
  bool operator==(const FloatLayout&) const = default;
};
constexpr FloatLayout kBFloat16Layout{15, 7, 8, 0, 7, 127};
constexpr FloatLayout kFloat16Layout{15, 10, 5, 0, 10, 15};  // IEEE half, as h5py stores numpy's float16

std::optional<FloatLayout> float16_layout(hid_t type) {
  if (H5Tget_class(type) != H5T_FLOAT || H5Tget_size(type) != 2) return std::nullopt;
  FloatLayout l{};
  check(H5Tget_fields(type, &l.sign, &l.exp_pos, &l.exp_size, &l.mant_pos, &l.mant_size),
        "cannot read the fields of an HDF5 float type");
  l.bias = H5Tget_ebias(type);
  return l;
}

// bfloat16 as HDF5 sees it: float32's top half, a custom float type that HDF5 converts to other
// floats, so h5py or PyTorch users read it as float32 (a float32 memory type) and round it back.
Id bfloat16_type() {
  Id type = copy_type(H5T_IEEE_F32LE);
  const char* what = "cannot create the HDF5 bfloat16 type";
  check(H5Tset_fields(type, kBFloat16Layout.sign, kBFloat16Layout.exp_pos, kBFloat16Layout.exp_size,
                      kBFloat16Layout.mant_pos, kBFloat16Layout.mant_size), what);
  check(H5Tset_size(type, 2), what);
  check(H5Tset_ebias(type, kBFloat16Layout.bias), what);
  return type;
}

// The HDF5 type of a dtype: little-endian in the file (what h5py writes on x86), native in memory.
Id hdf5_type(DType dtype, bool in_file) {
  switch (dtype) {
    case DType::Float32: return copy_type(in_file ? H5T_IEEE_F32LE : H5T_NATIVE_FLOAT);
    case DType::Float64: return copy_type(in_file ? H5T_IEEE_F64LE : H5T_NATIVE_DOUBLE);
    case DType::Int64: return copy_type(in_file ? H5T_STD_I64LE : H5T_NATIVE_INT64);
    case DType::Bool: return bool_type();
    case DType::BFloat16: return bfloat16_type();  // the same bits in the file and in memory
  }
  throw Error(concat("no HDF5 type for dtype ", dtype_name(dtype)));
}

// Variable-length strings: what h5py writes for a Python str.
Id vlen_string_type(H5T_cset_t cset) {
  Id type = copy_type(H5T_C_S1);
  check(H5Tset_size(type, H5T_VARIABLE), "cannot create an HDF5 string type");
  check(H5Tset_cset(type, cset), "cannot create an HDF5 string type");
  return type;
}

// A stored type in numpy's words, for DatasetInfo and error messages.
std::string type_name(hid_t type) {
  const std::string bits = std::to_string(8 * H5Tget_size(type));
  switch (H5Tget_class(type)) {
    case H5T_FLOAT: {
      const auto layout = float16_layout(type);
      if (layout == kBFloat16Layout) return "bfloat16";
      if (layout && *layout != kFloat16Layout) return "float16 of an unknown bit layout";
      return "float" + bits;
    }
    case H5T_INTEGER: return (H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + bits;
    case H5T_ENUM: return is_bool_enum(type) ? "bool" : "enum";
    case H5T_STRING: return "string";
    case H5T_COMPOUND: return "compound";
    case H5T_ARRAY: return "array";
    case H5T_VLEN: return "vlen";
    case H5T_OPAQUE: return "opaque";
    case H5T_BITFIELD: return "bitfield";
    case H5T_REFERENCE: return "reference";
    default: return "unknown";
  }
}

// The dtype a stored type reads as without loss; none for uint64 (may not fit in int64), wider
// floats, strings and compounds.
std::optional<DType> readable_dtype(hid_t type) {
  const size_t size = H5Tget_size(type);
  switch (H5Tget_class(type)) {
    case H5T_FLOAT:
      // A 2-byte float of another layout is no type we know (a mislabelled half, say): refused, not guessed.
      if (const auto layout = float16_layout(type)) {
        if (*layout == kBFloat16Layout) return DType::BFloat16;
        if (*layout != kFloat16Layout) return std::nullopt;
      }
      if (size <= 4) return DType::Float32;
      if (size <= 8) return DType::Float64;
      return std::nullopt;
    case H5T_INTEGER:
      if (size < 8 || (size == 8 && H5Tget_sign(type) != H5T_SGN_NONE)) return DType::Int64;
      return std::nullopt;
    case H5T_ENUM:
      if (is_bool_enum(type)) return DType::Bool;
      return std::nullopt;
    default: return std::nullopt;
  }
}

Id dataspace(const Shape& shape) {
  if (shape.empty()) return checked(H5Screate(H5S_SCALAR), H5Sclose, "cannot create a scalar HDF5 dataspace");
  const std::vector<hsize_t> dims(shape.begin(), shape.end());
  return checked(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose,
                 "cannot create an HDF5 dataspace of shape ", shape_str(shape));
}

// A dataset's shape ({} when scalar); `where` names it for the error a null dataspace (no data) gets.
Shape shape_of(hid_t space, const std::string& where) {
  const H5S_class_t kind = H5Sget_simple_extent_type(space);
  if (kind == H5S_SCALAR) return {};
  DILATRON_CHECK(kind == H5S_SIMPLE, where, " has no data (a null dataspace)");
  std::vector<hsize_t> dims(static_cast<size_t>(H5Sget_simple_extent_ndims(space)));
  check(H5Sget_simple_extent_dims(space, dims.data(), nullptr), "cannot read the shape of ", where);
  return Shape(dims.begin(), dims.end());
}

// A tensor to read `where` into. A stored shape too large to count in bytes or to allocate (a corrupted or
// hostile file) is an error naming the dataset, not an overflow or an anonymous out-of-memory error.
Tensor empty_for(const Shape& shape, DType dtype, const std::string& where) {
  uint64_t bytes = dtype_size(dtype);
  for (const int64_t d : shape)
    DILATRON_CHECK(!__builtin_mul_overflow(bytes, static_cast<uint64_t>(d), &bytes) &&
                       bytes <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                   "cannot read ", where, ": its shape ", shape_str(shape), " is too large");
  try {
    return Tensor::empty(shape, dtype);
  } catch (const Error& e) {
    throw Error(concat("cannot read ", where, " of shape ", shape_str(shape), ": ", e.what()));
  }
}

// Creation properties (file, group or dataset) that keep an object's links and attributes in its header
// ("compact" storage) however many there are. The header is checksummed and read whole; dense storage (a
// fractal heap and a B-tree) is read piece by piece, and when a block of it fails its checksum in the
// middle of an iteration HDF5 1.10.8 frees uninitialised pointers (listing a checkpoint's /model with one
// flipped byte crashed under AddressSanitizer). An attribute too large for a header still goes to dense
// storage: HDF5 moves it there.
Id compact_props(hid_t create_class, const std::string& what) {
  Id props = checked(H5Pcreate(create_class), H5Pclose, what);
  constexpr unsigned kMaxCompact = 65535;  // HDF5's ceiling
  if (create_class != H5P_DATASET_CREATE) check(H5Pset_link_phase_change(props, kMaxCompact, kMaxCompact), what);
  check(H5Pset_attr_phase_change(props, kMaxCompact, kMaxCompact), what);
  return props;
}

// Dataset creation properties: chunked with HDF5's Fletcher32 checksum, which H5Dread verifies, so a
// flipped byte is refused instead of read. Scalar and empty datasets cannot be chunked and stay plain.
Id checksummed_layout(const Shape& shape, size_t elem_size, const std::string& what) {
  Id props = compact_props(H5P_DATASET_CREATE, what);
  if (shape.empty() || shape_numel(shape) == 0) return props;
  // Chunks of at most ~1 MiB (HDF5 caps them at 4 GiB), cut along the leading dimensions first.
  constexpr hsize_t kChunkBytes = hsize_t{1} << 20;
  std::vector<hsize_t> chunk(shape.begin(), shape.end());
  for (size_t i = 0; i < chunk.size(); ++i) {
    hsize_t inner = elem_size;
    for (size_t j = i + 1; j < chunk.size(); ++j) inner *= chunk[j];
    if (chunk[i] * inner <= kChunkBytes) break;
    chunk[i] = std::max<hsize_t>(1, kChunkBytes / inner);
  }
  check(H5Pset_chunk(props, static_cast<int>(chunk.size()), chunk.data()), what);
  check(H5Pset_fletcher32(props), what);
  return props;
}

// ---------------------------------------------------------------- objects

// Whether every component of name exists as a link, walking down from the root: H5Lexists fails,
// instead of answering false, when an intermediate group is missing.
bool link_exists(hid_t file, const std::string& name) {
  std::string prefix;
  size_t start = 0;
  while (start < name.size()) {
    const size_t end = std::min(name.find('/', start), name.size());
    if (end > start) {
      if (!prefix.empty()) prefix += '/';
      prefix.append(name, start, end - start);
      if (H5Lexists(file, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    }
    start = end + 1;
  }
  return true;
}

// What name is (H5I_DATASET, H5I_GROUP, ...), or H5I_BADID when nothing is there ("/" is the root group).
H5I_type_t object_type(hid_t file, const std::string& name) {
  if (name.empty() || !link_exists(file, name)) return H5I_BADID;
  const Id object(H5Oopen(file, name.c_str(), H5P_DEFAULT), H5Oclose);  // a dangling soft link opens nothing
  return object.valid() ? H5Iget_type(object) : H5I_BADID;
}

// H5Literate/H5Lvisit callback collecting dataset names. Soft and external links are skipped: they would
// list a dataset twice or reach into other files.
herr_t collect_dataset(hid_t group, const char* name, const H5L_info_t* info, void* names) {
  if (info->type != H5L_TYPE_HARD) return 0;
  const Id object(H5Oopen(group, name, H5P_DEFAULT), H5Oclose);
  if (object.valid() && H5Iget_type(object) == H5I_DATASET)
    static_cast<std::vector<std::string>*>(names)->push_back(name);
  return 0;
}

// "a, b, c" with at most `max` names shown.
std::string join_names(const std::vector<std::string>& names, size_t max = 20) {
  std::string out;
  for (size_t i = 0; i < std::min(names.size(), max); ++i) {
    if (i > 0) out += ", ";
    out += names[i];
  }
  if (names.size() > max) out += concat(", ... (", names.size() - max, " more)");
  return out;
}

void require_writable(hid_t file, const std::string& what) {
  unsigned intent = 0;
  check(H5Fget_intent(file, &intent), what);
  DILATRON_CHECK(intent & H5F_ACC_RDWR, what, ": the file is open read-only");
}

Id open_dataset(const File& f, hid_t file, const std::string& name) {
  if (object_type(file, name) != H5I_DATASET) {
    const std::vector<std::string> names = f.list("/", true);
    throw Error(concat("'", f.path(), "' has no dataset '", name, "' (",
                       names.empty() ? "the file has no datasets" : "datasets: " + join_names(names), ")"));
  }
  return checked(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose, "cannot open dataset '", name, "' in '",
                 f.path(), "'");
}

// ---------------------------------------------------------------- attributes

std::string attr_where(const std::string& path, const std::string& object, const std::string& key) {
  return concat("attribute '", key, "' of '", object, "' in '", path, "'");
}

// A failed lookup means the object's attribute storage cannot be read (all of it, for many attributes:
// one damaged heap block), not that this attribute is the damaged one.
std::string attr_lookup_failed(const std::string& path, const std::string& object, const std::string& key) {
  return concat("cannot read the attributes of '", object, "' in '", path, "' (looking up '", key, "')");
}

// An object that is linked but does not open (a corrupted header fails its checksum) is reported with
// HDF5's reason, not as missing.
Id open_object(hid_t file, const std::string& path, const std::string& object, const std::string& key) {
  DILATRON_CHECK(!object.empty() && link_exists(file, object), "'", path, "' has no group or dataset '", object,
                 "' (looking for attribute '", key, "')");
  return checked(H5Oopen(file, object.c_str(), H5P_DEFAULT), H5Oclose, "cannot open '", object, "' in '", path, "'");
}

// Opens an attribute; when it is missing, the error lists the attributes the object does have.
Id open_attr(hid_t file, const std::string& path, const std::string& object, const std::string& key) {
  const Id obj = open_object(file, path, object, key);
  const htri_t exists = H5Aexists(obj, key.c_str());
  check(exists, attr_lookup_failed(path, object, key));
  if (exists == 0) {
    std::vector<std::string> names;
    H5Aiterate2(
        obj, H5_INDEX_NAME, H5_ITER_INC, nullptr,
        [](hid_t, const char* name, const H5A_info_t*, void* out) -> herr_t {
          static_cast<std::vector<std::string>*>(out)->push_back(name);
          return 0;
        },
        &names);
    throw Error(concat("'", object, "' in '", path, "' has no attribute '", key, "' (",
                       names.empty() ? "it has no attributes" : "attributes: " + join_names(names), ")"));
  }
  return checked(H5Aopen(obj, key.c_str(), H5P_DEFAULT), H5Aclose, "cannot open ", attr_where(path, object, key));
}

// Creates attribute key on object (replacing one of that name) and writes data, given in mem_type.
void write_attr(hid_t file, const std::string& path, const std::string& object, const std::string& key,
                hid_t file_type, hid_t mem_type, const Shape& shape, const void* data) {
  const std::string what = "cannot write " + attr_where(path, object, key);
  require_writable(file, what);
  const Id obj = open_object(file, path, object, key);
  const htri_t exists = H5Aexists(obj, key.c_str());
  check(exists, what);
  if (exists > 0) check(H5Adelete(obj, key.c_str()), what);
  const Id space = dataspace(shape);
  const Id attr = checked(H5Acreate2(obj, key.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose, what);
  if (shape_numel(shape) > 0) check(H5Awrite(attr, mem_type, data), what);
}

// All values of a numeric attribute, row-major. Int64 accepts integer attributes only; double takes
// integers or floats.
template <typename T>
std::vector<T> read_numeric_attr(hid_t file, const std::string& path, const std::string& object,
                                 const std::string& key) {
  constexpr bool as_int = std::is_same_v<T, int64_t>;
  const std::string where = attr_where(path, object, key);
  const Id attr = open_attr(file, path, object, key);
  const Id type = checked(H5Aget_type(attr), H5Tclose, "cannot read ", where);
  const std::optional<DType> dtype = readable_dtype(type);
  DILATRON_CHECK(dtype && dtype != DType::Bool && (!as_int || dtype == DType::Int64), where, " is ",
                 type_name(type), ", not ", as_int ? "an integer" : "a number");
  const Id space = checked(H5Aget_space(attr), H5Sclose, "cannot read ", where);
  std::vector<T> values(static_cast<size_t>(H5Sget_simple_extent_npoints(space)));
  if (!values.empty())
    check(H5Aread(attr, as_int ? H5T_NATIVE_INT64 : H5T_NATIVE_DOUBLE, values.data()), "cannot read ", where);
  return values;
}

// Strings are stored up to their first NUL: one inside would cut them short.
void require_no_nul(const std::string& value, const std::string& where) {
  DILATRON_CHECK(value.find('\0') == std::string::npos, "cannot write ", where, ": the string contains a NUL character");
}

// FNV-1a, 64 bits: enough to tell a corrupted string from the one written (not an authenticity check).
uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

template <typename T>
T single_value(const std::vector<T>& values, const std::string& where) {
  DILATRON_CHECK(values.size() == 1, where, " holds ", values.size(), " values, not one");
  return values[0];
}

}  // namespace

// ---------------------------------------------------------------- File

File File::create(const std::string& path) {
  init_hdf5();
  const std::string what = concat("cannot create '", path, "'");
  // The 1.10 format checksums all the metadata a read relies on: the superblock, object headers
  // (attributes included), and the chunk indexes (a single chunk's in its dataset's header, several in
  // a fixed array). The 1.8 format indexed chunks in version-1 B-trees, which have no checksum: a flipped
  // byte in a chunk's key made HDF5 read the dataset as its fill value, zeros, without an error.
  // h5py (HDF5 >= 1.10) reads it.
  const Id access = checked(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, what);
  check(H5Pset_libver_bounds(access, H5F_LIBVER_V110, H5F_LIBVER_V110), what);
  const Id create = compact_props(H5P_FILE_CREATE, what);  // the root group's links and attributes
  const hid_t id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, create, access);
  if (id < 0) throw_hdf5("cannot create '", path, "'");
  return File(path, id);
}

File File::open(const std::string& path, Mode mode) {
  init_hdf5();
  // Other stat() failures (a parent without permission, say) are left for HDF5 to explain.
  std::error_code ec;
  const std::filesystem::file_type kind = std::filesystem::status(path, ec).type();
  DILATRON_CHECK(kind != std::filesystem::file_type::not_found, "cannot open '", path, "': no such file");
  DILATRON_CHECK(kind != std::filesystem::file_type::directory, "cannot open '", path, "': it is a directory");
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 < 0) throw_hdf5("cannot open '", path, "'");
  DILATRON_CHECK(is_hdf5 > 0, "'", path, "' is not an HDF5 file");
  const hid_t id = H5Fopen(path.c_str(), mode == Mode::ReadOnly ? H5F_ACC_RDONLY : H5F_ACC_RDWR, H5P_DEFAULT);
  if (id < 0) throw_hdf5("cannot open '", path, "'");
  return File(path, id);
}

File::File(File&& other) noexcept : path_(std::move(other.path_)), id_(std::exchange(other.id_, -1)) {}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (id_ >= 0) H5Fclose(id_);
    path_ = std::move(other.path_);
    id_ = std::exchange(other.id_, -1);
  }
  return *this;
}

File::~File() {
  if (id_ >= 0) H5Fclose(id_);
}

int64_t File::open_id() const {
  DILATRON_CHECK(id_ >= 0, "'", path_, "' is closed");
  return id_;
}

void File::write(const std::string& name, const Tensor& t) {
  const hid_t file = open_id();
  const std::string what = concat("cannot write dataset '", name, "' to '", path_, "'");
  DILATRON_CHECK(t.defined(), what, ": the tensor is undefined");
  require_writable(file, what);
  // HDF5 takes a dense host buffer; the backend copy turns a CUDA or strided tensor into one.
  Tensor host = t;
  if (!t.device().is_cpu() || !t.is_contiguous()) {
    host = Tensor::empty(t.shape(), t.dtype());
    host.copy_(t);
  }
  // Missing groups on the way are created (compact, as every object here); an existing dataset on the way
  // cannot hold children.
  for (size_t slash = name.find('/', 1); slash != std::string::npos; slash = name.find('/', slash + 1)) {
    const std::string parent = name.substr(0, slash);
    const H5I_type_t kind = object_type(file, parent);
    if (kind == H5I_BADID) {
      const Id group_props = compact_props(H5P_GROUP_CREATE, what);
      checked(H5Gcreate2(file, parent.c_str(), H5P_DEFAULT, group_props, H5P_DEFAULT), H5Gclose, what);
      continue;
    }
    DILATRON_CHECK(kind == H5I_GROUP, what, ": '", parent, "' is a dataset, not a group");
  }
  // Replacing a dataset lets checkpoints reuse names. A group is not replaced: that would drop its contents.
  const H5I_type_t existing = object_type(file, name);
  DILATRON_CHECK(existing == H5I_BADID || existing == H5I_DATASET, what, ": a group of that name exists");
  if (existing == H5I_DATASET) check(H5Ldelete(file, name.c_str(), H5P_DEFAULT), what);

  const Id file_type = hdf5_type(t.dtype(), /*in_file=*/true);
  const Id space = dataspace(t.shape());
  const Id create_props = checksummed_layout(t.shape(), dtype_size(t.dtype()), what);
  const Id dset =
      checked(H5Dcreate2(file, name.c_str(), file_type, space, H5P_DEFAULT, create_props, H5P_DEFAULT), H5Dclose, what);
  if (host.numel() > 0) {
    const Id mem_type = hdf5_type(t.dtype(), /*in_file=*/false);
    check(H5Dwrite(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, host.raw_data()), what);
  }
}

Tensor File::read(const std::string& name) const {
  const hid_t file = open_id();
  const std::string where = concat("dataset '", name, "' in '", path_, "'");
  const Id dset = open_dataset(*this, file, name);
  const Id type = checked(H5Dget_type(dset), H5Tclose, "cannot read ", where);
  const std::optional<DType> dtype = readable_dtype(type);
  DILATRON_CHECK(dtype, where, " has type ", type_name(type),
                 ", which does not read as a tensor (supported: float16/32/64, integers up to int64, bool)");
  const Id space = checked(H5Dget_space(dset), H5Sclose, "cannot read ", where);
  Tensor t = empty_for(shape_of(space, where), *dtype, where);
  if (t.numel() > 0) {
    const Id mem_type = hdf5_type(*dtype, /*in_file=*/false);
    check(H5Dread(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.raw_data()), "cannot read ", where);
  }
  return t;
}

bool File::has(const std::string& name) const { return object_type(open_id(), name) == H5I_DATASET; }

DatasetInfo File::info(const std::string& name) const {
  const hid_t file = open_id();
  const std::string where = concat("dataset '", name, "' in '", path_, "'");
  const Id dset = open_dataset(*this, file, name);
  const Id type = checked(H5Dget_type(dset), H5Tclose, "cannot read the type of ", where);
  const Id space = checked(H5Dget_space(dset), H5Sclose, "cannot read the shape of ", where);
  return {shape_of(space, where), type_name(type)};
}

std::vector<std::string> File::list(const std::string& group, bool recursive) const {
  const hid_t file = open_id();
  DILATRON_CHECK(object_type(file, group) == H5I_GROUP, "'", path_, "' has no group '", group, "'");
  const std::string what = concat("cannot list group '", group, "' in '", path_, "'");
  const Id g = checked(H5Gopen2(file, group.c_str(), H5P_DEFAULT), H5Gclose, what);
  std::vector<std::string> names;
  check(recursive ? H5Lvisit(g, H5_INDEX_NAME, H5_ITER_INC, collect_dataset, &names)
                  : H5Literate(g, H5_INDEX_NAME, H5_ITER_INC, nullptr, collect_dataset, &names),
        what);
  return names;
}

void File::set_attr(const std::string& object, const std::string& key, const std::string& value) {
  require_no_nul(value, attr_where(path_, object, key));
  const Id type = vlen_string_type(H5T_CSET_UTF8);
  const char* data = value.c_str();
  write_attr(open_id(), path_, object, key, type, type, {}, &data);
}

void File::set_attr_checksummed(const std::string& object, const std::string& key, const std::string& value) {
  require_no_nul(value, attr_where(path_, object, key));
  // Fixed length, so the bytes sit in the attribute itself (NUL-padded; HDF5 takes no empty type).
  const Id type = copy_type(H5T_C_S1);
  const std::string what = "cannot write " + attr_where(path_, object, key);
  check(H5Tset_size(type, std::max<size_t>(value.size(), 1)), what);
  check(H5Tset_cset(type, H5T_CSET_UTF8), what);
  check(H5Tset_strpad(type, H5T_STR_NULLPAD), what);
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  write_attr(open_id(), path_, object, key, type, type, {}, padded.data());
  set_attr(object, key + kChecksumSuffix, static_cast<int64_t>(fnv1a64(value)));
}

void File::set_attr(const std::string& object, const std::string& key, int64_t value) {
  write_attr(open_id(), path_, object, key, H5T_STD_I64LE, H5T_NATIVE_INT64, {}, &value);
}

void File::set_attr(const std::string& object, const std::string& key, double value) {
  write_attr(open_id(), path_, object, key, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, {}, &value);
}

void File::set_attr(const std::string& object, const std::string& key, const std::vector<int64_t>& values) {
  write_attr(open_id(), path_, object, key, H5T_STD_I64LE, H5T_NATIVE_INT64, {static_cast<int64_t>(values.size())},
             values.data());
}

void File::set_attr(const std::string& object, const std::string& key, const std::vector<double>& values) {
  write_attr(open_id(), path_, object, key, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, {static_cast<int64_t>(values.size())},
             values.data());
}

bool File::has_attr(const std::string& object, const std::string& key) const {
  const hid_t file = open_id();
  if (object_type(file, object) == H5I_BADID) return false;
  const htri_t exists = H5Aexists_by_name(file, object.c_str(), key.c_str(), H5P_DEFAULT);
  check(exists, attr_lookup_failed(path_, object, key));
  return exists > 0;
}

std::string File::get_attr_string(const std::string& object, const std::string& key) const {
  std::string value = read_attr_string(object, key);
  const std::string checksum = key + kChecksumSuffix;
  if (has_attr(object, checksum)) {
    const auto stored = static_cast<uint64_t>(get_attr_int(object, checksum));
    DILATRON_CHECK(fnv1a64(value) == stored, attr_where(path_, object, key), " does not match its checksum ('",
                   checksum, "'): the file is corrupted");
  }
  return value;
}

std::string File::read_attr_string(const std::string& object, const std::string& key) const {
  const std::string where = attr_where(path_, object, key);
  const Id attr = open_attr(open_id(), path_, object, key);
  const Id type = checked(H5Aget_type(attr), H5Tclose, "cannot read ", where);
  DILATRON_CHECK(H5Tget_class(type) == H5T_STRING, where, " is ", type_name(type), ", not a string");
  const Id space = checked(H5Aget_space(attr), H5Sclose, "cannot read ", where);
  const hssize_t count = H5Sget_simple_extent_npoints(space);
  DILATRON_CHECK(count == 1, where, " holds ", count, " strings, not one");

  if (H5Tis_variable_str(type) > 0) {
    const Id mem_type = vlen_string_type(H5Tget_cset(type));
    char* data = nullptr;
    check(H5Aread(attr, mem_type, &data), "cannot read ", where);
    std::string value = data != nullptr ? data : "";
    H5free_memory(data);
    return value;
  }
  // Fixed length: the stored bytes, minus the padding.
  std::string value(H5Tget_size(type), '\0');
  check(H5Aread(attr, type, value.data()), "cannot read ", where);
  if (H5Tget_strpad(type) == H5T_STR_SPACEPAD) {
    value.erase(value.find_last_not_of(' ') + 1);
  } else {
    value.resize(std::min(value.find('\0'), value.size()));
  }
  return value;
}

int64_t File::get_attr_int(const std::string& object, const std::string& key) const {
  return single_value(get_attr_ints(object, key), attr_where(path_, object, key));
}

double File::get_attr_double(const std::string& object, const std::string& key) const {
  return single_value(get_attr_doubles(object, key), attr_where(path_, object, key));
}

std::vector<int64_t> File::get_attr_ints(const std::string& object, const std::string& key) const {
  return read_numeric_attr<int64_t>(open_id(), path_, object, key);
}

std::vector<double> File::get_attr_doubles(const std::string& object, const std::string& key) const {
  return read_numeric_attr<double>(open_id(), path_, object, key);
}

void File::flush() { check(H5Fflush(open_id(), H5F_SCOPE_GLOBAL), "cannot flush '", path_, "'"); }

void File::close() {
  if (id_ < 0) return;
  check(H5Fclose(std::exchange(id_, -1)), "cannot close '", path_, "'");
}

// ---------------------------------------------------------------- atomic_write

void atomic_write(const std::string& path, const std::function<void(File&)>& fill) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  replace_atomically(path, tmp, [&] {
    File file = File::create(tmp);
    fill(file);
    file.close();
    fsync_path(tmp, /*directory=*/false);
  });
}

std::vector<std::string> remove_orphaned_temporaries(const std::string& dir, const std::string& name) {
  namespace fs = std::filesystem;
  std::vector<std::string> removed;
  std::error_code ec;
  for (fs::directory_iterator it(dir.empty() ? "." : dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string n = it->path().filename().string();
    const size_t at = n.rfind(".tmp.");
    if (at == std::string::npos) continue;
    const std::string target = n.substr(0, at);
    if (name.empty() ? !target.ends_with(".h5") : target != name) continue;
    const char* first = n.data() + at + 5;
    const char* last = n.data() + n.size();
    pid_t pid = 0;
    const auto [ptr, err] = std::from_chars(first, last, pid);
    if (err != std::errc() || ptr != last || first == last || pid <= 0) continue;
    // Only when its writer is gone: a running process (even another user's, EPERM) may still rename it.
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;
    std::error_code ignored;
    if (it->is_regular_file(ignored) && fs::remove(it->path(), ignored)) removed.push_back(it->path().string());
  }
  return removed;
}

}  // namespace dilatron::h5
