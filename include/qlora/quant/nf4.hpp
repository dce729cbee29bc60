// NF4 quantization as bitsandbytes 0.50.2 implements quantize_4bit(quant_type="nf4"),
// with and without double quantization (compress_statistics=True / False).
//
// Per block of `block_size` consecutive elements of one row:
//   absmax = max |x|                                   (float32, stored as is, 0 allowed)
//   inv    = 1.0f / max(absmax, 1e-38f)                (float32 reciprocal, as bitsandbytes)
//   s      = clamp(x * inv, -1, 1)                     (float32 multiply)
//   code   = number of kNf4Thresholds strictly below s (ties go to the lower code)
// This is bitsandbytes' pure-PyTorch ("default") backend, which its CPU build uses for
// 4-bit quantization. Dequantization: w = kNf4Levels[code] * absmax, one float32 multiply.
// Codes are packed two per byte, the even element in the high nibble (quantized_matrix.hpp).
//
// Double quantization of the flattened absmax array a[0 .. n_blocks):
//   offset = mean(a) rounded to float32
//   c[b]   = a[b] - offset                             (float32)
//   per nested block of 256 consecutive c (the last may be shorter):
//     nested_absmax = max |c|
//     s = clamp(c * (1.0f / max(nested_absmax, 1e-38f)), -1, 1)  (the shorter last block
//         divides, c / max(nested_absmax, 1e-38f), as bitsandbytes does)
//     absmax_code = number of kDynamicMap midpoints strictly below s
//   decoded absmax[b] = kDynamicMap[code] * nested_absmax[b / 256] + offset
//
// NOTE: bitsandbytes computes the offset with torch.mean in float32, whose summation order
// depends on the CPU's vector width, so its offset can differ from the correctly rounded
// mean used here by an ulp. nf4_double_quantize takes the offset as an argument so that
// tests can reproduce a bitsandbytes state exactly.
// NOTE: bitsandbytes 0.50.2's native CPU library encodes the 8-bit absmax codes through a
// 65536-bin lookup table, which missed the nearest entry for 0.15% of N(0, 1) values in a
// sample of 4096. qlora follows the nearest-entry rule of bitsandbytes' reference PyTorch
// backend. Both store the same kind of codes and decode them the same way.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "qlora/core/matrix.hpp"
#include "qlora/quant/quant_config.hpp"
#include "qlora/quant/quantized_matrix.hpp"
#include "qlora/quant/tables.hpp"

namespace qlora {

/// Block sizes that NF4 accepts: the powers of two from kNf4MinBlockSize to kNf4MaxBlockSize.
inline constexpr int kNf4MinBlockSize = 32;
inline constexpr int kNf4MaxBlockSize = 4096;
/// Number of block absmaxes that share one nested absmax under double quantization.
inline constexpr int kNf4NestedBlockSize = 256;

/// The double-quantized form of an absmax array.
struct Nf4DoubleQuant {
  std::vector<std::uint8_t> absmax_codes;  // [n_blocks], indexes into kDynamicMap
  std::vector<float> nested_absmax;        // [ceil(n_blocks / 256)]
  float nested_offset = 0.0f;
};

/**
 * Quantizes `weights` [out, in] to NF4 with `config.block_size` and `config.double_quant`.
 * Throws qlora::InvalidArgument for an empty matrix, a bad block size or a non-finite weight.
 */
QuantizedMatrix nf4_quantize(ConstRefRowMatrixF weights, const QuantConfig& config);

/**
 * Double-quantizes `absmax` [n_blocks] (non-negative, finite) around `offset`, following
 * bitsandbytes' quantize_blockwise(absmax - offset, blocksize=256).
 */
Nf4DoubleQuant nf4_double_quantize(std::span<const float> absmax, float offset);

/// The float32 mean that qlora uses as the double-quantization offset (correctly rounded).
float nf4_absmax_mean(std::span<const float> absmax);

/// The block absmaxes of an NF4 matrix [rows * cols / block_size]: decoded when double
/// quantized, copied from scales otherwise. Validates `q`.
std::vector<float> nf4_absmax(const QuantizedMatrix& q);

namespace detail {

// Dequantizes rows [row_begin, row_end) of a validated NF4 matrix into out
// [row_end - row_begin, q.cols].
void nf4_dequantize_rows(const QuantizedMatrix& q, std::int64_t row_begin, std::int64_t row_end,
                         float* out);

// Dequantizes blocks [block_begin, block_end) of row `row` of a validated matrix into out
// [(block_end - block_begin) * q.block_size].
void nf4_dequantize_blocks(const QuantizedMatrix& q, std::int64_t row, std::int64_t block_begin,
                          std::int64_t block_end, float* out);

}  // namespace detail
}  // namespace qlora
