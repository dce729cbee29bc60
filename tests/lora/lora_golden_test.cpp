// LoRA checks against PEFT and bitsandbytes: LoftQ's quantized codes and factors, and a PEFT
// adapter directory loaded and applied. The golden files come from
// tests/golden/make_lora_golden.py (versions in its header).
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"
#include "qlora/init/loftq.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/lora/merge.hpp"
#include "qlora/lora/peft_io.hpp"
#include "support/compare.hpp"

namespace {

using qlora::RowMatrixF;
using ::testing::HasSubstr;

// torch.linalg.svd (LAPACK) and Eigen's BDCSVD agree on float32 singular vectors to about
// this much, relative to the factor's largest entry.
constexpr double kFactorRelTol = 2e-3;
// With T > 1 the next quantization takes W - B A, whose tiny SVD differences can move a value
// across an NF4 threshold; allow this share of codes to differ.
constexpr double kIteratedCodeMismatchShare = 0.002;
// A PEFT layer output reproduced from the loaded adapter, in float32.
constexpr double kPeftOutputAbsTol = 1e-5;

const std::filesystem::path kGolden = std::filesystem::path(QLORA_SOURCE_DIR) / "tests/golden/lora";

nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "missing golden file " << path;
  return nlohmann::json::parse(in);
}

RowMatrixF matrix(const nlohmann::json& values, std::int64_t rows, std::int64_t cols) {
  const auto v = values.get<std::vector<float>>();
  EXPECT_EQ(static_cast<std::int64_t>(v.size()), rows * cols);
  return Eigen::Map<const RowMatrixF>(v.data(), rows, cols);
}

std::span<const float> span_of(const RowMatrixF& m) {
  return {m.data(), static_cast<std::size_t>(m.size())};
}

class loftq_golden : public ::testing::TestWithParam<int> {};

TEST_P(loftq_golden, matches_peft_bitsandbytes) {
  const int iterations = GetParam();
  const auto g = read_json(kGolden / fmt::format("loftq_r4_t{}.json", iterations));
  const std::int64_t rows = g["rows"], cols = g["cols"];
  const int rank = g["rank"];
  const RowMatrixF w = matrix(g["weight"], rows, cols);

  qlora::LoraConfig config;
  config.rank = rank;
  config.alpha = static_cast<float>(rank);
  config.loftq.iterations = iterations;
  config.loftq.peft_compatible = true;
  config.loftq.svd = qlora::SvdMethod::full;
  const auto result = qlora::loftq_init(
      w, {.format = qlora::QuantFormat::nf4, .block_size = g["block_size"]}, config);

  const auto codes = g["codes"].get<std::vector<std::uint8_t>>();
  ASSERT_EQ(result.base.codes.size(), codes.size());
  if (iterations == 1) {
    EXPECT_TRUE(qlora::test::arrays_equal(std::span<const std::uint8_t>(result.base.codes),
                                          std::span<const std::uint8_t>(codes)));
    const auto absmax = g["absmax"].get<std::vector<float>>();
    EXPECT_TRUE(qlora::test::arrays_equal(std::span<const float>(result.base.scales),
                                          std::span<const float>(absmax)));
  } else {
    std::size_t differ = 0;
    for (std::size_t i = 0; i < codes.size(); ++i) {
      if ((codes[i] >> 4) != (result.base.codes[i] >> 4)) ++differ;
      if ((codes[i] & 15) != (result.base.codes[i] & 15)) ++differ;
    }
    EXPECT_LE(static_cast<double>(differ), kIteratedCodeMismatchShare * static_cast<double>(rows * cols))
        << differ << " of " << rows * cols << " codes differ";
  }

  // Factors agree up to the sign of each singular pair.
  RowMatrixF a_ref = matrix(g["lora_A"], rank, cols);
  RowMatrixF b_ref = matrix(g["lora_B"], rows, rank);
  RowMatrixF a = result.adapter.A;
  RowMatrixF b = result.adapter.B;
  for (int i = 0; i < rank; ++i) {
    if (a.row(i).dot(a_ref.row(i)) < 0.0f) {
      a.row(i) *= -1.0f;
      b.col(i) *= -1.0f;
    }
  }
  EXPECT_TRUE(qlora::test::arrays_near(span_of(a), span_of(a_ref),
                                       kFactorRelTol * a_ref.cwiseAbs().maxCoeff()));
  EXPECT_TRUE(qlora::test::arrays_near(span_of(b), span_of(b_ref),
                                       kFactorRelTol * b_ref.cwiseAbs().maxCoeff()));
}

INSTANTIATE_TEST_SUITE_P(iterations, loftq_golden, ::testing::Values(1, 3));

TEST(peft_io, loads_peft_written_adapter) {
  const auto adapter = qlora::load_peft_adapter(kGolden / "peft_tiny");
  EXPECT_EQ(adapter.modules.size(), 14u);  // 2 layers x 7 projections
  EXPECT_EQ(adapter.config.r, 4);
  EXPECT_FLOAT_EQ(adapter.config.lora_alpha, 8.0f);

  const auto io = read_json(kGolden / "peft_tiny_io.json");
  const std::int64_t out = io["out"], in = io["in"], rows = io["rows"];
  const RowMatrixF w = matrix(io["base_weight"], out, in);
  const RowMatrixF x = matrix(io["x"], rows, in);
  const RowMatrixF y_ref = matrix(io["y"], rows, out);

  const qlora::LoraAdapter& a = adapter.modules.at(io["module"].get<std::string>());
  EXPECT_FLOAT_EQ(a.scaling, 2.0f);
  RowMatrixF merged = w;
  qlora::merge_adapter(merged, a);
  const RowMatrixF y = x * merged.transpose();
  EXPECT_TRUE(qlora::test::arrays_near(span_of(y), span_of(y_ref), kPeftOutputAbsTol));
}

TEST(peft_io, save_load_round_trip) {
  qlora::LoraConfig config;
  config.rank = 4;
  config.alpha = 16.0f;
  config.use_rslora = true;
  qlora::PeftAdapter adapter;
  adapter.config.use_rslora = true;
  adapter.modules["model.layers.0.self_attn.q_proj"] = qlora::make_lora_adapter(32, 32, config, 1);
  config.rank = 2;
  adapter.modules["model.layers.1.mlp.down_proj"] = qlora::make_lora_adapter(32, 64, config, 2);
  for (auto& [key, a] : adapter.modules) a.B.setConstant(0.25f);

  const auto dir = std::filesystem::temp_directory_path() / "qlora_peft_round_trip";
  std::filesystem::remove_all(dir);
  qlora::save_peft_adapter(dir, adapter);
  const auto loaded = qlora::load_peft_adapter(dir);
  ASSERT_EQ(loaded.modules.size(), 2u);
  for (const auto& [key, a] : adapter.modules) {
    const qlora::LoraAdapter& b = loaded.modules.at(key);
    EXPECT_EQ(b.rank, a.rank) << key;
    EXPECT_FLOAT_EQ(b.scaling, a.scaling) << key;
    EXPECT_EQ(b.A, a.A) << key;
    EXPECT_EQ(b.B, a.B) << key;
  }
  std::filesystem::remove_all(dir);
}

TEST(peft_io, qalora_adapter_round_trip_uses_peft_scaling) {
  qlora::LoraConfig config;
  config.rank = 2;
  config.init = qlora::LoraInit::qalora;
  qlora::PeftAdapter adapter;
  adapter.modules["model.layers.0.self_attn.v_proj"] =
      qlora::make_lora_adapter(16, 64, config, 3, /*pool_group_size=*/32);
  const auto dir = std::filesystem::temp_directory_path() / "qlora_peft_qalora";
  std::filesystem::remove_all(dir);
  qlora::save_peft_adapter(dir, adapter);

  // PEFT multiplies the pooled mean by in / g = 2, so the stored A is halved.
  const qlora::SafetensorsFile file(dir / "adapter_model.safetensors");
  const RowMatrixF stored =
      file.to_matrix("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
  const RowMatrixF& original = adapter.modules.begin()->second.A;
  EXPECT_TRUE(stored.isApprox(original / 2.0f));
  const auto loaded = qlora::load_peft_adapter(dir);
  EXPECT_EQ(loaded.config.qalora_group_size, 32);
  EXPECT_TRUE(loaded.modules.begin()->second.A.isApprox(original));
  std::filesystem::remove_all(dir);
}

TEST(peft_io, mismatches_named_by_tensor) {
  const auto adapter = qlora::load_peft_adapter(kGolden / "peft_tiny");
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> shapes;
  for (const auto& [key, a] : adapter.modules) shapes[key] = {a.B.rows(), a.A.cols()};
  EXPECT_NO_THROW(qlora::check_peft_adapter_fits(adapter, shapes));
  shapes["model.layers.0.self_attn.q_proj"] = {48, 32};
  shapes.erase("model.layers.1.mlp.up_proj");
  EXPECT_THAT(
      [&] { qlora::check_peft_adapter_fits(adapter, shapes); },
      ::testing::ThrowsMessage<qlora::InvalidArgument>(
          AllOf(HasSubstr("model.layers.0.self_attn.q_proj.lora_B.weight: shape [32, 4], "
                          "expected [48, 4]"),
                HasSubstr("the model has no module 'model.layers.1.mlp.up_proj'"))));
}

TEST(peft_io, missing_and_malformed_files_rejected) {
  const auto dir = std::filesystem::temp_directory_path() / "qlora_peft_bad";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  EXPECT_THAT([&] { qlora::load_peft_adapter(dir); },
              ::testing::ThrowsMessage<qlora::IoError>(HasSubstr("adapter_config.json not found")));
  std::filesystem::copy(kGolden / "peft_tiny" / "adapter_model.safetensors", dir);
  std::ofstream(dir / "adapter_config.json") << "{ not json";
  EXPECT_THAT([&] { qlora::load_peft_adapter(dir); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("not valid JSON")));
  std::ofstream(dir / "adapter_config.json") << R"({"peft_type": "LORA", "r": 8})";
  EXPECT_THAT([&] { qlora::load_peft_adapter(dir); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("rank mismatch")));
  std::ofstream(dir / "adapter_config.json") << R"({"peft_type": "LORA", "r": 4, "use_dora": true})";
  EXPECT_THROW(qlora::load_peft_adapter(dir), qlora::NotImplemented);
  std::filesystem::remove_all(dir);
}

// Writes an adapter for the golden script's tiny model into $QLORA_PEFT_EXPORT_DIR, with the
// adapter output qlora computes, so that `make_lora_golden.py --check-qlora DIR` can confirm
// that PEFT loads it and computes the same. Skipped when the variable is unset.
TEST(peft_io, export_for_peft_check) {
  const char* dir_env = std::getenv("QLORA_PEFT_EXPORT_DIR");
  if (dir_env == nullptr) GTEST_SKIP() << "set QLORA_PEFT_EXPORT_DIR to write the adapter";
  const std::filesystem::path dir(dir_env);
  const auto io = read_json(kGolden / "peft_tiny_io.json");
  const auto reference = qlora::load_peft_adapter(kGolden / "peft_tiny");

  qlora::PeftAdapter adapter;
  qlora::LoraConfig config;
  config.rank = 8;
  config.alpha = 8.0f;
  config.use_rslora = true;
  adapter.config.use_rslora = true;
  std::uint64_t seed = 10;
  for (const auto& [key, a] : reference.modules) {
    auto mine = qlora::make_lora_adapter(a.B.rows(), a.A.cols(), config, seed++);
    mine.B = RowMatrixF::Constant(mine.B.rows(), mine.B.cols(), 0.05f);
    adapter.modules[key] = std::move(mine);
  }
  qlora::save_peft_adapter(dir, adapter);

  const std::int64_t rows = io["rows"], in = io["in"];
  const RowMatrixF x = matrix(io["x"], rows, in);
  const qlora::LoraAdapter& q = adapter.modules.at(io["module"].get<std::string>());
  const RowMatrixF delta = x * q.delta_weight(in).transpose();
  nlohmann::json expected = {{"x", std::vector<float>(x.data(), x.data() + x.size())},
                             {"rows", rows},
                             {"adapter_output",
                              std::vector<float>(delta.data(), delta.data() + delta.size())}};
  std::ofstream(dir / "expected.json") << expected.dump();
}

}  // namespace
