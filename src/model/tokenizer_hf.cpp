// Tokenizer::from_hf_tokenizer_json: TokenizerData from a Hugging Face `tokenizer.json` (and the
// `tokenizer_config.json` beside it), for byte-level BPE models only.

#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/model/tokenizer.hpp"

namespace qlora {
namespace {

using nlohmann::json;

constexpr const char* kOp = "tokenizer_from_hf";

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    raise<IoError>("[{}] cannot open {} (hint: pass the path of a tokenizer.json file)", kOp,
                   path.string());
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return json::parse(buffer.str());
  } catch (const json::parse_error& e) {
    raise<FormatError>("[{}] {} is not valid JSON: {}", kOp, path.string(), e.what());
  }
}

bool is_null_or_false(const json& object, const char* key) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() || (it->is_boolean() && !it->get<bool>());
}

bool is_null_or_empty(const json& object, const char* key) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() || (it->is_string() && it->get<std::string>().empty());
}

// True for ByteLevel without a prefix space and with its GPT-2 regex, the only form supported.
bool is_plain_byte_level(const json& node) {
  return node.is_object() && node.value("type", "") == "ByteLevel" &&
         !node.value("add_prefix_space", false) && node.value("use_regex", true);
}

// Maps the pre_tokenizer node to a TokenizerData::pre_tokenizer name.
std::string pre_tokenizer_name(const json& root, const std::filesystem::path& path) {
  const auto it = root.find("pre_tokenizer");
  if (it != root.end() && is_plain_byte_level(*it)) return "gpt2";
  if (it != root.end() && it->is_object() && it->value("type", "") == "Sequence") {
    const json& steps = it->value("pretokenizers", json::array());
    if (steps.size() == 2 && steps[0].value("type", "") == "Digits" &&
        steps[0].value("individual_digits", false) && is_plain_byte_level(steps[1])) {
      return "smollm";
    }
  }
  const std::string got = it == root.end() ? "nothing" : it->dump();
  raise<NotImplemented>(
      "[{}] unsupported pre_tokenizer in {}: got {:.200}, expected ByteLevel(add_prefix_space="
      "false) alone or after Digits(individual_digits=true)", kOp, path.string(), got);
}

// `max_tokens` bounds the ids: the vocabulary plus the added tokens.
void read_model(const json& model, const std::filesystem::path& path, size_t max_tokens,
                TokenizerData& data, std::string& unk_token) {
  if (model.value("type", "BPE") != "BPE") {
    raise<NotImplemented>("[{}] unsupported model type in {}: got \"{}\", expected \"BPE\"", kOp,
                          path.string(), model.value("type", ""));
  }
  if (!is_null_or_false(model, "byte_fallback") || !is_null_or_false(model, "ignore_merges") ||
      !is_null_or_empty(model, "continuing_subword_prefix") ||
      !is_null_or_empty(model, "end_of_word_suffix")) {
    raise<NotImplemented>("[{}] unsupported BPE options in {}: byte_fallback, ignore_merges, "
                          "continuing_subword_prefix and end_of_word_suffix must be unset", kOp,
                          path.string());
  }
  // NOTE: BPE dropout is a training-time regularizer; encoding here never drops merges.
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    unk_token = model["unk_token"].get<std::string>();
  }

  const json& vocab = model.at("vocab");
  if (!vocab.is_object()) {
    raise<FormatError>("[{}] model.vocab in {} is not an object of token: id", kOp, path.string());
  }
  for (const auto& [token, id_value] : vocab.items()) {
    const auto id = id_value.get<int64_t>();
    if (id < 0 || id >= static_cast<int64_t>(max_tokens)) {
      raise<FormatError>("[{}] invalid id of token \"{}\" in {}: got {}, expected 0..{}", kOp,
                         token, path.string(), id, max_tokens - 1);
    }
    const auto index = static_cast<size_t>(id);
    if (index >= data.tokens.size()) data.tokens.resize(index + 1);
    if (!data.tokens[index].empty()) {
      raise<FormatError>("[{}] id {} is given to both \"{}\" and \"{}\" in {}", kOp, id,
                         data.tokens[index], token, path.string());
    }
    data.tokens[index] = token;
  }

  for (const json& merge : model.at("merges")) {
    if (merge.is_string()) {
      data.merges.push_back(merge.get<std::string>());
    } else if (merge.is_array() && merge.size() == 2) {
      const auto left = merge[0].get<std::string>();
      const auto right = merge[1].get<std::string>();
      if (left.find(' ') != std::string::npos || right.find(' ') != std::string::npos) {
        raise<NotImplemented>("[{}] merge [\"{}\", \"{}\"] in {} has a space in a token, which "
                              "byte-level vocabularies never have", kOp, left, right, path.string());
      }
      data.merges.push_back(left + " " + right);
    } else {
      raise<FormatError>("[{}] malformed merge in {}: got {}, expected \"left right\" or "
                         "[left, right]", kOp, path.string(), merge.dump());
    }
  }
}

void read_added_tokens(const json& root, const std::filesystem::path& path, TokenizerData& data) {
  if (!root.contains("added_tokens")) return;
  for (const json& added : root.at("added_tokens")) {
    const auto id = added.at("id").get<int64_t>();
    const auto content = added.at("content").get<std::string>();
    if (id < 0 || id > INT32_MAX) {
      raise<FormatError>("[{}] invalid id of added token \"{}\" in {}: got {}", kOp, content,
                         path.string(), id);
    }
    if (!is_null_or_false(added, "lstrip") || !is_null_or_false(added, "rstrip") ||
        !is_null_or_false(added, "single_word")) {
      raise<NotImplemented>("[{}] added token \"{}\" in {} sets lstrip, rstrip or single_word, "
                            "which are not supported", kOp, content, path.string());
    }
    const auto index = static_cast<size_t>(id);
    if (index >= data.tokens.size()) data.tokens.resize(index + 1);
    if (!data.tokens[index].empty() && data.tokens[index] != content) {
      raise<FormatError>("[{}] added token {} \"{}\" in {} disagrees with the vocabulary, which "
                         "has \"{}\" at that id", kOp, id, content, path.string(), data.tokens[index]);
    }
    data.tokens[index] = content;
    if (data.token_types.size() < data.tokens.size()) {
      data.token_types.resize(data.tokens.size(), TokenType::normal);
    }
    data.token_types[index] = added.value("special", false) ? TokenType::control : TokenType::user_defined;
  }
}

// A token in tokenizer_config.json is either a string or an object with "content".
std::string config_token(const json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  return it->value("content", "");
}

int32_t id_of(const TokenizerData& data, const std::string& token, const char* role,
              const std::filesystem::path& path) {
  if (token.empty()) return -1;
  for (size_t id = 0; id < data.tokens.size(); ++id) {
    if (data.tokens[id] == token) return static_cast<int32_t>(id);
  }
  raise<FormatError>("[{}] the {} token \"{}\" of {} is not in the vocabulary", kOp, role, token,
                     path.string());
}

void read_config(const std::filesystem::path& path, TokenizerData& data) {
  const json config = read_json(path);
  data.bos_id = id_of(data, config_token(config, "bos_token"), "bos", path);
  data.eos_id = id_of(data, config_token(config, "eos_token"), "eos", path);
  data.unk_id = id_of(data, config_token(config, "unk_token"), "unk", path);
  data.pad_id = id_of(data, config_token(config, "pad_token"), "pad", path);
  data.add_bos = config.value("add_bos_token", false) && data.bos_id >= 0;
  data.add_eos = config.value("add_eos_token", false) && data.eos_id >= 0;
  const auto it = config.find("chat_template");
  if (it != config.end() && it->is_string()) data.chat_template = it->get<std::string>();
  if (it != config.end() && it->is_array()) {
    for (const json& entry : *it) {
      if (entry.value("name", "") == "default") data.chat_template = entry.value("template", "");
    }
  }
}

}  // namespace

TokenizerData Tokenizer::data_from_hf_tokenizer_json(const std::filesystem::path& path) {
  const json root = read_json(path);
  TokenizerData data;
  try {
    if (!root.is_object() || !root.contains("model")) {
      raise<FormatError>("[{}] {} has no \"model\" object (hint: pass a tokenizer.json file)", kOp,
                         path.string());
    }
    if (root.contains("normalizer") && !root["normalizer"].is_null()) {
      raise<NotImplemented>("[{}] {} has a normalizer ({:.120}), which is not supported", kOp,
                            path.string(), root["normalizer"].dump());
    }
    const json& decoder = root.value("decoder", json());
    if (!decoder.is_null() && decoder.value("type", "") != "ByteLevel") {
      raise<NotImplemented>("[{}] unsupported decoder in {}: got {:.120}, expected ByteLevel", kOp,
                            path.string(), decoder.dump());
    }
    data.pre_tokenizer = pre_tokenizer_name(root, path);

    std::string unk_token;
    const json& model = root.at("model");
    const size_t max_tokens = model.at("vocab").size() + root.value("added_tokens", json::array()).size();
    read_model(model, path, max_tokens, data, unk_token);
    read_added_tokens(root, path, data);
    data.token_types.resize(data.tokens.size(), TokenType::normal);
    for (size_t id = 0; id < data.tokens.size(); ++id) {
      if (data.tokens[id].empty()) {
        raise<FormatError>("[{}] the vocabulary of {} has no token with id {}, expected ids "
                           "0..{} without gaps", kOp, path.string(), id, data.tokens.size() - 1);
      }
    }
    if (!unk_token.empty()) {
      data.unk_id = id_of(data, unk_token, "model.unk_token", path);
      data.unk_for_missing_bytes = true;
    }

    // NOTE: post_processor is not read; BOS / EOS insertion comes from tokenizer_config.json.
    const std::filesystem::path config = path.parent_path() / "tokenizer_config.json";
    if (std::filesystem::exists(config)) read_config(config, data);
  } catch (const json::exception& e) {
    raise<FormatError>("[{}] unexpected structure in {}: {}", kOp, path.string(), e.what());
  }
  return data;
}

Tokenizer Tokenizer::from_hf_tokenizer_json(const std::filesystem::path& path) {
  return Tokenizer(data_from_hf_tokenizer_json(path));
}

}  // namespace qlora
