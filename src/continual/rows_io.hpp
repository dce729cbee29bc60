// Packed rows in safetensors files, for the replay buffer and the bank's held-out sets: one
// flat I32 tensor per field (<prefix>.tokens, .targets, .segment_ids) plus <prefix>.lengths.
#pragma once

#include <string>
#include <vector>

#include "qlora/io/safetensors.hpp"
#include "qlora/train/data.hpp"

namespace qlora::continual::detail {

void add_rows(SafetensorsWriter& writer, const std::string& prefix,
              const std::vector<PackedRow>& rows);

/// Throws qlora::FormatError naming the file and prefix when the tensors disagree in size.
std::vector<PackedRow> read_rows(const SafetensorsFile& file, const std::string& prefix);

}  // namespace qlora::continual::detail
