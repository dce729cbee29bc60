// LlamaConfig from config.json and from GGUF metadata written by GgufWriter, with the
// validation errors.
#include "qlora/model/llama_config.hpp"

#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "io/io_test_util.hpp"
#include "qlora/core/error.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/gguf_writer.hpp"

namespace {

using ::testing::HasSubstr;
using qlora::GgufValue;
using qlora::LlamaConfig;

// The config.json of SmolLM2-135M-Instruct (values as listed for HuggingFaceTB's repository).
const char* const kSmolLm2Config = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.041666666666666664,
  "intermediate_size": 1536,
  "max_position_embeddings": 8192,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pad_token_id": 2,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 100000,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "vocab_size": 49152
})";

LlamaConfig smollm2_expected() {
  LlamaConfig config;
  config.hidden_size = 576;
  config.num_hidden_layers = 30;
  config.num_attention_heads = 9;
  config.num_key_value_heads = 3;
  config.head_dim = 64;
  config.intermediate_size = 1536;
  config.vocab_size = 49152;
  config.max_position_embeddings = 8192;
  config.rope_theta = 100000.0f;
  config.rms_norm_eps = 1e-5f;
  config.tie_word_embeddings = true;
  config.bos_token_id = 1;
  config.eos_token_id = 2;
  return config;
}

LlamaConfig config_from_text(const qlora::test::TempDir& dir, const std::string& text) {
  qlora::test::write_text(dir / "config.json", text);
  return LlamaConfig::from_hf_config_json(dir / "config.json");
}

std::string replace(std::string text, const std::string& from, const std::string& to) {
  const auto at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return text.replace(at, from.size(), to);
}

TEST(llama_config_json, reads_smollm2) {
  const qlora::test::TempDir dir;
  EXPECT_EQ(config_from_text(dir, kSmolLm2Config), smollm2_expected());
}

TEST(llama_config_json, reads_llama3_rope_scaling_and_eos_list) {
  const qlora::test::TempDir dir;
  std::string text = replace(kSmolLm2Config, R"("rope_scaling": null)",
                             R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})");
  text = replace(text, R"("eos_token_id": 2)", R"("eos_token_id": [7, 8])");
  const LlamaConfig config = config_from_text(dir, text);
  EXPECT_EQ(config.rope_scaling.type, "llama3");
  EXPECT_EQ(config.rope_scaling.factor, 8.0f);
  EXPECT_EQ(config.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(config.eos_token_id, 7);
}

TEST(llama_config_json, applies_transformers_defaults) {
  const qlora::test::TempDir dir;
  const LlamaConfig config = config_from_text(dir, R"({"model_type": "llama", "hidden_size": 64,
      "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
      "vocab_size": 100})");
  EXPECT_EQ(config.num_key_value_heads, 4);
  EXPECT_EQ(config.head_dim, 16);
  EXPECT_EQ(config.rms_norm_eps, 1e-6f);
  EXPECT_EQ(config.rope_theta, 10000.0f);
  EXPECT_FALSE(config.tie_word_embeddings);
  EXPECT_EQ(config.rope_scaling.type, "none");
}

TEST(llama_config_json, rejects_invalid_configs) {
  const qlora::test::TempDir dir;
  EXPECT_THAT([&] { config_from_text(dir, replace(kSmolLm2Config, R"("num_key_value_heads": 3)",
                                                  R"("num_key_value_heads": 4)")); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("KV heads do not divide")));
  EXPECT_THAT([&] { config_from_text(dir, replace(kSmolLm2Config, R"("num_attention_heads": 9)",
                                                  R"("num_attention_heads": 7)")); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("hidden_size=576")));
  EXPECT_THAT([&] { config_from_text(dir, replace(kSmolLm2Config, R"("hidden_size": 576,)", "")); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("'hidden_size' is missing")));
  EXPECT_THAT([&] { config_from_text(dir, replace(kSmolLm2Config, R"("vocab_size": 49152)",
                                                  R"("vocab_size": "big")")); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("not an integer")));
  EXPECT_THAT([&] { config_from_text(dir, replace(kSmolLm2Config, R"("intermediate_size": 1536)",
                                                  R"("intermediate_size": 0)")); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("must be positive")));
  EXPECT_THAT([&] { config_from_text(dir, replace(kSmolLm2Config, R"("model_type": "llama")",
                                                  R"("model_type": "qwen2")")); },
              ::testing::ThrowsMessage<qlora::NotImplemented>(HasSubstr("qwen2")));
  EXPECT_THROW(config_from_text(dir, "{"), qlora::FormatError);
  EXPECT_THROW(LlamaConfig::from_hf_config_json(dir / "absent.json"), qlora::IoError);
}

TEST(llama_config, validate_rejects_zero_heads) {
  LlamaConfig config = smollm2_expected();
  EXPECT_NO_THROW(config.validate());
  config.num_attention_heads = 0;
  EXPECT_THROW(config.validate(), qlora::InvalidArgument);
}

// Writes the llama.* keys of SmolLM2 and a token embedding; with_output adds output.weight.
void write_llama_gguf(const std::filesystem::path& path, bool with_output, bool with_vocab_key) {
  qlora::GgufWriter writer;
  writer.set("general.architecture", GgufValue("llama"));
  writer.set("llama.block_count", GgufValue(std::uint32_t{30}));
  writer.set("llama.context_length", GgufValue(std::uint32_t{8192}));
  writer.set("llama.embedding_length", GgufValue(std::uint64_t{576}));  // UINT64 also reads
  writer.set("llama.feed_forward_length", GgufValue(std::uint32_t{1536}));
  writer.set("llama.attention.head_count", GgufValue(std::uint32_t{9}));
  writer.set("llama.attention.head_count_kv", GgufValue(std::uint32_t{3}));
  writer.set("llama.rope.freq_base", GgufValue(100000.0f));
  writer.set("llama.attention.layer_norm_rms_epsilon", GgufValue(1e-5f));
  if (with_vocab_key) writer.set("llama.vocab_size", GgufValue(std::uint32_t{49152}));
  writer.set("tokenizer.ggml.bos_token_id", GgufValue(std::uint32_t{1}));
  writer.set("tokenizer.ggml.eos_token_id", GgufValue(std::uint32_t{2}));
  const std::vector<float> embedding(576 * 4, 0.0f);
  const std::int64_t shape[] = {4, 576};
  writer.add_tensor("token_embd.weight", shape, embedding);
  if (with_output) writer.add_tensor("output.weight", shape, embedding);
  writer.write(path);
}

TEST(llama_config_gguf, reads_llama_keys) {
  const qlora::test::TempDir dir;
  write_llama_gguf(dir / "tied.gguf", false, true);
  EXPECT_EQ(LlamaConfig::from_gguf(qlora::GgufFile(dir / "tied.gguf")), smollm2_expected());

  write_llama_gguf(dir / "untied.gguf", true, false);
  const LlamaConfig untied = LlamaConfig::from_gguf(qlora::GgufFile(dir / "untied.gguf"));
  EXPECT_FALSE(untied.tie_word_embeddings);
  EXPECT_EQ(untied.vocab_size, 4);  // from token_embd.weight when llama.vocab_size is absent
}

TEST(llama_config_gguf, rejects_other_architectures_and_missing_keys) {
  const qlora::test::TempDir dir;
  qlora::GgufWriter writer;
  writer.set("general.architecture", GgufValue("qwen2"));
  writer.write(dir / "qwen.gguf");
  EXPECT_THAT([&] { LlamaConfig::from_gguf(qlora::GgufFile(dir / "qwen.gguf")); },
              ::testing::ThrowsMessage<qlora::NotImplemented>(HasSubstr("qwen2")));

  qlora::GgufWriter partial;
  partial.set("general.architecture", GgufValue("llama"));
  partial.set("llama.embedding_length", GgufValue(std::uint32_t{576}));
  partial.write(dir / "partial.gguf");
  EXPECT_THAT([&] { LlamaConfig::from_gguf(qlora::GgufFile(dir / "partial.gguf")); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("llama.block_count")));
}

}  // namespace
