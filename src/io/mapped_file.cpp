#include "qlora/io/mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include <fstream>
#include <sstream>

#include "qlora/core/error.hpp"

namespace qlora {
namespace {

std::string errno_text(int error) { return std::strerror(error); }

// Closes a file descriptor when it goes out of scope.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    raise<IoError>("[MappedFile] cannot open '{}': {} (hint: check the path and its permissions)",
                   path.string(), errno_text(error));
  }
  const FdCloser closer{fd};

  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    raise<IoError>("[MappedFile] cannot stat '{}': {}", path.string(), errno_text(error));
  }
  if (!S_ISREG(info.st_mode)) {
    raise<IoError>("[MappedFile] '{}' is not a regular file (hint: pass the file, not its "
                   "directory)",
                   path.string());
  }
  size_ = static_cast<std::size_t>(info.st_size);
  // mmap rejects a zero length; an empty file maps to an empty span.
  if (size_ == 0) return;

  void* address = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  if (address == MAP_FAILED) {
    const int error = errno;
    size_ = 0;
    raise<IoError>("[MappedFile] cannot map '{}' ({} bytes): {}", path.string(), info.st_size,
                   errno_text(error));
  }
  data_ = static_cast<const std::byte*>(address);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

MappedFile::~MappedFile() { unmap(); }

void MappedFile::unmap() noexcept {
  if (data_ != nullptr) {
    // const_cast: munmap takes a non-const pointer but does not write through it.
    ::munmap(const_cast<std::byte*>(data_), size_);
  }
  data_ = nullptr;
  size_ = 0;
}

AtomicFileWriter::AtomicFileWriter(std::filesystem::path destination)
    : destination_(std::move(destination)) {
  std::filesystem::path directory = destination_.parent_path();
  if (directory.empty()) directory = ".";
  temp_path_ = (directory / ("." + destination_.filename().string() + ".tmp.XXXXXX")).string();
  std::vector<char> pattern(temp_path_.begin(), temp_path_.end());
  pattern.push_back('\0');
  fd_ = ::mkstemp(pattern.data());
  if (fd_ < 0) {
    const int error = errno;
    raise<IoError>("[AtomicFileWriter] cannot create a temporary file in '{}': {} (hint: the "
                   "directory must exist and be writable)",
                   directory.string(), errno_text(error));
  }
  temp_path_.assign(pattern.data());
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(temp_path_.c_str());
  }
}

void AtomicFileWriter::write(std::span<const std::byte> bytes) {
  if (fd_ < 0) raise<IoError>("[AtomicFileWriter] write after commit to '{}'", destination_.string());
  const std::byte* data = bytes.data();
  std::size_t left = bytes.size();
  while (left > 0) {
    const ssize_t written = ::write(fd_, data, left);
    if (written < 0) {
      const int error = errno;
      if (error == EINTR) continue;
      raise<IoError>("[AtomicFileWriter] writing '{}' failed after {} bytes: {}", temp_path_,
                     position_, errno_text(error));
    }
    data += written;
    left -= static_cast<std::size_t>(written);
    position_ += static_cast<std::size_t>(written);
  }
}

void AtomicFileWriter::write_zeros(std::size_t n) {
  static constexpr std::array<std::byte, 256> kZeros{};
  while (n > 0) {
    const std::size_t chunk = n < kZeros.size() ? n : kZeros.size();
    write(std::span<const std::byte>(kZeros.data(), chunk));
    n -= chunk;
  }
}

void AtomicFileWriter::commit() {
  if (fd_ < 0) raise<IoError>("[AtomicFileWriter] '{}' was already committed", destination_.string());
  if (::fsync(fd_) != 0) {
    const int error = errno;
    raise<IoError>("[AtomicFileWriter] fsync of '{}' failed: {}", temp_path_, errno_text(error));
  }
  // mkstemp creates the file with mode 0600; model files are usually world-readable.
  ::fchmod(fd_, 0644);
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) {
    const int error = errno;
    ::unlink(temp_path_.c_str());
    raise<IoError>("[AtomicFileWriter] closing '{}' failed: {}", temp_path_, errno_text(error));
  }
  if (::rename(temp_path_.c_str(), destination_.c_str()) != 0) {
    const int error = errno;
    ::unlink(temp_path_.c_str());
    raise<IoError>("[AtomicFileWriter] renaming '{}' to '{}' failed: {}", temp_path_,
                   destination_.string(), errno_text(error));
  }
  // Make the rename itself durable; a failure here leaves a complete file, so it is ignored.
  std::filesystem::path directory = destination_.parent_path();
  if (directory.empty()) directory = ".";
  const int dir_fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

void write_text_file_atomic(const std::filesystem::path& path, std::string_view text) {
  AtomicFileWriter writer(path);
  writer.write(std::as_bytes(std::span<const char>(text.data(), text.size())));
  writer.commit();
}

std::string read_text_file(const std::filesystem::path& path, std::string_view op) {
  std::ifstream in(path, std::ios::binary);
  if (!in) raise<IoError>("[{}] cannot read {}", op, path.string());
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) raise<IoError>("[{}] error while reading {}", op, path.string());
  return text.str();
}

}  // namespace qlora
