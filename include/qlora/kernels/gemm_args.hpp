// The arguments of one fp32 GEMM as the kernels receive them, and the kernel signature shared
// by every instruction set.
//
// Kernels assume valid input: the public op in qlora/kernels/gemm.hpp checks sizes, strides and
// pointers once and then calls a kernel through a function pointer.
#pragma once

#include <cstdint>

namespace qlora::kernels {

/// Reduction steps summed from zero before they are added to C: the K order of every variant.
inline constexpr std::int64_t kGemmSliceDepth = 256;

/**
 * C[M, N] (+)= (alpha * op(A)) * op(B), row-major, with element access
 *
 *   op(A)[m, k] = trans_a ? a[k * lda + m] : a[m * lda + k]
 *   op(B)[k, n] = trans_b ? b[n * ldb + k] : b[k * ldb + n]
 *   C[m, n]     = c[m * ldc + n]
 *
 * With `accumulate` false, C is overwritten and never read. M, N and K are positive.
 */
struct GemmArgs {
  bool trans_a = false;
  bool trans_b = false;
  std::int64_t M = 0;
  std::int64_t N = 0;
  std::int64_t K = 0;
  float alpha = 1.0f;
  const float* a = nullptr;
  std::int64_t lda = 0;
  const float* b = nullptr;
  std::int64_t ldb = 0;
  float* c = nullptr;
  std::int64_t ldc = 0;
  bool accumulate = false;
};

/**
 * A GEMM kernel. Each C element starts from C[m, n] (with accumulate) or 0. Then each slice of
 * kGemmSliceDepth reduction steps, in increasing order, adds its own multiply-add chain of
 * (alpha * op(A)[m, k]) * op(B)[k, n], fused into FMAs in the SIMD variants. A SIMD variant may
 * split a slice into one chain per vector lane whose sums are added in lane order (its
 * dot-product path for up to 4 rows of C). The order depends on the variant, the path and K,
 * never on `n_threads`. `workspace` has room for the floats that the variant's workspace-size
 * function returns for the same arguments and thread count.
 */
using GemmFn = void (*)(const GemmArgs& args, int n_threads, float* workspace) noexcept;

/// Returns the workspace, in floats, that a GEMM kernel needs for `args` on `n_threads` threads.
using GemmWorkspaceFn = std::int64_t (*)(const GemmArgs& args, int n_threads) noexcept;

}  // namespace qlora::kernels
