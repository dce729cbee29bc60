#include "qlora/lora/lora_linear.hpp"

#include <cmath>
#include <cstdio>
#include <span>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/core/cpu.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"
#include "qlora/kernels/matmul.hpp"
#include "qlora/lora/merge.hpp"
#include "qlora/quant/quantize.hpp"
#include "support/compare.hpp"

namespace {

using qlora::LoraConfig;
using qlora::LoraInit;
using qlora::QuantFormat;
using qlora::QuantLoraLinear;
using qlora::RowMatrixF;
using ::testing::HasSubstr;

// The loss is linear in A, B and x, so a central difference is exact up to rounding. This
// bounds that rounding relative to the gradient's largest entry.
constexpr double kGradRelTol = 2e-3;
constexpr float kFdStep = 1e-2f;
// Merged and unmerged float layers compute the same sum in a different order.
constexpr double kMergeOutputRelTol = 1e-5;
constexpr double kUnmergeAbsTol = 1e-6;

RowMatrixF random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t seed,
                         float scale = 1.0f) {
  qlora::Rng rng(seed);
  RowMatrixF m(rows, cols);
  for (float& v : m.reshaped()) v = static_cast<float>(rng.normal()) * scale;
  return m;
}

QuantLoraLinear make_layer(std::int64_t out, std::int64_t in, QuantFormat format, int block,
                           std::uint64_t seed) {
  const RowMatrixF w = random_matrix(out, in, seed, 0.05f);
  return QuantLoraLinear(qlora::quantize(w, {.format = format, .block_size = block}));
}

// Sets B to random values so that every gradient path is non-zero.
void randomize_b(qlora::LoraAdapter& a, std::uint64_t seed) {
  a.B = random_matrix(a.B.rows(), a.B.cols(), seed, 0.1f);
}

// L = sum(y .* R), accumulated in double.
double loss(const QuantLoraLinear& layer, const RowMatrixF& x, const RowMatrixF& r,
            const qlora::LoraForwardOptions& options) {
  RowMatrixF y(x.rows(), layer.out_features());
  qlora::LoraLinearCache cache;
  layer.forward(x, y, false, &cache, options);
  return (y.cast<double>().cwiseProduct(r.cast<double>())).sum();
}

// Central differences of `loss` with respect to every entry of `param`.
RowMatrixF numeric_gradient(QuantLoraLinear& layer, RowMatrixF& param, const RowMatrixF& x,
                            const RowMatrixF& r, const qlora::LoraForwardOptions& options) {
  RowMatrixF grad(param.rows(), param.cols());
  for (std::int64_t i = 0; i < param.rows(); ++i) {
    for (std::int64_t j = 0; j < param.cols(); ++j) {
      const float saved = param(i, j);
      param(i, j) = saved + kFdStep;
      const double up = loss(layer, x, r, options);
      param(i, j) = saved - kFdStep;
      const double down = loss(layer, x, r, options);
      param(i, j) = saved;
      grad(i, j) = static_cast<float>((up - down) / (2.0 * static_cast<double>(kFdStep)));
    }
  }
  return grad;
}

::testing::AssertionResult gradients_match(const RowMatrixF& analytic, const RowMatrixF& numeric) {
  const double scale = std::max(1.0, static_cast<double>(numeric.cwiseAbs().maxCoeff()));
  return qlora::test::arrays_near(
      std::span<const float>(analytic.data(), static_cast<std::size_t>(analytic.size())),
      std::span<const float>(numeric.data(), static_cast<std::size_t>(numeric.size())),
      kGradRelTol * scale);
}

struct GradCase {
  const char* name;
  QuantFormat format;
  LoraInit init;
  float dropout;
};

class lora_linear_gradients : public ::testing::TestWithParam<GradCase> {};

TEST_P(lora_linear_gradients, match_finite_differences) {
  const GradCase& c = GetParam();
  constexpr std::int64_t kOut = 12, kIn = 64, kM = 5;
  QuantLoraLinear layer = make_layer(kOut, kIn, c.format, 32, 1);
  LoraConfig config;
  config.rank = 4;
  config.alpha = 8.0f;
  config.init = c.init;
  config.dropout = c.dropout;
  layer.add_adapter("a", config, 7);
  randomize_b(layer.adapter("a"), 9);

  const RowMatrixF x = random_matrix(kM, kIn, 3);
  const RowMatrixF r = random_matrix(kM, kOut, 4);
  const qlora::LoraForwardOptions options{.training = true, .dropout_seed = 11};

  RowMatrixF y(kM, kOut);
  qlora::LoraLinearCache cache;
  layer.zero_grad();
  layer.forward(x, y, false, &cache, options);
  RowMatrixF dx(kM, kIn);
  layer.backward(r, cache, dx);

  qlora::LoraAdapter& a = layer.adapter("a");
  const RowMatrixF dA = a.dA;
  const RowMatrixF dB = a.dB;
  EXPECT_TRUE(gradients_match(dA, numeric_gradient(layer, a.A, x, r, options))) << "dA";
  EXPECT_TRUE(gradients_match(dB, numeric_gradient(layer, a.B, x, r, options))) << "dB";
  RowMatrixF x_var = x;
  RowMatrixF dx_numeric(kM, kIn);
  for (std::int64_t i = 0; i < kM; ++i) {
    for (std::int64_t j = 0; j < kIn; ++j) {
      const float saved = x_var(i, j);
      x_var(i, j) = saved + kFdStep;
      const double up = loss(layer, x_var, r, options);
      x_var(i, j) = saved - kFdStep;
      const double down = loss(layer, x_var, r, options);
      x_var(i, j) = saved;
      dx_numeric(i, j) = static_cast<float>((up - down) / (2.0 * static_cast<double>(kFdStep)));
    }
  }
  EXPECT_TRUE(gradients_match(dx, dx_numeric)) << "dx";
}

INSTANTIATE_TEST_SUITE_P(
    cases, lora_linear_gradients,
    ::testing::Values(GradCase{"nf4_default", QuantFormat::nf4, LoraInit::kaiming, 0.0f},
                      GradCase{"nf4_dropout", QuantFormat::nf4, LoraInit::kaiming, 0.25f},
                      GradCase{"int4_gaussian", QuantFormat::int4, LoraInit::gaussian, 0.0f},
                      GradCase{"int4_qalora", QuantFormat::int4, LoraInit::qalora, 0.0f},
                      GradCase{"int8_qalora_dropout", QuantFormat::int8, LoraInit::qalora, 0.1f}),
    [](const ::testing::TestParamInfo<GradCase>& param_info) {
      return std::string(param_info.param.name);
    });

TEST(lora_linear, default_init_is_identity_at_start) {
  QuantLoraLinear layer = make_layer(16, 64, QuantFormat::nf4, 64, 2);
  const RowMatrixF x = random_matrix(3, 64, 5);
  RowMatrixF base_only(3, 16), with_adapter(3, 16);
  layer.forward(x, base_only);
  LoraConfig config;
  layer.add_adapter("a", config, 1);
  layer.forward(x, with_adapter);
  EXPECT_EQ(base_only, with_adapter) << "B = 0 must make a new adapter a no-op";
  const float bound = 1.0f / std::sqrt(64.0f);
  EXPECT_LE(layer.adapter("a").A.cwiseAbs().maxCoeff(), bound);
  EXPECT_GT(layer.adapter("a").A.cwiseAbs().maxCoeff(), 0.5f * bound);
}

TEST(lora_linear, same_seed_same_adapter) {
  LoraConfig config;
  config.rank = 8;
  const auto a1 = qlora::make_lora_adapter(32, 64, config, 42);
  const auto a2 = qlora::make_lora_adapter(32, 64, config, 42);
  const auto a3 = qlora::make_lora_adapter(32, 64, config, 43);
  EXPECT_EQ(a1.A, a2.A);
  EXPECT_NE(a1.A, a3.A);
}

TEST(lora_linear, adapters_add_disable_remove_swap) {
  QuantLoraLinear layer = make_layer(8, 32, QuantFormat::int4, 32, 3);
  LoraConfig config;
  config.rank = 2;
  layer.add_adapter("task1", config, 1);
  layer.add_adapter("task2", config, 2);
  randomize_b(layer.adapter("task1"), 5);
  randomize_b(layer.adapter("task2"), 6);
  const RowMatrixF x = random_matrix(4, 32, 7);

  RowMatrixF both(4, 8), one(4, 8), two(4, 8), none(4, 8), disabled(4, 8);
  layer.forward(x, both);
  layer.set_active_adapters({"task1"});
  layer.forward(x, one);
  layer.set_active_adapters({"task2"});
  layer.forward(x, two);
  layer.set_active_adapters({});
  layer.forward(x, none);
  layer.set_active_adapters({"task1", "task2"});
  layer.set_adapters_disabled(true);
  layer.forward(x, disabled);
  layer.set_adapters_disabled(false);

  EXPECT_TRUE(none.isApprox(disabled));
  EXPECT_TRUE(both.isApprox(one + two - none, 1e-5f));
  EXPECT_FALSE(one.isApprox(two));

  // Hot swap: replacing task2's weights changes the output without touching the base.
  const qlora::QuantizedMatrix base_before = layer.base();
  qlora::LoraAdapter replacement = layer.adapter("task1");
  layer.add_adapter("task2", replacement);
  layer.set_active_adapters({"task2"});
  RowMatrixF swapped(4, 8);
  layer.forward(x, swapped);
  EXPECT_TRUE(swapped.isApprox(one));
  EXPECT_EQ(layer.base().codes, base_before.codes);

  layer.remove_adapter("task2");
  EXPECT_FALSE(layer.has_adapter("task2"));
  EXPECT_TRUE(layer.active_adapters().empty());
  EXPECT_THAT([&] { layer.set_active_adapters({"task2"}); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("'task2'")));
}

TEST(lora_linear, frozen_adapter_gets_no_gradient) {
  QuantLoraLinear layer = make_layer(8, 32, QuantFormat::nf4, 32, 4);
  LoraConfig config;
  config.rank = 2;
  layer.add_adapter("old", config, 1);
  layer.add_adapter("new", config, 2);
  randomize_b(layer.adapter("old"), 3);
  layer.adapter("old").trainable = false;
  const RowMatrixF x = random_matrix(3, 32, 8);
  RowMatrixF y(3, 8), dx(3, 32);
  qlora::LoraLinearCache cache;
  layer.zero_grad();
  layer.forward(x, y, false, &cache, {.training = true});
  layer.backward(random_matrix(3, 8, 9), cache, dx);
  EXPECT_EQ(layer.adapter("old").dA.cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_EQ(layer.adapter("old").dB.cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_GT(layer.adapter("new").dB.cwiseAbs().maxCoeff(), 0.0f);
}

TEST(lora_linear, bad_shapes_rejected) {
  QuantLoraLinear layer = make_layer(8, 32, QuantFormat::nf4, 32, 5);
  LoraConfig config;
  config.rank = 64;
  EXPECT_THAT([&] { layer.add_adapter("big", config, 1); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("rank 64 exceeds")));
  config.rank = 2;
  layer.add_adapter("a", config, 1);
  RowMatrixF x(3, 31), y(3, 8);
  EXPECT_THAT([&] { layer.forward(x, y); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("got x [3, 31]")));
  config.init = LoraInit::qalora;
  EXPECT_THAT([&] { layer.add_adapter("q", config, 1); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("INT4 or INT8")));
}

TEST(lora_merge, merge_then_unmerge_restores_weights) {
  const RowMatrixF w = random_matrix(24, 48, 1);
  LoraConfig config;
  config.rank = 4;
  config.alpha = 16.0f;
  auto adapter = qlora::make_lora_adapter(24, 48, config, 2);
  randomize_b(adapter, 3);
  RowMatrixF merged = w;
  qlora::merge_adapter(merged, adapter);
  EXPECT_GT((merged - w).cwiseAbs().maxCoeff(), 1e-3f);
  qlora::unmerge_adapter(merged, adapter);
  EXPECT_TRUE(qlora::test::arrays_near(
      std::span<const float>(merged.data(), static_cast<std::size_t>(merged.size())),
      std::span<const float>(w.data(), static_cast<std::size_t>(w.size())), kUnmergeAbsTol));
}

TEST(lora_merge, merged_float_layer_matches_adapter_output) {
  QuantLoraLinear layer = make_layer(24, 64, QuantFormat::nf4, 64, 6);
  LoraConfig config;
  config.rank = 4;
  config.use_rslora = true;
  config.alpha = 16.0f;
  layer.add_adapter("a", config, 2);
  randomize_b(layer.adapter("a"), 3);
  const RowMatrixF x = random_matrix(5, 64, 4);
  RowMatrixF y(5, 24);
  // fp32 activations: a batch this small would otherwise round x to int8 (0.5 % error).
  layer.forward(x, y, false, nullptr, {.precision = qlora::ActivationPrecision::fp32});

  RowMatrixF w = qlora::dequantize(layer.base());
  qlora::merge_adapter(w, layer.adapter("a"));
  const RowMatrixF y_merged = x * w.transpose();
  EXPECT_TRUE(y_merged.isApprox(y, static_cast<float>(kMergeOutputRelTol)))
      << "max diff " << (y_merged - y).cwiseAbs().maxCoeff();
}

// With int8 activations on, only an inference forward of a small batch may use them: a forward
// that keeps a cache for backward computes the same fp32 product as ActivationPrecision::fp32.
TEST(lora_linear, training_forward_keeps_fp32_activations) {
  const bool saved = qlora::int8_activations();
  qlora::set_int8_activations(true);
  QuantLoraLinear layer = make_layer(24, 64, QuantFormat::nf4, 64, 6);
  LoraConfig config;
  config.rank = 4;
  layer.add_adapter("a", config, 2);
  randomize_b(layer.adapter("a"), 3);
  const RowMatrixF x = random_matrix(5, 64, 4);

  RowMatrixF y_fp32(5, 24);
  layer.forward(x, y_fp32, false, nullptr, {.precision = qlora::ActivationPrecision::fp32});
  RowMatrixF y_train(5, 24);
  qlora::LoraLinearCache cache;
  layer.forward(x, y_train, false, &cache, {.training = true});
  EXPECT_EQ(y_train, y_fp32);

  RowMatrixF y_auto(5, 24);
  layer.forward(x, y_auto);
  if (qlora::select_isa() != qlora::Isa::scalar) {
    EXPECT_NE(y_auto, y_fp32) << "a 5-row inference forward should use int8 activations";
  }
  // The int8 path's relative RMS error is under 1 % on random activations.
  EXPECT_TRUE(y_auto.isApprox(y_fp32, 0.02f)) << "max diff " << (y_auto - y_fp32).cwiseAbs().maxCoeff();
  qlora::set_int8_activations(saved);
}

TEST(lora_merge, safe_merge_rejects_non_finite) {
  RowMatrixF w = random_matrix(4, 8, 1);
  const RowMatrixF before = w;
  LoraConfig config;
  config.rank = 2;
  auto adapter = qlora::make_lora_adapter(4, 8, config, 2);
  adapter.B(1, 1) = std::numeric_limits<float>::infinity();
  EXPECT_THAT([&] { qlora::merge_adapter(w, adapter, true); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("not finite at row 1")));
  EXPECT_EQ(w, before);
}

TEST(lora_merge, requantized_merge_reports_rounding) {
  const RowMatrixF w = random_matrix(32, 128, 11);
  const auto base = qlora::quantize(w, {.format = QuantFormat::int4, .block_size = 64});
  LoraConfig config;
  config.rank = 4;
  auto tiny = qlora::make_lora_adapter(32, 128, config, 1);
  tiny.B.setConstant(1e-6f);  // far below half a step: must vanish
  const auto vanished = qlora::merge_into_quantized(base, tiny);
  EXPECT_LT(vanished.report.retained_fraction, 0.1);
  EXPECT_GT(vanished.report.below_half_step_fraction, 0.99);

  auto large = qlora::make_lora_adapter(32, 128, config, 2);
  randomize_b(large, 3);
  large.B *= 20.0f;
  const auto kept = qlora::merge_into_quantized(base, large);
  EXPECT_GT(kept.report.retained_fraction, 0.8);
  EXPECT_GT(kept.report.codes_changed, 0);
  EXPECT_LT(kept.report.error_norm, kept.report.delta_norm);
}

TEST(qalora_merge, exact_and_codes_unchanged) {
  for (bool symmetric : {false, true}) {
    for (QuantFormat format : {QuantFormat::int4, QuantFormat::int8}) {
      const RowMatrixF w = random_matrix(40, 128, 21, 0.05f);
      QuantLoraLinear layer(qlora::quantize(
          w, {.format = format, .block_size = 32, .symmetric = symmetric}));
      LoraConfig config;
      config.rank = 8;
      config.alpha = 16.0f;
      config.init = LoraInit::qalora;
      layer.add_adapter("qa", config, 5);
      randomize_b(layer.adapter("qa"), 6);
      const RowMatrixF x = random_matrix(7, 128, 8);
      RowMatrixF y(7, 40);
      layer.forward(x, y);

      const qlora::QuantizedMatrix merged = qlora::qalora_merge(layer.base(), layer.adapter("qa"));
      EXPECT_EQ(merged.scales, layer.base().scales);
      if (format == QuantFormat::int4 || !symmetric) {
        EXPECT_EQ(merged.codes, layer.base().codes);
      }
      QuantLoraLinear merged_layer(merged);
      RowMatrixF y_merged(7, 40);
      merged_layer.forward(x, y_merged);
      const double rel = (y_merged - y).norm() / y.norm();
      std::printf("QA-LoRA merge, %s%s: relative output difference %.3g\n",
                  std::string(qlora::to_string(format)).c_str(), symmetric ? " symmetric" : "",
                  rel);
      EXPECT_LT(rel, 1e-5) << qlora::to_string(format) << " symmetric=" << symmetric;
    }
  }
}

TEST(lora_config, target_matching) {
  LoraConfig config;
  EXPECT_TRUE(qlora::lora_targets_module(config, "model.layers.0.self_attn.q_proj", 0));
  EXPECT_TRUE(qlora::lora_targets_module(config, "model.layers.3.mlp.down_proj", 3));
  EXPECT_FALSE(qlora::lora_targets_module(config, "lm_head", std::nullopt));
  EXPECT_FALSE(qlora::lora_targets_module(config, "model.layers.0.self_attn.xq_proj", 0));
  config.target_modules = {"all-linear"};
  EXPECT_TRUE(qlora::lora_targets_module(config, "model.layers.1.mlp.up_proj", 1));
  EXPECT_FALSE(qlora::lora_targets_module(config, "lm_head", std::nullopt));
  config.target_modules = {"re:.*layers\\.(0|2)\\..*v_proj"};
  EXPECT_TRUE(qlora::lora_targets_module(config, "model.layers.2.self_attn.v_proj", 2));
  EXPECT_FALSE(qlora::lora_targets_module(config, "model.layers.1.self_attn.v_proj", 1));
  config.target_modules = {"q_proj"};
  config.layers_to_transform = {1};
  EXPECT_FALSE(qlora::lora_targets_module(config, "model.layers.0.self_attn.q_proj", 0));
  EXPECT_TRUE(qlora::lora_targets_module(config, "model.layers.1.self_attn.q_proj", 1));
}

TEST(lora_config, invalid_values_rejected) {
  LoraConfig config;
  config.rank = 0;
  EXPECT_THROW(config.validate(), qlora::InvalidArgument);
  config.rank = 8;
  config.dropout = 1.0f;
  EXPECT_THROW(config.validate(), qlora::InvalidArgument);
  config.dropout = 0.0f;
  config.target_modules = {"re:(unclosed"};
  EXPECT_THAT([&] { config.validate(); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("regular expression")));
  EXPECT_EQ(qlora::parse_lora_init("loftq"), LoraInit::loftq);
  EXPECT_THROW(qlora::parse_lora_init("pissa"), qlora::InvalidArgument);
}

TEST(lora_config, scaling_plain_and_rslora) {
  LoraConfig config;
  config.rank = 8;
  config.alpha = 16.0f;
  EXPECT_FLOAT_EQ(config.scaling(), 2.0f);
  config.use_rslora = true;
  EXPECT_FLOAT_EQ(config.scaling(), 16.0f / std::sqrt(8.0f));
}

}  // namespace
