// Internal state of qlora::Tokenizer, shared by the files of src/model/ that build and use it.
#pragma once

#include <array>
#include <functional>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "qlora/model/tokenizer.hpp"

namespace qlora {

namespace detail {

/// A recognised ChatML chat template.
struct ChatTemplateInfo {
  /// Content of the system message inserted before a conversation whose first message is not a
  /// system message; empty optional when the template inserts none.
  std::optional<std::string> default_system;
};

/// Recognises the ChatML forms of chat templates; throws NotImplemented for anything else.
ChatTemplateInfo parse_chat_template(const std::string& source);

/// A BPE merge: the pair (left, right) becomes `merged`; lower rank merges first.
struct MergeRule {
  int32_t rank;
  int32_t merged;
};

/// A special token matched in text as a whole string before pre-tokenization.
struct SpecialToken {
  std::string text;
  int32_t id;
  bool control;  ///< matched only with parse_special
};

}  // namespace detail

struct Tokenizer::Impl {
  TokenizerData data;
  std::vector<std::string> pieces;  // bytes that each token decodes to
  std::unordered_map<std::string, int32_t> token_ids;
  std::unordered_map<uint64_t, detail::MergeRule> merges;  // key: left << 32 | right
  std::array<int32_t, 256> byte_tokens{};                  // -1 where the vocabulary lacks it
  std::vector<detail::SpecialToken> specials;              // longest first
  std::array<bool, 256> special_first_byte{};
  bool split_digits = true;
  std::optional<detail::ChatTemplateInfo> chat;  // set when the template is recognised
  std::string chat_error;                        // why it was not recognised

  // Hash and equality that let the maps be searched with a string_view, without a copy.
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  using StringMap = std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>>;

  // Word cache: byte string of a pre-tokenizer word to its ids.
  mutable std::mutex cache_mutex;
  mutable StringMap cache;

  explicit Impl(TokenizerData d);

  /// Token ids of one pre-tokenizer word, with the byte offset (within the word) at which each
  /// token starts when `offsets` is not null.
  void bpe(std::string_view word, std::vector<int32_t>& ids, std::vector<uint32_t>* offsets) const;

  /// Encodes text in which no special tokens are to be matched.
  void encode_plain(std::string_view text, std::vector<int32_t>& ids,
                    std::vector<uint32_t>* offsets) const;

  /// Encodes text, cutting out special tokens first (control tokens only when `parse_special`).
  void encode_text(std::string_view text, bool parse_special, std::vector<int32_t>& ids,
                   std::vector<uint32_t>* offsets) const;

  void check_id(int32_t id, const char* op) const;
};

}  // namespace qlora
