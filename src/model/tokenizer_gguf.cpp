// Tokenizer::from_gguf: TokenizerData from the `tokenizer.*` metadata of a GGUF file, with the
// keys and meanings that llama.cpp's converter writes.

#include <string>

#include "qlora/core/error.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/model/tokenizer.hpp"

namespace qlora {
namespace {

// Reads an optional token id; GGUF writes them as UINT32, other integer types are accepted.
int32_t optional_id(const GgufFile& file, std::string_view key) {
  const GgufValue* value = file.find(key);
  if (value == nullptr) return -1;
  const std::optional<int64_t> id = value->to_int64();
  if (!id || *id < 0 || *id > INT32_MAX) {
    raise<FormatError>("[tokenizer_from_gguf] invalid {} in {}: got {}, expected a token id",
                       key, file.path().string(), value->to_display_string());
  }
  return static_cast<int32_t>(*id);
}

}  // namespace

TokenizerData Tokenizer::data_from_gguf(const GgufFile& file) {
  const std::string model = file.get_string("tokenizer.ggml.model");
  if (model != "gpt2") {
    raise<NotImplemented>(
        "[tokenizer_from_gguf] unsupported tokenizer model in {}: got tokenizer.ggml.model=\"{}\", "
        "expected \"gpt2\" (byte-level BPE)", file.path().string(), model);
  }

  TokenizerData data;
  data.tokens = file.get_array<std::string>("tokenizer.ggml.tokens");
  data.merges = file.get_array<std::string>("tokenizer.ggml.merges");
  if (file.contains("tokenizer.ggml.token_type")) {
    const std::vector<int32_t> types = file.get_array<int32_t>("tokenizer.ggml.token_type");
    data.token_types.reserve(types.size());
    for (size_t i = 0; i < types.size(); ++i) {
      if (types[i] < 1 || types[i] > 6) {
        raise<FormatError>("[tokenizer_from_gguf] invalid tokenizer.ggml.token_type[{}] in {}: "
                           "got {}, expected 1..6", i, file.path().string(), types[i]);
      }
      data.token_types.push_back(static_cast<TokenType>(types[i]));
    }
  }

  data.bos_id = optional_id(file, "tokenizer.ggml.bos_token_id");
  data.eos_id = optional_id(file, "tokenizer.ggml.eos_token_id");
  data.unk_id = optional_id(file, "tokenizer.ggml.unknown_token_id");
  data.pad_id = optional_id(file, "tokenizer.ggml.padding_token_id");
  data.add_bos = file.get_or<bool>("tokenizer.ggml.add_bos_token", false);
  data.add_eos = file.get_or<bool>("tokenizer.ggml.add_eos_token", false);
  // The GGUF converter records unknown_token_id from tokenizer_config.json even when the BPE
  // model itself has no unk_token, so missing byte symbols are dropped as the HF tokenizer
  // of SmolLM2 does.
  data.unk_for_missing_bytes = false;

  // llama.cpp calls the plain GPT-2 pre-tokenizer "gpt-2"; an absent key means its "default"
  // regexes, which the Tokenizer constructor rejects as unsupported.
  data.pre_tokenizer = file.get_or<std::string>("tokenizer.ggml.pre", "default");
  if (data.pre_tokenizer == "gpt-2") data.pre_tokenizer = "gpt2";
  data.chat_template = file.get_or<std::string>("tokenizer.chat_template", "");
  return data;
}

Tokenizer Tokenizer::from_gguf(const GgufFile& file) { return Tokenizer(data_from_gguf(file)); }

}  // namespace qlora
