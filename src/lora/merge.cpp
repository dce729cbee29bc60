#include "qlora/lora/merge.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "qlora/core/error.hpp"
#include "qlora/core/log.hpp"
#include "qlora/quant/tables.hpp"

namespace qlora {
namespace {

// Reads the code of element (row, col); 4-bit codes use the bitsandbytes nibble order.
int code_at(const QuantizedMatrix& q, std::int64_t row, std::int64_t col) {
  const std::int64_t index = row * q.cols + col;
  if (q.format == QuantFormat::int8) {
    const std::uint8_t byte = q.codes[static_cast<std::size_t>(index)];
    return q.symmetric ? static_cast<int>(static_cast<std::int8_t>(byte)) : byte;
  }
  const std::uint8_t byte = q.codes[static_cast<std::size_t>(index / 2)];
  return (index % 2 == 0) ? (byte >> 4) : (byte & 0x0f);
}

// Half the distance from a weight's level to its nearest neighbouring level.
float half_step(const QuantizedMatrix& q, const std::vector<float>& absmax, std::int64_t row,
                std::int64_t col) {
  const std::int64_t block = row * q.blocks_per_row() + col / q.block_size;
  if (q.format != QuantFormat::nf4) {
    return 0.5f * q.scales[static_cast<std::size_t>(block)];
  }
  const auto code = static_cast<std::size_t>(code_at(q, row, col));
  float gap = std::numeric_limits<float>::infinity();
  if (code > 0) gap = std::min(gap, kNf4Levels[code] - kNf4Levels[code - 1]);
  if (code < 15) gap = std::min(gap, kNf4Levels[code + 1] - kNf4Levels[code]);
  return 0.5f * gap * absmax[static_cast<std::size_t>(block)];
}

void check_finite(const RowMatrixF& m, const char* op) {
  for (std::int64_t r = 0; r < m.rows(); ++r) {
    for (std::int64_t c = 0; c < m.cols(); ++c) {
      if (!std::isfinite(m(r, c))) {
        raise<InvalidArgument>(
            "[{}] merged weight is not finite at row {}, column {}: got {} (hint: the adapter "
            "holds NaN or infinite values; the weights were left unchanged)",
            op, r, c, m(r, c));
      }
    }
  }
}

void check_adapter_shape(const LoraAdapter& adapter, std::int64_t rows, std::int64_t cols,
                         const char* op) {
  const std::int64_t expected_in =
      adapter.pool_group_size > 0 ? cols / adapter.pool_group_size : cols;
  QLORA_CHECK_ARG(adapter.B.rows() == rows && adapter.A.cols() == expected_in &&
                      adapter.A.rows() == adapter.B.cols(),
                  "[{}] adapter does not fit the weights: got A [{}, {}] and B [{}, {}] for "
                  "weights [{}, {}]",
                  op, adapter.A.rows(), adapter.A.cols(), adapter.B.rows(), adapter.B.cols(),
                  rows, cols);
}

}  // namespace

void merge_adapter(RowMatrixF& weights, const LoraAdapter& adapter, bool safe_merge) {
  check_adapter_shape(adapter, weights.rows(), weights.cols(), "merge_adapter");
  const RowMatrixF delta = adapter.delta_weight(weights.cols());
  if (safe_merge) {
    RowMatrixF merged = weights + delta;
    check_finite(merged, "merge_adapter");
    weights = std::move(merged);
    return;
  }
  weights += delta;
}

void unmerge_adapter(RowMatrixF& weights, const LoraAdapter& adapter) {
  check_adapter_shape(adapter, weights.rows(), weights.cols(), "unmerge_adapter");
  weights -= adapter.delta_weight(weights.cols());
}

QuantMergeResult merge_into_quantized(const QuantizedMatrix& base, const LoraAdapter& adapter,
                                      bool safe_merge) {
  validate(base);
  check_adapter_shape(adapter, base.rows, base.cols, "merge_into_quantized");

  const RowMatrixF base_float = dequantize(base);
  const RowMatrixF delta = adapter.delta_weight(base.cols);
  const RowMatrixF target = base_float + delta;
  if (safe_merge) check_finite(target, "merge_into_quantized");

  QuantMergeResult result;
  result.merged = quantize(target, {.format = base.format,
                                    .block_size = base.block_size,
                                    .symmetric = base.symmetric,
                                    .double_quant = base.double_quant});
  const RowMatrixF merged_float = dequantize(result.merged);

  // Accumulate in double: the norms of 50M-element layers lose digits in float.
  QuantMergeReport& report = result.report;
  const std::vector<float> absmax =
      base.format == QuantFormat::nf4 ? nf4_absmax(base) : std::vector<float>{};
  double delta_sq = 0.0, error_sq = 0.0, dot = 0.0;
  std::int64_t n_nonzero = 0, n_below = 0;
  for (std::int64_t r = 0; r < base.rows; ++r) {
    for (std::int64_t c = 0; c < base.cols; ++c) {
      const double d = delta(r, c);
      const double applied = static_cast<double>(merged_float(r, c)) - base_float(r, c);
      delta_sq += d * d;
      dot += applied * d;
      const double err = static_cast<double>(merged_float(r, c)) - target(r, c);
      error_sq += err * err;
      if (d != 0.0) {
        ++n_nonzero;
        if (std::abs(d) < half_step(base, absmax, r, c)) ++n_below;
      }
      if (code_at(result.merged, r, c) != code_at(base, r, c)) ++report.codes_changed;
    }
  }
  report.delta_norm = std::sqrt(delta_sq);
  report.error_norm = std::sqrt(error_sq);
  report.retained_fraction = delta_sq > 0.0 ? dot / delta_sq : 1.0;
  report.below_half_step_fraction =
      n_nonzero > 0 ? static_cast<double>(n_below) / static_cast<double>(n_nonzero) : 0.0;

  if (delta_sq > 0.0 && report.retained_fraction < 0.9) {
    QLORA_LOG_WARN(
        "[merge_into_quantized] re-quantizing to {} kept {:.1f}% of the adapter update "
        "(||delta|| {:.4g}, added error {:.4g}); {:.1f}% of the updated weights moved by less "
        "than half a quantization step (hint: keep the adapter separate, merge into float "
        "weights, or train with QA-LoRA for an exact merge)",
        to_string(base.format), 100.0 * report.retained_fraction, report.delta_norm,
        report.error_norm, 100.0 * report.below_half_step_fraction);
  }
  return result;
}

QuantizedMatrix qalora_merge(const QuantizedMatrix& base, const LoraAdapter& adapter) {
  validate(base);
  QLORA_CHECK_ARG(base.format != QuantFormat::nf4,
                  "[qalora_merge] QA-LoRA merges into INT4 or INT8 group-wise bases: got nf4 "
                  "(hint: use merge_into_quantized, which re-quantizes)");
  QLORA_CHECK_ARG(adapter.pool_group_size > 0,
                  "[qalora_merge] the adapter is not a QA-LoRA adapter (pool_group_size 0) "
                  "(hint: use merge_into_quantized)");
  QLORA_CHECK_ARG(adapter.pool_group_size == base.block_size,
                  "[qalora_merge] group sizes differ: adapter pools {} inputs, base groups {}",
                  adapter.pool_group_size, base.block_size);
  check_adapter_shape(adapter, base.rows, base.cols, "qalora_merge");

  QuantizedMatrix merged = base;
  const auto n_blocks = static_cast<std::size_t>(base.n_blocks());
  if (base.symmetric) {
    // Offset form of the symmetric codes: the stored integers keep their meaning.
    merged.symmetric = false;
    merged.mins.resize(n_blocks);
    if (base.format == QuantFormat::int4) {
      for (std::size_t b = 0; b < n_blocks; ++b) merged.mins[b] = -8.0f * base.scales[b];
    } else {
      for (std::size_t b = 0; b < n_blocks; ++b) merged.mins[b] = -128.0f * base.scales[b];
      for (std::uint8_t& code : merged.codes) {
        code = static_cast<std::uint8_t>(static_cast<int>(static_cast<std::int8_t>(code)) + 128);
      }
    }
  }

  // Each (row, group) cell of s * B * A / g is constant over the group's inputs, so it adds
  // to that group's offset and leaves codes and scales alone.
  const RowMatrixF ba = (adapter.B * adapter.A) * adapter.scaling;  // [N, K / g]
  const float inv_g = 1.0f / static_cast<float>(adapter.pool_group_size);
  for (std::int64_t j = 0; j < base.rows; ++j) {
    for (std::int64_t k = 0; k < base.blocks_per_row(); ++k) {
      float& offset = merged.mins[static_cast<std::size_t>(j * base.blocks_per_row() + k)];
      offset += ba(j, k) * inv_g;
      if (!std::isfinite(offset)) {
        raise<InvalidArgument>("[qalora_merge] merged offset is not finite at row {}, group {}",
                               j, k);
      }
    }
  }
  return merged;
}

}  // namespace qlora
