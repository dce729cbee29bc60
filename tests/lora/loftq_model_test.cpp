// LoftQ on real SmolLM2-135M weights. Skipped when the model file is absent.
#include <filesystem>

#include <gtest/gtest.h>

#include "qlora/init/loftq.hpp"
#include "qlora/model/load.hpp"

namespace {

const std::filesystem::path kModel =
    std::filesystem::path(QLORA_SOURCE_DIR) / "models/SmolLM2-135M-Instruct.Q4_1.gguf";

TEST(loftq_smollm2, error_below_qlora_start) {
  if (!std::filesystem::exists(kModel)) {
    GTEST_SKIP() << kModel << " is absent; run scripts/fetch-model to download it";
  }
  const qlora::ModelSource source(kModel);
  const qlora::QuantConfig nf4{.format = qlora::QuantFormat::nf4, .block_size = 64};
  for (qlora::LlamaProjection p : {qlora::LlamaProjection::q_proj, qlora::LlamaProjection::down_proj}) {
    const qlora::RowMatrixF w = source.projection_weight(0, p);
    qlora::LoraConfig config;
    config.rank = 16;
    config.alpha = 16.0f;
    config.loftq.iterations = 5;
    const auto result = qlora::loftq_init(w, nf4, config);
    const double norm = w.cast<double>().norm();
    std::printf("layer 0 %s [%ld, %ld]: QLoRA start %.4f, LoftQ T=1 %.4f, T=5 %.4f (relative)\n",
                std::string(qlora::to_string(p)).c_str(), static_cast<long>(w.rows()),
                static_cast<long>(w.cols()), result.qlora_error / norm, result.errors.front() / norm,
                result.errors.back() / norm);
    EXPECT_LT(result.errors.front(), 0.95 * result.qlora_error);
    EXPECT_LT(result.errors.back(), result.errors.front());
  }
}

}  // namespace
