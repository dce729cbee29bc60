// Byte-level BPE tokenizer (the GPT-2 scheme that SmolLM2 uses) and the ChatML chat format.
//
// A Tokenizer is built from a plain TokenizerData (vocabulary in byte-mapped form, merges in
// rank order, token types, special ids, pre-tokenizer name, chat template), which in turn comes
// from GGUF metadata (`from_gguf`) or from a Hugging Face `tokenizer.json`
// (`from_hf_tokenizer_json`). It encodes text to ids, decodes ids to bytes, renders and encodes
// ChatML conversations and marks the tokens of assistant turns for loss masks.
//
// Supported: BPE models with the GPT-2 byte-to-unicode alphabet; the pre-tokenizers "smollm"
// (every \p{N} code point split off, then the GPT-2 regex) and "gpt2" (the GPT-2 regex alone);
// ChatML templates. Not supported: SentencePiece / WordPiece / Unigram models, normalizers,
// other pre-tokenizer regexes, and general Jinja chat templates (they raise NotImplemented).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

class GgufFile;

/// Token types as GGUF stores them in `tokenizer.ggml.token_type` (llama.cpp numbering).
enum class TokenType : int32_t {
  normal = 1,
  unknown = 2,
  control = 3,       ///< special tokens such as <|im_start|>; matched in text only with parse_special
  user_defined = 4,  ///< added, non-special tokens; always matched in text as whole strings
  unused = 5,
  byte = 6,
};

/**
 * The plain description of a byte-level BPE tokenizer.
 *
 * `tokens[i]` is token i in byte-mapped form (GPT-2 bytes_to_unicode: space is "Ġ", newline
 * "Ċ") for normal, unused and byte tokens, and raw UTF-8 text for control, user-defined and
 * unknown tokens. `merges[r]` is the merge of rank r as "left right". Ids that a tokenizer does
 * not have are -1.
 */
struct TokenizerData {
  std::vector<std::string> tokens;
  std::vector<std::string> merges;
  std::vector<TokenType> token_types;  ///< one per token; empty means every token is normal
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  int32_t pad_id = -1;
  bool add_bos = false;  ///< encode() with add_special prepends bos_id
  bool add_eos = false;  ///< encode() with add_special appends eos_id
  /// A byte whose symbol is missing from the vocabulary encodes as unk_id when true, and is
  /// dropped when false (what Hugging Face BPE does when its model has no unk_token).
  bool unk_for_missing_bytes = false;
  std::string pre_tokenizer = "smollm";  ///< "smollm" or "gpt2"
  std::string chat_template;             ///< Jinja source; only ChatML forms are recognised
};

/// Options of Tokenizer::encode.
struct EncodeOptions {
  bool add_special = true;     ///< add BOS / EOS as TokenizerData::add_bos / add_eos request
  bool parse_special = false;  ///< match control tokens (<|im_start|>, ...) written in the text
};

/// Options of Tokenizer::decode.
struct DecodeOptions {
  bool skip_special = false;  ///< leave out control, unknown and unused tokens
};

/// One message of a conversation.
struct ChatMessage {
  std::string role;  ///< "system", "user", "assistant" or any other role name
  std::string content;
};

/// A conversation encoded for training: `assistant_mask[i]` is 1 when `ids[i]` belongs to the
/// content of an assistant message or is the <|im_end|> that closes it, else 0.
struct ChatEncoding {
  std::vector<int32_t> ids;
  std::vector<uint8_t> assistant_mask;
};

/**
 * Byte-level BPE tokenizer.
 *
 * Encoding first cuts special tokens out of the text (user-defined tokens always, control
 * tokens only with parse_special). The rest is pre-tokenized into words. The UTF-8 bytes of each
 * word are mapped to byte symbols and merged by rank, lowest rank first and leftmost first on
 * ties, as Hugging Face tokenizers and llama.cpp do.
 *
 * Invalid UTF-8 input is accepted: each byte of an invalid sequence is treated as one
 * character of the "other" class (like punctuation) by the pre-tokenizer and goes through BPE
 * as a byte, so decode(encode(s)) == s holds for any byte string whose bytes all have a symbol
 * in the vocabulary. Bytes without a symbol are dropped or become unk_id (see
 * TokenizerData::unk_for_missing_bytes). NOTE: SmolLM2's vocabulary has no symbol for the bytes
 * 0x04 0x06 0x13 0x14 0x16 0x1D 0xC0 0xC1 0xF1 0xF2 0xF5-0xFF, so those control characters and
 * the code points U+40000..U+BFFFF do not round-trip with it (Hugging Face tokenizers and
 * llama.cpp drop those bytes too).
 *
 * encode() and decode() are safe to call from several threads at once.
 */
class Tokenizer {
 public:
  /// Validates `data` and builds the lookup tables. Throws InvalidArgument or FormatError
  /// naming the offending token, merge or id, and NotImplemented for an unsupported
  /// pre-tokenizer.
  explicit Tokenizer(TokenizerData data);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  /// Reads the `tokenizer.ggml.*` keys and `tokenizer.chat_template` of a GGUF file.
  static Tokenizer from_gguf(const GgufFile& file);

  /// Builds the TokenizerData that from_gguf uses, for callers that want to inspect it.
  static TokenizerData data_from_gguf(const GgufFile& file);

  /**
   * Reads a Hugging Face `tokenizer.json` (BPE model, vocab, merges as "a b" strings or [a, b]
   * arrays, added_tokens, pre_tokenizer). When a `tokenizer_config.json` sits in the same
   * directory, bos/eos/unk/pad tokens, add_bos_token / add_eos_token and chat_template are
   * read from it.
   */
  static Tokenizer from_hf_tokenizer_json(const std::filesystem::path& path);

  /// Builds the TokenizerData that from_hf_tokenizer_json uses.
  static TokenizerData data_from_hf_tokenizer_json(const std::filesystem::path& path);

  /// Encodes UTF-8 text (invalid UTF-8 included, see the class comment) to token ids.
  std::vector<int32_t> encode(std::string_view text, EncodeOptions options = {}) const;

  /// Concatenates the pieces of `ids`. The result may be invalid UTF-8 when `ids` cut a
  /// multi-byte character. Throws InvalidArgument for an id outside [0, vocab_size()).
  std::string decode(std::span<const int32_t> ids, DecodeOptions options = {}) const;

  /// The bytes that token `id` decodes to (raw text for control tokens).
  const std::string& token_to_piece(int32_t id) const;

  /// Token `id` as stored in the vocabulary (byte-mapped form for normal tokens).
  const std::string& token_text(int32_t id) const;

  /// The id of the token stored as `text`, if any.
  std::optional<int32_t> token_id(std::string_view text) const;

  TokenType token_type(int32_t id) const;

  /// True for control, unknown and unused tokens, which decode(skip_special) leaves out.
  bool is_special(int32_t id) const;

  int32_t vocab_size() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t unk_id() const;
  int32_t pad_id() const;
  const std::string& chat_template() const;

  /**
   * Renders a conversation as the tokenizer's ChatML template does.
   *
   * Each message becomes "<|im_start|>{role}\n{content}<|im_end|>\n". The template's default
   * system message comes first when the template has one and the first message is not a system
   * message. With `add_generation_prompt`, "<|im_start|>assistant\n" follows.
   * Throws NotImplemented when the chat template is not a recognised ChatML form.
   */
  std::string apply_chat_template(std::span<const ChatMessage> messages,
                                  bool add_generation_prompt) const;

  /**
   * Encodes a conversation rendered by apply_chat_template, with the assistant mask.
   *
   * The ChatML markers become their control-token ids; roles and contents are encoded without
   * parse_special, so text such as "<|im_end|>" inside a message stays plain text. A token is
   * marked as assistant when any of its bytes lies in an assistant message's content, and each
   * <|im_end|> closing an assistant message is marked too.
   */
  ChatEncoding encode_chat(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

 /// Internal state, defined in src/model/tokenizer_impl.hpp.
  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

namespace detail {

/// Byte ranges [first, last) of the words that the pre-tokenizer cuts `text` into.
struct WordSpan {
  uint32_t first;
  uint32_t last;
};

/// Splits `text` into pre-tokenizer words: with `split_digits`, every \p{N} code point is
/// cut off on its own first ("smollm"), then the GPT-2 regex
/// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ runs on each piece.
void pre_tokenize(std::string_view text, bool split_digits, std::vector<WordSpan>& words);

/// The Unicode version of the character class tables.
const char* unicode_version();

/// The GPT-2 byte-to-unicode symbol of `byte`, as UTF-8.
const std::string& byte_to_symbol(uint8_t byte);

}  // namespace detail

}  // namespace qlora
