// Reading and writing safetensors files, the weight format of Hugging Face and PEFT.
//
// SafetensorsFile memory-maps one file and validates its header with the rules of the reference
// reader (huggingface/safetensors, safetensors/src/tensor.rs). The header length is an 8-byte
// little-endian integer, the header a JSON object of at most 100,000,000 bytes with known
// dtypes and no duplicate names. Each tensor's data_offsets must match its dtype and shape, and
// together they must tile the data buffer from 0 to its end with no gap or overlap. Tensors of dtype F32, F16 and BF16 convert to fp32; other dtypes open but
// throw qlora::NotImplemented when converted. SafetensorsCheckpoint opens a single file or a
// directory holding `model.safetensors` or a sharded checkpoint indexed by
// `model.safetensors.index.json`. SafetensorsWriter writes F32, F16, BF16 or I32 tensors atomically
// with the `__metadata__` {"format": "pt"} that PEFT and transformers expect.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/core/matrix.hpp"
#include "qlora/io/mapped_file.hpp"

namespace qlora {

/// One tensor of a safetensors file and a span of its bytes inside the mapping.
struct SafetensorsTensor {
  std::string name;
  std::string dtype;                // as written: "F32", "BF16", "I64", ...
  std::vector<std::int64_t> shape;  // row-major, outermost first; empty for a scalar
  std::uint64_t data_begin = 0;     // data_offsets, relative to the data buffer
  std::uint64_t data_end = 0;
  std::span<const std::byte> data;

  std::int64_t n_elements() const noexcept;
};

/// A memory-mapped safetensors file.
class SafetensorsFile {
 public:
  /// Maps and validates `path`. Throws qlora::IoError when it cannot be read and
  /// qlora::FormatError when its header is invalid.
  explicit SafetensorsFile(const std::filesystem::path& path);

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile() = default;

  const std::filesystem::path& path() const noexcept { return file_.path(); }
  /// The string-to-string `__metadata__` map; empty when the header has none.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// Tensors in the order of their data offsets.
  const std::vector<SafetensorsTensor>& tensors() const noexcept { return tensors_; }
  const SafetensorsTensor* find(std::string_view name) const noexcept;
  /// The tensor `name`; throws qlora::FormatError when it is missing.
  const SafetensorsTensor& tensor(std::string_view name) const;

  /// Converts an F32, F16 or BF16 tensor to fp32 values in row-major order. Throws
  /// qlora::NotImplemented naming the tensor for any other dtype.
  std::vector<float> to_float(const SafetensorsTensor& tensor) const;

  /**
   * Converts an F32, F16 or BF16 tensor of rank 1 or 2 to a matrix: a 2-D tensor [rows, cols]
   * keeps its shape, a 1-D tensor [n] becomes [1, n]. Throws qlora::InvalidArgument for other
   * ranks and qlora::NotImplemented for other dtypes.
   */
  RowMatrixF to_matrix(const SafetensorsTensor& tensor) const;
  RowMatrixF to_matrix(std::string_view name) const { return to_matrix(tensor(name)); }

  /// The values of an I32 tensor; throws qlora::FormatError naming it for any other dtype.
  std::vector<std::int32_t> to_int32(const SafetensorsTensor& tensor) const;

 private:
  MappedFile file_;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

/**
 * The weights of a Hugging Face checkpoint: one safetensors file, or the shards listed by
 * `model.safetensors.index.json`.
 *
 * Example:
 *   qlora::SafetensorsCheckpoint checkpoint("path/to/SmolLM2-135M");  // a directory
 *   qlora::RowMatrixF wq = checkpoint.to_matrix("model.layers.0.self_attn.q_proj.weight");
 */
class SafetensorsCheckpoint {
 public:
  /**
   * Opens `path`: a .safetensors file, a `model.safetensors.index.json`, or a directory that
   * contains `model.safetensors.index.json` (preferred) or `model.safetensors`.
   * Throws qlora::IoError when none is found and qlora::FormatError for an invalid index
   * (not JSON, no weight_map, a shard name with a directory part, a tensor missing from the
   * shard that the index names).
   */
  explicit SafetensorsCheckpoint(const std::filesystem::path& path);

  const std::vector<SafetensorsFile>& shards() const noexcept { return shards_; }
  /// Every tensor name, sorted.
  std::vector<std::string> tensor_names() const;
  bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }
  const SafetensorsTensor* find(std::string_view name) const noexcept;
  /// The tensor `name`; throws qlora::FormatError when no shard has it.
  const SafetensorsTensor& tensor(std::string_view name) const;
  /// The shard that contains `name`; throws like tensor().
  const SafetensorsFile& shard_of(std::string_view name) const;

  std::vector<float> to_float(std::string_view name) const;
  RowMatrixF to_matrix(std::string_view name) const;

 private:
  std::filesystem::path path_;
  std::vector<SafetensorsFile> shards_;
  std::map<std::string, std::size_t, std::less<>> shard_index_;  // tensor name -> shard
};

/// The storage dtype of a tensor written by SafetensorsWriter.
enum class SafetensorsDtype { f32, f16, bf16 };

/**
 * Collects fp32 tensors and writes them as one safetensors file.
 *
 * The header lists tensors sorted by name, padded with spaces so that the data buffer starts
 * at a multiple of 8, with `__metadata__` {"format": "pt"} plus any entries set here.
 * F16 and BF16 round to nearest even. The writer copies the data it is given.
 */
class SafetensorsWriter {
 public:
  SafetensorsWriter();

  /// Adds or replaces a `__metadata__` entry.
  void set_metadata(std::string key, std::string value);

  /**
   * Adds tensor `name` of row-major shape `shape` (empty for a scalar).
   * `values` [product of shape]. Throws qlora::InvalidArgument for a duplicate or empty name,
   * the reserved name "__metadata__", a negative dimension or a size mismatch.
   */
  void add(std::string_view name, std::span<const std::int64_t> shape,
           std::span<const float> values, SafetensorsDtype dtype = SafetensorsDtype::f32);

  /// Adds an I32 tensor (token ids, for example), stored exactly.
  void add_int32(std::string_view name, std::span<const std::int64_t> shape,
                 std::span<const std::int32_t> values);

  /// Adds a matrix as a 2-D tensor [rows, cols].
  void add(std::string_view name, const ConstRefRowMatrixF& matrix,
           SafetensorsDtype dtype = SafetensorsDtype::f32);

  /// Writes the file atomically; throws qlora::IoError when writing fails.
  void write(const std::filesystem::path& path) const;

 private:
  void check_new_tensor(std::string_view name, std::span<const std::int64_t> shape,
                        std::size_t n_values) const;

  struct PendingTensor {
    std::string dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> data;
  };

  std::map<std::string, std::string> metadata_;
  std::map<std::string, PendingTensor> tensors_;
};

/// The largest header that the reference reader accepts.
inline constexpr std::uint64_t kSafetensorsMaxHeaderSize = 100'000'000;

}  // namespace qlora
