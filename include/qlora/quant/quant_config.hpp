// The options of qlora::quantize: format, block (group) size, symmetric or affine, and NF4
// double quantization.
#pragma once

#include "qlora/quant/quantized_matrix.hpp"

namespace qlora {

/**
 * How to quantize a weight matrix.
 *
 * - format: nf4, int4 or int8.
 * - block_size: elements per block (NF4) or group (INT4, INT8), along `in`, inside one row.
 *   NF4: a power of two from 32 to 4096 (bitsandbytes' set) that divides `in`.
 *   INT4 / INT8: any divisor of `in`; 0 means one group per row (per output channel), stored
 *   as block_size = in.
 * - symmetric: INT4 / INT8 only. false = affine (scale and float min per group), true =
 *   absmax scaling with codes in [-7, 7] or [-127, 127]. Ignored for NF4.
 * - double_quant: NF4 only; quantizes the block absmaxes to 8 bits as QLoRA does.
 */
struct QuantConfig {
  QuantFormat format = QuantFormat::nf4;
  int block_size = 64;
  bool symmetric = false;
  bool double_quant = false;
};

}  // namespace qlora
