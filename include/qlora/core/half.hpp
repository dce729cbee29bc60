// Conversions between fp32 and the 16-bit float formats fp16 (IEEE 754 binary16) and bf16.
//
// fp32 -> fp16 and fp32 -> bf16 round to nearest, ties to even, as F16C's vcvtps2ph with
// rounding mode 0 and PyTorch's .half() / .bfloat16() do. Values beyond the fp16 range become
// infinity; values below its smallest subnormal become signed zero. NaN stays NaN: the
// result is a quiet NaN that keeps the sign and the top payload bits. The 16-bit values are
// carried as raw uint16_t bit patterns, which is how GGUF and safetensors store them.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace qlora {

/// Converts an fp32 value to fp16 bits, rounding to nearest even.
constexpr std::uint16_t fp32_to_fp16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  std::uint32_t magnitude = bits & 0x7fffffffu;

  // NaN: set the quiet bit so that a signalling NaN with a low payload stays a NaN.
  if (magnitude > 0x7f800000u) {
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  }
  // 65520 is the midpoint between the largest fp16 (65504, odd mantissa) and 2^16, so it and
  // everything above it (infinity included) round to infinity.
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);

  // Normal fp16 range: rebias the exponent (127 -> 15) and round away the low 13 bits.
  // A carry out of the mantissa correctly bumps the exponent.
  if (magnitude >= 0x38800000u) {
    const std::uint32_t odd = (magnitude >> 13) & 1u;
    magnitude += 0xc8000fffu + odd;
    return static_cast<std::uint16_t>(sign | (magnitude >> 13));
  }

  // Subnormal fp16: adding 0.5 aligns the value to the fp16 subnormal step (2^-24) and the
  // fp32 addition rounds to nearest even; the low bits of the sum are the fp16 mantissa.
  const float shifted = std::bit_cast<float>(magnitude) + 0.5f;
  return static_cast<std::uint16_t>(sign | (std::bit_cast<std::uint32_t>(shifted) - 0x3f000000u));
}

/// Converts fp16 bits to fp32 exactly.
constexpr float fp16_to_fp32(std::uint16_t half) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1fu;
  const std::uint32_t mantissa = half & 0x3ffu;

  if (exponent == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<std::uint32_t>(magnitude));
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/// Converts an fp32 value to bf16 bits, rounding to nearest even; NaN becomes a quiet NaN.
constexpr std::uint16_t fp32_to_bf16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

/// Converts bf16 bits to fp32 exactly.
constexpr float bf16_to_fp32(std::uint16_t bf16) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bf16) << 16);
}

/// Converts `n` fp16 values to fp32. `src` [n], `dst` [n].
inline void fp16_to_fp32(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(src[i]);
}

/// Converts `n` bf16 values to fp32. `src` [n], `dst` [n].
inline void bf16_to_fp32(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(src[i]);
}

}  // namespace qlora
