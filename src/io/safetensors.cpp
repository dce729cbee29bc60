#include "qlora/io/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"

namespace qlora {
namespace {

using nlohmann::json;

// Bits per element of each dtype that safetensors defines (safetensors/src/tensor.rs).
std::optional<std::uint64_t> dtype_bits(std::string_view dtype) noexcept {
  struct Entry {
    std::string_view name;
    std::uint64_t bits;
  };
  static constexpr Entry kDtypes[] = {
      {"BOOL", 8},    {"U8", 8},          {"I8", 8},          {"I16", 16},      {"U16", 16},
      {"I32", 32},    {"U32", 32},        {"I64", 64},        {"U64", 64},      {"F16", 16},
      {"BF16", 16},   {"F32", 32},        {"F64", 64},        {"C64", 64},      {"F8_E5M2", 8},
      {"F8_E4M3", 8}, {"F8_E8M0", 8},     {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"F4", 4},
      {"F6_E2M3", 6}, {"F6_E3M2", 6},
  };
  for (const Entry& entry : kDtypes) {
    if (entry.name == dtype) return entry.bits;
  }
  return std::nullopt;
}

std::uint64_t read_u64_le(const std::byte* bytes) noexcept {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<std::uint64_t>(bytes[i]);
  return value;
}

// Parses the header JSON, rejecting duplicate top-level keys (nlohmann keeps the last one).
json parse_header(std::string_view text, const std::string& path) {
  std::set<std::string> seen;
  std::string duplicate;
  const json::parser_callback_t callback = [&](int depth, json::parse_event_t event,
                                               json& parsed) {
    if (event == json::parse_event_t::key && depth == 1) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text.begin(), text.end(), callback);
  } catch (const json::exception& error) {
    raise<FormatError>("[safetensors] '{}': the header is not valid JSON: {} (hint: the file "
                       "is corrupt or not a safetensors file)",
                       path, error.what());
  }
  if (!duplicate.empty()) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' appears twice in the header, expected "
                       "unique names",
                       path, duplicate);
  }
  if (!header.is_object()) {
    raise<FormatError>("[safetensors] '{}': the header is not a JSON object: got {}", path,
                       header.type_name());
  }
  return header;
}

std::uint64_t get_unsigned(const json& value, const std::string& path, std::string_view tensor,
                           std::string_view field) {
  if (!value.is_number_unsigned()) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' has an invalid {}: got {}, expected a "
                       "non-negative integer",
                       path, tensor, field, value.dump());
  }
  return value.get<std::uint64_t>();
}

SafetensorsTensor parse_tensor_entry(const std::string& name, const json& entry,
                                     const std::string& path) {
  if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
      !entry.contains("data_offsets")) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' has an invalid header entry: got {}, "
                       "expected an object with dtype, shape and data_offsets",
                       path, name, entry.dump().substr(0, 200));
  }
  SafetensorsTensor tensor;
  tensor.name = name;
  const json& dtype = entry["dtype"];
  if (!dtype.is_string()) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' has a non-string dtype: got {}", path,
                       name, dtype.dump());
  }
  tensor.dtype = dtype.get<std::string>();
  const auto bits = dtype_bits(tensor.dtype);
  if (!bits) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' has an unknown dtype: got \"{}\", "
                       "expected one of F32, F16, BF16, F64, I8 ... U64, BOOL, F8_*, F6_*, F4",
                       path, name, tensor.dtype);
  }

  const json& shape = entry["shape"];
  if (!shape.is_array()) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' has a shape that is not an array: got {}",
                       path, name, shape.dump());
  }
  std::uint64_t n_elements = 1;
  bool overflow = false;
  for (const json& dim : shape) {
    const std::uint64_t size = get_unsigned(dim, path, name, "shape");
    if (size > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) overflow = true;
    overflow = overflow || __builtin_mul_overflow(n_elements, size, &n_elements);
    tensor.shape.push_back(static_cast<std::int64_t>(size));
  }
  std::uint64_t n_bits = 0;
  overflow = overflow || __builtin_mul_overflow(n_elements, *bits, &n_bits) ||
             n_elements > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  if (overflow) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' has a size that overflows 64 bits: got "
                       "shape {} of {}",
                       path, name, shape.dump(), tensor.dtype);
  }
  if (n_bits % 8 != 0) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' of {} is not a whole number of bytes: "
                       "got shape {} ({} bits)",
                       path, name, tensor.dtype, shape.dump(), n_bits);
  }

  const json& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' has invalid data_offsets: got {}, "
                       "expected [begin, end]",
                       path, name, offsets.dump());
  }
  tensor.data_begin = get_unsigned(offsets[0], path, name, "data_offsets[0]");
  tensor.data_end = get_unsigned(offsets[1], path, name, "data_offsets[1]");
  if (tensor.data_end < tensor.data_begin || tensor.data_end - tensor.data_begin != n_bits / 8) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' has data_offsets that do not match its "
                       "dtype and shape: got [{}, {}], expected end - begin = {} bytes for "
                       "shape {} of {}",
                       path, name, tensor.data_begin, tensor.data_end, n_bits / 8, shape.dump(),
                       tensor.dtype);
  }
  return tensor;
}

void convert_to_float(const SafetensorsTensor& tensor, const std::string& path, float* dst) {
  const std::size_t n = static_cast<std::size_t>(tensor.n_elements());
  const std::byte* src = tensor.data.data();
  if (tensor.dtype == "F32") {
    if (n > 0) std::memcpy(dst, src, n * sizeof(float));
  } else if (tensor.dtype == "F16" || tensor.dtype == "BF16") {
    const bool is_f16 = tensor.dtype == "F16";
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t bits;
      std::memcpy(&bits, src + 2 * i, sizeof bits);
      dst[i] = is_f16 ? fp16_to_fp32(bits) : bf16_to_fp32(bits);
    }
  } else {
    raise<NotImplemented>("[safetensors] '{}': tensor '{}' has dtype {}, which qlora cannot "
                          "convert to float (supported: F32, F16, BF16)",
                          path, tensor.name, tensor.dtype);
  }
}

}  // namespace

std::int64_t SafetensorsTensor::n_elements() const noexcept {
  std::int64_t n = 1;
  for (const std::int64_t dim : shape) n *= dim;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(path) {
  const std::string path_text = path.string();
  const std::span<const std::byte> bytes = file_.bytes();
  if (bytes.size() < 8) {
    raise<FormatError>("[safetensors] '{}' is too short for a header length: got {} bytes, "
                       "expected at least 8 (hint: the file is truncated)",
                       path_text, bytes.size());
  }
  const std::uint64_t header_size = read_u64_le(bytes.data());
  if (header_size > kSafetensorsMaxHeaderSize || header_size > bytes.size() - 8) {
    raise<FormatError>("[safetensors] '{}': the header length is invalid: got {}, expected at "
                       "most {} and at most the {} bytes after the length field (hint: the file "
                       "is truncated or not a safetensors file)",
                       path_text, header_size, kSafetensorsMaxHeaderSize, bytes.size() - 8);
  }
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8),
                              static_cast<std::size_t>(header_size));
  if (text.empty() || text.front() != '{') {
    raise<FormatError>("[safetensors] '{}': the header does not start with '{{': got {} bytes "
                       "starting with 0x{:02x} (hint: not a safetensors file)",
                       path_text, header_size, text.empty() ? 0 : static_cast<unsigned char>(text[0]));
  }
  const json header = parse_header(text, path_text);

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        raise<FormatError>("[safetensors] '{}': __metadata__ is not an object: got {}", path_text,
                           entry.dump().substr(0, 200));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          raise<FormatError>("[safetensors] '{}': __metadata__ entry '{}' is not a string: got "
                             "{}, expected a string-to-string map",
                             path_text, key, value.dump().substr(0, 200));
        }
        metadata_.emplace(key, value.get<std::string>());
      }
      continue;
    }
    tensors_.push_back(parse_tensor_entry(name, entry, path_text));
  }

  // The data buffer must be tiled exactly: sorted by offset, each tensor starts where the
  // previous ends, the first at 0 and the last at the end of the file.
  std::sort(tensors_.begin(), tensors_.end(), [](const auto& a, const auto& b) {
    return a.data_begin != b.data_begin ? a.data_begin < b.data_begin : a.data_end < b.data_end;
  });
  const std::uint64_t data_start = 8 + header_size;
  const std::uint64_t data_size = bytes.size() - data_start;
  std::uint64_t expected_begin = 0;
  for (SafetensorsTensor& tensor : tensors_) {
    if (tensor.data_begin != expected_begin) {
      raise<FormatError>("[safetensors] '{}': tensor '{}' is not contiguous with the previous "
                         "one: got data_offsets [{}, {}], expected begin {} (no gaps or overlaps "
                         "in the data buffer)",
                         path_text, tensor.name, tensor.data_begin, tensor.data_end,
                         expected_begin);
    }
    if (tensor.data_end > data_size) {
      raise<FormatError>("[safetensors] '{}': tensor '{}' lies past the end of the file: got "
                         "data_offsets [{}, {}], but the data buffer holds {} bytes (hint: the "
                         "file is truncated)",
                         path_text, tensor.name, tensor.data_begin, tensor.data_end, data_size);
    }
    tensor.data = bytes.subspan(static_cast<std::size_t>(data_start + tensor.data_begin),
                                static_cast<std::size_t>(tensor.data_end - tensor.data_begin));
    expected_begin = tensor.data_end;
  }
  if (expected_begin != data_size) {
    raise<FormatError>("[safetensors] '{}': the data buffer has {} bytes, but the tensors cover "
                       "{} (hint: the file is truncated or has trailing bytes)",
                       path_text, data_size, expected_begin);
  }
  for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const noexcept {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const SafetensorsTensor& SafetensorsFile::tensor(std::string_view name) const {
  const SafetensorsTensor* tensor = find(name);
  if (tensor == nullptr) {
    raise<FormatError>("[safetensors] '{}': tensor '{}' is missing ({} tensors in the file)",
                       path().string(), name, tensors_.size());
  }
  return *tensor;
}

std::vector<std::int32_t> SafetensorsFile::to_int32(const SafetensorsTensor& tensor) const {
  if (tensor.dtype != "I32") {
    raise<FormatError>("[SafetensorsFile::to_int32] {}: tensor '{}' has dtype {}, expected I32",
                       path().string(), tensor.name, tensor.dtype);
  }
  std::vector<std::int32_t> values(tensor.data.size() / sizeof(std::int32_t));
  if (!values.empty()) std::memcpy(values.data(), tensor.data.data(), tensor.data.size());
  return values;
}

std::vector<float> SafetensorsFile::to_float(const SafetensorsTensor& tensor) const {
  std::vector<float> values(static_cast<std::size_t>(tensor.n_elements()));
  convert_to_float(tensor, path().string(), values.data());
  return values;
}

RowMatrixF SafetensorsFile::to_matrix(const SafetensorsTensor& tensor) const {
  if (tensor.shape.size() != 1 && tensor.shape.size() != 2) {
    raise<InvalidArgument>("[safetensors] '{}': tensor '{}' is not a vector or matrix: got shape "
                           "[{}], expected rank 1 or 2",
                           path().string(), tensor.name, fmt::join(tensor.shape, ", "));
  }
  const std::int64_t rows = tensor.shape.size() == 2 ? tensor.shape[0] : 1;
  const std::int64_t cols = tensor.shape.back();
  RowMatrixF matrix(rows, cols);
  convert_to_float(tensor, path().string(), matrix.data());
  return matrix;
}

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::filesystem::path& path) : path_(path) {
  namespace fs = std::filesystem;
  fs::path index_path;
  fs::path single_path;
  if (fs::is_directory(path)) {
    if (fs::exists(path / "model.safetensors.index.json")) {
      index_path = path / "model.safetensors.index.json";
    } else if (fs::exists(path / "model.safetensors")) {
      single_path = path / "model.safetensors";
    } else {
      raise<IoError>("[SafetensorsCheckpoint] no model.safetensors.index.json or model.safetensors "
                     "found in '{}' (hint: pass the directory of a Hugging Face checkpoint)",
                     path.string());
    }
  } else if (path.filename().string().ends_with(".index.json")) {
    index_path = path;
  } else {
    single_path = path;
  }

  if (!single_path.empty()) {
    shards_.emplace_back(single_path);
    for (const SafetensorsTensor& tensor : shards_.back().tensors()) {
      shard_index_.emplace(tensor.name, 0);
    }
    return;
  }

  // Sharded: the index maps each tensor name to the file that contains it.
  std::ifstream stream(index_path);
  if (!stream) {
    raise<IoError>("[SafetensorsCheckpoint] cannot open '{}'", index_path.string());
  }
  json index;
  try {
    index = json::parse(stream);
  } catch (const json::exception& error) {
    raise<FormatError>("[SafetensorsCheckpoint] '{}' is not valid JSON: {}", index_path.string(),
                       error.what());
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    raise<FormatError>("[SafetensorsCheckpoint] '{}' has no weight_map object, expected "
                       "{{\"weight_map\": {{\"tensor name\": \"shard file\", ...}}}}",
                       index_path.string());
  }
  std::map<std::string, std::size_t> shard_by_file;
  const fs::path directory = index_path.parent_path();
  for (const auto& [name, file] : index["weight_map"].items()) {
    if (!file.is_string()) {
      raise<FormatError>("[SafetensorsCheckpoint] '{}': weight_map entry '{}' is not a file "
                         "name: got {}",
                         index_path.string(), name, file.dump());
    }
    const std::string file_name = file.get<std::string>();
    if (file_name.empty() || fs::path(file_name).has_parent_path() || file_name == "..") {
      raise<FormatError>("[SafetensorsCheckpoint] '{}': weight_map entry '{}' names an invalid "
                         "shard: got \"{}\", expected a file name in the same directory",
                         index_path.string(), name, file_name);
    }
    auto it = shard_by_file.find(file_name);
    if (it == shard_by_file.end()) {
      shards_.emplace_back(directory / file_name);
      it = shard_by_file.emplace(file_name, shards_.size() - 1).first;
    }
    if (shards_[it->second].find(name) == nullptr) {
      raise<FormatError>("[SafetensorsCheckpoint] '{}': the index puts tensor '{}' in '{}', but "
                         "that shard does not hold it (hint: the checkpoint is incomplete or "
                         "mixed from two downloads)",
                         index_path.string(), name, file_name);
    }
    shard_index_.emplace(name, it->second);
  }
}

std::vector<std::string> SafetensorsCheckpoint::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(shard_index_.size());
  for (const auto& entry : shard_index_) names.push_back(entry.first);
  return names;
}

const SafetensorsTensor* SafetensorsCheckpoint::find(std::string_view name) const noexcept {
  const auto it = shard_index_.find(name);
  return it == shard_index_.end() ? nullptr : shards_[it->second].find(name);
}

const SafetensorsFile& SafetensorsCheckpoint::shard_of(std::string_view name) const {
  const auto it = shard_index_.find(name);
  if (it == shard_index_.end()) {
    raise<FormatError>("[SafetensorsCheckpoint] '{}': tensor '{}' is missing ({} tensors in {} "
                       "files) (hint: names are Hugging Face names such as "
                       "'model.layers.0.self_attn.q_proj.weight')",
                       path_.string(), name, shard_index_.size(), shards_.size());
  }
  return shards_[it->second];
}

const SafetensorsTensor& SafetensorsCheckpoint::tensor(std::string_view name) const {
  return shard_of(name).tensor(name);
}

std::vector<float> SafetensorsCheckpoint::to_float(std::string_view name) const {
  const SafetensorsFile& shard = shard_of(name);
  return shard.to_float(shard.tensor(name));
}

RowMatrixF SafetensorsCheckpoint::to_matrix(std::string_view name) const {
  const SafetensorsFile& shard = shard_of(name);
  return shard.to_matrix(shard.tensor(name));
}

SafetensorsWriter::SafetensorsWriter() { metadata_["format"] = "pt"; }

void SafetensorsWriter::set_metadata(std::string key, std::string value) {
  metadata_[std::move(key)] = std::move(value);
}

void SafetensorsWriter::check_new_tensor(std::string_view name,
                                         std::span<const std::int64_t> shape,
                                         std::size_t n_values) const {
  QLORA_CHECK_ARG(!name.empty() && name != "__metadata__",
                  "[SafetensorsWriter::add] invalid tensor name: got '{}', expected a non-empty "
                  "name other than __metadata__",
                  name);
  QLORA_CHECK_ARG(tensors_.find(std::string(name)) == tensors_.end(),
                  "[SafetensorsWriter::add] duplicate tensor name '{}'", name);
  std::int64_t n_elements = 1;
  for (const std::int64_t dim : shape) {
    QLORA_CHECK_ARG(dim >= 0 && !__builtin_mul_overflow(n_elements, dim, &n_elements),
                    "[SafetensorsWriter::add] tensor '{}' has an invalid shape [{}]", name,
                    fmt::join(shape, ", "));
  }
  QLORA_CHECK_ARG(static_cast<std::uint64_t>(n_elements) == n_values,
                  "[SafetensorsWriter::add] tensor '{}' has the wrong element count: got {}, "
                  "expected {} for shape [{}]",
                  name, n_values, n_elements, fmt::join(shape, ", "));
}

void SafetensorsWriter::add(std::string_view name, std::span<const std::int64_t> shape,
                            std::span<const float> values, SafetensorsDtype dtype) {
  check_new_tensor(name, shape, values.size());
  PendingTensor tensor;
  tensor.shape.assign(shape.begin(), shape.end());
  if (dtype == SafetensorsDtype::f32) {
    tensor.dtype = "F32";
    tensor.data.resize(values.size() * sizeof(float));
    if (!values.empty()) std::memcpy(tensor.data.data(), values.data(), tensor.data.size());
  } else {
    tensor.dtype = dtype == SafetensorsDtype::f16 ? "F16" : "BF16";
    tensor.data.resize(values.size() * sizeof(std::uint16_t));
    for (std::size_t i = 0; i < values.size(); ++i) {
      const std::uint16_t bits =
          dtype == SafetensorsDtype::f16 ? fp32_to_fp16(values[i]) : fp32_to_bf16(values[i]);
      std::memcpy(tensor.data.data() + 2 * i, &bits, sizeof bits);
    }
  }
  tensors_.emplace(std::string(name), std::move(tensor));
}

void SafetensorsWriter::add_int32(std::string_view name, std::span<const std::int64_t> shape,
                                  std::span<const std::int32_t> values) {
  check_new_tensor(name, shape, values.size());
  PendingTensor tensor;
  tensor.shape.assign(shape.begin(), shape.end());
  tensor.dtype = "I32";
  tensor.data.resize(values.size() * sizeof(std::int32_t));
  if (!values.empty()) std::memcpy(tensor.data.data(), values.data(), tensor.data.size());
  tensors_.emplace(std::string(name), std::move(tensor));
}

void SafetensorsWriter::add(std::string_view name, const ConstRefRowMatrixF& matrix,
                            SafetensorsDtype dtype) {
  const std::int64_t shape[2] = {matrix.rows(), matrix.cols()};
  // A Ref may have an outer stride; copy into a contiguous row-major matrix first.
  const RowMatrixF contiguous = matrix;
  add(name, shape, std::span<const float>(contiguous.data(), static_cast<std::size_t>(contiguous.size())),
      dtype);
}

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  json header = json::object();
  header["__metadata__"] = metadata_;
  std::uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors_) {
    header[name] = {{"dtype", tensor.dtype},
                    {"shape", tensor.shape},
                    {"data_offsets", {offset, offset + tensor.data.size()}}};
    offset += tensor.data.size();
  }
  std::string text = header.dump();
  // Pad with spaces so that the data buffer starts 8-aligned, as the reference writer does.
  text.append((8 - text.size() % 8) % 8, ' ');

  AtomicFileWriter out(path);
  std::byte length[8];
  for (int i = 0; i < 8; ++i) {
    length[i] = static_cast<std::byte>((text.size() >> (8 * i)) & 0xffu);
  }
  out.write(length);
  out.write(std::as_bytes(std::span<const char>(text.data(), text.size())));
  for (const auto& entry : tensors_) out.write(entry.second.data);
  out.commit();
}

}  // namespace qlora
