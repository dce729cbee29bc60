// The real SmolLM2-135M-Instruct Q4_1 GGUF: every tensor dequantized by qlora against what
// gguf-py dequantizes (tests/golden/smollm2_q4_1_dequant.json, made by
// tests/golden/make_gguf_golden.py), and LlamaConfig against the published configuration.
// Skipped when the model is absent; scripts/fetch-model downloads it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "qlora/io/gguf.hpp"
#include "qlora/model/llama_config.hpp"

namespace {

// The hash and the sampled values compare bit for bit. The sum is accumulated in another
// order than numpy's pairwise sum, so it only has to agree to this relative tolerance.
constexpr double kSumRelativeTolerance = 1e-9;

const std::filesystem::path kSourceDir(QLORA_SOURCE_DIR);

std::filesystem::path model_path() {
  if (const char* path = std::getenv("QLORA_SMOLLM2_GGUF")) return path;
  return kSourceDir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

#define QLORA_REQUIRE_MODEL()                                                               \
  if (!std::filesystem::exists(model_path())) {                                             \
    GTEST_SKIP() << model_path() << " is absent; run scripts/fetch-model to download it "   \
                 << "(or set QLORA_SMOLLM2_GGUF)";                                          \
  }

// The hash of tests/golden/make_gguf_golden.py::tensor_hash: the sum modulo 2^64 over i of
// splitmix64_finalizer(bits(values[i]) * 0x9E3779B97F4A7C15 + i).
std::uint64_t tensor_hash(const float* values, std::size_t n) {
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, values + i, sizeof bits);
    std::uint64_t x = std::uint64_t{bits} * 0x9E3779B97F4A7C15ull + i;
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    total += x;
  }
  return total;
}

TEST(smollm2_gguf, metadata_matches_published_config) {
  QLORA_REQUIRE_MODEL();
  const qlora::GgufFile file(model_path());
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.get_string("general.architecture"), "llama");
  EXPECT_EQ(file.get_u32("general.file_type"), 3u);  // MOSTLY_Q4_1
  EXPECT_EQ(file.get_string("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(file.get_string("tokenizer.ggml.pre"), "smollm");
  EXPECT_EQ(file.get_array<std::string>("tokenizer.ggml.tokens").size(), 49152u);
  EXPECT_EQ(file.get_array<std::int32_t>("tokenizer.ggml.token_type").size(), 49152u);
  EXPECT_EQ(file.get_array<std::string>("tokenizer.ggml.merges").size(), 48900u);
  EXPECT_EQ(file.tensors().size(), 272u);
  EXPECT_EQ(file.find_tensor("output.weight"), nullptr);

  const qlora::GgufTensor& embedding = file.tensor("token_embd.weight");
  EXPECT_EQ(embedding.type, qlora::GgmlType::q8_0);
  EXPECT_EQ(embedding.shape(), (std::vector<std::int64_t>{49152, 576}));
  EXPECT_EQ(file.tensor("blk.0.attn_k.weight").type, qlora::GgmlType::q4_1);
  EXPECT_EQ(file.tensor("blk.0.attn_k.weight").shape(), (std::vector<std::int64_t>{192, 576}));
  EXPECT_EQ(file.tensor("blk.29.ffn_down.weight").shape(), (std::vector<std::int64_t>{576, 1536}));
  EXPECT_EQ(file.tensor("output_norm.weight").type, qlora::GgmlType::f32);
}

TEST(smollm2_gguf, llama_config_matches_published_config) {
  QLORA_REQUIRE_MODEL();
  const qlora::LlamaConfig config = qlora::LlamaConfig::from_gguf(qlora::GgufFile(model_path()));
  EXPECT_EQ(config.hidden_size, 576);
  EXPECT_EQ(config.num_hidden_layers, 30);
  EXPECT_EQ(config.num_attention_heads, 9);
  EXPECT_EQ(config.num_key_value_heads, 3);
  EXPECT_EQ(config.head_dim, 64);
  EXPECT_EQ(config.intermediate_size, 1536);
  EXPECT_EQ(config.vocab_size, 49152);
  EXPECT_EQ(config.max_position_embeddings, 8192);
  EXPECT_EQ(config.rope_theta, 100000.0f);
  EXPECT_EQ(config.rms_norm_eps, 1e-5f);
  EXPECT_EQ(config.rope_scaling.type, "none");
  EXPECT_TRUE(config.tie_word_embeddings);
  EXPECT_EQ(config.bos_token_id, 1);
  EXPECT_EQ(config.eos_token_id, 2);
}

TEST(smollm2_gguf, every_tensor_matches_gguf_py) {
  QLORA_REQUIRE_MODEL();
  std::ifstream golden_stream(kSourceDir / "tests" / "golden" / "smollm2_q4_1_dequant.json");
  ASSERT_TRUE(golden_stream.good());
  const nlohmann::json golden = nlohmann::json::parse(golden_stream);
  const qlora::GgufFile file(model_path());
  ASSERT_EQ(file.file_size(), golden["model_size"].get<std::size_t>())
      << "the model differs from the one the golden file was made from";
  ASSERT_EQ(golden["tensors"].size(), file.tensors().size());

  for (const nlohmann::json& expected : golden["tensors"]) {
    const std::string name = expected["name"].get<std::string>();
    SCOPED_TRACE(name);
    const qlora::GgufTensor& tensor = file.tensor(name);
    EXPECT_EQ(std::string(qlora::to_string(tensor.type)), expected["type"].get<std::string>());
    const qlora::RowMatrixF values = file.dequantize(tensor);
    ASSERT_EQ(values.rows(), expected["shape"][0].get<std::int64_t>());
    ASSERT_EQ(values.cols(), expected["shape"][1].get<std::int64_t>());
    const auto n = static_cast<std::size_t>(values.size());

    EXPECT_EQ(fmt::format("{:016x}", tensor_hash(values.data(), n)),
              expected["hash"].get<std::string>());

    const auto& indexes = expected["sample_index"];
    const auto& bits = expected["sample_bits"];
    for (std::size_t s = 0; s < indexes.size(); ++s) {
      const auto index = indexes[s].get<std::size_t>();
      std::uint32_t actual_bits;
      std::memcpy(&actual_bits, values.data() + index, sizeof actual_bits);
      EXPECT_EQ(actual_bits, bits[s].get<std::uint32_t>()) << "at flat index " << index;
    }

    double sum = 0.0;
    double abs_sum = 0.0;
    float absmax = 0.0f;
    for (std::size_t i = 0; i < n; ++i) {
      sum += values.data()[i];
      abs_sum += std::abs(values.data()[i]);
      absmax = std::max(absmax, std::abs(values.data()[i]));
    }
    EXPECT_NEAR(sum, expected["sum"].get<double>(), kSumRelativeTolerance * abs_sum);
    EXPECT_EQ(absmax, expected["absmax"].get<float>());
  }
}

}  // namespace
