// The AVX-512 (F, BW, VL) dequant-matmul kernels; the algorithms are in dequant_matmul_impl.inc.
#include <immintrin.h>
#include <omp.h>

// NOTE: GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which initializes a
// variable with itself, and inlining then triggers false -Wmaybe-uninitialized reports.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#include "../dequant_matmul_q8.hpp"
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
#include "../dequant_matmul_q8_impl.inc"

/**
 * The integer dot products of the q8 path with AVX-512 VNNI, 32 weights per step: vpdpbusd on
 * 256-bit registers multiplies unsigned code bytes by signed activation bytes and adds groups of
 * four into int32 lanes without saturation. Codes go in as c + o with o = 8 for 4-bit integer
 * codes and o = 128 otherwise, which makes every value unsigned. Used only when the CPU has
 * AVX-512 VNNI; matmul.cpp uses the AVX2 q8 kernels otherwise.
 */
struct Int8Dot {
  using Acc = __m256i;
  using FReg = __m256;
  static constexpr std::int64_t kUnit = 32;

  template <KernelFormat F>
  static constexpr int kOffset = (F == KernelFormat::int4 || F == KernelFormat::int4_sym) ? 8 : 128;

  static Acc acc_init(std::int32_t v) { return _mm256_setr_epi32(v, 0, 0, 0, 0, 0, 0, 0); }

  /// 16 bytes of 4-bit codes: the high nibbles (even elements) in bytes 0-15, the low nibbles
  /// (odd elements) in bytes 16-31.
  static __m256i nibbles(const std::uint8_t* p) {
    const __m256i bytes =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i shifted = _mm256_srlv_epi32(bytes, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0));
    return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f));
  }

  /// Returns c + o as unsigned bytes.
  template <KernelFormat F>
  static __m256i load(const std::uint8_t* p) {
    if constexpr (F == KernelFormat::nf4) {
      static constexpr std::array<std::int8_t, 16> kBook = q8_nf4_codebook<128>();
      const __m128i book = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kBook.data()));
      return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(book), nibbles(p));
    } else if constexpr (kIs4Bit<F>) {
      return nibbles(p);
    } else {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (F == KernelFormat::int8_sym) return _mm256_xor_si256(c, _mm256_set1_epi8(-128));
      return c;
    }
  }

  template <KernelFormat F>
  static Acc dot(Acc acc, __m256i weights, const std::int8_t* q) {
    return _mm256_dpbusd_epi32(acc, weights, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  }

  static FReg fzero() { return _mm256_setzero_ps(); }
  static FReg fma(Acc acc, float s, FReg f) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s), f);
  }
  static float reduce(FReg f) {
    const __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
    const __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    const __m128 sum1 = _mm_add_ss(sum2, _mm_movehdup_ps(sum2));
    return _mm_cvtss_f32(sum1);
  }
};

const DequantMatmulQ8Table kQ8Table = make_q8_table<Int8Dot>();

}  // namespace qlora::kernels::avx512
