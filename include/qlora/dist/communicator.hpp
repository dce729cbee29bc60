// The collective operations that data-parallel training needs, behind a small interface: rank,
// size, sum all-reduce of float and double buffers, broadcast, all-gather of 64-bit hashes and
// barrier.
//
// The Trainer talks only to this interface. SingleProcessCommunicator (here) is the default and
// turns every collective into a no-op. MpiCommunicator (qlora/dist/mpi_communicator.hpp) runs
// the same operations over MPI and is built only with -DQLORA_WITH_MPI=ON. Another transport
// plugs in by deriving from Communicator. Nothing here sends point-to-point messages or
// overlaps communication with compute.
//
// Every collective must be called by every rank in the same order with buffers of the same
// length, as in MPI; a rank that skips one leaves the others waiting.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"

namespace qlora {

/// Thrown identically on every rank when the ranks disagree on something that must be equal
/// (model, configuration, seed, data, data position). The job can end cleanly, without an abort.
class RankMismatch : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  /// This process's index, 0 <= rank() < size().
  virtual int rank() const = 0;
  /// The number of processes taking part.
  virtual int size() const = 0;
  /// A short description for logs, such as "MPI, 2 ranks".
  virtual std::string description() const = 0;

  /// Replaces `values` on every rank with the element-wise sum over all ranks.
  virtual void all_reduce_sum(std::span<float> values) = 0;
  virtual void all_reduce_sum(std::span<double> values) = 0;

  /// Copies `bytes` of rank `root` into `bytes` of every other rank.
  virtual void broadcast(std::span<std::byte> bytes, int root) = 0;

  /// Returns the `values` of every rank concatenated in rank order: size() * values.size()
  /// elements, the same on every rank.
  virtual std::vector<std::uint64_t> all_gather(std::span<const std::uint64_t> values) = 0;

  /// Returns once every rank has called it.
  virtual void barrier() = 0;

  bool is_root() const { return rank() == 0; }

  /// Broadcasts a trivially copyable value from `root`.
  template <class T>
  void broadcast_value(T& value, int root = 0) {
    static_assert(std::is_trivially_copyable_v<T>,
                  "broadcast_value needs a trivially copyable type");
    broadcast(std::as_writable_bytes(std::span<T>(&value, 1)), root);
  }
};

/// The communicator of a job with one process: rank 0 of 1, every collective a no-op.
class SingleProcessCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string description() const override { return "single process"; }
  void all_reduce_sum(std::span<float>) override {}
  void all_reduce_sum(std::span<double>) override {}
  void broadcast(std::span<std::byte>, int root) override {
    QLORA_CHECK_ARG(root == 0, "[broadcast] root rank out of range: got {}, expected 0 in a "
                               "single-process job", root);
  }
  std::vector<std::uint64_t> all_gather(std::span<const std::uint64_t> values) override {
    return {values.begin(), values.end()};
  }
  void barrier() override {}
};

/// Returns a process-wide SingleProcessCommunicator, the Trainer's default.
inline Communicator& single_process_communicator() {
  static SingleProcessCommunicator communicator;
  return communicator;
}

/// Returns a 64-bit hash of `bytes`, read 8 bytes at a time and mixed with mix_seed. It detects
/// accidental differences between ranks; it is not a cryptographic hash.
inline std::uint64_t hash_bytes(std::span<const std::byte> bytes, std::uint64_t seed = 0) {
  std::uint64_t h = mix_seed(seed, bytes.size());
  std::size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    std::uint64_t word = 0;
    for (std::size_t b = 0; b < 8; ++b) {
      word |= static_cast<std::uint64_t>(bytes[i + b]) << (8 * b);
    }
    h = mix_seed(h, word);
  }
  std::uint64_t tail = 0;
  for (std::size_t b = 0; i + b < bytes.size(); ++b) {
    tail |= static_cast<std::uint64_t>(bytes[i + b]) << (8 * b);
  }
  return mix_seed(h, tail);
}

/// Hashes the elements of a vector of trivially copyable values.
template <class T>
std::uint64_t hash_values(std::span<const T> values, std::uint64_t seed = 0) {
  static_assert(std::is_trivially_copyable_v<T>, "hash_values needs a trivially copyable type");
  return hash_bytes(std::as_bytes(values), seed);
}

}  // namespace qlora
