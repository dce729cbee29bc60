#include "qlora/core/half.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include <gtest/gtest.h>

namespace {

using qlora::bf16_to_fp32;
using qlora::fp16_to_fp32;
using qlora::fp32_to_bf16;
using qlora::fp32_to_fp16;

constexpr std::uint16_t kFp16PosInf = 0x7c00;
constexpr std::uint16_t kFp16NegInf = 0xfc00;
constexpr std::uint16_t kFp16Max = 0x7bff;          // 65504
constexpr std::uint16_t kFp16MinNormal = 0x0400;    // 2^-14
constexpr std::uint16_t kFp16MinSubnormal = 0x0001; // 2^-24

// Rounds to nearest even through double, as an independent reference for the bit tricks.
std::uint16_t fp16_reference(float value) {
  const double x = static_cast<double>(value);
  if (std::isnan(x)) return 0x7e00;
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::abs(x);
  if (a >= 65520.0) return sign | kFp16PosInf;
  // Step of the fp16 grid at this magnitude: 2^-24 for subnormals, 2^(e-10) for normals.
  int exponent = 0;
  std::frexp(a, &exponent);  // a = m * 2^exponent, m in [0.5, 1)
  const int e = std::max(exponent - 1, -14);
  const double step = std::ldexp(1.0, e - 10);
  const double q = std::nearbyint(a / step);  // default rounding mode is to nearest even
  const double r = q * step;
  if (r == 0.0) return sign;
  if (r < std::ldexp(1.0, -14)) return static_cast<std::uint16_t>(sign | static_cast<int>(q));
  int re = 0;
  const double m = std::frexp(r, &re);
  const int biased = re - 1 + 15;
  const int mantissa = static_cast<int>((m * 2.0 - 1.0) * 1024.0);
  return static_cast<std::uint16_t>(sign | (biased << 10) | mantissa);
}

TEST(fp16_convert, round_trip_every_fp16_value) {
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto half = static_cast<std::uint16_t>(bits);
    const float value = fp16_to_fp32(half);
    if (std::isnan(value)) {
      EXPECT_TRUE(std::isnan(fp16_to_fp32(fp32_to_fp16(value)))) << std::hex << bits;
      continue;
    }
    ASSERT_EQ(fp32_to_fp16(value), half) << "bits 0x" << std::hex << bits;
  }
}

TEST(fp16_convert, matches_reference_rounding) {
  // Sweep fp32 bit patterns with a stride that hits ties, subnormals and the overflow edge.
  for (std::uint64_t bits = 0; bits <= 0x7f800000u; bits += 4093) {
    const float value = std::bit_cast<float>(static_cast<std::uint32_t>(bits));
    ASSERT_EQ(fp32_to_fp16(value), fp16_reference(value)) << "value " << value;
    ASSERT_EQ(fp32_to_fp16(-value), fp16_reference(-value)) << "value " << -value;
  }
}

TEST(fp16_convert, ties_round_to_even) {
  // 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: even mantissa (1.0) wins.
  EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f), 0x3c00);
  // 1 + 3 * 2^-11 lies halfway between 1 + 2^-10 (odd) and 1 + 2^-9 (even).
  EXPECT_EQ(fp32_to_fp16(1.0f + 3.0f * 0x1p-11f), 0x3c02);
  // Halfway between the two smallest subnormals rounds to the even one (2^-23).
  EXPECT_EQ(fp32_to_fp16(1.5f * 0x1p-24f), 0x0002);
  // Half of the smallest subnormal rounds to zero (even).
  EXPECT_EQ(fp32_to_fp16(0x1p-25f), 0x0000);
}

TEST(fp16_convert, overflow_becomes_infinity) {
  EXPECT_EQ(fp32_to_fp16(65504.0f), kFp16Max);
  EXPECT_EQ(fp32_to_fp16(65519.99f), kFp16Max);
  EXPECT_EQ(fp32_to_fp16(65520.0f), kFp16PosInf);
  EXPECT_EQ(fp32_to_fp16(1e10f), kFp16PosInf);
  EXPECT_EQ(fp32_to_fp16(-1e10f), kFp16NegInf);
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::infinity()), kFp16PosInf);
  EXPECT_EQ(fp32_to_fp16(-std::numeric_limits<float>::infinity()), kFp16NegInf);
}

TEST(fp16_convert, subnormals_and_zero) {
  EXPECT_EQ(fp32_to_fp16(0x1p-14f), kFp16MinNormal);
  EXPECT_EQ(fp32_to_fp16(0x1p-24f), kFp16MinSubnormal);
  EXPECT_EQ(fp16_to_fp32(kFp16MinSubnormal), 0x1p-24f);
  EXPECT_EQ(fp16_to_fp32(0x03ff), 1023.0f * 0x1p-24f);
  EXPECT_EQ(fp32_to_fp16(0.0f), 0x0000);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_TRUE(std::signbit(fp16_to_fp32(0x8000)));
  // An fp32 subnormal is far below the fp16 range.
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::denorm_min()), 0x0000);
}

TEST(fp16_convert, nan_stays_quiet_nan) {
  const float quiet = std::numeric_limits<float>::quiet_NaN();
  const float signalling = std::bit_cast<float>(0x7f800001u);
  const std::uint16_t from_quiet = fp32_to_fp16(quiet);
  const std::uint16_t from_signalling = fp32_to_fp16(signalling);
  EXPECT_EQ(from_quiet & 0x7c00, 0x7c00);
  EXPECT_NE(from_quiet & 0x03ff, 0);
  EXPECT_NE(from_signalling & 0x0200, 0) << "a signalling NaN with a low payload must stay NaN";
  EXPECT_TRUE(std::isnan(fp16_to_fp32(from_signalling)));
  EXPECT_EQ(fp32_to_fp16(-quiet) & 0x8000, 0x8000);
  EXPECT_TRUE(std::isinf(fp16_to_fp32(kFp16PosInf)));
}

TEST(bf16_convert, round_to_nearest_even) {
  EXPECT_EQ(fp32_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: rounds to the even 1.0.
  EXPECT_EQ(fp32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(fp32_to_bf16(1.0f + 3.0f * 0x1p-8f), 0x3f82);
  EXPECT_EQ(fp32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
}

TEST(bf16_convert, specials) {
  EXPECT_EQ(fp32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(fp32_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(fp32_to_bf16(std::numeric_limits<float>::max()), 0x7f80) << "rounds up to infinity";
  EXPECT_EQ(fp32_to_bf16(-0.0f), 0x8000);
  const std::uint16_t nan = fp32_to_bf16(std::bit_cast<float>(0x7f800001u));
  EXPECT_TRUE(std::isnan(bf16_to_fp32(nan)));
  // bf16 keeps fp32's exponent range, so fp32 subnormals survive (truncated mantissa).
  EXPECT_EQ(bf16_to_fp32(fp32_to_bf16(0x1p-130f)), 0x1p-130f);
}

TEST(bf16_convert, round_trip_every_bf16_value) {
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto bf16 = static_cast<std::uint16_t>(bits);
    const float value = bf16_to_fp32(bf16);
    if (std::isnan(value)) continue;
    ASSERT_EQ(fp32_to_bf16(value), bf16) << "bits 0x" << std::hex << bits;
  }
}

TEST(half_convert, usable_in_constant_expressions) {
  static_assert(fp32_to_fp16(1.0f) == 0x3c00);
  static_assert(fp16_to_fp32(0x3c00) == 1.0f);
  static_assert(fp32_to_bf16(-2.0f) == 0xc000);
  static_assert(bf16_to_fp32(0xc000) == -2.0f);
}

}  // namespace
