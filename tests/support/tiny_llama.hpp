// A tiny random Llama model with a byte-level tokenizer, shared by the trainer, continual and
// MPI tests: 2 layers, hidden size 32, INT8 projections, and a LoRA adapter "default".
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "qlora/core/random.hpp"
#include "qlora/model/llama.hpp"
#include "qlora/model/tokenizer.hpp"
#include "qlora/train/data.hpp"

namespace qlora::test {

inline constexpr std::int64_t kVocab = 258;  // 256 byte tokens, EOS, PAD
inline constexpr std::int32_t kEos = 256;
inline constexpr std::int32_t kPad = 257;

// The GPT-2 byte-to-symbol map, so that the test tokenizer has one token per byte.
inline std::string byte_symbol(int byte) {
  int code = byte;
  if (!((byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || (byte >= 174))) {
    int n = 0;
    for (int b = 0; b < byte; ++b) {
      if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174))) ++n;
    }
    code = 256 + n;
  }
  std::string out;
  if (code < 0x80) {
    out += static_cast<char>(code);
  } else {
    out += static_cast<char>(0xc0 | (code >> 6));
    out += static_cast<char>(0x80 | (code & 0x3f));
  }
  return out;
}

inline qlora::Tokenizer byte_tokenizer() {
  qlora::TokenizerData data;
  for (int b = 0; b < 256; ++b) data.tokens.push_back(byte_symbol(b));
  data.tokens.push_back("<|endoftext|>");
  data.tokens.push_back("<|pad|>");
  data.token_types.assign(256, qlora::TokenType::normal);
  data.token_types.push_back(qlora::TokenType::control);
  data.token_types.push_back(qlora::TokenType::control);
  data.eos_id = kEos;
  data.pad_id = kPad;
  data.pre_tokenizer = "gpt2";
  return qlora::Tokenizer(std::move(data));
}

inline qlora::LlamaModel tiny_model(std::uint64_t seed) {
  qlora::LlamaConfig config;
  config.hidden_size = 32;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 4;
  config.num_key_value_heads = 2;
  config.head_dim = 8;
  config.intermediate_size = 64;
  config.vocab_size = kVocab;
  config.max_position_embeddings = 128;
  config.rope_theta = 10000.0f;
  config.tie_word_embeddings = true;

  qlora::Rng rng(seed);
  const auto random = [&rng](std::int64_t r, std::int64_t c, float scale) {
    qlora::RowMatrixF m(r, c);
    for (float& v : m.reshaped()) v = static_cast<float>(rng.normal()) * scale;
    return m;
  };
  qlora::LlamaWeights w;
  w.embed_tokens = random(kVocab, 32, 0.5f);
  for (int l = 0; l < 2; ++l) {
    qlora::LlamaLayerWeights layer;
    layer.q_proj = random(32, 32, 0.2f);
    layer.k_proj = random(16, 32, 0.2f);
    layer.v_proj = random(16, 32, 0.2f);
    layer.o_proj = random(32, 32, 0.2f);
    layer.gate_proj = random(64, 32, 0.2f);
    layer.up_proj = random(64, 32, 0.2f);
    layer.down_proj = random(32, 64, 0.2f);
    layer.input_layernorm = qlora::VectorF::Ones(32);
    layer.post_attention_layernorm = qlora::VectorF::Ones(32);
    w.layers.push_back(std::move(layer));
  }
  w.norm = qlora::VectorF::Ones(32);
  qlora::LlamaLoadOptions options;
  options.projections = qlora::QuantConfig{.format = qlora::QuantFormat::int8, .block_size = 32};
  qlora::LlamaModel model(config, std::move(w), options);
  qlora::LoraConfig lora;
  lora.rank = 4;
  lora.alpha = 8.0f;
  lora.dropout = 0.1f;
  model.add_adapter("default", lora, seed + 1);
  return model;
}

inline std::vector<qlora::Document> sample_documents() {
  const qlora::Tokenizer tokenizer = byte_tokenizer();
  const char* texts[] = {"The quick brown fox jumps over the lazy dog.",
                         "A stitch in time saves nine.",
                         "To be or not to be, that is the question.",
                         "All that glitters is not gold; all that wander are not lost.",
                         "Premature optimization is the root of all evil.",
                         "Simple things should be simple, complex things possible."};
  std::vector<qlora::Document> docs;
  for (const char* t : texts) {
    qlora::Document d;
    d.ids = tokenizer.encode(t, {.add_special = false});
    d.ids.push_back(kEos);
    d.loss_mask.assign(d.ids.size(), 1);
    docs.push_back(std::move(d));
  }
  return docs;
}

}  // namespace qlora::test
