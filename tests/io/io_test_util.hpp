// Helpers shared by the io tests: a temporary directory, whole-file reads and writes, and a
// byte builder for hand-made GGUF files.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

namespace qlora::test {

/// A fresh directory under the system temp directory, removed with its contents at scope end.
class TempDir {
 public:
  TempDir() {
    std::random_device device;
    path_ = std::filesystem::temp_directory_path() /
            ("qlora_io_test_" + std::to_string(device()) + "_" + std::to_string(device()));
    std::filesystem::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code error;
    std::filesystem::remove_all(path_, error);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(std::string_view name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline std::vector<std::uint8_t> read_bytes(const std::filesystem::path& path) {
  std::ifstream stream(path, std::ios::binary);
  EXPECT_TRUE(stream.good()) << "cannot open " << path;
  return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
}

inline void write_bytes(const std::filesystem::path& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  stream.write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(stream.good()) << "cannot write " << path;
}

inline void write_text(const std::filesystem::path& path, std::string_view text) {
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  stream << text;
  ASSERT_TRUE(stream.good()) << "cannot write " << path;
}

/// Appends little-endian GGUF fields to a byte vector, with no validation, so tests can build
/// malformed files field by field.
class GgufBytes {
 public:
  GgufBytes& u8(std::uint8_t value) { return raw(&value, 1); }
  GgufBytes& u32(std::uint32_t value) { return raw(&value, 4); }
  GgufBytes& u64(std::uint64_t value) { return raw(&value, 8); }
  GgufBytes& f32(float value) { return raw(&value, 4); }
  GgufBytes& str(std::string_view text) {
    u64(text.size());
    return raw(text.data(), text.size());
  }
  /// magic "GGUF", version, tensor count, metadata count.
  GgufBytes& header(std::uint64_t n_tensors, std::uint64_t n_kv, std::uint32_t version = 3) {
    return u32(0x46554747).u32(version).u64(n_tensors).u64(n_kv);
  }
  GgufBytes& kv_u32(std::string_view key, std::uint32_t value) { return str(key).u32(4).u32(value); }
  GgufBytes& kv_str(std::string_view key, std::string_view value) {
    return str(key).u32(8).str(value);
  }
  GgufBytes& tensor_info(std::string_view name, std::vector<std::uint64_t> ne, std::uint32_t type,
                         std::uint64_t offset) {
    str(name).u32(static_cast<std::uint32_t>(ne.size()));
    for (const std::uint64_t dim : ne) u64(dim);
    return u32(type).u64(offset);
  }
  GgufBytes& pad_to(std::size_t alignment) {
    while (bytes_.size() % alignment != 0) bytes_.push_back(0);
    return *this;
  }
  GgufBytes& zeros(std::size_t n) {
    bytes_.insert(bytes_.end(), n, 0);
    return *this;
  }
  const std::vector<std::uint8_t>& bytes() const { return bytes_; }

 private:
  GgufBytes& raw(const void* data, std::size_t n) {
    const auto* first = static_cast<const std::uint8_t*>(data);
    bytes_.insert(bytes_.end(), first, first + n);
    return *this;
  }
  std::vector<std::uint8_t> bytes_;
};

}  // namespace qlora::test
