// The AVX-512 fp32 GEMM kernel; the algorithm is in gemm_impl.inc.
#include <immintrin.h>
#include <omp.h>

// NOTE: GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which initializes a
// variable with itself, and inlining then triggers false -Wmaybe-uninitialized reports.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "qlora/detail/gemm_kernels.hpp"

namespace qlora::kernels::avx512 {

/// The SIMD interface that gemm_impl.inc is written against: a 12 x 32 micro-kernel with 24
/// accumulator registers out of 32.
struct GemmSimd {
  using Reg = __m512;
  static constexpr int kW = 16;
  static constexpr int kMr = 12;
  static constexpr int kNv = 2;

  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float v) { return _mm512_set1_ps(v); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
};

#include "../gemm_impl.inc"

}  // namespace qlora::kernels::avx512
