#include "qlora/init/loftq.hpp"

#include <cmath>

#include <gtest/gtest.h>

#include "qlora/core/random.hpp"
#include "qlora/quant/quantize.hpp"

namespace {

using qlora::LoraConfig;
using qlora::QuantFormat;
using qlora::RowMatrixF;

// Randomized SVD with 10 extra columns and 4 power iterations should lose almost nothing.
constexpr double kRandomizedSvdRelTol = 0.01;
// With T = 1 LoftQ removes the best rank-r part of the error; on Gaussian residuals that is
// a modest share, so require a clear but not dramatic drop.
constexpr double kLoftqMaxErrorRatio = 0.97;

RowMatrixF gaussian(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  qlora::Rng rng(seed);
  RowMatrixF m(rows, cols);
  for (float& v : m.reshaped()) v = static_cast<float>(rng.normal());
  return m;
}

// A Gaussian matrix plus a strong low-rank part, like trained weights.
RowMatrixF weight_like(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  const RowMatrixF u = gaussian(rows, 8, seed + 1);
  const RowMatrixF v = gaussian(8, cols, seed + 2);
  return 0.02f * gaussian(rows, cols, seed) + 0.01f * (u * v);
}

TEST(loftq_init, error_falls_with_iterations) {
  const RowMatrixF w = weight_like(128, 256, 1);
  LoraConfig config;
  config.rank = 16;
  config.alpha = 16.0f;
  config.loftq.iterations = 5;
  const auto result = qlora::loftq_init(w, {.format = QuantFormat::nf4, .block_size = 64}, config);
  ASSERT_EQ(result.errors.size(), 5u);
  EXPECT_LT(result.errors.front(), kLoftqMaxErrorRatio * result.qlora_error);
  EXPECT_LE(result.errors.back(), result.errors.front());
  for (std::size_t t = 1; t < result.errors.size(); ++t) {
    EXPECT_LE(result.errors[t], result.errors[t - 1] * 1.001) << "iteration " << t;
  }
}

TEST(loftq_init, start_matches_reported_error_for_any_alpha) {
  const RowMatrixF w = weight_like(64, 128, 2);
  for (float alpha : {4.0f, 16.0f, 64.0f}) {
    LoraConfig config;
    config.rank = 8;
    config.alpha = alpha;
    const auto result =
        qlora::loftq_init(w, {.format = QuantFormat::nf4, .block_size = 64}, config);
    const RowMatrixF start =
        qlora::dequantize(result.base) + config.scaling() * (result.adapter.B * result.adapter.A);
    const double error = (w - start).cast<double>().norm();
    EXPECT_NEAR(error, result.errors.back(), 1e-4 * result.qlora_error) << "alpha " << alpha;
    EXPECT_LT(error, result.qlora_error) << "alpha " << alpha;
  }
}

TEST(loftq_init, peft_compatible_split_is_unscaled) {
  const RowMatrixF w = weight_like(64, 128, 3);
  LoraConfig config;
  config.rank = 8;
  config.alpha = 32.0f;  // s = 4
  const qlora::QuantConfig quant{.format = QuantFormat::nf4, .block_size = 64};
  const auto ours = qlora::loftq_init(w, quant, config);
  config.loftq.peft_compatible = true;
  const auto peft = qlora::loftq_init(w, quant, config);
  // PEFT's B * A is the rank-r residual; qlora's s * B * A is.
  const RowMatrixF ours_delta = config.scaling() * (ours.adapter.B * ours.adapter.A);
  const RowMatrixF peft_delta = peft.adapter.B * peft.adapter.A;
  EXPECT_TRUE(ours_delta.isApprox(peft_delta, 1e-4f));
  EXPECT_EQ(ours.base.codes, peft.base.codes);
}

TEST(loftq_init, int_formats_and_double_quant) {
  const RowMatrixF w = weight_like(64, 128, 4);
  LoraConfig config;
  config.rank = 8;
  for (const qlora::QuantConfig& quant :
       {qlora::QuantConfig{.format = QuantFormat::int4, .block_size = 32},
        qlora::QuantConfig{.format = QuantFormat::int8, .block_size = 64},
        qlora::QuantConfig{.format = QuantFormat::nf4, .block_size = 64, .double_quant = true}}) {
    const auto result = qlora::loftq_init(w, quant, config);
    EXPECT_LT(result.errors.back(), result.qlora_error) << qlora::to_string(quant.format);
    EXPECT_EQ(result.base.double_quant, quant.double_quant);
  }
}

TEST(truncated_svd, randomized_close_to_full) {
  const RowMatrixF m = gaussian(300, 500, 5);
  qlora::LoftqOptions full;
  full.svd = qlora::SvdMethod::full;
  qlora::LoftqOptions randomized;
  randomized.svd = qlora::SvdMethod::randomized;
  const auto f = qlora::truncated_svd(m, 16, full);
  const auto r = qlora::truncated_svd(m, 16, randomized);
  const RowMatrixF approx_full = f.U * f.S.asDiagonal() * f.V.transpose();
  const RowMatrixF approx_rand = r.U * r.S.asDiagonal() * r.V.transpose();
  const double err_full = (m - approx_full).cast<double>().norm();
  const double err_rand = (m - approx_rand).cast<double>().norm();
  EXPECT_LE(err_rand, err_full * (1.0 + kRandomizedSvdRelTol));
  EXPECT_NEAR(r.S(0), f.S(0), 0.01 * f.S(0));
}

TEST(truncated_svd, rank_out_of_range_rejected) {
  const RowMatrixF m = gaussian(4, 6, 6);
  EXPECT_THROW(qlora::truncated_svd(m, 5, {}), qlora::InvalidArgument);
  EXPECT_THROW(qlora::truncated_svd(m, 0, {}), qlora::InvalidArgument);
}

}  // namespace
