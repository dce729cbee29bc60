// The scalar reference fp32 GEMM: the specification that every SIMD variant is tested against,
// and the fallback when QLORA_ISA=scalar or no SIMD variant is available.
//
// Each output element is summed in the order of the SIMD variants (slices of kGemmSliceDepth
// steps, see GemmArgs), but the products are not fused, so results differ by float rounding.
// The loops are plain; only the order of the inner loop is chosen so that the compiler can
// vectorize it when op(B) is not transposed.
#pragma once

#include <algorithm>
#include <cstdint>

#include "qlora/kernels/gemm_args.hpp"

namespace qlora::kernels::ref {

/// Columns of one row of C summed at once.
inline constexpr std::int64_t kGemmRefColumns = 64;

/// Computes one GEMM (see GemmArgs) on `n_threads` OpenMP threads, split over rows of C.
inline void gemm_f32(const GemmArgs& args, int n_threads, float* /*workspace*/) noexcept {
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (std::int64_t m = 0; m < args.M; ++m) {
    float acc[kGemmRefColumns];
    float slice[kGemmRefColumns];
    for (std::int64_t n0 = 0; n0 < args.N; n0 += kGemmRefColumns) {
      const std::int64_t width = std::min(kGemmRefColumns, args.N - n0);
      float* c_row = args.c + m * args.ldc + n0;
      for (std::int64_t j = 0; j < width; ++j) acc[j] = args.accumulate ? c_row[j] : 0.0f;

      for (std::int64_t k0 = 0; k0 < args.K; k0 += kGemmSliceDepth) {
        const std::int64_t k_end = std::min(args.K, k0 + kGemmSliceDepth);
        std::fill(slice, slice + width, 0.0f);
        for (std::int64_t k = k0; k < k_end; ++k) {
          const float a_value =
              args.trans_a ? args.a[k * args.lda + m] : args.a[m * args.lda + k];
          const float a = args.alpha * a_value;
          if (args.trans_b) {
            for (std::int64_t j = 0; j < width; ++j) slice[j] += a * args.b[(n0 + j) * args.ldb + k];
          } else {
            const float* b_row = args.b + k * args.ldb + n0;
            for (std::int64_t j = 0; j < width; ++j) slice[j] += a * b_row[j];
          }
        }
        for (std::int64_t j = 0; j < width; ++j) acc[j] += slice[j];
      }
      std::copy(acc, acc + width, c_row);
    }
  }
}

/// Returns 0, because the reference needs no workspace.
inline std::int64_t gemm_f32_workspace_floats(const GemmArgs& /*args*/,
                                              int /*n_threads*/) noexcept {
  return 0;
}

}  // namespace qlora::kernels::ref
