// Byte-level BPE: validation of TokenizerData, the GPT-2 byte alphabet, merging by rank and
// encode / decode.

#include <algorithm>
#include <array>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "qlora/core/error.hpp"
#include "qlora/model/tokenizer.hpp"
#include "tokenizer_impl.hpp"

namespace qlora {
namespace {

// GPT-2 bytes_to_unicode: the printable bytes 33..126, 161..172 and 174..255 stand for
// themselves, and the other 68 bytes map to U+0100 + n in increasing byte order.
// kSymbolLimit is one past the largest symbol code point (U+0143).
constexpr uint32_t kSymbolLimit = 0x144;

struct ByteAlphabet {
  std::array<uint32_t, 256> symbol{};          // byte -> code point
  std::array<int16_t, kSymbolLimit> byte{};    // code point -> byte, -1 if none
  std::array<std::string, 256> symbol_utf8{};  // byte -> UTF-8 of its symbol
};

std::string encode_utf8(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet = [] {
    ByteAlphabet a;
    a.byte.fill(-1);
    uint32_t next_extra = 0x100;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      a.symbol[b] = printable ? b : next_extra++;
      a.byte[a.symbol[b]] = static_cast<int16_t>(b);
      a.symbol_utf8[b] = encode_utf8(a.symbol[b]);
    }
    return a;
  }();
  return alphabet;
}

// Maps a byte-mapped token back to its bytes. Returns false when the token contains a character
// outside the byte alphabet.
bool unmap_bytes(std::string_view token, std::string& out) {
  const ByteAlphabet& alphabet = byte_alphabet();
  out.clear();
  size_t i = 0;
  while (i < token.size()) {
    const auto b0 = static_cast<uint8_t>(token[i]);
    uint32_t cp = 0;
    if (b0 < 0x80) {
      cp = b0, i += 1;
    } else if ((b0 & 0xE0) == 0xC0 && i + 1 < token.size()) {
      cp = ((b0 & 0x1Fu) << 6) | (static_cast<uint8_t>(token[i + 1]) & 0x3Fu), i += 2;
    } else {
      return false;  // every symbol is below U+0800, so longer sequences cannot be symbols
    }
    if (cp >= kSymbolLimit || alphabet.byte[cp] < 0) return false;
    out += static_cast<char>(alphabet.byte[cp]);
  }
  return true;
}

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

bool is_raw_text_type(TokenType type) {
  return type == TokenType::control || type == TokenType::user_defined ||
         type == TokenType::unknown;
}

constexpr size_t kCacheMaxEntries = 1 << 16;
constexpr size_t kCacheMaxWordBytes = 64;

}  // namespace

const std::string& detail::byte_to_symbol(uint8_t byte) { return byte_alphabet().symbol_utf8[byte]; }

Tokenizer::Impl::Impl(TokenizerData d) : data(std::move(d)) {
  const auto n_tokens = static_cast<int64_t>(data.tokens.size());
  if (n_tokens == 0 || n_tokens > INT32_MAX) {
    raise<InvalidArgument>(
        "[tokenizer] invalid vocabulary size: got {} tokens, expected 1 to {} (hint: the "
        "tokenizer data holds no token list)", n_tokens, INT32_MAX);
  }
  if (data.token_types.empty()) data.token_types.assign(data.tokens.size(), TokenType::normal);
  if (data.token_types.size() != data.tokens.size()) {
    raise<InvalidArgument>(
        "[tokenizer] token types do not match the vocabulary: got {} types for {} tokens, "
        "expected one type per token", data.token_types.size(), data.tokens.size());
  }

  const std::pair<const char*, int32_t> ids[] = {
      {"bos", data.bos_id}, {"eos", data.eos_id}, {"unk", data.unk_id}, {"pad", data.pad_id}};
  for (const auto& [name, id] : ids) {
    if (id < -1 || id >= n_tokens) {
      raise<InvalidArgument>("[tokenizer] invalid {} id: got {}, expected -1 (none) or 0..{}",
                             name, id, n_tokens - 1);
    }
  }
  if (data.add_bos && data.bos_id < 0) {
    raise<InvalidArgument>("[tokenizer] add_bos is set but the tokenizer has no BOS id: got "
                           "bos_id=-1, expected a token id (hint: set bos_id or clear add_bos)");
  }
  if (data.add_eos && data.eos_id < 0) {
    raise<InvalidArgument>("[tokenizer] add_eos is set but the tokenizer has no EOS id: got "
                           "eos_id=-1, expected a token id (hint: set eos_id or clear add_eos)");
  }

  if (data.pre_tokenizer == "smollm") {
    split_digits = true;
  } else if (data.pre_tokenizer == "gpt2") {
    split_digits = false;
  } else {
    raise<NotImplemented>(
        "[tokenizer] unsupported pre-tokenizer: got \"{}\", expected \"smollm\" or \"gpt2\"",
        data.pre_tokenizer);
  }

  // Vocabulary: lookup table, decoded pieces, special tokens.
  pieces.resize(data.tokens.size());
  token_ids.reserve(data.tokens.size());
  for (size_t index = 0; index < data.tokens.size(); ++index) {
    const auto id = static_cast<int32_t>(index);
    const std::string& token = data.tokens[index];
    const TokenType type = data.token_types[index];
    const auto type_value = static_cast<int32_t>(type);
    if (type_value < 1 || type_value > 6) {
      raise<InvalidArgument>("[tokenizer] invalid type of token {} \"{}\": got {}, expected 1..6",
                             id, token, type_value);
    }
    if (!token_ids.emplace(token, id).second) {
      raise<FormatError>("[tokenizer] duplicate token: \"{}\" is both id {} and id {}", token,
                         token_ids[token], id);
    }
    if (is_raw_text_type(type)) {
      pieces[index] = token;
    } else if (!unmap_bytes(token, pieces[index])) {
      raise<FormatError>(
          "[tokenizer] token {} \"{}\" has a character outside the GPT-2 byte alphabet, expected "
          "byte-mapped text (hint: only byte-level BPE vocabularies are supported)", id, token);
    }
    if (type == TokenType::control || type == TokenType::user_defined) {
      if (token.empty()) {
        raise<FormatError>("[tokenizer] special token {} is empty, expected its text", id);
      }
      specials.push_back({token, id, type == TokenType::control});
      special_first_byte[static_cast<uint8_t>(token[0])] = true;
    }
  }
  std::stable_sort(specials.begin(), specials.end(),
                   [](const auto& a, const auto& b) { return a.text.size() > b.text.size(); });

  // Byte symbols: the starting point of BPE for every word.
  for (uint32_t b = 0; b < 256; ++b) {
    const auto it = token_ids.find(byte_alphabet().symbol_utf8[b]);
    const bool usable = it != token_ids.end() && !is_raw_text_type(data.token_types[static_cast<size_t>(it->second)]);
    byte_tokens[b] = usable ? it->second : -1;
  }

  // Merges, in rank order.
  merges.reserve(data.merges.size());
  for (size_t rank = 0; rank < data.merges.size(); ++rank) {
    const std::string& merge = data.merges[rank];
    const size_t space = merge.find(' ');
    if (space == std::string::npos || space == 0 || space + 1 == merge.size() ||
        merge.find(' ', space + 1) != std::string::npos) {
      raise<FormatError>("[tokenizer] malformed merge {}: got \"{}\", expected \"left right\" "
                         "with one space", rank, merge);
    }
    const std::string left = merge.substr(0, space);
    const std::string right = merge.substr(space + 1);
    const auto find = [&](const std::string& token) {
      const auto it = token_ids.find(token);
      if (it == token_ids.end()) {
        raise<FormatError>("[tokenizer] merge {} \"{}\" names the unknown token \"{}\" "
                           "(hint: the merges do not belong to this vocabulary)", rank, merge, token);
      }
      return it->second;
    };
    const int32_t left_id = find(left);
    const int32_t right_id = find(right);
    const int32_t merged_id = find(left + right);
    if (!merges.emplace(pair_key(left_id, right_id),
                        detail::MergeRule{static_cast<int32_t>(rank), merged_id}).second) {
      raise<FormatError>("[tokenizer] duplicate merge {} \"{}\": the pair was already merged at "
                         "rank {}", rank, merge, merges.at(pair_key(left_id, right_id)).rank);
    }
  }

  // A template that is not ChatML does not stop the tokenizer from working: only the chat
  // functions raise, with this message.
  try {
    chat = detail::parse_chat_template(data.chat_template);
  } catch (const NotImplemented& e) {
    chat_error = e.what();
  }
}

void Tokenizer::Impl::check_id(int32_t id, const char* op) const {
  if (id < 0 || static_cast<size_t>(id) >= data.tokens.size()) {
    raise<InvalidArgument>("[{}] invalid token id: got {}, expected 0..{}", op, id,
                           data.tokens.size() - 1);
  }
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& ids,
                          std::vector<uint32_t>* offsets) const {
  struct Symbol {
    int32_t id;  // -1 once merged into its left neighbour
    int32_t prev;
    int32_t next;
    uint32_t offset;
  };
  struct Candidate {
    int32_t rank;
    int32_t left;
    int32_t left_id;
    int32_t right_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  thread_local std::vector<Symbol> symbols;
  thread_local std::vector<Candidate> heap;
  symbols.clear();
  heap.clear();
  const auto at = [&](int32_t i) -> Symbol& { return symbols[static_cast<size_t>(i)]; };

  for (size_t i = 0; i < word.size(); ++i) {
    int32_t id = byte_tokens[static_cast<uint8_t>(word[i])];
    if (id < 0) {
      if (!data.unk_for_missing_bytes || data.unk_id < 0) continue;  // dropped, see the header
      id = data.unk_id;
    }
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, static_cast<uint32_t>(i)});
    if (index > 0) at(index - 1).next = index;
  }

  const auto push_candidate = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = at(left).next;
    if (right < 0) return;
    const auto it = merges.find(pair_key(at(left).id, at(right).id));
    if (it == merges.end()) return;
    heap.push_back({it->second.rank, left, at(left).id, at(right).id});
    std::push_heap(heap.begin(), heap.end(), std::greater<>{});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_candidate(i);

  // Lowest rank first, leftmost first among equal ranks. A candidate is stale when either
  // symbol has changed since it was pushed.
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
    const Candidate c = heap.back();
    heap.pop_back();
    Symbol& left = at(c.left);
    if (left.id != c.left_id || left.next < 0) continue;
    Symbol& right = at(left.next);
    if (right.id != c.right_id) continue;

    left.id = merges.find(pair_key(c.left_id, c.right_id))->second.merged;
    right.id = -1;
    left.next = right.next;
    if (right.next >= 0) at(right.next).prev = c.left;
    push_candidate(left.prev);
    push_candidate(c.left);
  }

  for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = at(i).next) {
    ids.push_back(at(i).id);
    if (offsets != nullptr) offsets->push_back(at(i).offset);
  }
}

void Tokenizer::Impl::encode_plain(std::string_view text, std::vector<int32_t>& ids,
                                   std::vector<uint32_t>* offsets) const {
  thread_local std::vector<detail::WordSpan> words;
  detail::pre_tokenize(text, split_digits, words);
  std::vector<int32_t> word_ids;
  for (const detail::WordSpan& span : words) {
    const std::string_view word = text.substr(span.first, span.last - span.first);
    if (offsets != nullptr) {
      const size_t before = offsets->size();
      bpe(word, ids, offsets);
      for (size_t k = before; k < offsets->size(); ++k) (*offsets)[k] += span.first;
      continue;
    }
    if (word.size() > kCacheMaxWordBytes) {
      bpe(word, ids, nullptr);
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      const auto it = cache.find(word);
      if (it != cache.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        continue;
      }
    }
    word_ids.clear();
    bpe(word, word_ids, nullptr);
    ids.insert(ids.end(), word_ids.begin(), word_ids.end());
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= kCacheMaxEntries) cache.clear();
    cache.emplace(std::string(word), word_ids);
  }
}

void Tokenizer::Impl::encode_text(std::string_view text, bool parse_special,
                                  std::vector<int32_t>& ids, std::vector<uint32_t>* offsets) const {
  size_t segment = 0;
  const auto flush = [&](size_t end) {
    if (end == segment) return;
    const size_t before = offsets != nullptr ? offsets->size() : 0;
    encode_plain(text.substr(segment, end - segment), ids, offsets);
    if (offsets != nullptr) {
      for (size_t k = before; k < offsets->size(); ++k) {
        (*offsets)[k] += static_cast<uint32_t>(segment);
      }
    }
  };

  // Leftmost-longest match of the special tokens (specials is sorted longest first).
  size_t i = 0;
  while (i < text.size()) {
    const detail::SpecialToken* match = nullptr;
    if (special_first_byte[static_cast<uint8_t>(text[i])]) {
      for (const detail::SpecialToken& special : specials) {
        if ((parse_special || !special.control) && text.substr(i).starts_with(special.text)) {
          match = &special;
          break;
        }
      }
    }
    if (match == nullptr) {
      ++i;
      continue;
    }
    flush(i);
    ids.push_back(match->id);
    if (offsets != nullptr) offsets->push_back(static_cast<uint32_t>(i));
    i += match->text.size();
    segment = i;
  }
  flush(text.size());
}

Tokenizer::Tokenizer(TokenizerData data) : impl_(std::make_unique<Impl>(std::move(data))) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, EncodeOptions options) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (options.add_special && impl_->data.add_bos) ids.push_back(impl_->data.bos_id);
  impl_->encode_text(text, options.parse_special, ids, nullptr);
  if (options.add_special && impl_->data.add_eos) ids.push_back(impl_->data.eos_id);
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, DecodeOptions options) const {
  std::string out;
  for (const int32_t id : ids) {
    impl_->check_id(id, "tokenizer_decode");
    if (options.skip_special && is_special(id)) continue;
    out += impl_->pieces[static_cast<size_t>(id)];
  }
  return out;
}

const std::string& Tokenizer::token_to_piece(int32_t id) const {
  impl_->check_id(id, "token_to_piece");
  return impl_->pieces[static_cast<size_t>(id)];
}

const std::string& Tokenizer::token_text(int32_t id) const {
  impl_->check_id(id, "token_text");
  return impl_->data.tokens[static_cast<size_t>(id)];
}

std::optional<int32_t> Tokenizer::token_id(std::string_view text) const {
  const auto it = impl_->token_ids.find(std::string(text));
  if (it == impl_->token_ids.end()) return std::nullopt;
  return it->second;
}

TokenType Tokenizer::token_type(int32_t id) const {
  impl_->check_id(id, "token_type");
  return impl_->data.token_types[static_cast<size_t>(id)];
}

bool Tokenizer::is_special(int32_t id) const {
  const TokenType type = token_type(id);
  return type == TokenType::control || type == TokenType::unknown || type == TokenType::unused;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->data.tokens.size()); }
int32_t Tokenizer::bos_id() const { return impl_->data.bos_id; }
int32_t Tokenizer::eos_id() const { return impl_->data.eos_id; }
int32_t Tokenizer::unk_id() const { return impl_->data.unk_id; }
int32_t Tokenizer::pad_id() const { return impl_->data.pad_id; }
const std::string& Tokenizer::chat_template() const { return impl_->data.chat_template; }

}  // namespace qlora
