// The public quantization API: quantize a row-major [out, in] float matrix to NF4, INT4 or
// INT8, dequantize it whole or by rows, check a QuantizedMatrix and count its storage.
//
// Each format also has a quantizer type (Nf4Quantizer, Int4Quantizer, Int8Quantizer) that
// satisfies the Quantizer concept, for code that picks the format at compile time. The fast
// dequant-matmul kernels are not here (see qlora/kernels); this is the reference path that
// they and the LoRA merges are checked against.
//
// The rounding rules, clamp ranges and the exact bitsandbytes steps that each format follows
// are documented in nf4.hpp and int_quant.hpp.
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/matrix.hpp"
#include "qlora/quant/int_quant.hpp"
#include "qlora/quant/nf4.hpp"
#include "qlora/quant/quant_config.hpp"
#include "qlora/quant/quantized_matrix.hpp"
#include "qlora/quant/validate.hpp"

namespace qlora {

/**
 * Quantizes `weights` [out, in] (row-major) with `config`.
 *
 * Throws qlora::InvalidArgument for an empty matrix, a block size that does not divide `in`
 * or is not allowed for the format, a NaN or infinity (naming its row and column), and a
 * format value other than nf4, int4 and int8 (the only bit widths supported).
 *
 * Example:
 *   qlora::RowMatrixF w = qlora::RowMatrixF::Random(576, 576);
 *   auto q = qlora::quantize(w, {.format = qlora::QuantFormat::nf4, .double_quant = true});
 *   qlora::RowMatrixF w2 = qlora::dequantize(q);
 */
inline QuantizedMatrix quantize(ConstRefRowMatrixF weights, const QuantConfig& config) {
  switch (config.format) {
    case QuantFormat::nf4:
      return nf4_quantize(weights, config);
    case QuantFormat::int4:
    case QuantFormat::int8:
      return int_quantize(weights, config);
  }
  raise<InvalidArgument>("[quantize] unknown format: got {}, expected nf4, int4 or int8",
                         static_cast<int>(config.format));
}

/**
 * Dequantizes rows [row_begin, row_end) of `q` into `out` [row_end - row_begin, q.cols]
 * (row-major, contiguous). Validates `q` and the row range first.
 */
inline void dequantize_rows(const QuantizedMatrix& q, std::int64_t row_begin,
                            std::int64_t row_end, float* out) {
  validate(q);
  QLORA_CHECK_ARG(0 <= row_begin && row_begin <= row_end && row_end <= q.rows,
                  "[dequantize_rows] invalid row range: got [{}, {}), expected 0 <= begin <= "
                  "end <= rows = {}",
                  row_begin, row_end, q.rows);
  if (row_begin == row_end) return;
  QLORA_CHECK_ARG(out != nullptr, "[dequantize_rows] output pointer is null: got {} rows",
                  row_end - row_begin);
  if (q.format == QuantFormat::nf4) {
    detail::nf4_dequantize_rows(q, row_begin, row_end, out);
  } else {
    detail::int_dequantize_rows(q, row_begin, row_end, out);
  }
}

/**
 * Dequantizes blocks [block_begin, block_end) of row `row` of `q` into `out`
 * [(block_end - block_begin) * q.block_size]. Validates `q` and the ranges first.
 */
inline void dequantize_blocks(const QuantizedMatrix& q, std::int64_t row,
                              std::int64_t block_begin, std::int64_t block_end, float* out) {
  validate(q);
  QLORA_CHECK_ARG(0 <= row && row < q.rows,
                  "[dequantize_blocks] row out of range: got {}, expected 0 <= row < rows = {}",
                  row, q.rows);
  QLORA_CHECK_ARG(0 <= block_begin && block_begin <= block_end &&
                      block_end <= q.blocks_per_row(),
                  "[dequantize_blocks] invalid block range: got [{}, {}), expected 0 <= begin "
                  "<= end <= blocks_per_row = {}",
                  block_begin, block_end, q.blocks_per_row());
  if (block_begin == block_end) return;
  QLORA_CHECK_ARG(out != nullptr, "[dequantize_blocks] output pointer is null: got {} blocks",
                  block_end - block_begin);
  if (q.format == QuantFormat::nf4) {
    detail::nf4_dequantize_blocks(q, row, block_begin, block_end, out);
  } else {
    detail::int_dequantize_blocks(q, row, block_begin, block_end, out);
  }
}

/// Dequantizes all of `q` into a [rows, cols] row-major matrix.
inline RowMatrixF dequantize(const QuantizedMatrix& q) {
  validate(q);
  RowMatrixF out(q.rows, q.cols);
  dequantize_rows(q, 0, q.rows, out.data());
  return out;
}

/// The quantizer interface that each format type satisfies.
template <class Q>
concept Quantizer = requires(ConstRefRowMatrixF weights, const typename Q::Config& config,
                             const QuantizedMatrix& q, std::int64_t row, float* out) {
  { Q::kFormat } -> std::convertible_to<QuantFormat>;
  { Q::quantize(weights, config) } -> std::same_as<QuantizedMatrix>;
  { Q::dequantize(q) } -> std::same_as<RowMatrixF>;
  { Q::dequantize_rows(q, row, row, out) } -> std::same_as<void>;
  { Q::bits_per_weight(q) } -> std::same_as<double>;
};

/// NF4 (bitsandbytes' quantize_4bit with quant_type="nf4"), optionally double quantized.
struct Nf4Quantizer {
  static constexpr QuantFormat kFormat = QuantFormat::nf4;

  /// Block size (a power of two from 32 to 4096) and double quantization of the absmaxes.
  struct Config {
    int block_size = 64;
    bool double_quant = false;
  };

  static QuantizedMatrix quantize(ConstRefRowMatrixF weights, const Config& config) {
    return qlora::quantize(weights, {.format = kFormat,
                                     .block_size = config.block_size,
                                     .symmetric = false,
                                     .double_quant = config.double_quant});
  }
  static RowMatrixF dequantize(const QuantizedMatrix& q) { return qlora::dequantize(q); }
  static void dequantize_rows(const QuantizedMatrix& q, std::int64_t row_begin,
                              std::int64_t row_end, float* out) {
    qlora::dequantize_rows(q, row_begin, row_end, out);
  }
  static double bits_per_weight(const QuantizedMatrix& q) { return qlora::bits_per_weight(q); }
};

/// Group-wise integer quantization with `kBits` bits (4 or 8), affine or symmetric.
template <int kBits>
struct IntQuantizer {
  static_assert(kBits == 4 || kBits == 8, "IntQuantizer supports 4 and 8 bits");
  static constexpr QuantFormat kFormat = kBits == 4 ? QuantFormat::int4 : QuantFormat::int8;

  /// Group size along `in` (0 = one group per row, INT8 only) and the symmetric variant.
  struct Config {
    int block_size = 64;
    bool symmetric = false;
  };

  static QuantizedMatrix quantize(ConstRefRowMatrixF weights, const Config& config) {
    return qlora::quantize(weights, {.format = kFormat,
                                     .block_size = config.block_size,
                                     .symmetric = config.symmetric,
                                     .double_quant = false});
  }
  static RowMatrixF dequantize(const QuantizedMatrix& q) { return qlora::dequantize(q); }
  static void dequantize_rows(const QuantizedMatrix& q, std::int64_t row_begin,
                              std::int64_t row_end, float* out) {
    qlora::dequantize_rows(q, row_begin, row_end, out);
  }
  static double bits_per_weight(const QuantizedMatrix& q) { return qlora::bits_per_weight(q); }
};

using Int4Quantizer = IntQuantizer<4>;
using Int8Quantizer = IntQuantizer<8>;

static_assert(Quantizer<Nf4Quantizer>);
static_assert(Quantizer<Int4Quantizer>);
static_assert(Quantizer<Int8Quantizer>);

}  // namespace qlora
