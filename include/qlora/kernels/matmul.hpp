// Matrix products with a frozen quantized weight, forward and backward, for every format of
// qlora::QuantizedMatrix (NF4 with or without double quantization, INT4 and INT8 group-wise,
// symmetric or asymmetric).
//
// The op validates its arguments once and runs the kernel of the instruction set that
// qlora::select_isa picks (QLORA_ISA forces one), on qlora::num_threads() OpenMP threads. Results
// do not depend on the thread count. The weight is dequantized on the fly and never stored in
// fp32, apart from tiles that fit in cache.
//
// Inference with few rows (decoding) quantizes the activations to int8 and uses integer dot
// products, 1.5 to 2.5 times as fast (see set_int8_activations). Training never does: its forward
// calls ask for ActivationPrecision::fp32, and the backward product, larger batches and the scalar
// instruction set always use fp32.
#pragma once

#include <cstdint>

#include "qlora/core/cpu.hpp"
#include "qlora/core/matrix.hpp"
#include "qlora/quant/quantized_matrix.hpp"

namespace qlora {

/// The activation precision that a forward dequant_matmul call may use.
enum class ActivationPrecision {
  /// int8 activations for up to kInt8ActivationMaxRows rows when int8_activations() is on and
  /// the weight has kernels for them, else fp32. For inference.
  automatic,
  /// fp32 activations always, the same arithmetic as the backward product. For training, where
  /// the forward must be the function whose gradient the backward computes.
  fp32,
};

/**
 * Computes y[M, N] = x[M, K] * dequant(w)^T, or adds it to y when `accumulate` is set, where w
 * is [N, K] = [out, in]. x and y are dense row-major and must not overlap.
 *
 * `precision` selects whether a small batch may round x to int8 (see ActivationPrecision).
 *
 * Throws qlora::InvalidArgument when w is inconsistent (block size not dividing K, array sizes
 * not matching the shape) or when a pointer is null while M > 0.
 *
 * Example:
 *   qlora::dequant_matmul(x.data(), n_tokens, w, y.data(), false);
 */
void dequant_matmul(const float* x, std::int64_t M, const QuantizedMatrix& w, float* y,
                    bool accumulate, ActivationPrecision precision = ActivationPrecision::automatic);

/**
 * Computes dx[M, K] = dy[M, N] * dequant(w), or adds it to dx when `accumulate` is set: the
 * gradient with respect to the input of the frozen layer y = x * dequant(w)^T.
 */
void dequant_matmul_backward(const float* dy, std::int64_t M, const QuantizedMatrix& w, float* dx,
                             bool accumulate);

/// The Eigen form of dequant_matmul: x [M, K], y [M, N]; throws when the shapes disagree.
void dequant_matmul(ConstRefRowMatrixF x, const QuantizedMatrix& w, RefRowMatrixF y,
                    bool accumulate, ActivationPrecision precision = ActivationPrecision::automatic);

/// The Eigen form of dequant_matmul_backward: dy [M, N], dx [M, K].
void dequant_matmul_backward(ConstRefRowMatrixF dy, const QuantizedMatrix& w, RefRowMatrixF dx,
                             bool accumulate);

/// The largest batch, in rows of x, for which dequant_matmul may take the int8-activation path.
inline constexpr std::int64_t kInt8ActivationMaxRows = 16;

/**
 * Turns the int8-activation forward path on or off for the whole process, overriding the
 * environment variable QLORA_INT8_ACT (1 on, 0 off; unset means on).
 *
 * When on, dequant_matmul with ActivationPrecision::automatic, M <= kInt8ActivationMaxRows, a
 * SIMD instruction set and a block size that is a multiple of 32 (16 on NEON) and at most 4096
 * quantizes each block of x to int8 with scale max|x| / 127 and computes integer dot products
 * with the weight codes (AVX-512 VNNI, AVX2, NEON dotprod or plain NEON). This is what decoding
 * runs: a QuantLoraLinear forward without a backward cache and LlamaModel's logits and KV-cache
 * steps. Training forwards ask for ActivationPrecision::fp32 and never use it.
 *
 * Error: the rounding of x changes each output by at most the sum over blocks b of
 * (max|x_b| / 254) * sum_k |w_k - c_b|, where c_b is min + 8 * step (INT4) or min + 128 * step
 * (INT8) for asymmetric formats and 0 otherwise. NF4 rounds its code book to multiples of 1/127,
 * which adds up to absmax / 254 per weight. On Gaussian activations the relative RMS difference
 * is about 0.4 % to 0.7 % (NF4 0.8 %), as measured by tests/kernels/dequant_matmul_int8_test.cpp.
 * Results stay independent of the thread count, and each output row depends only on its own row
 * of x. Turn it off when inference results must match the fp32 kernels (and the logits of
 * reference implementations) to fp32 rounding.
 */
void set_int8_activations(bool enabled);

/// Returns whether the int8-activation path is on. The first call reads QLORA_INT8_ACT and
/// throws qlora::InvalidArgument when it is set to anything other than 0 or 1.
bool int8_activations();

namespace detail {

/// dequant_matmul with the kernels of `isa` instead of select_isa()'s, for tests and benchmarks.
void dequant_matmul(Isa isa, const float* x, std::int64_t M, const QuantizedMatrix& w, float* y,
                    bool accumulate);

/**
 * dequant_matmul through the int8-activation kernels of `isa` for any M, whatever
 * int8_activations() returns, for tests and benchmarks. Throws qlora::InvalidArgument when `isa`
 * is scalar or the block size is not supported (see set_int8_activations).
 */
void dequant_matmul_int8(Isa isa, const float* x, std::int64_t M, const QuantizedMatrix& w,
                         float* y, bool accumulate);

/// dequant_matmul_backward with the kernels of `isa`.
void dequant_matmul_backward(Isa isa, const float* dy, std::int64_t M, const QuantizedMatrix& w,
                             float* dx, bool accumulate);

}  // namespace detail

}  // namespace qlora
