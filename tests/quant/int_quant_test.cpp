// Group-wise INT4 / INT8 quantization: round trip, edge cases, GPTQ conversion, bad input.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/quant/quantize.hpp"
#include "support/compare.hpp"

namespace {

using ::testing::HasSubstr;
using qlora::QuantFormat;

// Relative slack on "within half a step" for float32 rounding of the division and product.
constexpr double kHalfStepRelSlack = 1e-5;
// Absolute slack for subnormal groups, whose scale itself is rounded to a multiple of 2^-149.
constexpr double kSubnormalSlack = 1e-43;
constexpr double kGptqTol = 1e-6;

qlora::RowMatrixF normal_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed,
                                float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  qlora::RowMatrixF w(rows, cols);
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = dist(rng);
  return w;
}

struct IntCase {
  QuantFormat format;
  bool symmetric;
};

const IntCase kCases[] = {{QuantFormat::int4, false},
                          {QuantFormat::int4, true},
                          {QuantFormat::int8, false},
                          {QuantFormat::int8, true}};

qlora::QuantizedMatrix quantize(const qlora::RowMatrixF& w, IntCase c, int group) {
  return qlora::quantize(w, {.format = c.format, .block_size = group, .symmetric = c.symmetric});
}

// Checks |w - dequantize(q)| <= scale / 2 for every element of every group.
::testing::AssertionResult within_half_step(const qlora::RowMatrixF& w,
                                            const qlora::QuantizedMatrix& q) {
  const qlora::RowMatrixF w2 = qlora::dequantize(q);
  for (Eigen::Index r = 0; r < w.rows(); ++r) {
    for (Eigen::Index c = 0; c < w.cols(); ++c) {
      const auto g = static_cast<std::size_t>(r * q.blocks_per_row() + c / q.block_size);
      const double scale = q.scales[g];
      const double err = std::abs(static_cast<double>(w(r, c)) - w2(r, c));
      const double bound = 0.5 * scale * (1.0 + kHalfStepRelSlack) +
                           kHalfStepRelSlack * std::abs(w(r, c)) + kSubnormalSlack;
      if (err > bound) {
        return ::testing::AssertionFailure()
               << "(" << r << ", " << c << "): |" << w(r, c) << " - " << w2(r, c) << "| = " << err
               << " > " << bound << " with scale " << scale;
      }
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(int_quantize, roundtrip_within_half_step) {
  const qlora::RowMatrixF w = normal_matrix(8, 384, 31);
  for (IntCase c : kCases) {
    for (int group : {32, 64, 128, 96, 384, 3}) {
      EXPECT_TRUE(within_half_step(w, quantize(w, c, group)))
          << qlora::to_string(c.format) << (c.symmetric ? " symmetric" : " affine") << " group "
          << group;
    }
  }
}

TEST(int_quantize, per_row_group) {
  const qlora::RowMatrixF w = normal_matrix(5, 200, 32);
  for (IntCase c : kCases) {
    const qlora::QuantizedMatrix q = quantize(w, c, 0);
    EXPECT_EQ(q.block_size, 200);
    EXPECT_EQ(q.scales.size(), 5u);
    EXPECT_TRUE(within_half_step(w, q));
  }
}

TEST(int_quantize, all_zero_group) {
  qlora::RowMatrixF w = normal_matrix(2, 64, 33);
  w.row(0).tail(32).setZero();
  for (IntCase c : kCases) {
    const qlora::QuantizedMatrix q = quantize(w, c, 32);
    EXPECT_EQ(q.scales[1], 0.0f);
    const qlora::RowMatrixF w2 = qlora::dequantize(q);
    EXPECT_TRUE(w2.row(0).tail(32).isZero(0.0f));
  }
}

TEST(int_quantize, constant_group_is_exact) {
  qlora::RowMatrixF w(1, 64);
  w.setConstant(-0.8125f);
  w.row(0).tail(32).setConstant(3.0e-3f);
  for (IntCase c : kCases) {
    const qlora::RowMatrixF w2 = qlora::dequantize(quantize(w, c, 32));
    if (c.symmetric) {
      // absmax / qpos * qpos may differ from absmax by an ulp.
      EXPECT_TRUE(w2.isApprox(w, 1e-6f));
    } else {
      EXPECT_TRUE(w2.isApprox(w, 0.0f)) << "affine constant groups store min = the value";
    }
  }
}

TEST(int_quantize, outlier_group_keeps_extremes) {
  qlora::RowMatrixF w = normal_matrix(1, 64, 34, 1e-3f);
  w(0, 10) = 500.0f;
  for (IntCase c : kCases) {
    const qlora::QuantizedMatrix q = quantize(w, c, 64);
    EXPECT_TRUE(within_half_step(w, q));
    EXPECT_NEAR(qlora::dequantize(q)(0, 10), 500.0f, 1e-3f);
  }
}

TEST(int_quantize, subnormal_weights) {
  qlora::RowMatrixF w = normal_matrix(2, 64, 35, 1e-40f);
  w(1, 0) = std::numeric_limits<float>::denorm_min();
  for (IntCase c : kCases) {
    const qlora::QuantizedMatrix q = quantize(w, c, 32);
    const qlora::RowMatrixF w2 = qlora::dequantize(q);
    EXPECT_TRUE(w2.allFinite());
    EXPECT_TRUE(within_half_step(w, q));
  }
}

TEST(int_quantize, one_row_one_group) {
  const qlora::RowMatrixF w = normal_matrix(1, 32, 36);
  for (IntCase c : kCases) {
    const qlora::QuantizedMatrix q = quantize(w, c, 32);
    EXPECT_EQ(q.n_blocks(), 1);
    EXPECT_TRUE(within_half_step(w, q));
  }
}

TEST(int_quantize, rounds_half_to_even) {
  // Symmetric INT4 with absmax 7: scale 1, so 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0.
  qlora::RowMatrixF w(1, 6);
  w << 7.0f, 0.5f, 1.5f, 2.5f, -0.5f, -3.5f;
  const qlora::QuantizedMatrix q = quantize(w, {QuantFormat::int4, true}, 6);
  ASSERT_EQ(q.scales[0], 1.0f);
  // Stored as u = q + 8, even element in the high nibble.
  EXPECT_EQ(q.codes[0], (15 << 4) | 8);
  EXPECT_EQ(q.codes[1], (10 << 4) | 10);
  EXPECT_EQ(q.codes[2], (8 << 4) | 4);
}

TEST(int_quantize, int8_symmetric_codes_are_twos_complement) {
  qlora::RowMatrixF w(1, 4);
  w << -127.0f, 127.0f, 0.0f, -63.5f;  // scale 1
  const qlora::QuantizedMatrix q = quantize(w, {QuantFormat::int8, true}, 4);
  EXPECT_EQ(static_cast<std::int8_t>(q.codes[0]), -127);
  EXPECT_EQ(static_cast<std::int8_t>(q.codes[1]), 127);
  EXPECT_EQ(static_cast<std::int8_t>(q.codes[2]), 0);
  EXPECT_EQ(static_cast<std::int8_t>(q.codes[3]), -64);  // -63.5 rounds to the even -64
}

TEST(int_quantize, affine_from_gptq_matches_zero_point_form) {
  const float scale = 0.0123f;
  for (int zero : {0, 3, 8, 15}) {
    const qlora::AffineParams p = qlora::affine_from_gptq(scale, zero);
    for (int u = 0; u < 16; ++u) {
      const double gptq = static_cast<double>(scale) * (u - zero);
      EXPECT_NEAR(p.scale * static_cast<float>(u) + p.min, gptq, kGptqTol);
    }
  }
}

TEST(int_quantize, quantizer_types_match_free_function) {
  const qlora::RowMatrixF w = normal_matrix(3, 128, 37);
  const qlora::QuantizedMatrix a = qlora::Int4Quantizer::quantize(w, {.block_size = 32});
  const qlora::QuantizedMatrix b = quantize(w, {QuantFormat::int4, false}, 32);
  EXPECT_EQ(a.codes, b.codes);
  EXPECT_EQ(a.mins, b.mins);
  const qlora::QuantizedMatrix c =
      qlora::Int8Quantizer::quantize(w, {.block_size = 0, .symmetric = true});
  EXPECT_EQ(c.format, QuantFormat::int8);
  EXPECT_DOUBLE_EQ(qlora::Int8Quantizer::bits_per_weight(c), 8.0 + 32.0 / 128.0);
  EXPECT_DOUBLE_EQ(qlora::Int4Quantizer::bits_per_weight(a), 4.0 + 64.0 / 32.0);
}

TEST(int_quantize, dequantize_blocks_match_full) {
  const qlora::RowMatrixF w = normal_matrix(4, 96, 38);
  for (IntCase c : kCases) {
    const qlora::QuantizedMatrix q = quantize(w, c, 32);
    const qlora::RowMatrixF full = qlora::dequantize(q);
    std::vector<float> part(32);
    qlora::dequantize_blocks(q, 3, 2, 3, part.data());
    for (std::size_t i = 0; i < part.size(); ++i) {
      EXPECT_EQ(part[i], full(3, 64 + static_cast<Eigen::Index>(i)));
    }
  }
}

TEST(int_errors, group_not_dividing_row) {
  const qlora::RowMatrixF w = normal_matrix(2, 100, 39);
  EXPECT_THAT([&] { quantize(w, {QuantFormat::int4, false}, 32); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  HasSubstr("group size does not divide the row: got in=100, group_size=32")));
  EXPECT_THAT([&] { quantize(w, {QuantFormat::int8, true}, -4); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("negative group size")));
}

TEST(int_errors, odd_row_for_int4) {
  const qlora::RowMatrixF w = normal_matrix(2, 33, 40);
  EXPECT_THAT([&] { quantize(w, {QuantFormat::int4, true}, 11); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("odd row length")));
  EXPECT_NO_THROW(quantize(w, {QuantFormat::int8, true}, 11));
}

TEST(int_errors, non_finite_weight_names_position) {
  qlora::RowMatrixF w = normal_matrix(3, 64, 41);
  w(1, 17) = std::numeric_limits<float>::infinity();
  EXPECT_THAT([&] { quantize(w, {QuantFormat::int8, false}, 32); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("row 1, column 17")));
}

TEST(int_errors, range_overflow) {
  qlora::RowMatrixF w = normal_matrix(1, 32, 42);
  w(0, 0) = 3.0e38f;
  w(0, 1) = -3.0e38f;
  EXPECT_THAT([&] { quantize(w, {QuantFormat::int4, false}, 32); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  HasSubstr("group range overflows float32")));
  EXPECT_NO_THROW(quantize(w, {QuantFormat::int4, true}, 32));
}

TEST(int_errors, empty_matrix) {
  const qlora::RowMatrixF w(3, 0);
  EXPECT_THAT([&] { quantize(w, {QuantFormat::int8, false}, 0); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("empty weight matrix")));
}

}  // namespace
