// Consistency checks and storage accounting for a QuantizedMatrix.
#pragma once

#include <cstdint>

#include "qlora/core/matrix.hpp"
#include "qlora/quant/quantized_matrix.hpp"

namespace qlora {

/**
 * Checks `q`'s shape, block size and the size of every array against its format, and
 * throws qlora::InvalidArgument naming the first field that is wrong. The public ops that
 * read a QuantizedMatrix call it once, so their kernels can assume a valid matrix.
 */
void validate(const QuantizedMatrix& q);

/**
 * The storage of `q` in bits per weight: codes, scales, mins, the NF4 double-quantization
 * codes, nested absmaxes and offset, divided by rows * cols. Constant tables (the NF4 levels,
 * the dynamic map) are not counted. NF4 at block 64 is 4.5; with double quantization
 * 4 + 8/64 + 32/(64*256) + 32/(rows*cols), about 4.127.
 */
double bits_per_weight(const QuantizedMatrix& q);

namespace detail {

// Throws qlora::InvalidArgument naming the row and column of the first NaN or infinity in
// `weights`, and for an empty matrix. `op` names the calling operation in the message.
void check_weights(ConstRefRowMatrixF weights, const char* op);

}  // namespace detail
}  // namespace qlora
