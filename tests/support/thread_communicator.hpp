// A Communicator whose ranks are threads of one process, so that the data-parallel trainer is
// tested in every build, without MPI. Sums run in rank order on every rank, so every rank
// gets bit-identical results.
#pragma once

#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "qlora/dist/communicator.hpp"

namespace qlora::test {

// The state that the ranks of one job share.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size)
      : size_(size), sync_(size), slots_(static_cast<std::size_t>(size)) {}

  int size() const { return size_; }

  // Runs `body(rank)` on `size` threads and waits for all of them. An exception on one thread
  // would leave the others waiting in a collective, so bodies report failures with gtest
  // assertions instead of throwing past a collective.
  void run(const std::function<void(int)>& body) {
    std::vector<std::jthread> threads;
    for (int rank = 0; rank < size_; ++rank) threads.emplace_back(body, rank);
  }

 private:
  friend class ThreadCommunicator;
  int size_;
  std::barrier<> sync_;
  std::vector<const void*> slots_;  // each rank's buffer during a collective
};

class ThreadCommunicator final : public qlora::Communicator {
 public:
  ThreadCommunicator(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_.size(); }
  std::string description() const override {
    return fmt::format("threads, rank {} of {}", rank_, group_.size());
  }
  void all_reduce_sum(std::span<float> values) override { reduce(values); }
  void all_reduce_sum(std::span<double> values) override { reduce(values); }

  void broadcast(std::span<std::byte> bytes, int root) override {
    publish(bytes.data());
    std::vector<std::byte> copy(bytes.size());
    std::memcpy(copy.data(), group_.slots_[static_cast<std::size_t>(root)], bytes.size());
    group_.sync_.arrive_and_wait();
    std::memcpy(bytes.data(), copy.data(), bytes.size());
  }

  std::vector<std::uint64_t> all_gather(std::span<const std::uint64_t> values) override {
    publish(values.data());
    std::vector<std::uint64_t> gathered;
    for (int r = 0; r < size(); ++r) {
      const auto* other =
          static_cast<const std::uint64_t*>(group_.slots_[static_cast<std::size_t>(r)]);
      gathered.insert(gathered.end(), other, other + values.size());
    }
    group_.sync_.arrive_and_wait();
    return gathered;
  }

  void barrier() override { group_.sync_.arrive_and_wait(); }

 private:
  // Stores this rank's buffer and waits until every rank has stored its own.
  void publish(const void* data) {
    group_.slots_[static_cast<std::size_t>(rank_)] = data;
    group_.sync_.arrive_and_wait();
  }

  template <class T>
  void reduce(std::span<T> values) {
    publish(values.data());
    std::vector<T> sum(values.size(), T(0));
    for (int r = 0; r < size(); ++r) {
      const auto* other = static_cast<const T*>(group_.slots_[static_cast<std::size_t>(r)]);
      for (std::size_t i = 0; i < values.size(); ++i) sum[i] += other[i];
    }
    // No rank overwrites its buffer until every rank has read all of them.
    group_.sync_.arrive_and_wait();
    std::copy(sum.begin(), sum.end(), values.begin());
  }

  ThreadGroup& group_;
  int rank_;
};

}  // namespace qlora::test
