#include "qlora/io/gguf.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include "qlora/core/error.hpp"

namespace qlora {
namespace {

constexpr std::uint32_t kMaxDims = 4;
// Nested arrays are parsed recursively, so a depth limit keeps a crafted file from exhausting
// the stack.
constexpr int kMaxArrayDepth = 16;
// Smallest encoded sizes, used to reject counts that cannot fit in the rest of the file
// before anything is allocated for them.
constexpr std::uint64_t kMinKeyValueBytes = 8 + 4 + 1;      // empty key, type, one-byte value
constexpr std::uint64_t kMinTensorInfoBytes = 8 + 4 + 4 + 8;  // empty name, n_dims 0, type, offset

std::uint64_t value_min_bytes(GgufValueType type) noexcept {
  switch (type) {
    case GgufValueType::uint8:
    case GgufValueType::int8:
    case GgufValueType::boolean:
      return 1;
    case GgufValueType::uint16:
    case GgufValueType::int16:
      return 2;
    case GgufValueType::uint32:
    case GgufValueType::int32:
    case GgufValueType::float32:
      return 4;
    case GgufValueType::uint64:
    case GgufValueType::int64:
    case GgufValueType::float64:
    case GgufValueType::string:
      return 8;
    case GgufValueType::array:
      return 12;
  }
  return 1;
}

// A bounds-checked little-endian reader over the mapped bytes. Every read names its field, so
// an error message points at the bad part of the file.
class Cursor {
 public:
  Cursor(std::span<const std::byte> bytes, const std::filesystem::path& path)
      : bytes_(bytes), path_(path.string()) {}

  std::uint64_t position() const noexcept { return position_; }
  std::uint64_t remaining() const noexcept { return bytes_.size() - position_; }
  const std::string& path() const noexcept { return path_; }

  template <class T>
  T read(std::string_view field) {
    require(sizeof(T), field);
    T value;
    std::memcpy(&value, bytes_.data() + position_, sizeof(T));
    position_ += sizeof(T);
    return value;
  }

  std::string read_string(std::string_view field) {
    const auto length = read<std::uint64_t>(field);
    if (length > remaining()) {
      raise<FormatError>("[gguf] '{}': {} has a string length past the end of the file: got "
                         "length {} at offset {}, expected at most the {} bytes left (hint: the "
                         "file is truncated or corrupt)",
                         path_, field, length, position_ - 8, remaining());
    }
    std::string text(reinterpret_cast<const char*>(bytes_.data() + position_),
                     static_cast<std::size_t>(length));
    position_ += length;
    return text;
  }

  void require(std::uint64_t n, std::string_view field) const {
    if (n > remaining()) {
      raise<FormatError>("[gguf] '{}': file ends inside {}: got {} bytes left at offset {}, "
                         "expected {} (hint: the file is truncated; download it again)",
                         path_, field, remaining(), position_, n);
    }
  }

 private:
  std::span<const std::byte> bytes_;
  std::string path_;
  std::uint64_t position_ = 0;
};

bool is_valid_value_type(std::uint32_t id) noexcept { return id <= 12; }

GgufValue read_value(Cursor& cursor, GgufValueType type, std::string_view key, int depth);

GgufArray read_array(Cursor& cursor, std::string_view key, int depth) {
  if (depth >= kMaxArrayDepth) {
    raise<FormatError>("[gguf] '{}': metadata '{}' nests arrays too deeply: got depth {} at "
                       "offset {}, expected at most {}",
                       cursor.path(), key, depth + 1, cursor.position(), kMaxArrayDepth);
  }
  const auto type_id = cursor.read<std::uint32_t>("an array element type");
  if (!is_valid_value_type(type_id)) {
    raise<FormatError>("[gguf] '{}': metadata '{}' has an unknown array element type: got {} at "
                       "offset {}, expected 0..12",
                       cursor.path(), key, type_id, cursor.position() - 4);
  }
  const auto element_type = static_cast<GgufValueType>(type_id);
  const auto count = cursor.read<std::uint64_t>("an array length");
  const std::uint64_t min_bytes = value_min_bytes(element_type);
  if (count > cursor.remaining() / min_bytes) {
    raise<FormatError>("[gguf] '{}': metadata '{}' is an array too long for the file: got {} "
                       "elements of {} at offset {}, but only {} bytes are left (hint: the file "
                       "is truncated or corrupt)",
                       cursor.path(), key, count, to_string(element_type), cursor.position() - 8,
                       cursor.remaining());
  }
  GgufArray array;
  array.element_type = element_type;
  array.elements.reserve(static_cast<std::size_t>(count));
  for (std::uint64_t i = 0; i < count; ++i) {
    array.elements.push_back(read_value(cursor, element_type, key, depth + 1));
  }
  return array;
}

GgufValue read_value(Cursor& cursor, GgufValueType type, std::string_view key, int depth) {
  const std::string field = fmt::format("the value of metadata '{}'", key);
  switch (type) {
    case GgufValueType::uint8:
      return GgufValue(cursor.read<std::uint8_t>(field));
    case GgufValueType::int8:
      return GgufValue(cursor.read<std::int8_t>(field));
    case GgufValueType::uint16:
      return GgufValue(cursor.read<std::uint16_t>(field));
    case GgufValueType::int16:
      return GgufValue(cursor.read<std::int16_t>(field));
    case GgufValueType::uint32:
      return GgufValue(cursor.read<std::uint32_t>(field));
    case GgufValueType::int32:
      return GgufValue(cursor.read<std::int32_t>(field));
    case GgufValueType::float32:
      return GgufValue(cursor.read<float>(field));
    case GgufValueType::boolean: {
      const auto byte = cursor.read<std::uint8_t>(field);
      if (byte > 1) {
        raise<FormatError>("[gguf] '{}': metadata '{}' is an invalid BOOL: got byte {} at offset "
                           "{}, expected 0 or 1",
                           cursor.path(), key, byte, cursor.position() - 1);
      }
      return GgufValue(byte == 1);
    }
    case GgufValueType::string:
      return GgufValue(cursor.read_string(field));
    case GgufValueType::array:
      return GgufValue(read_array(cursor, key, depth));
    case GgufValueType::uint64:
      return GgufValue(cursor.read<std::uint64_t>(field));
    case GgufValueType::int64:
      return GgufValue(cursor.read<std::int64_t>(field));
    case GgufValueType::float64:
      return GgufValue(cursor.read<double>(field));
  }
  raise<FormatError>("[gguf] '{}': metadata '{}' has an unknown value type {}", cursor.path(), key,
                     static_cast<std::uint32_t>(type));
}

// a * b, or nullopt when the product overflows int64.
std::optional<std::int64_t> checked_mul(std::int64_t a, std::int64_t b) noexcept {
  std::int64_t product = 0;
  if (__builtin_mul_overflow(a, b, &product)) return std::nullopt;
  return product;
}

std::string format_ne(const GgufTensor& tensor) {
  std::string text = "[";
  for (int i = 0; i < tensor.n_dims; ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(tensor.ne[static_cast<std::size_t>(i)]);
  }
  return text + "]";
}

// Reads one tensor info and checks everything that does not depend on other tensors or on
// the data section.
GgufTensor read_tensor_info(Cursor& cursor, std::uint64_t index) {
  GgufTensor tensor;
  const std::uint64_t start = cursor.position();
  tensor.name = cursor.read_string(fmt::format("the name of tensor {}", index));
  const std::string& name = tensor.name;

  const auto n_dims = cursor.read<std::uint32_t>(fmt::format("n_dims of tensor '{}'", name));
  if (n_dims > kMaxDims) {
    raise<FormatError>("[gguf] '{}': tensor '{}' has too many dimensions: got n_dims {} at "
                       "offset {}, expected at most {}",
                       cursor.path(), name, n_dims, cursor.position() - 4, kMaxDims);
  }
  tensor.n_dims = static_cast<int>(n_dims);
  for (std::uint32_t i = 0; i < n_dims; ++i) {
    const auto ne = cursor.read<std::uint64_t>(fmt::format("ne[{}] of tensor '{}'", i, name));
    if (ne > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      raise<FormatError>("[gguf] '{}': tensor '{}' has a dimension that overflows: got ne[{}] = "
                         "{}, expected at most 2^63 - 1",
                         cursor.path(), name, i, ne);
    }
    tensor.ne[i] = static_cast<std::int64_t>(ne);
  }

  const auto type_id = cursor.read<std::uint32_t>(fmt::format("the type of tensor '{}'", name));
  const auto traits = ggml_type_traits(type_id);
  if (!traits) {
    raise<FormatError>("[gguf] '{}': tensor '{}' has an unknown or retired ggml type: got type "
                       "id {}, expected a ggml type id such as 0 (F32), 1 (F16), 8 (Q8_0) or 12 "
                       "(Q4_K) (hint: the file needs a newer reader, or it is corrupt)",
                       cursor.path(), name, type_id);
  }
  tensor.type = static_cast<GgmlType>(type_id);
  tensor.offset = cursor.read<std::uint64_t>(fmt::format("the offset of tensor '{}'", name));

  if (tensor.ne[0] % traits->block_size != 0) {
    raise<FormatError>("[gguf] '{}': tensor '{}' of type {} has a row length that is not a "
                       "whole number of blocks: got ne {}, expected ne[0] % {} == 0",
                       cursor.path(), name, traits->name, format_ne(tensor), traits->block_size);
  }
  std::optional<std::int64_t> n_elements = tensor.ne[0];
  std::optional<std::int64_t> n_bytes =
      checked_mul(tensor.ne[0] / traits->block_size, traits->type_size);
  for (std::size_t i = 1; i < 4 && n_elements && n_bytes; ++i) {
    n_elements = checked_mul(*n_elements, tensor.ne[i]);
    n_bytes = checked_mul(*n_bytes, tensor.ne[i]);
  }
  if (!n_elements || !n_bytes) {
    raise<FormatError>("[gguf] '{}': tensor '{}' has a size that overflows 64 bits: got ne {} "
                       "of type {} (tensor info at offset {})",
                       cursor.path(), name, format_ne(tensor), traits->name, start);
  }
  tensor.n_bytes = static_cast<std::uint64_t>(*n_bytes);
  return tensor;
}

void check_tensor_placement(const GgufFile& file, std::vector<GgufTensor>& tensors,
                            std::span<const std::byte> bytes) {
  const std::string path = file.path().string();
  const std::uint64_t data_size = bytes.size() - file.data_offset();
  for (GgufTensor& tensor : tensors) {
    if (tensor.offset % file.alignment() != 0) {
      raise<FormatError>("[gguf] '{}': tensor '{}' is misaligned: got offset {}, expected a "
                         "multiple of the alignment {}",
                         path, tensor.name, tensor.offset, file.alignment());
    }
    if (tensor.offset > data_size || tensor.n_bytes > data_size - tensor.offset) {
      raise<FormatError>("[gguf] '{}': tensor '{}' lies outside the file: got offset {} and {} "
                         "bytes, but the data section holds {} bytes (it starts at file offset "
                         "{}) (hint: the file is truncated; download it again)",
                         path, tensor.name, tensor.offset, tensor.n_bytes, data_size,
                         file.data_offset());
    }
    tensor.data = bytes.subspan(static_cast<std::size_t>(file.data_offset() + tensor.offset),
                                static_cast<std::size_t>(tensor.n_bytes));
  }

  // Tensors must not share bytes: sort by offset and compare each with the next.
  std::vector<std::size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return tensors[a].offset < tensors[b].offset;
  });
  for (std::size_t i = 1; i < order.size(); ++i) {
    const GgufTensor& before = tensors[order[i - 1]];
    const GgufTensor& after = tensors[order[i]];
    if (before.offset + before.n_bytes > after.offset) {
      raise<FormatError>("[gguf] '{}': tensors '{}' and '{}' overlap: got offsets {} (+{} "
                         "bytes) and {}, expected disjoint byte ranges",
                         path, before.name, after.name, before.offset, before.n_bytes,
                         after.offset);
    }
  }
}

template <class T>
T convert_integer(const GgufValue& value, std::string_view key, const std::string& path) {
  if constexpr (std::is_signed_v<T>) {
    const auto wide = value.to_int64();
    if (wide && *wide >= std::numeric_limits<T>::min() && *wide <= std::numeric_limits<T>::max()) {
      return static_cast<T>(*wide);
    }
  } else {
    const auto wide = value.to_uint64();
    if (wide && *wide <= std::numeric_limits<T>::max()) return static_cast<T>(*wide);
  }
  raise<FormatError>("[gguf] '{}': metadata '{}' is not a {}-bit {} integer: got {} of type {} "
                     "(hint: the file was written for another model or reader)",
                     path, key, sizeof(T) * 8, std::is_signed_v<T> ? "signed" : "unsigned",
                     value.to_display_string(), to_string(value.type()));
}

template <class T>
T convert_value(const GgufValue& value, std::string_view key, const std::string& path) {
  if constexpr (std::is_same_v<T, std::string>) {
    if (const auto* text = value.get_if<std::string>()) return *text;
  } else if constexpr (std::is_same_v<T, bool>) {
    if (const auto* flag = value.get_if<bool>()) return *flag;
  } else if constexpr (std::is_floating_point_v<T>) {
    if (const auto number = value.to_double()) return static_cast<T>(*number);
  } else {
    return convert_integer<T>(value, key, path);
  }
  const char* expected = "FLOAT32 or FLOAT64";
  if constexpr (std::is_same_v<T, std::string>) expected = "STRING";
  if constexpr (std::is_same_v<T, bool>) expected = "BOOL";
  raise<FormatError>("[gguf] '{}': metadata '{}' has the wrong type: got {} ({}), expected {}",
                     path, key, to_string(value.type()), value.to_display_string(), expected);
}

}  // namespace

std::string_view to_string(GgufValueType type) noexcept {
  switch (type) {
    case GgufValueType::uint8:
      return "UINT8";
    case GgufValueType::int8:
      return "INT8";
    case GgufValueType::uint16:
      return "UINT16";
    case GgufValueType::int16:
      return "INT16";
    case GgufValueType::uint32:
      return "UINT32";
    case GgufValueType::int32:
      return "INT32";
    case GgufValueType::float32:
      return "FLOAT32";
    case GgufValueType::boolean:
      return "BOOL";
    case GgufValueType::string:
      return "STRING";
    case GgufValueType::array:
      return "ARRAY";
    case GgufValueType::uint64:
      return "UINT64";
    case GgufValueType::int64:
      return "INT64";
    case GgufValueType::float64:
      return "FLOAT64";
  }
  return "unknown";
}

GgufValue GgufValue::array(GgufValueType element_type, std::vector<GgufValue> elements) {
  for (std::size_t i = 0; i < elements.size(); ++i) {
    if (elements[i].type() != element_type) {
      raise<InvalidArgument>("[GgufValue::array] element {} has the wrong type: got {}, "
                             "expected {} like the array",
                             i, to_string(elements[i].type()), to_string(element_type));
    }
  }
  return GgufValue(GgufArray{element_type, std::move(elements)});
}

std::optional<std::int64_t> GgufValue::to_int64() const noexcept {
  return std::visit(
      [](const auto& value) -> std::optional<std::int64_t> {
        using T = std::decay_t<decltype(value)>;
        if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
          if constexpr (std::is_same_v<T, std::uint64_t>) {
            if (value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
              return std::nullopt;
            }
          }
          return static_cast<std::int64_t>(value);
        } else {
          return std::nullopt;
        }
      },
      storage_);
}

std::optional<std::uint64_t> GgufValue::to_uint64() const noexcept {
  return std::visit(
      [](const auto& value) -> std::optional<std::uint64_t> {
        using T = std::decay_t<decltype(value)>;
        if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
          if constexpr (std::is_signed_v<T>) {
            if (value < 0) return std::nullopt;
          }
          return static_cast<std::uint64_t>(value);
        } else {
          return std::nullopt;
        }
      },
      storage_);
}

std::optional<double> GgufValue::to_double() const noexcept {
  if (const auto* value = get_if<float>()) return static_cast<double>(*value);
  if (const auto* value = get_if<double>()) return *value;
  return std::nullopt;
}

std::string GgufValue::to_display_string() const {
  return std::visit(
      [](const auto& value) -> std::string {
        using T = std::decay_t<decltype(value)>;
        if constexpr (std::is_same_v<T, std::string>) {
          constexpr std::size_t kMaxShown = 64;
          if (value.size() <= kMaxShown) return fmt::format("\"{}\"", value);
          return fmt::format("\"{}...\" ({} bytes)", value.substr(0, kMaxShown), value.size());
        } else if constexpr (std::is_same_v<T, GgufArray>) {
          return fmt::format("ARRAY[{}; {}]", to_string(value.element_type),
                             value.elements.size());
        } else if constexpr (std::is_same_v<T, bool>) {
          return value ? "true" : "false";
        } else if constexpr (std::is_same_v<T, std::int8_t> || std::is_same_v<T, std::uint8_t>) {
          return std::to_string(static_cast<int>(value));
        } else {
          return fmt::format("{}", value);
        }
      },
      storage_);
}

bool operator==(const GgufArray& a, const GgufArray& b) {
  return a.element_type == b.element_type && a.elements == b.elements;
}

bool operator==(const GgufValue& a, const GgufValue& b) { return a.storage_ == b.storage_; }

std::vector<std::int64_t> GgufTensor::shape() const {
  std::vector<std::int64_t> result;
  for (int i = n_dims - 1; i >= 0; --i) result.push_back(ne[static_cast<std::size_t>(i)]);
  return result;
}

GgufFile::GgufFile(const std::filesystem::path& path) : file_(path) { parse(); }

void GgufFile::parse() {
  const std::span<const std::byte> bytes = file_.bytes();
  Cursor cursor(bytes, file_.path());
  const std::string& path = cursor.path();

  // Header: magic, version, tensor count, metadata count.
  const auto magic = cursor.read<std::uint32_t>("the magic number");
  if (magic != kGgufMagic) {
    raise<FormatError>("[gguf] '{}' is not a GGUF file: got magic 0x{:08x}, expected 0x{:08x} "
                       "(\"GGUF\") (hint: check that the path names a .gguf file)",
                       path, magic, kGgufMagic);
  }
  version_ = cursor.read<std::uint32_t>("the version");
  if (version_ != 2 && version_ != 3) {
    const std::uint32_t swapped = __builtin_bswap32(version_);
    if (swapped == 2 || swapped == 3) {
      raise<FormatError>("[gguf] '{}' is a big-endian GGUF file: got version 0x{:08x}, expected "
                         "2 or 3 little-endian (hint: convert it to little-endian)",
                         path, version_);
    }
    raise<FormatError>("[gguf] '{}' has an unsupported GGUF version: got {}, expected 2 or 3 "
                       "(hint: version 1 files are obsolete; convert them with a current "
                       "llama.cpp)",
                       path, version_);
  }
  const auto n_tensors = cursor.read<std::uint64_t>("the tensor count");
  const auto n_kv = cursor.read<std::uint64_t>("the metadata count");
  if (n_tensors > cursor.remaining() / kMinTensorInfoBytes) {
    raise<FormatError>("[gguf] '{}': the tensor count is too large for the file: got {}, but "
                       "only {} bytes follow the header (hint: the file is corrupt)",
                       path, n_tensors, cursor.remaining());
  }
  if (n_kv > cursor.remaining() / kMinKeyValueBytes) {
    raise<FormatError>("[gguf] '{}': the metadata count is too large for the file: got {}, but "
                       "only {} bytes follow the header (hint: the file is corrupt)",
                       path, n_kv, cursor.remaining());
  }

  // Metadata.
  metadata_.reserve(static_cast<std::size_t>(n_kv));
  for (std::uint64_t i = 0; i < n_kv; ++i) {
    std::string key = cursor.read_string(fmt::format("the key of metadata entry {}", i));
    const auto type_id =
        cursor.read<std::uint32_t>(fmt::format("the value type of metadata '{}'", key));
    if (!is_valid_value_type(type_id)) {
      raise<FormatError>("[gguf] '{}': metadata '{}' has an unknown value type: got {} at offset "
                         "{}, expected 0..12",
                         path, key, type_id, cursor.position() - 4);
    }
    GgufValue value = read_value(cursor, static_cast<GgufValueType>(type_id), key, 0);
    if (metadata_index_.count(key) != 0) {
      raise<FormatError>("[gguf] '{}': metadata key '{}' appears twice (entries {} and {}), "
                         "expected unique keys",
                         path, key, metadata_index_.find(key)->second, i);
    }
    metadata_index_.emplace(key, metadata_.size());
    metadata_.push_back({std::move(key), std::move(value)});
  }

  if (const GgufValue* value = find("general.alignment")) {
    const auto* alignment = value->get_if<std::uint32_t>();
    if (alignment == nullptr || *alignment == 0 || (*alignment & (*alignment - 1)) != 0) {
      raise<FormatError>("[gguf] '{}': general.alignment is invalid: got {} of type {}, expected "
                         "a UINT32 power of two",
                         path, value->to_display_string(), to_string(value->type()));
    }
    alignment_ = *alignment;
  }

  // Tensor infos.
  tensors_.reserve(static_cast<std::size_t>(n_tensors));
  for (std::uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor tensor = read_tensor_info(cursor, i);
    if (tensor_index_.count(tensor.name) != 0) {
      raise<FormatError>("[gguf] '{}': tensor name '{}' appears twice (tensors {} and {}), "
                         "expected unique names",
                         path, tensor.name, tensor_index_.find(tensor.name)->second, i);
    }
    tensor_index_.emplace(tensor.name, tensors_.size());
    tensors_.push_back(std::move(tensor));
  }

  // The data section starts at the end of the header, rounded up to the alignment.
  const std::uint64_t header_end = cursor.position();
  data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
  if (!tensors_.empty() && data_offset_ > bytes.size()) {
    raise<FormatError>("[gguf] '{}': the file ends before its data section: got {} bytes, "
                       "expected at least {} (header of {} bytes padded to alignment {}) (hint: "
                       "the file is truncated)",
                       path, bytes.size(), data_offset_, header_end, alignment_);
  }
  if (data_offset_ > bytes.size()) data_offset_ = bytes.size();
  check_tensor_placement(*this, tensors_, bytes);
}

const GgufValue* GgufFile::find(std::string_view key) const noexcept {
  const auto it = metadata_index_.find(key);
  return it == metadata_index_.end() ? nullptr : &metadata_[it->second].value;
}

const GgufValue& GgufFile::at(std::string_view key) const {
  const GgufValue* value = find(key);
  if (value == nullptr) {
    raise<FormatError>("[gguf] '{}': metadata '{}' is missing (hint: the file may be for another "
                       "architecture, or written by an old converter)",
                       path().string(), key);
  }
  return *value;
}

std::string GgufFile::get_string(std::string_view key) const {
  return convert_value<std::string>(at(key), key, path().string());
}
bool GgufFile::get_bool(std::string_view key) const {
  return convert_value<bool>(at(key), key, path().string());
}
std::uint32_t GgufFile::get_u32(std::string_view key) const {
  return convert_value<std::uint32_t>(at(key), key, path().string());
}
std::uint64_t GgufFile::get_u64(std::string_view key) const {
  return convert_value<std::uint64_t>(at(key), key, path().string());
}
std::int32_t GgufFile::get_i32(std::string_view key) const {
  return convert_value<std::int32_t>(at(key), key, path().string());
}
std::int64_t GgufFile::get_i64(std::string_view key) const {
  return convert_value<std::int64_t>(at(key), key, path().string());
}
float GgufFile::get_f32(std::string_view key) const {
  return convert_value<float>(at(key), key, path().string());
}
double GgufFile::get_f64(std::string_view key) const {
  return convert_value<double>(at(key), key, path().string());
}

template <class T>
std::vector<T> GgufFile::get_array(std::string_view key) const {
  const GgufValue& value = at(key);
  const auto* array = value.get_if<GgufArray>();
  if (array == nullptr) {
    raise<FormatError>("[gguf] '{}': metadata '{}' has the wrong type: got {} ({}), expected "
                       "ARRAY",
                       path().string(), key, to_string(value.type()), value.to_display_string());
  }
  std::vector<T> result;
  result.reserve(array->elements.size());
  const std::string path_text = path().string();
  for (const GgufValue& element : array->elements) {
    result.push_back(convert_value<T>(element, key, path_text));
  }
  return result;
}

template <class T>
T GgufFile::get_or(std::string_view key, T fallback) const {
  const GgufValue* value = find(key);
  if (value == nullptr) return fallback;
  return convert_value<T>(*value, key, path().string());
}

#define QLORA_GGUF_INSTANTIATE(T)                                              \
  template std::vector<T> GgufFile::get_array<T>(std::string_view key) const; \
  template T GgufFile::get_or<T>(std::string_view key, T fallback) const;
QLORA_GGUF_INSTANTIATE(std::string)
QLORA_GGUF_INSTANTIATE(bool)
QLORA_GGUF_INSTANTIATE(float)
QLORA_GGUF_INSTANTIATE(double)
QLORA_GGUF_INSTANTIATE(std::int8_t)
QLORA_GGUF_INSTANTIATE(std::uint8_t)
QLORA_GGUF_INSTANTIATE(std::int16_t)
QLORA_GGUF_INSTANTIATE(std::uint16_t)
QLORA_GGUF_INSTANTIATE(std::int32_t)
QLORA_GGUF_INSTANTIATE(std::uint32_t)
QLORA_GGUF_INSTANTIATE(std::int64_t)
QLORA_GGUF_INSTANTIATE(std::uint64_t)
#undef QLORA_GGUF_INSTANTIATE

const GgufTensor* GgufFile::find_tensor(std::string_view name) const noexcept {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensor& GgufFile::tensor(std::string_view name) const {
  const GgufTensor* tensor = find_tensor(name);
  if (tensor == nullptr) {
    raise<FormatError>("[gguf] '{}': tensor '{}' is missing ({} tensors in the file) (hint: "
                       "tensor names are GGUF names such as 'blk.0.attn_q.weight')",
                       path().string(), name, tensors_.size());
  }
  return *tensor;
}

RowMatrixF GgufFile::dequantize(const GgufTensor& tensor) const {
  RowMatrixF result(tensor.rows(), tensor.cols());
  dequantize_rows(tensor, 0, tensor.rows(), result.data());
  return result;
}

void GgufFile::dequantize_rows(const GgufTensor& tensor, std::int64_t row_begin,
                               std::int64_t n_rows, float* dst) const {
  const GgmlTypeTraits traits = ggml_type_traits(tensor.type);
  if (!traits.can_dequantize) {
    raise<NotImplemented>("[gguf] '{}': tensor '{}' has type {}, which qlora cannot dequantize "
                          "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, "
                          "Q6_K) (hint: requantize the model with llama-quantize to a supported "
                          "type)",
                          path().string(), tensor.name, traits.name);
  }
  if (row_begin < 0 || n_rows < 0 || row_begin > tensor.rows() ||
      n_rows > tensor.rows() - row_begin) {
    raise<InvalidArgument>("[gguf] rows of tensor '{}' out of range: got row_begin={}, "
                           "n_rows={}, expected a range inside [0, {})",
                           tensor.name, row_begin, n_rows, tensor.rows());
  }
  const std::int64_t cols = tensor.cols();
  const std::int64_t row_bytes = cols / traits.block_size * traits.type_size;
  const std::byte* src = tensor.data.data();

  // Rows are independent; a static schedule keeps the output identical for any thread count.
#pragma omp parallel for schedule(static) if (n_rows * cols >= (std::int64_t{1} << 16))
  for (std::int64_t r = 0; r < n_rows; ++r) {
    dequantize_ggml(tensor.type, src + (row_begin + r) * row_bytes, dst + r * cols, cols);
  }
}

}  // namespace qlora
