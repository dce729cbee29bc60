#include "qlora/model/llama_config.hpp"

#include <fstream>
#include <optional>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/io/gguf.hpp"

namespace qlora {
namespace {

using nlohmann::json;

// Checks sizes and head divisibility; throws E naming `source`.
template <class E>
void check_config(const LlamaConfig& config, std::string_view source) {
  const auto require_positive = [&](std::string_view field, std::int64_t value) {
    if (value <= 0) {
      raise<E>("[LlamaConfig] {}: {} must be positive: got {}", source, field, value);
    }
  };
  require_positive("hidden_size", config.hidden_size);
  require_positive("num_hidden_layers", config.num_hidden_layers);
  require_positive("num_attention_heads", config.num_attention_heads);
  require_positive("num_key_value_heads", config.num_key_value_heads);
  require_positive("head_dim", config.head_dim);
  require_positive("intermediate_size", config.intermediate_size);
  require_positive("vocab_size", config.vocab_size);
  if (config.hidden_size % config.num_attention_heads != 0) {
    raise<E>("[LlamaConfig] {}: the attention heads do not divide the hidden size: got "
             "hidden_size={}, num_attention_heads={}, expected hidden_size % "
             "num_attention_heads == 0",
             source, config.hidden_size, config.num_attention_heads);
  }
  if (config.num_attention_heads % config.num_key_value_heads != 0) {
    raise<E>("[LlamaConfig] {}: the KV heads do not divide the attention heads: got "
             "num_attention_heads={}, num_key_value_heads={}, expected "
             "num_attention_heads % num_key_value_heads == 0",
             source, config.num_attention_heads, config.num_key_value_heads);
  }
  if (!(config.rope_theta > 0.0f) || !(config.rms_norm_eps > 0.0f)) {
    raise<E>("[LlamaConfig] {}: rope_theta and rms_norm_eps must be positive: got rope_theta={}, "
             "rms_norm_eps={}",
             source, config.rope_theta, config.rms_norm_eps);
  }
  if (config.rope_scaling.type != "none" && !(config.rope_scaling.factor > 0.0f)) {
    raise<E>("[LlamaConfig] {}: the RoPE scaling factor must be positive: got {} for type '{}'",
             source, config.rope_scaling.factor, config.rope_scaling.type);
  }
}

// config.json readers: a missing optional key gives `fallback`; a present key of the wrong
// type throws.
std::optional<std::int64_t> find_int(const json& object, const char* key,
                                     const std::string& source) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) {
    raise<FormatError>("[LlamaConfig] {}: '{}' is not an integer: got {}", source, key,
                       it->dump().substr(0, 100));
  }
  return it->get<std::int64_t>();
}

std::int64_t require_int(const json& object, const char* key, const std::string& source) {
  const auto value = find_int(object, key, source);
  if (!value) {
    raise<FormatError>("[LlamaConfig] {}: '{}' is missing (hint: this is not a Llama "
                       "config.json)",
                       source, key);
  }
  return *value;
}

float get_float(const json& object, const char* key, float fallback, const std::string& source) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_number()) {
    raise<FormatError>("[LlamaConfig] {}: '{}' is not a number: got {}", source, key,
                       it->dump().substr(0, 100));
  }
  return it->get<float>();
}

// bos_token_id / eos_token_id: an integer, a list of integers (the first is kept) or null.
std::int64_t get_token_id(const json& object, const char* key, std::int64_t fallback,
                          const std::string& source) {
  const auto it = object.find(key);
  if (it == object.end()) return fallback;
  if (it->is_null()) return -1;
  if (it->is_number_integer()) return it->get<std::int64_t>();
  if (it->is_array() && !it->empty() && it->front().is_number_integer()) {
    // NOTE: only the first of several EOS ids is kept (Llama 3.1 lists three).
    return it->front().get<std::int64_t>();
  }
  raise<FormatError>("[LlamaConfig] {}: '{}' is not a token id: got {}", source, key,
                     it->dump().substr(0, 100));
}

RopeScaling parse_hf_rope_scaling(const json& config, const std::string& source) {
  RopeScaling scaling;
  const auto it = config.find("rope_scaling");
  if (it == config.end() || it->is_null()) return scaling;
  if (!it->is_object()) {
    raise<FormatError>("[LlamaConfig] {}: 'rope_scaling' is not an object or null: got {}",
                       source, it->dump().substr(0, 100));
  }
  // transformers reads "rope_type" and falls back to the older "type".
  const char* type_key = it->contains("rope_type") ? "rope_type" : "type";
  const auto type = it->find(type_key);
  if (type == it->end() || !type->is_string()) {
    raise<FormatError>("[LlamaConfig] {}: 'rope_scaling' has no string 'rope_type': got {}",
                       source, it->dump().substr(0, 200));
  }
  scaling.type = type->get<std::string>();
  if (scaling.type == "default") scaling.type = "none";
  scaling.factor = get_float(*it, "factor", 1.0f, source);
  scaling.low_freq_factor = get_float(*it, "low_freq_factor", 1.0f, source);
  scaling.high_freq_factor = get_float(*it, "high_freq_factor", 4.0f, source);
  scaling.original_max_position_embeddings =
      find_int(*it, "original_max_position_embeddings", source).value_or(0);
  return scaling;
}

}  // namespace

void LlamaConfig::validate(std::string_view source) const {
  check_config<InvalidArgument>(*this, source);
}

LlamaConfig LlamaConfig::from_gguf(const GgufFile& file) {
  const std::string source = file.path().string();
  const std::string architecture = file.get_string("general.architecture");
  if (architecture != "llama") {
    raise<NotImplemented>("[LlamaConfig] {}: architecture '{}' is not supported, expected "
                          "'llama' (hint: qlora implements the Llama architecture only)",
                          source, architecture);
  }

  LlamaConfig config;
  config.hidden_size = file.get_i64("llama.embedding_length");
  config.num_hidden_layers = file.get_i64("llama.block_count");
  config.num_attention_heads = file.get_i64("llama.attention.head_count");
  config.num_key_value_heads =
      file.get_or<std::int64_t>("llama.attention.head_count_kv", config.num_attention_heads);
  config.intermediate_size = file.get_i64("llama.feed_forward_length");
  config.max_position_embeddings = file.get_or<std::int64_t>("llama.context_length", 0);
  config.rope_theta = file.get_or<float>("llama.rope.freq_base", 10000.0f);
  config.rms_norm_eps = file.get_f32("llama.attention.layer_norm_rms_epsilon");
  if (config.num_attention_heads > 0) {
    config.head_dim = file.get_or<std::int64_t>("llama.attention.key_length",
                                                config.hidden_size / config.num_attention_heads);
  }

  if (file.contains("llama.vocab_size")) {
    config.vocab_size = file.get_i64("llama.vocab_size");
  } else if (const GgufValue* tokens = file.find("tokenizer.ggml.tokens");
             tokens != nullptr && tokens->get_if<GgufArray>() != nullptr) {
    config.vocab_size = static_cast<std::int64_t>(tokens->get_if<GgufArray>()->elements.size());
  } else if (const GgufTensor* embedding = file.find_tensor("token_embd.weight")) {
    config.vocab_size = embedding->rows();
  }

  // llama.cpp writes linear scaling either as rope.scaling.* or as the older scale_linear.
  const std::string scaling_type = file.get_or<std::string>("llama.rope.scaling.type", "none");
  config.rope_scaling.type = scaling_type;
  config.rope_scaling.factor = file.get_or<float>("llama.rope.scaling.factor", 1.0f);
  config.rope_scaling.original_max_position_embeddings =
      file.get_or<std::int64_t>("llama.rope.scaling.original_context_length", 0);
  if (scaling_type == "none" && file.contains("llama.rope.scale_linear")) {
    config.rope_scaling.type = "linear";
    config.rope_scaling.factor = file.get_f32("llama.rope.scale_linear");
  }
  if (config.rope_scaling.type == "none") config.rope_scaling.factor = 1.0f;

  config.tie_word_embeddings = file.find_tensor("output.weight") == nullptr;
  config.bos_token_id = file.get_or<std::int64_t>("tokenizer.ggml.bos_token_id", -1);
  config.eos_token_id = file.get_or<std::int64_t>("tokenizer.ggml.eos_token_id", -1);

  check_config<FormatError>(config, source);
  return config;
}

LlamaConfig LlamaConfig::from_hf_config_json(const std::filesystem::path& path) {
  const std::string source = path.string();
  std::ifstream stream(path);
  if (!stream) {
    raise<IoError>("[LlamaConfig] cannot open '{}' (hint: pass the config.json of a Hugging Face "
                   "checkpoint)",
                   source);
  }
  json config_json;
  try {
    config_json = json::parse(stream);
  } catch (const json::exception& error) {
    raise<FormatError>("[LlamaConfig] {} is not valid JSON: {}", source, error.what());
  }
  if (!config_json.is_object()) {
    raise<FormatError>("[LlamaConfig] {} is not a JSON object: got {}", source,
                       config_json.type_name());
  }
  const auto model_type = config_json.find("model_type");
  if (model_type == config_json.end() || !model_type->is_string() ||
      model_type->get<std::string>() != "llama") {
    raise<NotImplemented>("[LlamaConfig] {}: model_type {} is not supported, expected \"llama\" "
                          "(hint: qlora implements the Llama architecture only)",
                          source,
                          model_type == config_json.end() ? "(missing)" : model_type->dump());
  }

  // Optional keys default to transformers' LlamaConfig defaults.
  LlamaConfig config;
  config.hidden_size = require_int(config_json, "hidden_size", source);
  config.num_hidden_layers = require_int(config_json, "num_hidden_layers", source);
  config.num_attention_heads = require_int(config_json, "num_attention_heads", source);
  config.num_key_value_heads = find_int(config_json, "num_key_value_heads", source)
                                   .value_or(config.num_attention_heads);
  config.intermediate_size = require_int(config_json, "intermediate_size", source);
  config.vocab_size = require_int(config_json, "vocab_size", source);
  config.max_position_embeddings =
      find_int(config_json, "max_position_embeddings", source).value_or(2048);
  if (config.num_attention_heads > 0) {
    config.head_dim = find_int(config_json, "head_dim", source)
                          .value_or(config.hidden_size / config.num_attention_heads);
  }
  config.rope_theta = get_float(config_json, "rope_theta", 10000.0f, source);
  config.rope_scaling = parse_hf_rope_scaling(config_json, source);
  config.rms_norm_eps = get_float(config_json, "rms_norm_eps", 1e-6f, source);
  const auto tie = config_json.find("tie_word_embeddings");
  if (tie != config_json.end() && !tie->is_boolean()) {
    raise<FormatError>("[LlamaConfig] {}: 'tie_word_embeddings' is not a boolean: got {}", source,
                       tie->dump());
  }
  config.tie_word_embeddings = tie != config_json.end() && tie->get<bool>();
  config.bos_token_id = get_token_id(config_json, "bos_token_id", 1, source);
  config.eos_token_id = get_token_id(config_json, "eos_token_id", 2, source);

  check_config<FormatError>(config, source);
  return config;
}

}  // namespace qlora
