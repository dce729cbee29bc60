// The storage of a quantized weight matrix, shared by the quantizers, the dequant-matmul
// kernels, LoRA merges and the model loader.
//
// A weight is row-major [N, K] = [out, in]. Blocks (NF4) and groups (INT4, INT8) are runs of
// `block_size` consecutive elements along K inside one row, so block_size must divide K and
// no block straddles two rows. For NF4 this is the same blocking as bitsandbytes, which
// blocks the flattened tensor, whenever K is a multiple of the block size.
//
// Every format dequantizes as w = scale * code_value + offset per block:
//   NF4:        w = absmax[b] * kNf4Levels[code]              (offset 0)
//   INT4 asym:  w = scale[b] * u + min[b],      u in [0, 15]
//   INT4 sym:   w = scale[b] * (u - 8),         u in [1, 15]  (q = u - 8 in [-7, 7])
//   INT8 asym:  w = scale[b] * u + min[b],      u in [0, 255]
//   INT8 sym:   w = scale[b] * q,               q in [-127, 127] stored as int8
//
// 4-bit packing (NF4 and INT4), the bitsandbytes order: byte j of a row holds elements 2j and
// 2j + 1 of that row, the even element in the HIGH nibble:
//
//     byte j:  [ 7 6 5 4 | 3 2 1 0 ]
//              elem 2j     elem 2j+1
//
// This is not GGUF's Q4_0/Q4_1 order (element j low, j + 16 high in a 32-element block);
// converters to and from GGUF repack.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace qlora {

enum class QuantFormat { nf4, int4, int8 };

std::string_view to_string(QuantFormat format);

/**
 * A quantized [rows, cols] matrix. Fields that a format does not use stay empty.
 *
 * - codes:  NF4 and INT4: rows * cols / 2 bytes, two codes per byte (order above).
 *           INT8: rows * cols bytes, uint8 for asymmetric, int8 (two's complement) for
 *           symmetric.
 * - scales: [rows, cols / block_size] row-major, fp32. NF4: the absmax of each block
 *           (empty when double_quant is on). INT: the step between adjacent codes.
 * - mins:   [rows, cols / block_size], fp32; INT asymmetric only: the value of code 0.
 * - NF4 double quantization (bitsandbytes' compress_statistics): the block absmaxes are
 *   stored as `absmax_codes` [rows * cols / block_size] uint8 indexes into the signed 8-bit
 *   dynamic map, in nested blocks of 256 consecutive (flattened) absmaxes, each with an fp32
 *   `nested_absmax`, after subtracting the mean `nested_offset`:
 *       absmax[b] = kDynamicMap[absmax_codes[b]] * nested_absmax[b / 256] + nested_offset
 */
struct QuantizedMatrix {
  QuantFormat format = QuantFormat::nf4;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  int block_size = 64;
  bool symmetric = false;     // INT4 / INT8 only
  bool double_quant = false;  // NF4 only

  std::vector<std::uint8_t> codes;
  std::vector<float> scales;
  std::vector<float> mins;

  std::vector<std::uint8_t> absmax_codes;
  std::vector<float> nested_absmax;
  float nested_offset = 0.0f;

  std::int64_t blocks_per_row() const noexcept { return cols / block_size; }
  std::int64_t n_blocks() const noexcept { return rows * blocks_per_row(); }
};

}  // namespace qlora
