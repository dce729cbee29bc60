// The AVX2 + FMA fp32 GEMM kernel; the algorithm is in gemm_impl.inc.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "qlora/detail/gemm_kernels.hpp"

namespace qlora::kernels::avx2 {

/// The SIMD interface that gemm_impl.inc is written against: a 6 x 16 micro-kernel with 12
/// accumulator registers out of 16.
struct GemmSimd {
  using Reg = __m256;
  static constexpr int kW = 8;
  static constexpr int kMr = 6;
  static constexpr int kNv = 2;

  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float v) { return _mm256_set1_ps(v); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
};

#include "../gemm_impl.inc"

}  // namespace qlora::kernels::avx2
