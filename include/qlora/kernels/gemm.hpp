// Dense fp32 matrix products C = alpha * op(A) * op(B) (+ C), row-major, for the model's
// unquantized products: the tied output head, attention and the LoRA factors.
//
// The op validates its arguments once and runs the kernel of the instruction set that
// qlora::select_isa picks (QLORA_ISA forces one), on qlora::num_threads() OpenMP threads, or on
// the calling thread alone when it is called inside an OpenMP parallel region. Every output
// element is summed over k in a fixed order (slices of 256 steps in increasing k, see
// qlora/kernels/gemm_args.hpp), so results do not depend on the thread count. Mixed precision
// and complex types are not provided.
//
// NOTE: the scalar fallback (QLORA_ISA=scalar, or x86-64 CPUs without AVX2 and FMA) is the
// plain reference loop. It is not tuned and was not measured against the Eigen products that
// it replaces on such CPUs.
#pragma once

#include <cstdint>

#include "qlora/core/cpu.hpp"
#include "qlora/core/matrix.hpp"

namespace qlora {

/// Whether a GEMM operand is used as stored or transposed.
enum class Transpose { no, yes };

/**
 * Computes C[M, N] = alpha * op(A)[M, K] * op(B)[K, N], or adds it to C when `accumulate` is
 * set. All matrices are row-major with the given row strides (leading dimensions):
 *
 * - A is stored [M, lda] when op_a is Transpose::no, [K, lda] when it is Transpose::yes;
 * - B is stored [K, ldb] when op_b is Transpose::no, [N, ldb] when it is Transpose::yes;
 * - C is stored [M, ldc] and must not overlap A or B.
 *
 * alpha multiplies the elements of op(A) before the products, so alpha = 1 gives the plain sum
 * of products. With K = 0 the product is zero, so C is zeroed (or left as it is with
 * `accumulate`).
 *
 * Throws qlora::InvalidArgument when a size is negative, a row stride is smaller than the row
 * it must contain, or a pointer is null while the matrix it stands for is not empty.
 *
 * Example (logits [T, vocab] = h [T, hidden] * E^T with E [vocab, hidden]):
 *   qlora::gemm_f32(Transpose::no, Transpose::yes, T, vocab, hidden, 1.0f, h.data(), hidden,
 *                   E.data(), hidden, false, logits.data(), vocab);
 */
void gemm_f32(Transpose op_a, Transpose op_b, std::int64_t M, std::int64_t N, std::int64_t K,
              float alpha, const float* A, std::int64_t lda, const float* B, std::int64_t ldb,
              bool accumulate, float* C, std::int64_t ldc);

/**
 * The Eigen form of gemm_f32: c = alpha * op(a) * op(b) (+ c). Blocks with a row stride are
 * accepted. Throws qlora::InvalidArgument when the shapes do not match.
 *
 * Example (dA += du^T x, du [M, r], x [M, in], dA [r, in]):
 *   qlora::gemm_f32(du, Transpose::yes, x, Transpose::no, dA, 1.0f, true);
 */
void gemm_f32(ConstRefRowMatrixF a, Transpose op_a, ConstRefRowMatrixF b, Transpose op_b,
              RefRowMatrixF c, float alpha = 1.0f, bool accumulate = false);

namespace detail {

/// gemm_f32 with the kernel of `isa` instead of select_isa()'s, for tests and benchmarks.
void gemm_f32(Isa isa, Transpose op_a, Transpose op_b, std::int64_t M, std::int64_t N,
              std::int64_t K, float alpha, const float* A, std::int64_t lda, const float* B,
              std::int64_t ldb, bool accumulate, float* C, std::int64_t ldc);

}  // namespace detail

}  // namespace qlora
