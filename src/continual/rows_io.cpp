#include "rows_io.hpp"

#include <algorithm>
#include <cstdint>

#include "qlora/core/error.hpp"

namespace qlora::continual::detail {

void add_rows(SafetensorsWriter& writer, const std::string& prefix,
              const std::vector<PackedRow>& rows) {
  std::vector<std::int32_t> tokens, targets, segments, lengths;
  for (const PackedRow& row : rows) {
    tokens.insert(tokens.end(), row.tokens.begin(), row.tokens.end());
    targets.insert(targets.end(), row.targets.begin(), row.targets.end());
    segments.insert(segments.end(), row.segment_ids.begin(), row.segment_ids.end());
    lengths.push_back(static_cast<std::int32_t>(row.tokens.size()));
  }
  const auto add = [&](const std::string& field, const std::vector<std::int32_t>& v) {
    const std::int64_t shape[1] = {static_cast<std::int64_t>(v.size())};
    writer.add_int32(prefix + "." + field, shape, v);
  };
  add("tokens", tokens);
  add("targets", targets);
  add("segment_ids", segments);
  add("lengths", lengths);
}

std::vector<PackedRow> read_rows(const SafetensorsFile& file, const std::string& prefix) {
  const auto tokens = file.to_int32(file.tensor(prefix + ".tokens"));
  const auto targets = file.to_int32(file.tensor(prefix + ".targets"));
  const auto segments = file.to_int32(file.tensor(prefix + ".segment_ids"));
  const auto lengths = file.to_int32(file.tensor(prefix + ".lengths"));
  std::int64_t total = 0;
  for (std::int32_t n : lengths) total += n;
  if (targets.size() != tokens.size() || segments.size() != tokens.size() ||
      total != static_cast<std::int64_t>(tokens.size())) {
    raise<FormatError>("[continual] {}: rows '{}' have inconsistent sizes",
                       file.path().string(), prefix);
  }
  std::vector<PackedRow> rows;
  std::size_t offset = 0;
  for (std::int32_t n32 : lengths) {
    const auto n = static_cast<std::size_t>(n32);
    PackedRow row;
    const auto begin = static_cast<std::ptrdiff_t>(offset);
    const auto end = static_cast<std::ptrdiff_t>(offset + n);
    row.tokens.assign(tokens.begin() + begin, tokens.begin() + end);
    row.targets.assign(targets.begin() + begin, targets.begin() + end);
    row.segment_ids.assign(segments.begin() + begin, segments.begin() + end);
    row.n_targets = static_cast<std::int64_t>(std::count_if(
        row.targets.begin(), row.targets.end(), [](std::int32_t t) { return t != kIgnoreIndex; }));
    rows.push_back(std::move(row));
    offset += n;
  }
  return rows;
}

}  // namespace qlora::continual::detail
