// The hyper-parameters of a Llama-family model, read from GGUF metadata or from a Hugging Face
// config.json.
//
// Field names follow transformers' LlamaConfig. Both readers validate the result (positive
// sizes, heads that divide the hidden size, KV heads that divide the heads) and throw
// qlora::FormatError naming the file, the key and the value. Only the plain Llama architecture
// is accepted (GGUF `general.architecture` "llama", config.json `model_type` "llama"); other
// architectures throw qlora::NotImplemented.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace qlora {

class GgufFile;

/// RoPE frequency scaling; `type` "none" means unscaled.
struct RopeScaling {
  std::string type = "none";  // "none", "linear", "yarn", "llama3", "dynamic", ...
  float factor = 1.0f;
  float low_freq_factor = 1.0f;   // llama3 only
  float high_freq_factor = 4.0f;  // llama3 only
  std::int64_t original_max_position_embeddings = 0;  // 0 when not given

  friend bool operator==(const RopeScaling&, const RopeScaling&) = default;
};

/// The hyper-parameters of a Llama model.
struct LlamaConfig {
  std::int64_t hidden_size = 0;
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;
  std::int64_t head_dim = 0;  // hidden_size / num_attention_heads unless the file sets it
  std::int64_t intermediate_size = 0;
  std::int64_t vocab_size = 0;
  std::int64_t max_position_embeddings = 0;  // 0 when the file does not say
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  float rms_norm_eps = 1e-5f;
  bool tie_word_embeddings = false;
  std::int64_t bos_token_id = -1;  // -1 when the file does not say
  std::int64_t eos_token_id = -1;  // -1 when absent; the first id when config.json lists several

  /**
   * Reads the `llama.*` metadata of a GGUF file (llama.cpp's key names).
   * vocab_size comes from llama.vocab_size, else from the length of tokenizer.ggml.tokens, else
   * from token_embd.weight; tie_word_embeddings is true when the file has no output.weight
   * tensor; BOS and EOS from tokenizer.ggml.bos_token_id / eos_token_id.
   */
  static LlamaConfig from_gguf(const GgufFile& file);

  /// Reads a Hugging Face config.json. Throws qlora::IoError when it cannot be read.
  static LlamaConfig from_hf_config_json(const std::filesystem::path& path);

  /// Throws qlora::InvalidArgument when a size is not positive or the heads do not divide.
  /// `source` names the file in the message.
  void validate(std::string_view source = "LlamaConfig") const;

  friend bool operator==(const LlamaConfig&, const LlamaConfig&) = default;
};

}  // namespace qlora
