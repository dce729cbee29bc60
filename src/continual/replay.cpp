#include "qlora/continual/replay.hpp"

#include <algorithm>
#include <string>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"
#include "qlora/io/safetensors.hpp"
#include "rows_io.hpp"

namespace qlora::continual {
namespace {

// Stream tags, so that admission, drops and draws never reuse a random number.
constexpr std::uint64_t kAdmitStream = 0x61646d6974ull;
constexpr std::uint64_t kDropStream = 0x64726f70ull;
constexpr std::uint64_t kDrawStream = 0x64726177ull;
// The reservoir key when quotas are off.
constexpr int kSharedReservoir = -1;

std::uint64_t uniform_below(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter,
                            std::uint64_t n) {
  Rng rng(mix_seed(mix_seed(seed, stream), counter));
  return rng.below(n);
}

}  // namespace

ReplayBuffer::ReplayBuffer(std::int64_t capacity, std::uint64_t seed, bool per_task_quota)
    : capacity_(capacity), seed_(seed), per_task_quota_(per_task_quota) {
  QLORA_CHECK_ARG(capacity >= 0, "[ReplayBuffer] capacity must be >= 0 windows: got {}",
                  capacity);
}

std::int64_t ReplayBuffer::quota() const {
  if (!per_task_quota_) return capacity_;
  const auto tasks = static_cast<std::int64_t>(std::max<std::size_t>(1, reservoirs_.size()));
  return capacity_ / tasks;
}

void ReplayBuffer::offer_to(std::vector<Slot>& slots, std::uint64_t& seen, std::int64_t quota,
                            const PackedRow& row, int task) {
  ++seen;
  if (static_cast<std::int64_t>(slots.size()) < quota) {
    slots.push_back({row, task});
    return;
  }
  // Algorithm R: the n-th offer replaces slot j, j uniform in [0, n), when j < quota.
  const std::uint64_t j = uniform_below(seed_, kAdmitStream, seen_, seen);
  if (j < static_cast<std::uint64_t>(quota)) slots[static_cast<std::size_t>(j)] = {row, task};
}

void ReplayBuffer::rebalance() {
  const std::int64_t q = quota();
  for (auto& [task, slots] : reservoirs_) {
    // Dropping uniformly chosen slots keeps a uniform sample uniform.
    while (static_cast<std::int64_t>(slots.size()) > q) {
      const std::uint64_t j = uniform_below(seed_, kDropStream, evictions_++, slots.size());
      slots.erase(slots.begin() + static_cast<std::ptrdiff_t>(j));
    }
  }
}

void ReplayBuffer::offer(const PackedRow& row, int task) {
  if (capacity_ == 0) return;
  QLORA_CHECK_ARG(!row.tokens.empty() && row.tokens.size() == row.targets.size() &&
                      row.tokens.size() == row.segment_ids.size(),
                  "[ReplayBuffer::offer] malformed window: {} tokens, {} targets, {} segment ids",
                  row.tokens.size(), row.targets.size(), row.segment_ids.size());
  const int key = per_task_quota_ ? task : kSharedReservoir;
  const bool new_task = reservoirs_.find(key) == reservoirs_.end();
  std::vector<Slot>& slots = reservoirs_[key];
  if (new_task && per_task_quota_) rebalance();
  ++seen_;
  std::uint64_t& reservoir_seen = seen_per_reservoir_[key];
  // offer_to counts the offer in reservoir_seen; seen_ (all tasks) only numbers the draws.
  offer_to(slots, reservoir_seen, quota(), row, task);
}

std::int64_t ReplayBuffer::size() const {
  std::int64_t n = 0;
  for (const auto& [task, slots] : reservoirs_) n += static_cast<std::int64_t>(slots.size());
  return n;
}

std::int64_t ReplayBuffer::stored_tokens() const {
  std::int64_t n = 0;
  for (const auto& [task, slots] : reservoirs_) {
    for (const Slot& s : slots) n += static_cast<std::int64_t>(s.row.tokens.size());
  }
  return n;
}

std::map<int, std::int64_t> ReplayBuffer::windows_per_task() const {
  std::map<int, std::int64_t> counts;
  for (const auto& [key, slots] : reservoirs_) {
    for (const Slot& s : slots) ++counts[s.task];
  }
  return counts;
}

const PackedRow& ReplayBuffer::draw(std::uint64_t draw) const {
  const std::int64_t n = size();
  QLORA_CHECK_ARG(n > 0, "[ReplayBuffer::draw] the buffer is empty (hint: replay starts with "
                         "the second task, after the first task's windows were offered)");
  auto index = static_cast<std::int64_t>(
      uniform_below(seed_, kDrawStream, draw, static_cast<std::uint64_t>(n)));
  for (const auto& [key, slots] : reservoirs_) {
    if (index < static_cast<std::int64_t>(slots.size())) {
      return slots[static_cast<std::size_t>(index)].row;
    }
    index -= static_cast<std::int64_t>(slots.size());
  }
  raise<Error>("[ReplayBuffer::draw] internal error: slot {} not found", index);
}

std::vector<const PackedRow*> ReplayBuffer::windows() const {
  std::vector<const PackedRow*> rows;
  for (const auto& [key, slots] : reservoirs_) {
    for (const Slot& s : slots) rows.push_back(&s.row);
  }
  return rows;
}

void ReplayBuffer::clear() {
  reservoirs_.clear();
  seen_per_reservoir_.clear();
  seen_ = 0;
  evictions_ = 0;
}

void ReplayBuffer::save(const std::filesystem::path& path) const {
  std::vector<PackedRow> rows;
  std::vector<std::int32_t> tasks, reservoir_keys;
  for (const auto& [key, slots] : reservoirs_) {
    for (const Slot& s : slots) {
      rows.push_back(s.row);
      tasks.push_back(s.task);
      reservoir_keys.push_back(key);
    }
  }
  nlohmann::json seen_per = nlohmann::json::object();
  for (const auto& [key, n] : seen_per_reservoir_) seen_per[std::to_string(key)] = n;
  SafetensorsWriter writer;
  writer.set_metadata("qlora.replay",
                      nlohmann::json{{"capacity", capacity_},
                                     {"seed", seed_},
                                     {"per_task_quota", per_task_quota_},
                                     {"seen", seen_},
                                     {"evictions", evictions_},
                                     {"seen_per_reservoir", seen_per}}
                          .dump());
  detail::add_rows(writer, "windows", rows);
  const std::int64_t shape[1] = {static_cast<std::int64_t>(tasks.size())};
  writer.add_int32("tasks", shape, tasks);
  writer.add_int32("reservoirs", shape, reservoir_keys);
  writer.write(path);
}

ReplayBuffer ReplayBuffer::load(const std::filesystem::path& path) {
  const SafetensorsFile file(path);
  const auto meta_it = file.metadata().find("qlora.replay");
  if (meta_it == file.metadata().end()) {
    raise<FormatError>("[ReplayBuffer::load] {} has no qlora.replay metadata (hint: it was "
                       "not written by ReplayBuffer::save)",
                       path.string());
  }
  ReplayBuffer buffer;
  try {
    const auto meta = nlohmann::json::parse(meta_it->second);
    buffer.capacity_ = meta.at("capacity").get<std::int64_t>();
    buffer.seed_ = meta.at("seed").get<std::uint64_t>();
    buffer.per_task_quota_ = meta.at("per_task_quota").get<bool>();
    buffer.seen_ = meta.at("seen").get<std::uint64_t>();
    buffer.evictions_ = meta.at("evictions").get<std::uint64_t>();
    for (const auto& [key, n] : meta.at("seen_per_reservoir").items()) {
      buffer.seen_per_reservoir_[std::stoi(key)] = n.get<std::uint64_t>();
    }
  } catch (const std::exception& e) {
    raise<FormatError>("[ReplayBuffer::load] {}: invalid qlora.replay metadata: {}",
                       path.string(), e.what());
  }
  std::vector<PackedRow> rows = detail::read_rows(file, "windows");
  const auto tasks = file.to_int32(file.tensor("tasks"));
  const auto keys = file.to_int32(file.tensor("reservoirs"));
  if (tasks.size() != rows.size() || keys.size() != rows.size() ||
      static_cast<std::int64_t>(rows.size()) > buffer.capacity_) {
    raise<FormatError>("[ReplayBuffer::load] {}: {} windows, {} task ids and {} reservoir ids "
                       "for a capacity of {}",
                       path.string(), rows.size(), tasks.size(), keys.size(), buffer.capacity_);
  }
  for (std::size_t i = 0; i < rows.size(); ++i) {
    buffer.reservoirs_[keys[i]].push_back({std::move(rows[i]), tasks[i]});
  }
  return buffer;
}

}  // namespace qlora::continual
