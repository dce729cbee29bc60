// Group-wise INT4 and INT8 quantization, affine (scale and float min) or symmetric.
//
// A group is `block_size` consecutive elements of one row; block_size = in gives one group
// per row (per output channel). All arithmetic is float32, without FMA or reciprocals.
//
// Affine, qmax = 15 (INT4) or 255 (INT8):
//   min   = min(x),  max = max(x)
//   scale = (max - min) / qmax
//   u     = clamp(round_half_even((x - min) / scale), 0, qmax)   (subtract, then divide)
//   w     = scale * u + min
// A constant group (max == min) stores scale 0, u = 0 and min = the value, so it round-trips
// exactly. If (max - min) / qmax underflows to 0 for a non-constant group (a range below
// about 2e-44), the group is stored the same way and dequantizes to its min. A group whose
// range max - min overflows float32 is rejected.
// The min is kept in float32, as MLX and GGUF's Q4_1 keep their offset, so that a float
// shift (QA-LoRA's merge) stays exact. GPTQ's integer zero point converts with
// affine_from_gptq: min = -scale * zero.
//
// Symmetric, qpos = 7 (INT4) or 127 (INT8):
//   scale = max|x| / qpos
//   q     = clamp(round_half_even(x / scale), -qpos, qpos)
//   w     = scale * q
// An all-zero group (or one whose scale underflows to 0) stores scale 0 and q = 0.
// INT4 stores u = q + 8 in [1, 15]; INT8 stores q as int8 (two's complement in the uint8
// codes array).
//
// Packing: INT8 one code per byte; INT4 two per byte, the even element in the high nibble
// (bitsandbytes' order, see quantized_matrix.hpp), not GGUF's.
//
// The rule differs from GPTQ's, which forces the range to contain 0 and rounds the zero
// point to an integer, and from MLX's, which re-fits the scale so that the larger-magnitude
// edge and zero are exact. It is min-max affine with a float offset, like GGUF's Q4_1, but
// rounds half to even and divides where Q4_1 multiplies by a reciprocal and rounds half up.
#pragma once

#include <cstdint>
#include <span>

#include "qlora/core/matrix.hpp"
#include "qlora/quant/quant_config.hpp"
#include "qlora/quant/quantized_matrix.hpp"

namespace qlora {

/// The scale and float offset of one affine group: w = scale * u + min.
struct AffineParams {
  float scale = 0.0f;
  float min = 0.0f;
};

/**
 * Converts GPTQ's per-group (scale, integer zero point), where w = scale * (u - zero), to
 * qlora's affine form w = scale * u + min, min = -scale * zero. For a GPTQ "v1" checkpoint
 * pass the stored qzeros value + 1.
 */
inline AffineParams affine_from_gptq(float scale, int zero) {
  return {scale, -scale * static_cast<float>(zero)};
}

/**
 * Quantizes `weights` [out, in] to INT4 or INT8 (config.format) group-wise.
 * Throws qlora::InvalidArgument for an empty matrix, a group size that does not divide `in`,
 * an odd `in` for INT4, a non-finite weight or a group range that overflows float32.
 */
QuantizedMatrix int_quantize(ConstRefRowMatrixF weights, const QuantConfig& config);

/// Quantizes one affine group `x` [n] into unpacked codes `u` [n] and returns its parameters.
AffineParams int_quantize_group_affine(std::span<const float> x, int qmax, std::uint8_t* u);

/// Quantizes one symmetric group `x` [n] into `q` [n] and returns its scale.
float int_quantize_group_symmetric(std::span<const float> x, int qpos, std::int8_t* q);

namespace detail {

// Dequantizes rows [row_begin, row_end) of a validated INT4 / INT8 matrix into out
// [row_end - row_begin, q.cols].
void int_dequantize_rows(const QuantizedMatrix& q, std::int64_t row_begin, std::int64_t row_end,
                         float* out);

// Dequantizes blocks [block_begin, block_end) of row `row` of a validated matrix into out
// [(block_end - block_begin) * q.block_size].
void int_dequantize_blocks(const QuantizedMatrix& q, std::int64_t row, std::int64_t block_begin,
                          std::int64_t block_end, float* out);

}  // namespace detail
}  // namespace qlora
