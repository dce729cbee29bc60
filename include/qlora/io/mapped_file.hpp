// Read-only memory-mapped files and atomic file writes, the two primitives of qlora's model
// readers and writers.
//
// MappedFile maps a whole file read-only (mmap, POSIX only) and unmaps it when destroyed; the
// bytes stay at the same address when the object is moved, so spans into them survive a move
// of the owner. AtomicFileWriter writes a new file next to its destination and renames it into
// place only after fsync, so readers never see a half-written file.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace qlora {

/// A read-only memory map of a whole file.
class MappedFile {
 public:
  MappedFile() = default;

  /// Maps `path`; throws qlora::IoError when it cannot be opened, stat'ed or mapped.
  explicit MappedFile(const std::filesystem::path& path);

  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  std::size_t size() const noexcept { return size_; }
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  void unmap() noexcept;

  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/**
 * Writes a file atomically: the bytes go to a temporary file in the destination's directory,
 * and commit() flushes it with fsync and renames it over the destination. Destroying the
 * writer without commit() removes the temporary file and leaves the destination untouched.
 * Throws qlora::IoError on any failed system call.
 */
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path destination);
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter();

  /// Appends `bytes` to the temporary file.
  void write(std::span<const std::byte> bytes);
  /// Appends `n` zero bytes.
  void write_zeros(std::size_t n);
  /// Bytes written so far.
  std::size_t position() const noexcept { return position_; }
  /// Flushes, closes and renames the temporary file over the destination.
  void commit();

 private:
  std::filesystem::path destination_;
  std::string temp_path_;
  int fd_ = -1;
  std::size_t position_ = 0;
};

/// Writes `text` to `path` through an AtomicFileWriter.
void write_text_file_atomic(const std::filesystem::path& path, std::string_view text);

/// Reads a whole file as text. Throws qlora::IoError naming `op` and the path when it cannot
/// be read.
std::string read_text_file(const std::filesystem::path& path, std::string_view op);

}  // namespace qlora
