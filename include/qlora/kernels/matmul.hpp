// Matrix products with a frozen quantized weight, forward and backward, for every format of
// qlora::QuantizedMatrix (NF4 with or without double quantization, INT4 and INT8 group-wise,
// symmetric or asymmetric).
//
// The op validates its arguments once and runs the kernel of the instruction set that
// qlora::select_isa picks (QLORA_ISA forces one), on qlora::num_threads() OpenMP threads. Results
// do not depend on the thread count. The weight is dequantized on the fly and never stored in
// fp32, apart from tiles that fit in cache.
#pragma once

#include <cstdint>

#include "qlora/core/cpu.hpp"
#include "qlora/core/matrix.hpp"
#include "qlora/quant/quantized_matrix.hpp"

namespace qlora {

/**
 * Computes y[M, N] = x[M, K] * dequant(w)^T, or adds it to y when `accumulate` is set, where w
 * is [N, K] = [out, in]. x and y are dense row-major and must not overlap.
 *
 * Throws qlora::InvalidArgument when w is inconsistent (block size not dividing K, array sizes
 * not matching the shape) or when a pointer is null while M > 0.
 *
 * Example:
 *   qlora::dequant_matmul(x.data(), n_tokens, w, y.data(), false);
 */
void dequant_matmul(const float* x, std::int64_t M, const QuantizedMatrix& w, float* y,
                    bool accumulate);

/**
 * Computes dx[M, K] = dy[M, N] * dequant(w), or adds it to dx when `accumulate` is set: the
 * gradient with respect to the input of the frozen layer y = x * dequant(w)^T.
 */
void dequant_matmul_backward(const float* dy, std::int64_t M, const QuantizedMatrix& w, float* dx,
                             bool accumulate);

/// The Eigen form of dequant_matmul: x [M, K], y [M, N]; throws when the shapes disagree.
void dequant_matmul(ConstRefRowMatrixF x, const QuantizedMatrix& w, RefRowMatrixF y,
                    bool accumulate);

/// The Eigen form of dequant_matmul_backward: dy [M, N], dx [M, K].
void dequant_matmul_backward(ConstRefRowMatrixF dy, const QuantizedMatrix& w, RefRowMatrixF dx,
                             bool accumulate);

namespace detail {

/// dequant_matmul with the kernels of `isa` instead of select_isa()'s, for tests and benchmarks.
void dequant_matmul(Isa isa, const float* x, std::int64_t M, const QuantizedMatrix& w, float* y,
                    bool accumulate);

/// dequant_matmul_backward with the kernels of `isa`.
void dequant_matmul_backward(Isa isa, const float* dy, std::int64_t M, const QuantizedMatrix& w,
                             float* dx, bool accumulate);

}  // namespace detail

}  // namespace qlora
