// A writer for GGUF version 3 files (little-endian), the counterpart of GgufFile.
//
// GgufWriter collects metadata of any of the 13 value types and tensors, then writes them in
// one pass: header, metadata in insertion order, tensor infos, and the tensor data, each
// tensor padded to the alignment as gguf-py lays it out. Tensors come either as fp32 values
// stored as F32, F16 or BF16, or as raw bytes of any ggml type (quantized blocks are written
// as given). The file appears atomically: it is written to a temporary file in the same
// directory, flushed with fsync and renamed into place. The writer copies tensor data, so the
// whole model stays in memory until write().
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/io/ggml_types.hpp"
#include "qlora/io/gguf.hpp"

namespace qlora {

class GgufWriter {
 public:
  /// `alignment` must be a power of two; a value other than 32 is written as general.alignment.
  explicit GgufWriter(std::uint32_t alignment = static_cast<std::uint32_t>(kGgufDefaultAlignment));

  /// Adds or replaces the metadata entry `key`. Throws qlora::InvalidArgument for an empty key.
  void set(std::string_view key, GgufValue value);

  /**
   * Adds a tensor whose bytes are already in ggml type `type`.
   * `ne` holds the dimensions innermost first (1 to 4 of them); `data` must hold exactly
   * (ne[0] / block_size) * type_size * ne[1] * ... bytes. Throws qlora::InvalidArgument for a
   * duplicate or too long name (ggml's limit is 63 bytes), a bad shape or a size mismatch.
   */
  void add_tensor(std::string_view name, GgmlType type, std::span<const std::int64_t> ne,
                  std::span<const std::byte> data);

  /**
   * Adds an fp32 tensor of PyTorch shape `shape` (outermost first; a weight [out, in]) stored
   * as `storage`, which must be F32, F16 or BF16 (rounded to nearest even).
   * `values` [product of shape].
   */
  void add_tensor(std::string_view name, std::span<const std::int64_t> shape,
                  std::span<const float> values, GgmlType storage = GgmlType::f32);

  std::size_t n_tensors() const noexcept { return tensors_.size(); }

  /// Writes the file atomically; throws qlora::IoError when writing fails.
  void write(const std::filesystem::path& path) const;

 private:
  struct PendingTensor {
    std::string name;
    GgmlType type;
    std::vector<std::int64_t> ne;
    std::vector<std::byte> data;
  };

  std::uint32_t alignment_;
  std::vector<GgufKeyValue> metadata_;
  std::vector<PendingTensor> tensors_;
};

}  // namespace qlora
