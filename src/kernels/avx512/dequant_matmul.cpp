// The AVX-512 (F, BW, VL) dequant-matmul kernels; the algorithms are in dequant_matmul_impl.inc.
#include <immintrin.h>
#include <omp.h>

// NOTE: GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which initializes a
// variable with itself, and inlining then triggers false -Wmaybe-uninitialized reports.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "qlora/detail/dequant_matmul_kernels.hpp"
#include "qlora/quant/tables.hpp"

namespace qlora::kernels::avx512 {
/// The SIMD interface that dequant_matmul_impl.inc is written against.
struct Simd {
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
  static float reduce(Reg v) { return _mm512_reduce_add_ps(v); }

  struct Lut4 {
    __m512 levels;
  };
  static Lut4 nf4_lut() { return {_mm512_loadu_ps(kNf4Levels.data())}; }

  /// 16 bytes: the high nibbles are elements 0, 2, .., 30 and the low nibbles 1, 3, .., 31.
  template <KernelFormat F>
  static void decode4(const std::uint8_t* p, const Lut4& lut, Reg& even, Reg& odd) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __m512i hi = _mm512_srli_epi32(bytes, 4);
    __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0f));
    if constexpr (F == KernelFormat::nf4) {
      even = _mm512_permutexvar_ps(hi, lut.levels);
      odd = _mm512_permutexvar_ps(lo, lut.levels);
      return;
    } else if constexpr (F == KernelFormat::int4_sym) {
      hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(8));
      lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(8));
    }
    even = _mm512_cvtepi32_ps(hi);
    odd = _mm512_cvtepi32_ps(lo);
  }

  template <KernelFormat F>
  static Reg decode8(const std::uint8_t* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (F == KernelFormat::int8_sym) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    } else {
      return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
    }
  }

  static void zip(Reg even, Reg odd, Reg& lo, Reg& hi) {
    const __m512i idx_lo =
        _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i idx_hi =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    lo = _mm512_permutex2var_ps(even, idx_lo, odd);
    hi = _mm512_permutex2var_ps(even, idx_hi, odd);
  }
};

#include "../dequant_matmul_impl.inc"

}  // namespace qlora::kernels::avx512
