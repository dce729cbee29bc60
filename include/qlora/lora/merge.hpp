// Folding LoRA adapters into weights. A merge into float weights is exactly invertible. A merge
// into a quantized base re-quantizes, so it loses part of the update, and that loss is measured.
// QA-LoRA's merge folds the update into the per-group offsets of an INT4 / INT8 base without loss.
#pragma once

#include <cstdint>

#include "qlora/core/matrix.hpp"
#include "qlora/lora/lora_linear.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora {

/**
 * Adds the adapter's update s * B * A to `weights` [N, K]. With `safe_merge` the sum is
 * formed in a copy and rejected with qlora::InvalidArgument, leaving `weights` untouched,
 * when it contains a NaN or infinity.
 */
void merge_adapter(RowMatrixF& weights, const LoraAdapter& adapter, bool safe_merge = true);

/// Subtracts what merge_adapter added; the inverse of merge_adapter up to float rounding.
void unmerge_adapter(RowMatrixF& weights, const LoraAdapter& adapter);

/// The effect of re-quantizing a merged layer on the adapter's update.
struct QuantMergeReport {
  double delta_norm = 0.0;  ///< ||s B A||_F, the update asked for
  /// ||dequant(merged) - (dequant(base) + s B A)||_F, the error the merge added
  double error_norm = 0.0;
  /// <dequant(merged) - dequant(base), s B A> / ||s B A||^2: the share of the update that
  /// survived re-quantization (1 for a perfect merge, 0 when it was rounded away entirely)
  double retained_fraction = 0.0;
  /// Share of weights whose non-zero update is smaller than half the quantization step at
  /// that weight: such an update vanishes unless the block's scale moves.
  double below_half_step_fraction = 0.0;
  std::int64_t codes_changed = 0;  ///< weights whose quantized code differs from the base's
};

struct QuantMergeResult {
  QuantizedMatrix merged;
  QuantMergeReport report;
};

/**
 * Merges `adapter` into a quantized base by dequantizing, adding s * B * A and quantizing
 * again with the base's own settings (format, block size, symmetry, double quantization).
 * Logs a warning when less than 90% of the update survives. With `safe_merge`, a
 * non-finite merged weight throws qlora::InvalidArgument before anything is quantized.
 */
QuantMergeResult merge_into_quantized(const QuantizedMatrix& base, const LoraAdapter& adapter,
                                      bool safe_merge = true);

/**
 * QA-LoRA's exact merge: folds s * (B A)[j, k] / g into the offset of row j, group k of an
 * INT4 or INT8 base with group size g = adapter.pool_group_size. The integer codes and the
 * scales are unchanged, so the result runs on the same kernels. A symmetric base is first
 * written in offset form (INT4: min = -8 * scale with the stored codes unchanged; INT8:
 * code q becomes q + 128 with min = -128 * scale, the same integers shifted). Throws
 * qlora::InvalidArgument for an NF4 base, an ordinary (non-pooled) adapter, a group size
 * that differs from the base's, or a non-finite result.
 */
QuantizedMatrix qalora_merge(const QuantizedMatrix& base, const LoraAdapter& adapter);

}  // namespace qlora
