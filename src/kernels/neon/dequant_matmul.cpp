// The NEON (AArch64 Advanced SIMD) dequant-matmul kernels; the algorithms are in
// dequant_matmul_impl.inc.
#include <arm_neon.h>
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

namespace qlora::kernels::neon {
/// The SIMD interface that dequant_matmul_impl.inc is written against.
struct Simd {
  using Reg = float32x4_t;
  static constexpr int kW = 4;
  static constexpr int kMr = 6;
  static constexpr int kNv = 4;

  static Reg zero() { return vdupq_n_f32(0.0f); }
  static Reg set1(float v) { return vdupq_n_f32(v); }
  static Reg load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, Reg v) { vst1q_f32(p, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return vfmaq_f32(c, a, b); }
  static Reg add(Reg a, Reg b) { return vaddq_f32(a, b); }
  static float reduce(Reg v) { return vaddvq_f32(v); }

  /// The 16 NF4 levels as 64 bytes for TBL; a code c selects bytes 4c .. 4c + 3.
  struct Lut4 {
    uint8x16x4_t bytes;
  };
  static Lut4 nf4_lut() {
    const auto* p = reinterpret_cast<const std::uint8_t*>(kNf4Levels.data());
    return {{{vld1q_u8(p), vld1q_u8(p + 16), vld1q_u8(p + 32), vld1q_u8(p + 48)}}};
  }

  static Reg lookup(uint32x4_t codes, const Lut4& lut) {
    const uint32x4_t index = vmlaq_n_u32(vdupq_n_u32(0x03020100u), codes, 0x04040404u);
    return vreinterpretq_f32_u8(vqtbl4q_u8(lut.bytes, vreinterpretq_u8_u32(index)));
  }

  /// 4 bytes: the high nibbles are elements 0, 2, 4, 6 and the low nibbles 1, 3, 5, 7.
  template <KernelFormat F>
  static void decode4(const std::uint8_t* p, const Lut4& lut, Reg& even, Reg& odd) {
    std::uint32_t raw = 0;
    std::memcpy(&raw, p, sizeof(raw));
    const uint8x8_t b8 = vreinterpret_u8_u32(vdup_n_u32(raw));
    const uint32x4_t bytes = vmovl_u16(vget_low_u16(vmovl_u8(b8)));
    const uint32x4_t hi = vshrq_n_u32(bytes, 4);
    const uint32x4_t lo = vandq_u32(bytes, vdupq_n_u32(0x0f));
    if constexpr (F == KernelFormat::nf4) {
      even = lookup(hi, lut);
      odd = lookup(lo, lut);
    } else if constexpr (F == KernelFormat::int4_sym) {
      even = vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(hi), vdupq_n_s32(8)));
      odd = vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(lo), vdupq_n_s32(8)));
    } else {
      even = vcvtq_f32_u32(hi);
      odd = vcvtq_f32_u32(lo);
    }
  }

  template <KernelFormat F>
  static Reg decode8(const std::uint8_t* p) {
    std::uint32_t raw = 0;
    std::memcpy(&raw, p, sizeof(raw));
    const uint8x8_t b8 = vreinterpret_u8_u32(vdup_n_u32(raw));
    if constexpr (F == KernelFormat::int8_sym) {
      const int16x8_t wide = vmovl_s8(vreinterpret_s8_u8(b8));
      return vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
    } else {
      return vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(b8))));
    }
  }

  static void zip(Reg even, Reg odd, Reg& lo, Reg& hi) {
    lo = vzip1q_f32(even, odd);
    hi = vzip2q_f32(even, odd);
  }
};

#include "../dequant_matmul_impl.inc"
#include "../dequant_matmul_q8_impl.inc"

/**
 * The integer dot products of the q8 path, 16 weights per step, signed by signed bytes. With
 * kDotprod, SDOT (Armv8.2 dotprod) adds groups of four products into int32 lanes. Without it,
 * SMULL and SMULL2 form int16 products of at most 128 * 127, and SADALP adds their pairs into
 * int32 lanes.
 * 4-bit integer codes go in as u = c + 8; the other formats go in centred.
 */
template <bool kDotprod>
struct Int8Dot {
  using Acc = int32x4_t;
  using FReg = float32x4_t;
  static constexpr std::int64_t kUnit = 16;

  template <KernelFormat F>
  static constexpr int kOffset = (F == KernelFormat::int4 || F == KernelFormat::int4_sym) ? 8 : 0;

  static Acc acc_init(std::int32_t v) { return vsetq_lane_s32(v, vdupq_n_s32(0), 0); }

  /// 8 bytes of 4-bit codes: the high nibbles (even elements) in bytes 0-7, the low nibbles (odd
  /// elements) in bytes 8-15.
  static uint8x16_t nibbles(const std::uint8_t* p) {
    const uint8x8_t bytes = vld1_u8(p);
    return vcombine_u8(vshr_n_u8(bytes, 4), vand_u8(bytes, vdup_n_u8(0x0f)));
  }

  template <KernelFormat F>
  static int8x16_t load(const std::uint8_t* p) {
    if constexpr (F == KernelFormat::nf4) {
      static constexpr std::array<std::int8_t, 16> kBook = q8_nf4_codebook<0>();
      return vqtbl1q_s8(vld1q_s8(kBook.data()), nibbles(p));
    } else if constexpr (kIs4Bit<F>) {
      return vreinterpretq_s8_u8(nibbles(p));
    } else if constexpr (F == KernelFormat::int8) {
      // Unsigned u becomes u - 128, the centred code.
      return vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), vdupq_n_u8(0x80)));
    } else {
      return vld1q_s8(reinterpret_cast<const std::int8_t*>(p));
    }
  }

  template <KernelFormat F>
  static Acc dot(Acc acc, int8x16_t weights, const std::int8_t* q) {
    const int8x16_t qv = vld1q_s8(q);
    if constexpr (kDotprod) {
      // The build targets plain Armv8-A, where the vdotq_s32 intrinsic cannot be inlined, so
      // the instruction is written out. The .arch directive only lets the assembler accept it
      // (GCC 12 emits nothing past Armv8-A); matmul.cpp picks this variant only when the CPU
      // reports dotprod.
      __asm__(".arch armv8.2-a+dotprod\n\tsdot %0.4s, %1.16b, %2.16b"
              : "+w"(acc)
              : "w"(weights), "w"(qv));
      return acc;
    } else {
      acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(weights), vget_low_s8(qv)));
      return vpadalq_s16(acc, vmull_high_s8(weights, qv));
    }
  }

  static FReg fzero() { return vdupq_n_f32(0.0f); }
  static FReg fma(Acc acc, float s, FReg f) { return vfmaq_n_f32(f, vcvtq_f32_s32(acc), s); }
  static float reduce(FReg f) { return vaddvq_f32(f); }
};

const DequantMatmulQ8Table kQ8Table = make_q8_table<Int8Dot<false>>();
const DequantMatmulQ8Table kQ8DotprodTable = make_q8_table<Int8Dot<true>>();

}  // namespace qlora::kernels::neon
