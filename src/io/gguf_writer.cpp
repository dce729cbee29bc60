#include "qlora/io/gguf_writer.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/ranges.h>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/io/mapped_file.hpp"

namespace qlora {
namespace {

// ggml's GGML_MAX_NAME is 64 bytes including the terminating NUL.
constexpr std::size_t kMaxTensorName = 63;

class ByteBuffer {
 public:
  template <class T>
  void put(T value) {
    const auto* first = reinterpret_cast<const std::byte*>(&value);
    bytes_.insert(bytes_.end(), first, first + sizeof(T));
  }
  void put_string(std::string_view text) {
    put<std::uint64_t>(text.size());
    const auto* first = reinterpret_cast<const std::byte*>(text.data());
    bytes_.insert(bytes_.end(), first, first + text.size());
  }
  const std::vector<std::byte>& bytes() const noexcept { return bytes_; }

 private:
  std::vector<std::byte> bytes_;
};

void put_value(ByteBuffer& buffer, const GgufValue& value) {
  std::visit(
      [&](const auto& payload) {
        using T = std::decay_t<decltype(payload)>;
        if constexpr (std::is_same_v<T, std::string>) {
          buffer.put_string(payload);
        } else if constexpr (std::is_same_v<T, GgufArray>) {
          buffer.put<std::uint32_t>(static_cast<std::uint32_t>(payload.element_type));
          buffer.put<std::uint64_t>(payload.elements.size());
          for (const GgufValue& element : payload.elements) put_value(buffer, element);
        } else if constexpr (std::is_same_v<T, bool>) {
          buffer.put<std::uint8_t>(payload ? 1 : 0);
        } else {
          buffer.put<T>(payload);
        }
      },
      value.storage());
}

std::uint64_t round_up(std::uint64_t n, std::uint64_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

}  // namespace

GgufWriter::GgufWriter(std::uint32_t alignment) : alignment_(alignment) {
  QLORA_CHECK_ARG(alignment != 0 && (alignment & (alignment - 1)) == 0,
                  "[GgufWriter] alignment is not a power of two: got {}, expected 1, 2, 4, ... "
                  "(hint: GGUF's default is 32)",
                  alignment);
  if (alignment != kGgufDefaultAlignment) set("general.alignment", GgufValue(alignment));
}

void GgufWriter::set(std::string_view key, GgufValue value) {
  QLORA_CHECK_ARG(!key.empty(), "[GgufWriter::set] empty metadata key, expected a name such as "
                                "'general.architecture'");
  if (key == "general.alignment" && value != GgufValue(alignment_)) {
    raise<InvalidArgument>("[GgufWriter::set] general.alignment is fixed by the constructor: got "
                           "{}, expected UINT32 {} (hint: pass the alignment to GgufWriter)",
                           value.to_display_string(), alignment_);
  }
  for (GgufKeyValue& entry : metadata_) {
    if (entry.key == key) {
      entry.value = std::move(value);
      return;
    }
  }
  metadata_.push_back({std::string(key), std::move(value)});
}

void GgufWriter::add_tensor(std::string_view name, GgmlType type, std::span<const std::int64_t> ne,
                            std::span<const std::byte> data) {
  QLORA_CHECK_ARG(!name.empty() && name.size() <= kMaxTensorName,
                  "[GgufWriter::add_tensor] invalid tensor name length: got '{}' ({} bytes), "
                  "expected 1 to {} bytes",
                  name, name.size(), kMaxTensorName);
  QLORA_CHECK_ARG(std::none_of(tensors_.begin(), tensors_.end(),
                               [&](const PendingTensor& t) { return t.name == name; }),
                  "[GgufWriter::add_tensor] duplicate tensor name '{}'", name);
  QLORA_CHECK_ARG(!ne.empty() && ne.size() <= 4,
                  "[GgufWriter::add_tensor] tensor '{}' has {} dimensions, expected 1 to 4", name,
                  ne.size());
  const GgmlTypeTraits traits = ggml_type_traits(type);
  std::int64_t n_bytes = 0;
  bool valid = ne[0] >= 0 && ne[0] % traits.block_size == 0;
  if (valid) {
    n_bytes = ne[0] / traits.block_size * traits.type_size;
    for (std::size_t i = 1; i < ne.size() && valid; ++i) {
      valid = ne[i] >= 0 && !__builtin_mul_overflow(n_bytes, ne[i], &n_bytes);
    }
  }
  QLORA_CHECK_ARG(valid,
                  "[GgufWriter::add_tensor] tensor '{}' has an invalid shape for type {}: got ne "
                  "[{}], expected non-negative dimensions with ne[0] % {} == 0",
                  name, traits.name, fmt::join(ne, ", "), traits.block_size);
  QLORA_CHECK_ARG(static_cast<std::uint64_t>(n_bytes) == data.size(),
                  "[GgufWriter::add_tensor] tensor '{}' has the wrong byte count: got {}, "
                  "expected {} for type {} and ne [{}]",
                  name, data.size(), n_bytes, traits.name, fmt::join(ne, ", "));
  tensors_.push_back({std::string(name), type, std::vector<std::int64_t>(ne.begin(), ne.end()),
                      std::vector<std::byte>(data.begin(), data.end())});
}

void GgufWriter::add_tensor(std::string_view name, std::span<const std::int64_t> shape,
                            std::span<const float> values, GgmlType storage) {
  QLORA_CHECK_ARG(storage == GgmlType::f32 || storage == GgmlType::f16 || storage == GgmlType::bf16,
                  "[GgufWriter::add_tensor] tensor '{}': float data can be stored as F32, F16 or "
                  "BF16, got {} (hint: pass quantized blocks as raw bytes)",
                  name, to_string(storage));
  std::int64_t n_elements = 1;
  for (const std::int64_t dim : shape) {
    QLORA_CHECK_ARG(dim >= 0 && !__builtin_mul_overflow(n_elements, dim, &n_elements),
                    "[GgufWriter::add_tensor] tensor '{}' has an invalid shape [{}]", name,
                    fmt::join(shape, ", "));
  }
  QLORA_CHECK_ARG(static_cast<std::uint64_t>(n_elements) == values.size(),
                  "[GgufWriter::add_tensor] tensor '{}' has the wrong element count: got {}, "
                  "expected {} for shape [{}]",
                  name, values.size(), n_elements, fmt::join(shape, ", "));
  const std::vector<std::int64_t> ne(shape.rbegin(), shape.rend());

  std::vector<std::byte> bytes;
  if (storage == GgmlType::f32) {
    bytes.resize(values.size() * sizeof(float));
    if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  } else {
    bytes.resize(values.size() * sizeof(std::uint16_t));
    for (std::size_t i = 0; i < values.size(); ++i) {
      const std::uint16_t bits =
          storage == GgmlType::f16 ? fp32_to_fp16(values[i]) : fp32_to_bf16(values[i]);
      std::memcpy(bytes.data() + 2 * i, &bits, sizeof bits);
    }
  }
  add_tensor(name, storage, ne, bytes);
}

void GgufWriter::write(const std::filesystem::path& path) const {
  ByteBuffer header;
  header.put<std::uint32_t>(kGgufMagic);
  header.put<std::uint32_t>(3);
  header.put<std::uint64_t>(tensors_.size());
  header.put<std::uint64_t>(metadata_.size());
  for (const GgufKeyValue& entry : metadata_) {
    header.put_string(entry.key);
    header.put<std::uint32_t>(static_cast<std::uint32_t>(entry.value.type()));
    put_value(header, entry.value);
  }
  std::uint64_t offset = 0;
  for (const PendingTensor& tensor : tensors_) {
    header.put_string(tensor.name);
    header.put<std::uint32_t>(static_cast<std::uint32_t>(tensor.ne.size()));
    for (const std::int64_t dim : tensor.ne) header.put<std::uint64_t>(static_cast<std::uint64_t>(dim));
    header.put<std::uint32_t>(static_cast<std::uint32_t>(tensor.type));
    header.put<std::uint64_t>(offset);
    offset += round_up(tensor.data.size(), alignment_);
  }

  AtomicFileWriter out(path);
  out.write(header.bytes());
  out.write_zeros(round_up(out.position(), alignment_) - out.position());
  for (const PendingTensor& tensor : tensors_) {
    out.write(tensor.data);
    out.write_zeros(round_up(tensor.data.size(), alignment_) - tensor.data.size());
  }
  out.commit();
}

}  // namespace qlora
