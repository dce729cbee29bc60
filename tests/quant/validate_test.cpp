// validate() and bits_per_weight(): every inconsistent field is named in the error.
#include <cstdint>
#include <functional>
#include <random>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/quant/quantize.hpp"

namespace {

using ::testing::HasSubstr;
using qlora::QuantFormat;

qlora::RowMatrixF normal_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  qlora::RowMatrixF w(rows, cols);
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = dist(rng);
  return w;
}

void expect_invalid(const qlora::QuantizedMatrix& q, const std::string& text) {
  EXPECT_THAT([&] { qlora::validate(q); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr(text)));
}

TEST(quant_validate, accepts_quantizer_output) {
  const qlora::RowMatrixF w = normal_matrix(4, 128, 51);
  EXPECT_NO_THROW(qlora::validate(qlora::quantize(w, {.format = QuantFormat::nf4})));
  EXPECT_NO_THROW(
      qlora::validate(qlora::quantize(w, {.format = QuantFormat::nf4, .double_quant = true})));
  EXPECT_NO_THROW(qlora::validate(qlora::quantize(w, {.format = QuantFormat::int4})));
  EXPECT_NO_THROW(qlora::validate(
      qlora::quantize(w, {.format = QuantFormat::int8, .block_size = 0, .symmetric = true})));
}

TEST(quant_validate, names_the_wrong_field) {
  const qlora::RowMatrixF w = normal_matrix(4, 128, 52);
  const qlora::QuantizedMatrix nf4 = qlora::quantize(w, {.format = QuantFormat::nf4});
  const qlora::QuantizedMatrix nf4_dq =
      qlora::quantize(w, {.format = QuantFormat::nf4, .double_quant = true});
  const qlora::QuantizedMatrix int4 = qlora::quantize(w, {.format = QuantFormat::int4});

  auto broken = nf4;
  broken.codes.pop_back();
  expect_invalid(broken, "codes has the wrong size: got 255, expected rows * cols / 2 = 256");

  broken = nf4;
  broken.scales.push_back(1.0f);
  expect_invalid(broken, "scales has the wrong size");

  broken = nf4_dq;
  broken.nested_absmax.clear();
  expect_invalid(broken, "nested_absmax has the wrong size");

  broken = nf4_dq;
  broken.absmax_codes.resize(3);
  expect_invalid(broken, "absmax_codes has the wrong size");

  broken = int4;
  broken.mins.clear();
  expect_invalid(broken, "mins has the wrong size");

  broken = int4;
  broken.double_quant = true;
  expect_invalid(broken, "double_quant is set on a int4 matrix");

  broken = nf4;
  broken.block_size = 48;
  expect_invalid(broken, "block_size does not divide cols");

  broken = nf4;
  broken.rows = 0;
  expect_invalid(broken, "empty matrix");

  broken = nf4;
  broken.format = static_cast<QuantFormat>(9);
  expect_invalid(broken, "unknown format");
}

TEST(quant_validate, dequantize_rejects_bad_ranges) {
  const qlora::QuantizedMatrix q =
      qlora::quantize(normal_matrix(4, 64, 53), {.format = QuantFormat::int8});
  float out[64 * 4];
  EXPECT_THAT([&] { qlora::dequantize_rows(q, 3, 5, out); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("invalid row range")));
  EXPECT_THAT([&] { qlora::dequantize_blocks(q, 0, 0, 2, out); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("invalid block range")));
  EXPECT_THAT([&] { qlora::dequantize_blocks(q, 4, 0, 1, out); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("row out of range")));
  EXPECT_NO_THROW(qlora::dequantize_rows(q, 2, 2, nullptr));
}

TEST(quant_validate, bits_per_weight_counts_every_array) {
  const qlora::RowMatrixF w = normal_matrix(2, 256, 54);
  EXPECT_DOUBLE_EQ(qlora::bits_per_weight(qlora::quantize(w, {.format = QuantFormat::nf4})),
                   4.5);
  EXPECT_DOUBLE_EQ(qlora::bits_per_weight(qlora::quantize(
                       w, {.format = QuantFormat::int4, .block_size = 128, .symmetric = true})),
                   4.25);
  EXPECT_DOUBLE_EQ(qlora::bits_per_weight(
                       qlora::quantize(w, {.format = QuantFormat::int8, .block_size = 32})),
                   10.0);
  // 8 blocks: 8 absmax codes, one nested absmax and the offset.
  EXPECT_DOUBLE_EQ(qlora::bits_per_weight(qlora::quantize(
                       w, {.format = QuantFormat::nf4, .double_quant = true})),
                   (512.0 * 4 + 8 * 8 + 32 + 32) / 512.0);
}

TEST(quant_format, to_string_names) {
  EXPECT_EQ(qlora::to_string(QuantFormat::nf4), "nf4");
  EXPECT_EQ(qlora::to_string(QuantFormat::int4), "int4");
  EXPECT_EQ(qlora::to_string(QuantFormat::int8), "int8");
}

}  // namespace
