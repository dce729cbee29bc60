// NF4 quantization: round trip, error against INT4, storage size, edge cases and bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
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

// Slack on "within half a step": float32 rounding of x * (1 / absmax) and of the product.
constexpr double kHalfStepSlack = 1e-6;
// NF4 with double quantization at block 64: 4 + 8/64 + 32/(64 * 256) bits, plus the offset.
constexpr double kNf4DqBitsPerWeight = 4.127;
constexpr double kBitsPerWeightTol = 1e-3;

qlora::RowMatrixF normal_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed,
                                float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  qlora::RowMatrixF w(rows, cols);
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = dist(rng);
  return w;
}

double mean_squared_error(const qlora::RowMatrixF& a, const qlora::RowMatrixF& b) {
  return (a.cast<double>() - b.cast<double>()).array().square().mean();
}

// Half the gap between the two NF4 levels around the normalised value s.
double nf4_half_step(double s) {
  for (std::size_t k = 0; k + 1 < qlora::kNf4Levels.size(); ++k) {
    if (s <= qlora::kNf4Levels[k + 1]) {
      return 0.5 * (qlora::kNf4Levels[k + 1] - qlora::kNf4Levels[k]);
    }
  }
  return 0.0;
}

qlora::QuantizedMatrix nf4(const qlora::RowMatrixF& w, int block_size, bool double_quant) {
  return qlora::quantize(w, {.format = QuantFormat::nf4,
                             .block_size = block_size,
                             .double_quant = double_quant});
}

TEST(nf4_quantize, roundtrip_within_half_step) {
  for (int block_size : {32, 64, 128, 256}) {
    const qlora::RowMatrixF w = normal_matrix(16, 512, 11);
    const qlora::QuantizedMatrix q = nf4(w, block_size, false);
    const qlora::RowMatrixF w2 = qlora::dequantize(q);
    for (Eigen::Index r = 0; r < w.rows(); ++r) {
      for (Eigen::Index c = 0; c < w.cols(); ++c) {
        const double absmax = q.scales[static_cast<std::size_t>(r * q.blocks_per_row() +
                                                                c / block_size)];
        const double bound = absmax * (nf4_half_step(w(r, c) / absmax) + kHalfStepSlack);
        ASSERT_LE(std::abs(w(r, c) - w2(r, c)), bound)
            << "block_size " << block_size << " at (" << r << ", " << c << ")";
      }
    }
  }
}

TEST(nf4_quantize, double_quant_absmax_error_bounded) {
  const qlora::RowMatrixF w = normal_matrix(64, 1024, 12);
  const qlora::QuantizedMatrix plain = nf4(w, 64, false);
  const qlora::QuantizedMatrix dq = nf4(w, 64, true);
  ASSERT_EQ(plain.codes, dq.codes);

  // The decoded absmax is the nearest dynamic-map entry: within half the largest map gap
  // (about 0.007) of the nested block's absmax.
  double max_half_gap = 0.0;
  for (std::size_t i = 0; i + 1 < qlora::kDynamicMap.size(); ++i) {
    max_half_gap = std::max(max_half_gap,
                            0.5 * (qlora::kDynamicMap[i + 1] - qlora::kDynamicMap[i]));
  }
  const std::vector<float> decoded = qlora::nf4_absmax(dq);
  ASSERT_EQ(decoded.size(), plain.scales.size());
  for (std::size_t b = 0; b < decoded.size(); ++b) {
    const double nested = dq.nested_absmax[b / qlora::kNf4NestedBlockSize];
    ASSERT_LE(std::abs(decoded[b] - plain.scales[b]), nested * max_half_gap + 1e-6)
        << "block " << b;
  }
}

TEST(nf4_quantize, lower_error_than_symmetric_int4) {
  const qlora::RowMatrixF w = normal_matrix(256, 1024, 13);
  for (int block_size : {32, 64, 128}) {
    const double mse_nf4 = mean_squared_error(w, qlora::dequantize(nf4(w, block_size, false)));
    const double mse_int4 = mean_squared_error(
        w, qlora::dequantize(qlora::quantize(w, {.format = QuantFormat::int4,
                                                 .block_size = block_size,
                                                 .symmetric = true})));
    std::printf("N(0, 1), block %d: MSE nf4 %.6f, symmetric int4 %.6f\n", block_size, mse_nf4,
                mse_int4);
    EXPECT_LT(mse_nf4, mse_int4) << "block_size " << block_size;
  }
}

TEST(nf4_quantize, double_quant_bits_per_weight) {
  const qlora::RowMatrixF w = normal_matrix(1024, 4096, 14);
  const double bits_dq = qlora::bits_per_weight(nf4(w, 64, true));
  const double bits_plain = qlora::bits_per_weight(nf4(w, 64, false));
  std::printf("NF4 block 64 [1024, 4096]: %.4f bits per weight with double quantization, "
              "%.4f without\n",
              bits_dq, bits_plain);
  EXPECT_NEAR(bits_dq, kNf4DqBitsPerWeight, kBitsPerWeightTol);
  EXPECT_DOUBLE_EQ(bits_plain, 4.5);
}

TEST(nf4_quantize, all_zero_block) {
  qlora::RowMatrixF w = normal_matrix(2, 128, 15);
  w.row(1).head(64).setZero();
  for (bool dq : {false, true}) {
    const qlora::QuantizedMatrix q = nf4(w, 64, dq);
    for (std::size_t j = 64; j < 96; ++j) EXPECT_EQ(q.codes[j], 0x77) << "byte " << j;
    const qlora::RowMatrixF w2 = qlora::dequantize(q);
    EXPECT_EQ(qlora::nf4_absmax(q).size(), 4u);
    if (!dq) {
      EXPECT_EQ(q.scales[2], 0.0f);
      EXPECT_TRUE(w2.row(1).head(64).isZero(0.0f));
    } else {
      // The decoded absmax of the zero block is near, not exactly, zero; the codes are 7.
      EXPECT_LE(w2.row(1).head(64).cwiseAbs().maxCoeff(), 1e-6f);
    }
  }
}

TEST(nf4_quantize, constant_block_is_exact) {
  qlora::RowMatrixF w(1, 64);
  w.setConstant(-0.3125f);
  const qlora::QuantizedMatrix q = nf4(w, 64, false);
  for (std::uint8_t byte : q.codes) EXPECT_EQ(byte, 0x00);  // every element is -absmax
  EXPECT_TRUE(qlora::dequantize(q).isApprox(w, 0.0f));
}

TEST(nf4_quantize, huge_outlier_is_kept_exactly) {
  qlora::RowMatrixF w = normal_matrix(1, 64, 16, 1e-3f);
  w(0, 9) = 1.0e6f;
  w(0, 40) = -3.0e5f;
  const qlora::RowMatrixF w2 = qlora::dequantize(nf4(w, 64, false));
  EXPECT_EQ(w2(0, 9), 1.0e6f);
  // The small values all round to zero next to the outlier.
  EXPECT_EQ(w2(0, 0), 0.0f);
}

TEST(nf4_quantize, subnormal_weights_stay_finite) {
  qlora::RowMatrixF w = normal_matrix(2, 64, 17, 1e-40f);
  w(1, 3) = std::numeric_limits<float>::denorm_min();
  for (bool dq : {false, true}) {
    const qlora::RowMatrixF w2 = qlora::dequantize(nf4(w, 64, dq));
    EXPECT_TRUE(w2.allFinite());
    EXPECT_LE((w2 - w).cwiseAbs().maxCoeff(), 1e-39f);
  }
}

TEST(nf4_quantize, one_row_and_one_block) {
  const qlora::RowMatrixF w = normal_matrix(1, 64, 18);
  for (bool dq : {false, true}) {
    const qlora::QuantizedMatrix q = nf4(w, 64, dq);
    EXPECT_EQ(q.n_blocks(), 1);
    EXPECT_EQ(q.codes.size(), 32u);
    const std::vector<float> absmax = qlora::nf4_absmax(q);
    ASSERT_EQ(absmax.size(), 1u);
    EXPECT_EQ(absmax[0], w.cwiseAbs().maxCoeff());  // a single absmax is the offset itself
  }
}

TEST(nf4_quantize, largest_block_size) {
  const qlora::RowMatrixF w = normal_matrix(3, 8192, 19);
  const qlora::QuantizedMatrix q = nf4(w, 4096, true);
  EXPECT_EQ(q.n_blocks(), 6);
  EXPECT_LT(mean_squared_error(w, qlora::dequantize(q)), 0.05);
}

TEST(nf4_quantize, packs_even_element_in_high_nibble) {
  qlora::RowMatrixF w(1, 64);
  w.setZero();
  w(0, 0) = 1.0f;   // code 15
  w(0, 1) = -1.0f;  // code 0
  w(0, 2) = 0.5f;   // code 12: below the 12/13 threshold 0.5016634
  const qlora::QuantizedMatrix q = nf4(w, 64, false);
  EXPECT_EQ(q.codes[0], 0xF0);
  EXPECT_EQ(q.codes[1] >> 4, 12);
  EXPECT_EQ(q.codes[1] & 0x0F, 7);
}

TEST(nf4_quantize, dequantize_rows_and_blocks_match_full) {
  const qlora::RowMatrixF w = normal_matrix(6, 256, 20);
  const qlora::QuantizedMatrix q = nf4(w, 64, true);
  const qlora::RowMatrixF full = qlora::dequantize(q);

  qlora::RowMatrixF rows(3, 256);
  qlora::dequantize_rows(q, 2, 5, rows.data());
  EXPECT_TRUE(rows.isApprox(full.middleRows(2, 3), 0.0f));

  std::vector<float> blocks(128);
  qlora::dequantize_blocks(q, 4, 1, 3, blocks.data());
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    EXPECT_EQ(blocks[i], full(4, 64 + static_cast<Eigen::Index>(i))) << i;
  }
}

TEST(nf4_quantize, quantizer_type_matches_free_function) {
  const qlora::RowMatrixF w = normal_matrix(4, 128, 21);
  const qlora::QuantizedMatrix a = qlora::Nf4Quantizer::quantize(w, {.double_quant = true});
  const qlora::QuantizedMatrix b = nf4(w, 64, true);
  EXPECT_EQ(a.codes, b.codes);
  EXPECT_EQ(a.absmax_codes, b.absmax_codes);
  EXPECT_TRUE(qlora::Nf4Quantizer::dequantize(a).isApprox(qlora::dequantize(b), 0.0f));
  EXPECT_DOUBLE_EQ(qlora::Nf4Quantizer::bits_per_weight(a), qlora::bits_per_weight(b));
}

TEST(nf4_errors, block_size_not_dividing_row) {
  const qlora::RowMatrixF w = normal_matrix(2, 96, 22);
  EXPECT_THAT([&] { nf4(w, 64, false); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  HasSubstr("block size does not divide the row: got in=96, block_size=64")));
}

TEST(nf4_errors, block_size_not_allowed) {
  const qlora::RowMatrixF w = normal_matrix(2, 8192 * 2, 23);
  for (int block_size : {0, 16, 48, 8192, -64}) {
    EXPECT_THAT([&] { nf4(w, block_size, false); },
                ::testing::ThrowsMessage<qlora::InvalidArgument>(
                    HasSubstr("expected a power of two from 32 to 4096")))
        << block_size;
  }
}

TEST(nf4_errors, non_finite_weight_names_position) {
  qlora::RowMatrixF w = normal_matrix(4, 64, 24);
  w(2, 5) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT([&] { nf4(w, 64, false); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("row 2, column 5")));
  w(2, 5) = 0.0f;
  w(3, 63) = -std::numeric_limits<float>::infinity();
  EXPECT_THAT([&] { nf4(w, 64, true); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("row 3, column 63")));
}

TEST(nf4_errors, empty_matrix) {
  const qlora::RowMatrixF w(0, 64);
  EXPECT_THAT([&] { nf4(w, 64, false); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("empty weight matrix")));
}

TEST(quantize_errors, unsupported_format) {
  const qlora::RowMatrixF w = normal_matrix(1, 64, 25);
  const auto bad = static_cast<QuantFormat>(3);
  EXPECT_THAT([&] { qlora::quantize(w, {.format = bad}); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("unknown format")));
}

}  // namespace
