// The AVX2 + FMA dequant-matmul kernels; the algorithms are in dequant_matmul_impl.inc.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "../dequant_matmul_q8.hpp"
#include "qlora/detail/dequant_matmul_kernels.hpp"
#include "qlora/quant/tables.hpp"

namespace qlora::kernels::avx2 {
/// The SIMD interface that dequant_matmul_impl.inc is written against.
struct Simd {
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
  static float reduce(Reg v) {
    const __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    const __m128 sum1 = _mm_add_ss(sum2, _mm_movehdup_ps(sum2));
    return _mm_cvtss_f32(sum1);
  }

  /// The 16 NF4 levels as two halves; bit 3 of a code picks the half.
  struct Lut4 {
    __m256 low;
    __m256 high;
  };
  static Lut4 nf4_lut() {
    return {_mm256_loadu_ps(kNf4Levels.data()), _mm256_loadu_ps(kNf4Levels.data() + 8)};
  }

  static Reg lookup(__m256i codes, const Lut4& lut) {
    const __m256 from_low = _mm256_permutevar8x32_ps(lut.low, codes);
    const __m256 from_high = _mm256_permutevar8x32_ps(lut.high, codes);
    const __m256 use_high = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));
    return _mm256_blendv_ps(from_low, from_high, use_high);
  }

  /// 8 bytes: the high nibbles are elements 0, 2, .., 14 and the low nibbles 1, 3, .., 15.
  template <KernelFormat F>
  static void decode4(const std::uint8_t* p, const Lut4& lut, Reg& even, Reg& odd) {
    std::int64_t raw = 0;
    std::memcpy(&raw, p, sizeof(raw));
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(raw));
    __m256i hi = _mm256_srli_epi32(bytes, 4);
    __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi32(0x0f));
    if constexpr (F == KernelFormat::nf4) {
      even = lookup(hi, lut);
      odd = lookup(lo, lut);
      return;
    } else if constexpr (F == KernelFormat::int4_sym) {
      hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(8));
      lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(8));
    }
    even = _mm256_cvtepi32_ps(hi);
    odd = _mm256_cvtepi32_ps(lo);
  }

  template <KernelFormat F>
  static Reg decode8(const std::uint8_t* p) {
    std::int64_t raw = 0;
    std::memcpy(&raw, p, sizeof(raw));
    const __m128i bytes = _mm_cvtsi64_si128(raw);
    if constexpr (F == KernelFormat::int8_sym) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    } else {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    }
  }

  static void zip(Reg even, Reg odd, Reg& lo, Reg& hi) {
    const __m256 a = _mm256_unpacklo_ps(even, odd);  // e0 o0 e1 o1 | e4 o4 e5 o5
    const __m256 b = _mm256_unpackhi_ps(even, odd);  // e2 o2 e3 o3 | e6 o6 e7 o7
    lo = _mm256_permute2f128_ps(a, b, 0x20);
    hi = _mm256_permute2f128_ps(a, b, 0x31);
  }
};

#include "../dequant_matmul_impl.inc"
#include "../dequant_matmul_q8_impl.inc"

/**
 * The integer dot products of the q8 path (see dequant_matmul_q8_impl.inc), 32 weights per step.
 * vpmaddubsw multiplies unsigned by signed bytes and saturates pairs at int16: 4-bit codes
 * (u <= 15) go in unsigned, while 8-bit values c go in as |c| with the sign moved onto q
 * (vpsignb), so a pair is at most 2 * 128 * 127 < 2^15. vpmaddwd then widens pairs to int32.
 */
struct Int8Dot {
  using Acc = __m256i;
  using FReg = __m256;
  static constexpr std::int64_t kUnit = 32;

  template <KernelFormat F>
  static constexpr int kOffset = (F == KernelFormat::int4 || F == KernelFormat::int4_sym) ? 8 : 0;

  /// A decoded step: `magnitude` is what vpmaddubsw reads unsigned; `sign` carries the sign of
  /// 8-bit values (unused for 4-bit integer codes).
  struct Weights {
    __m256i magnitude;
    __m256i sign;
  };

  static Acc acc_init(std::int32_t v) { return _mm256_setr_epi32(v, 0, 0, 0, 0, 0, 0, 0); }

  /// 16 bytes of 4-bit codes: the high nibbles (even elements) in bytes 0-15, the low nibbles
  /// (odd elements) in bytes 16-31. Shifting 32-bit lanes moves bits of the next byte into
  /// bits 4-7 only, which the mask clears.
  static __m256i nibbles(const std::uint8_t* p) {
    const __m256i bytes =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i shifted = _mm256_srlv_epi32(bytes, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0));
    return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f));
  }

  template <KernelFormat F>
  static Weights load(const std::uint8_t* p) {
    __m256i c;
    if constexpr (F == KernelFormat::nf4) {
      static constexpr std::array<std::int8_t, 16> kBook = q8_nf4_codebook<0>();
      const __m128i book = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kBook.data()));
      c = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(book), nibbles(p));
    } else if constexpr (kIs4Bit<F>) {
      return {nibbles(p), _mm256_setzero_si256()};
    } else {
      c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      // Unsigned u becomes u - 128, the centred code.
      if constexpr (F == KernelFormat::int8) c = _mm256_xor_si256(c, _mm256_set1_epi8(-128));
    }
    return {_mm256_abs_epi8(c), c};
  }

  template <KernelFormat F>
  static Acc dot(Acc acc, const Weights& weights, const std::int8_t* q) {
    __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    if constexpr (F == KernelFormat::nf4 || !kIs4Bit<F>) qv = _mm256_sign_epi8(qv, weights.sign);
    const __m256i pairs = _mm256_maddubs_epi16(weights.magnitude, qv);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }

  static FReg fzero() { return _mm256_setzero_ps(); }
  static FReg fma(Acc acc, float s, FReg f) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s), f);
  }
  static float reduce(FReg f) { return Simd::reduce(f); }
};

const DequantMatmulQ8Table kQ8Table = make_q8_table<Int8Dot>();

}  // namespace qlora::kernels::avx2
