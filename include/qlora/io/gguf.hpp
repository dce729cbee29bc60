// A reader for GGUF files, the container of llama.cpp and ggml models.
//
// GgufFile memory-maps a GGUF file of version 2 or 3 (little-endian), parses and validates the
// header, every metadata value (all 13 value types, nested arrays included) and every tensor
// info, and exposes each tensor's bytes as a span into the mapping, so opening copies no
// tensor data. Tensors of the types that real checkpoints use (F32, F16, BF16, Q8_0, Q4_0,
// Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) dequantize to fp32; the other ggml types throw
// qlora::NotImplemented when dequantized. Big-endian files and version 1 are rejected.
//
// Every malformed input raises qlora::FormatError naming the file, the field and the values;
// nothing is read outside the file. Writing lives in gguf_writer.hpp.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "qlora/core/matrix.hpp"
#include "qlora/io/ggml_types.hpp"
#include "qlora/io/mapped_file.hpp"

namespace qlora {

/// A GGUF metadata value type; the values are the on-disk ids.
enum class GgufValueType : std::uint32_t {
  uint8 = 0,
  int8 = 1,
  uint16 = 2,
  int16 = 3,
  uint32 = 4,
  int32 = 5,
  float32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  uint64 = 10,
  int64 = 11,
  float64 = 12,
};

/// Returns the GGUF spelling of `type` ("UINT32", "ARRAY"), or "unknown".
std::string_view to_string(GgufValueType type) noexcept;

class GgufValue;

/// A GGUF array: every element has `element_type`, which may itself be `array`.
struct GgufArray {
  GgufValueType element_type = GgufValueType::uint8;
  std::vector<GgufValue> elements;
};

/// One GGUF metadata value of any of the 13 types.
class GgufValue {
 public:
  // The alternatives are in on-disk id order, so index() is the GgufValueType.
  using Storage = std::variant<std::uint8_t, std::int8_t, std::uint16_t, std::int16_t,
                               std::uint32_t, std::int32_t, float, bool, std::string, GgufArray,
                               std::uint64_t, std::int64_t, double>;

  GgufValue() = default;

  /// Stores `value` with the GGUF type of its C++ type (std::uint32_t -> UINT32, ...).
  template <class T>
    requires(std::is_constructible_v<Storage, T> && !std::is_same_v<std::decay_t<T>, GgufValue> &&
             !std::is_same_v<std::decay_t<T>, const char*> &&
             !std::is_same_v<std::decay_t<T>, char*>)
  explicit GgufValue(T value) : storage_(std::in_place_type<std::decay_t<T>>, std::move(value)) {}

  /// Stores a STRING.
  explicit GgufValue(const char* value) : storage_(std::string(value)) {}
  explicit GgufValue(std::string_view value) : storage_(std::string(value)) {}

  /// Builds an ARRAY of `element_type` from values that must all have that type.
  static GgufValue array(GgufValueType element_type, std::vector<GgufValue> elements);

  /// Builds an ARRAY of the GGUF type of T from plain values.
  template <class T>
  static GgufValue array_of(std::span<const T> values) {
    GgufArray array;
    array.element_type = GgufValue(T{}).type();
    array.elements.reserve(values.size());
    for (const T& value : values) array.elements.emplace_back(value);
    return GgufValue(std::move(array));
  }

  GgufValueType type() const noexcept { return static_cast<GgufValueType>(storage_.index()); }
  const Storage& storage() const noexcept { return storage_; }

  /// The value as T when its type is exactly T, else nullptr.
  template <class T>
  const T* get_if() const noexcept {
    return std::get_if<T>(&storage_);
  }

  /// The value of any integer type as int64 / uint64, when it fits; nullopt otherwise.
  std::optional<std::int64_t> to_int64() const noexcept;
  std::optional<std::uint64_t> to_uint64() const noexcept;
  /// The value of FLOAT32 or FLOAT64 as double; nullopt otherwise.
  std::optional<double> to_double() const noexcept;

  /// A short rendering for messages: scalars in full, strings quoted and cut at 64 bytes,
  /// arrays as "ARRAY[UINT32; 3]".
  std::string to_display_string() const;

  friend bool operator==(const GgufValue& a, const GgufValue& b);

 private:
  Storage storage_;
};

bool operator==(const GgufArray& a, const GgufArray& b);

/// One metadata entry in file order.
struct GgufKeyValue {
  std::string key;
  GgufValue value;
};

/// The description of one tensor and a span of its bytes inside the mapping.
struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::f32;
  int n_dims = 0;
  /// Dimensions innermost first, as ggml writes them: ne[0] is the contiguous axis. Dimensions
  /// past n_dims are 1.
  std::array<std::int64_t, 4> ne{1, 1, 1, 1};
  std::uint64_t offset = 0;   // from the start of the data section
  std::uint64_t n_bytes = 0;  // (ne[0] / block_size) * type_size * ne[1] * ne[2] * ne[3]
  std::span<const std::byte> data;

  std::int64_t n_elements() const noexcept { return ne[0] * ne[1] * ne[2] * ne[3]; }
  /// Length of a row: ne[0]. A weight [out, in] has cols() == in.
  std::int64_t cols() const noexcept { return ne[0]; }
  /// Number of rows: ne[1] * ne[2] * ne[3]. A weight [out, in] has rows() == out.
  std::int64_t rows() const noexcept { return ne[1] * ne[2] * ne[3]; }
  /// The PyTorch (outermost-first) shape: ne[n_dims-1], ..., ne[0].
  std::vector<std::int64_t> shape() const;
};

/**
 * A memory-mapped GGUF file.
 *
 * Example:
 *   qlora::GgufFile file("models/SmolLM2-135M-Instruct.Q4_1.gguf");
 *   const std::uint32_t n_layers = file.get_u32("llama.block_count");
 *   qlora::RowMatrixF wq = file.dequantize(file.tensor("blk.0.attn_q.weight"));  // [576, 576]
 *
 * Typed getters throw qlora::FormatError naming the key when it is missing or holds another
 * type. Integer getters accept any integer type whose value fits the requested type, so
 * counts written as UINT32 or UINT64 both read; float getters accept FLOAT32 and FLOAT64.
 */
class GgufFile {
 public:
  /// Maps and validates `path`. Throws qlora::IoError when it cannot be read and
  /// qlora::FormatError when it is not a valid GGUF file.
  explicit GgufFile(const std::filesystem::path& path);

  GgufFile(GgufFile&&) noexcept = default;
  GgufFile& operator=(GgufFile&&) noexcept = default;
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;
  ~GgufFile() = default;

  const std::filesystem::path& path() const noexcept { return file_.path(); }
  std::uint32_t version() const noexcept { return version_; }
  std::uint64_t alignment() const noexcept { return alignment_; }
  /// Absolute file offset of the data section (the header size rounded up to alignment()).
  std::uint64_t data_offset() const noexcept { return data_offset_; }
  std::size_t file_size() const noexcept { return file_.size(); }

  // Metadata.
  const std::vector<GgufKeyValue>& metadata() const noexcept { return metadata_; }
  bool contains(std::string_view key) const noexcept { return find(key) != nullptr; }
  const GgufValue* find(std::string_view key) const noexcept;
  /// The value of `key`; throws qlora::FormatError when it is missing.
  const GgufValue& at(std::string_view key) const;

  std::string get_string(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  std::uint32_t get_u32(std::string_view key) const;
  std::uint64_t get_u64(std::string_view key) const;
  std::int32_t get_i32(std::string_view key) const;
  std::int64_t get_i64(std::string_view key) const;
  float get_f32(std::string_view key) const;
  double get_f64(std::string_view key) const;

  /// The elements of the ARRAY `key`, each converted with the rules of the scalar getters.
  /// T is one of std::string, bool, float, double, or an integer type of 8 to 64 bits.
  template <class T>
  std::vector<T> get_array(std::string_view key) const;

  /// Returns `fallback` when `key` is absent; a present key of the wrong type still throws.
  template <class T>
  T get_or(std::string_view key, T fallback) const;

  // Tensors, in file order.
  const std::vector<GgufTensor>& tensors() const noexcept { return tensors_; }
  const GgufTensor* find_tensor(std::string_view name) const noexcept;
  /// The tensor `name`; throws qlora::FormatError when the file has no such tensor.
  const GgufTensor& tensor(std::string_view name) const;

  /**
   * Dequantizes a whole tensor to fp32, shaped [rows(), cols()].
   * Throws qlora::NotImplemented naming the tensor and its type when the type is not one of
   * F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
   */
  RowMatrixF dequantize(const GgufTensor& tensor) const;
  RowMatrixF dequantize(std::string_view name) const { return dequantize(tensor(name)); }

  /**
   * Dequantizes rows [row_begin, row_begin + n_rows) of `tensor` into `dst`.
   * `dst` [n_rows, tensor.cols()] row-major. Throws qlora::InvalidArgument when the range is
   * outside the tensor, and qlora::NotImplemented for an unsupported type.
   */
  void dequantize_rows(const GgufTensor& tensor, std::int64_t row_begin, std::int64_t n_rows,
                       float* dst) const;

 private:
  void parse();

  MappedFile file_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = 32;
  std::uint64_t data_offset_ = 0;
  std::vector<GgufKeyValue> metadata_;
  std::map<std::string, std::size_t, std::less<>> metadata_index_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
};

/// The default alignment of tensor data when `general.alignment` is absent.
inline constexpr std::uint64_t kGgufDefaultAlignment = 32;
/// "GGUF" read as a little-endian u32.
inline constexpr std::uint32_t kGgufMagic = 0x46554747;

}  // namespace qlora
