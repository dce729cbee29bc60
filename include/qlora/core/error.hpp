// Exception types and the helpers that build their messages.
//
// Every error that qlora raises derives from qlora::Error. Messages follow one form, so that
// a user can act on them without reading the source:
//   [op] what is wrong: got <values>, expected <rule> (hint: <likely cause or fix>)
// The library never calls exit() or abort(); kernels never throw, because the public
// operation that calls them validates its arguments first.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>

namespace qlora {

/// Base class of every exception that qlora throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An argument has an invalid value or shape (a block size that does not divide a row, NaN).
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A file is malformed: bad magic, truncated data, offsets out of range, an unknown type.
class FormatError : public Error {
 public:
  using Error::Error;
};

/// A file or directory could not be opened, read or written.
class IoError : public Error {
 public:
  using Error::Error;
};

/// A valid request that this build of qlora does not support.
class NotImplemented : public Error {
 public:
  using Error::Error;
};

/**
 * Throws `E` with a message formatted by fmt.
 *
 * Example:
 *   qlora::raise<qlora::InvalidArgument>(
 *       "[nf4_quantize] block size does not divide the row: got in={}, block_size={}, "
 *       "expected in % block_size == 0 (hint: use a block size of 32 or 64)", in, block_size);
 */
template <class E = Error, class... Args>
[[noreturn]] void raise(fmt::format_string<Args...> format, Args&&... args) {
  throw E(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace qlora

/// Throws qlora::InvalidArgument with the formatted message when `cond` is false.
#define QLORA_CHECK_ARG(cond, ...)                         \
  do {                                                     \
    if (!(cond)) ::qlora::raise<::qlora::InvalidArgument>(__VA_ARGS__); \
  } while (false)
