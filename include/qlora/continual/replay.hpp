// A replay buffer for continual learning: a fixed-size uniform sample of the training windows
// of earlier tasks, mixed into later tasks' batches so that they are not forgotten.
//
// Admission is reservoir sampling (Vitter's algorithm R): the first `capacity` windows are
// kept; the n-th window offered (1-based, n > capacity) replaces slot j when a draw j uniform
// in [0, n) falls below the capacity, so every window offered so far is held with probability
// capacity / n. With per-task quotas each task keeps its own reservoir of capacity / tasks
// windows, so a very small buffer still keeps every task. When a task is added the others
// shrink by dropping random slots, which keeps each a uniform sample.
//
// Every random choice is a hash of the seed and a counter, so the buffer's content, and the
// rows it replays, depend on the seed and the offers alone, across save and load.
//
// The buffer stores the user's training text (as token ids): it has a size cap, can be
// cleared, and its file can be deleted.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <vector>

#include "qlora/train/data.hpp"

namespace qlora::continual {

struct ReplayOptions {
  std::int64_t capacity = 0;   ///< windows kept; 0 disables replay
  double batch_fraction = 0.25;  ///< share of each micro-batch drawn from the buffer
  bool per_task_quota = false;
  std::uint64_t seed = 0;
};

class ReplayBuffer {
 public:
  ReplayBuffer() = default;
  /// Throws qlora::InvalidArgument for a negative capacity.
  ReplayBuffer(std::int64_t capacity, std::uint64_t seed, bool per_task_quota = false);

  /// Offers one window of task `task` (any integer id); it is kept or dropped as above.
  void offer(const PackedRow& row, int task);

  /// The window replayed for draw number `draw`: a slot chosen by hashing the seed and `draw`.
  /// Throws qlora::InvalidArgument when the buffer is empty.
  const PackedRow& draw(std::uint64_t draw) const;

  std::int64_t capacity() const { return capacity_; }
  std::int64_t size() const;
  bool empty() const { return size() == 0; }
  /// Windows offered so far (all tasks).
  std::uint64_t seen() const { return seen_; }
  /// Tokens held, for the size report.
  std::int64_t stored_tokens() const;
  /// Windows held per task id.
  std::map<int, std::int64_t> windows_per_task() const;

  /// Every stored window, to inspect what the buffer keeps of the user's text.
  std::vector<const PackedRow*> windows() const;

  /// Erases every stored window and the offer counts.
  void clear();

  /// Writes the buffer as a safetensors file (token ids as I32), atomically.
  void save(const std::filesystem::path& path) const;
  /// Throws qlora::IoError or qlora::FormatError for a missing or malformed file.
  static ReplayBuffer load(const std::filesystem::path& path);

 private:
  struct Slot {
    PackedRow row;
    int task = 0;
  };
  void offer_to(std::vector<Slot>& slots, std::uint64_t& seen, std::int64_t quota,
                const PackedRow& row, int task);
  void rebalance();
  std::int64_t quota() const;

  std::int64_t capacity_ = 0;
  std::uint64_t seed_ = 0;
  bool per_task_quota_ = false;
  std::uint64_t seen_ = 0;
  std::uint64_t evictions_ = 0;  ///< counter for the random drops of rebalance()
  // One reservoir in total, or one per task with quotas (key = task id; -1 without quotas).
  std::map<int, std::vector<Slot>> reservoirs_;
  std::map<int, std::uint64_t> seen_per_reservoir_;
};

}  // namespace qlora::continual
