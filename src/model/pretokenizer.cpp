// The pre-tokenizer of byte-level BPE: UTF-8 decoding, Unicode character classes and a
// hand-written scanner equivalent to the GPT-2 regex (no regex engine, no ICU).

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/model/tokenizer.hpp"

namespace qlora::detail {
namespace {

// kDigitSplitOnly: split off one by one in "smollm" mode like numbers, but "other" for the
// GPT-2 regex (see scripts/gen_unicode_tables.py).
enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3, kDigitSplitOnly = 4 };

struct UnicodeRange {
  uint32_t first;
  uint32_t last;
  CharClass cls;
};

constexpr UnicodeRange kRanges[] = {
#include "unicode_tables.inc"
};

constexpr uint32_t kLatin1End = 0x100;

// Classes of U+0000..U+00FF, looked up directly because they are the common case.
constexpr std::array<CharClass, kLatin1End> make_latin1_classes() {
  std::array<CharClass, kLatin1End> table{};
  for (const UnicodeRange& range : kRanges) {
    for (uint32_t cp = range.first; cp <= range.last && cp < kLatin1End; ++cp) table[cp] = range.cls;
  }
  return table;
}

constexpr std::array<CharClass, kLatin1End> kLatin1Classes = make_latin1_classes();

CharClass char_class(uint32_t cp) {
  if (cp < kLatin1End) return kLatin1Classes[cp];
  const auto* it = std::upper_bound(std::begin(kRanges), std::end(kRanges), cp,
                                    [](uint32_t value, const UnicodeRange& r) { return value < r.first; });
  if (it == std::begin(kRanges)) return kOther;
  --it;
  return cp <= it->last ? it->cls : kOther;
}

// One decoded character: its code point (or the byte value of an invalid byte), class and
// byte offset in the text.
struct Char {
  uint32_t cp;
  uint32_t offset;
  CharClass cls;
};

constexpr uint32_t kInvalid = 0xFFFFFFFF;

// Decodes the UTF-8 sequence at `s[i]`, storing its length in `length`. Returns kInvalid
// (length 1) for a byte that does not start a well-formed sequence: overlong forms,
// surrogates and code points above U+10FFFF are rejected as the Unicode standard requires.
uint32_t decode_utf8(std::string_view s, size_t i, uint32_t& length) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t b0 = byte(i);
  length = 1;
  if (b0 < 0x80) return b0;

  uint32_t n = 0;
  uint32_t cp = 0;
  uint32_t min = 0;
  if ((b0 & 0xE0) == 0xC0) {
    n = 2, cp = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    n = 3, cp = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    n = 4, cp = b0 & 0x07, min = 0x10000;
  } else {
    return kInvalid;
  }
  if (i + n > s.size()) return kInvalid;
  for (uint32_t k = 1; k < n; ++k) {
    const uint8_t b = byte(i + k);
    if ((b & 0xC0) != 0x80) return kInvalid;
    cp = (cp << 6) | (b & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return kInvalid;
  length = n;
  return cp;
}

void decode_chars(std::string_view text, bool split_digits, std::vector<Char>& chars) {
  chars.clear();
  size_t i = 0;
  while (i < text.size()) {
    uint32_t length = 1;
    const uint32_t cp = decode_utf8(text, i, length);
    CharClass cls = cp == kInvalid ? kOther : char_class(cp);
    if (cls == kDigitSplitOnly && !split_digits) cls = kOther;
    chars.push_back({cp, static_cast<uint32_t>(i), cls});
    i += length;
  }
}

bool is_contraction_letter(uint32_t cp) { return cp == 's' || cp == 't' || cp == 'm' || cp == 'd'; }

bool is_contraction_pair(uint32_t a, uint32_t b) {
  return (a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l');
}

// Scans chars[first, last) with the GPT-2 regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// and calls emit(i, j) for each match chars[i, j). The alternatives are tried in that order
// at each position, as a backtracking regex engine does.
template <class Emit>
void scan_gpt2(const std::vector<Char>& chars, size_t first, size_t last, Emit&& emit) {
  size_t i = first;
  while (i < last) {
    const uint32_t cp = chars[i].cp;

    // 's 't 'm 'd 're 've 'll (lowercase only, as in the pattern).
    if (cp == '\'' && i + 1 < last) {
      if (is_contraction_letter(chars[i + 1].cp)) {
        emit(i, i + 2), i += 2;
        continue;
      }
      if (i + 2 < last && is_contraction_pair(chars[i + 1].cp, chars[i + 2].cp)) {
        emit(i, i + 3), i += 3;
        continue;
      }
    }

    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional U+0020 then a run of one class.
    size_t start = i;
    if (cp == ' ' && i + 1 < last && chars[i + 1].cls != kSpace) start = i + 1;
    const CharClass cls = chars[start].cls;
    if (cls != kSpace) {
      size_t j = start + 1;
      while (j < last && chars[j].cls == cls) ++j;
      emit(i, j), i = j;
      continue;
    }

    // `\s+(?!\S)` leaves the last whitespace character before a non-space for the next match;
    // `\s+` takes a single whitespace character that `\s+(?!\S)` cannot.
    size_t j = i + 1;
    while (j < last && chars[j].cls == kSpace) ++j;
    if (j < last && j - i >= 2) --j;
    emit(i, j), i = j;
  }
}

}  // namespace

void pre_tokenize(std::string_view text, bool split_digits, std::vector<WordSpan>& words) {
  words.clear();
  thread_local std::vector<Char> chars;
  decode_chars(text, split_digits, chars);
  const size_t n = chars.size();
  const auto offset = [&](size_t k) {
    return k < n ? chars[k].offset : static_cast<uint32_t>(text.size());
  };
  const auto emit = [&](size_t i, size_t j) { words.push_back({offset(i), offset(j)}); };

  if (!split_digits) {
    scan_gpt2(chars, 0, n, emit);
    return;
  }

  // Digits(individual_digits): each \p{N} character is a piece of its own, and the regex
  // runs on the pieces between them.
  size_t piece = 0;
  for (size_t k = 0; k < n; ++k) {
    if (chars[k].cls != kNumber && chars[k].cls != kDigitSplitOnly) continue;
    scan_gpt2(chars, piece, k, emit);
    emit(k, k + 1);
    piece = k + 1;
  }
  scan_gpt2(chars, piece, n, emit);
}

const char* unicode_version() { return QLORA_UNICODE_VERSION; }

}  // namespace qlora::detail
