// Compares the quantizers with golden files written by tests/golden/make_quant_golden.py from
// bitsandbytes 0.50.2 (NF4, tables) and from the stated INT4 / INT8 rule (numpy).
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "qlora/quant/quantize.hpp"
#include "support/compare.hpp"

namespace {

// Dequantized values may differ from the reference by rounding of the last float32 bit.
constexpr double kDequantAbsTol = 1e-6;
constexpr double kDequantRelTol = 1e-6;
// The double-quantization offset is a float32 mean, and torch sums in another order.
constexpr double kOffsetRelTol = 4e-7;

const std::filesystem::path kGoldenDir =
    std::filesystem::path(QLORA_SOURCE_DIR) / "tests" / "golden" / "quant";

nlohmann::json load(const std::string& name) {
  const auto path = kGoldenDir / (name + ".json");
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open golden file " + path.string());
  return nlohmann::json::parse(in);
}

std::vector<float> floats(const nlohmann::json& bits) {
  std::vector<float> out;
  out.reserve(bits.size());
  for (const auto& b : bits) out.push_back(std::bit_cast<float>(b.get<std::uint32_t>()));
  return out;
}

std::vector<std::uint8_t> bytes(const nlohmann::json& values) {
  std::vector<std::uint8_t> out;
  out.reserve(values.size());
  for (const auto& v : values) out.push_back(v.get<std::uint8_t>());
  return out;
}

std::vector<std::uint32_t> bit_patterns(std::span<const float> values) {
  std::vector<std::uint32_t> out;
  out.reserve(values.size());
  for (float v : values) out.push_back(std::bit_cast<std::uint32_t>(v));
  return out;
}

// Bit-exact float comparison that treats 0.0 and -0.0 as different.
::testing::AssertionResult floats_identical(std::span<const float> actual,
                                            std::span<const float> expected) {
  const auto a = bit_patterns(actual);
  const auto e = bit_patterns(expected);
  return qlora::test::arrays_equal<std::uint32_t>(a, e);
}

::testing::AssertionResult near_floats(std::span<const float> actual,
                                       std::span<const float> expected, double abs_tol,
                                       double rel_tol) {
  return qlora::test::arrays_near<float, float>(actual, expected, abs_tol, rel_tol);
}

::testing::AssertionResult bytes_equal(std::span<const std::uint8_t> actual,
                                       std::span<const std::uint8_t> expected) {
  return qlora::test::arrays_equal<std::uint8_t>(actual, expected);
}

qlora::RowMatrixF weights_of(const nlohmann::json& c) {
  const auto rows = c["rows"].get<Eigen::Index>();
  const auto cols = c["cols"].get<Eigen::Index>();
  const std::vector<float> w = floats(c["weights"]);
  return qlora::ConstMapRowMatrixF(w.data(), rows, cols);
}

std::span<const float> span_of(const qlora::RowMatrixF& m) {
  return {m.data(), static_cast<std::size_t>(m.size())};
}

const char* const kNf4Cases[] = {
    "nf4_normal_8x128_b64",     "nf4_normal_8x128_b64_dq",  "nf4_scaled_12x256_b32_dq",
    "nf4_normal_10x1024_b32_dq", "nf4_normal_2x4096_b4096", "nf4_edges_8x64_b64",
    "nf4_edges_8x64_b64_dq",    "nf4_one_row_1x64_b64",
};

const char* const kNf4DoubleQuantCases[] = {
    "nf4_normal_8x128_b64_dq", "nf4_scaled_12x256_b32_dq", "nf4_normal_10x1024_b32_dq",
    "nf4_edges_8x64_b64_dq",   "nf4_one_row_1x64_b64",
};

const char* const kIntCases[] = {
    "int4_asym_normal_6x256_g32", "int4_asym_normal_4x384_g128", "int4_asym_edges_7x64_g64",
    "int4_sym_normal_6x256_g32",  "int4_sym_normal_4x384_g128",  "int4_sym_edges_7x64_g64",
    "int8_asym_normal_6x256_g32", "int8_asym_normal_4x384_g128", "int8_asym_edges_7x64_g64",
    "int8_sym_normal_6x256_g32",  "int8_sym_normal_4x384_g128",  "int8_sym_edges_7x64_g64",
    "int8_asym_perrow_3x96",      "int8_sym_perrow_3x96",
};

TEST(quant_golden, nf4_levels_match_bitsandbytes) {
  const auto golden = floats(load("tables")["nf4_levels"]);
  EXPECT_TRUE(floats_identical(qlora::kNf4Levels, golden));
}

TEST(quant_golden, dynamic_map_matches_bitsandbytes) {
  const auto golden = floats(load("tables")["dynamic_map"]);
  EXPECT_TRUE(floats_identical(qlora::kDynamicMap, golden));
}

class Nf4Golden : public ::testing::TestWithParam<const char*> {};

TEST_P(Nf4Golden, quantize_matches_codes_and_absmax) {
  const auto c = load(GetParam());
  const bool dq = c["double_quant"].get<bool>();
  const qlora::QuantizedMatrix q = qlora::quantize(
      weights_of(c), {.format = qlora::QuantFormat::nf4,
                      .block_size = c["block_size"].get<int>(),
                      .double_quant = dq});

  EXPECT_TRUE(bytes_equal(q.codes, bytes(c["codes"])));
  if (!dq) {
    EXPECT_TRUE(floats_identical(q.scales, floats(c["absmax"])));
    return;
  }
  const float golden_offset = floats(c["nested_offset"])[0];
  EXPECT_NEAR(q.nested_offset, golden_offset, kOffsetRelTol * std::abs(golden_offset));
  EXPECT_TRUE(bytes_equal(q.absmax_codes, bytes(c["absmax_codes"])));
  EXPECT_TRUE(near_floats(q.nested_absmax, floats(c["nested_absmax"]),
                                                     0.0, kOffsetRelTol));
}

class Nf4DoubleQuantGolden : public ::testing::TestWithParam<const char*> {};

// bitsandbytes' offset is a float32 torch.mean that can differ from qlora's by an ulp, so
// this feeds bitsandbytes' own offset and expects every nested array bit for bit.
TEST_P(Nf4DoubleQuantGolden, double_quantize_matches_given_offset) {
  const auto c = load(GetParam());

  const auto absmax = floats(c["absmax"]);
  const float offset = floats(c["nested_offset"])[0];
  const qlora::Nf4DoubleQuant dq = qlora::nf4_double_quantize(absmax, offset);
  EXPECT_TRUE(bytes_equal(dq.absmax_codes, bytes(c["absmax_codes"])));
  EXPECT_TRUE(floats_identical(dq.nested_absmax, floats(c["nested_absmax"])));
}

TEST_P(Nf4Golden, dequantize_matches_bitsandbytes) {
  const auto c = load(GetParam());
  const bool dq = c["double_quant"].get<bool>();

  // The golden state itself, so that dequantization is checked apart from quantization.
  qlora::QuantizedMatrix q;
  q.format = qlora::QuantFormat::nf4;
  q.rows = c["rows"].get<std::int64_t>();
  q.cols = c["cols"].get<std::int64_t>();
  q.block_size = c["block_size"].get<int>();
  q.double_quant = dq;
  q.codes = bytes(c["codes"]);
  if (dq) {
    q.absmax_codes = bytes(c["absmax_codes"]);
    q.nested_absmax = floats(c["nested_absmax"]);
    q.nested_offset = floats(c["nested_offset"])[0];
  } else {
    q.scales = floats(c["absmax"]);
  }
  const auto golden = floats(c["dequantized"]);
  EXPECT_TRUE(near_floats(span_of(qlora::dequantize(q)), golden,
                                                     kDequantAbsTol, kDequantRelTol));

  // And the round trip through qlora's own quantizer.
  const qlora::QuantizedMatrix ours = qlora::quantize(
      weights_of(c), {.format = qlora::QuantFormat::nf4, .block_size = q.block_size,
                      .double_quant = dq});
  EXPECT_TRUE(near_floats(span_of(qlora::dequantize(ours)), golden,
                                                     kDequantAbsTol, kDequantRelTol));
}

INSTANTIATE_TEST_SUITE_P(quant_golden, Nf4Golden, ::testing::ValuesIn(kNf4Cases));
INSTANTIATE_TEST_SUITE_P(quant_golden, Nf4DoubleQuantGolden,
                         ::testing::ValuesIn(kNf4DoubleQuantCases));

class IntGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(IntGolden, quantize_matches_reference_rule) {
  const auto c = load(GetParam());
  const int bits = c["bits"].get<int>();
  const bool symmetric = c["symmetric"].get<bool>();
  const qlora::QuantizedMatrix q = qlora::quantize(
      weights_of(c), {.format = bits == 4 ? qlora::QuantFormat::int4 : qlora::QuantFormat::int8,
                      .block_size = c["block_size"].get<int>(),
                      .symmetric = symmetric});

  EXPECT_TRUE(bytes_equal(q.codes, bytes(c["codes"])));
  EXPECT_TRUE(floats_identical(q.scales, floats(c["scales"])));
  if (!symmetric) {
    EXPECT_TRUE(floats_identical(q.mins, floats(c["mins"])));
  }
  EXPECT_TRUE(near_floats(
      span_of(qlora::dequantize(q)), floats(c["dequantized"]), kDequantAbsTol, kDequantRelTol));
}

INSTANTIATE_TEST_SUITE_P(quant_golden, IntGolden, ::testing::ValuesIn(kIntCases));

TEST(quant_golden, gptq_zero_points_convert_to_affine) {
  const auto c = load("gptq_asym_4x128_g32");
  const auto scales = floats(c["scales"]);
  const auto zeros = c["zeros"].get<std::vector<int>>();
  const auto codes = c["q"].get<std::vector<int>>();

  qlora::QuantizedMatrix q;
  q.format = qlora::QuantFormat::int4;
  q.rows = c["rows"].get<std::int64_t>();
  q.cols = c["cols"].get<std::int64_t>();
  q.block_size = c["block_size"].get<int>();
  for (std::size_t g = 0; g < scales.size(); ++g) {
    const qlora::AffineParams p = qlora::affine_from_gptq(scales[g], zeros[g]);
    q.scales.push_back(p.scale);
    q.mins.push_back(p.min);
  }
  for (std::size_t k = 0; k < codes.size(); k += 2) {
    q.codes.push_back(static_cast<std::uint8_t>(codes[k] << 4 | codes[k + 1]));
  }
  EXPECT_TRUE(near_floats(
      span_of(qlora::dequantize(q)), floats(c["dequantized"]), kDequantAbsTol, kDequantRelTol));
}

}  // namespace
