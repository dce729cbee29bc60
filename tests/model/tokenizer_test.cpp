// Tests of qlora::Tokenizer.
//
// Suites named tokenizer_* use hand-made vocabularies and the small committed tokenizer.json
// fixture (CTest label `tokenizer`). The suite smollm2_tokenizer needs the real SmolLM2 GGUF
// file under models/ (label `model`). It compares with ids from Hugging Face tokenizers and
// llama.cpp, written by tests/golden/make_tokenizer_golden.py.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/gguf_writer.hpp"
#include "qlora/model/tokenizer.hpp"

namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;
using nlohmann::json;

// Random strings per round-trip test, and their maximum length in characters.
constexpr int kRoundTripStrings = 400;
constexpr int kRoundTripMaxChars = 40;
constexpr uint32_t kSeed = 20241204;

const std::filesystem::path kSourceDir = QLORA_SOURCE_DIR;
const std::filesystem::path kGoldenDir = kSourceDir / "tests/golden/tokenizer";

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  return json::parse(in);
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::filesystem::path temp_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("qlora_tokenizer_test_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// A vocabulary of the 256 byte symbols (id = byte value), a few merges, three control tokens
// and one user-defined token.
qlora::TokenizerData tiny_data() {
  qlora::TokenizerData data;
  for (int b = 0; b < 256; ++b) data.tokens.push_back(qlora::detail::byte_to_symbol(static_cast<uint8_t>(b)));
  data.token_types.assign(256, qlora::TokenType::normal);
  const auto add = [&](const std::string& token, qlora::TokenType type) {
    data.tokens.push_back(token);
    data.token_types.push_back(type);
    return static_cast<int32_t>(data.tokens.size() - 1);
  };
  for (const char* merged : {"he", "ll", "hell", "hello", "Ġt", "Ġthe", "aa", "Ġw", "Ġwor", "or",
                             "yz", "xy"}) {
    add(merged, qlora::TokenType::normal);
  }
  data.merges = {"h e", "l l", "he ll", "hell o", "Ġ t", "Ġt he", "a a", "Ġ w", "Ġw or", "o r",
                 "y z", "x y"};
  data.bos_id = add("<|endoftext|>", qlora::TokenType::control);
  add("<|im_start|>", qlora::TokenType::control);
  data.eos_id = add("<|im_end|>", qlora::TokenType::control);
  add("<tool>", qlora::TokenType::user_defined);
  data.pre_tokenizer = "smollm";
  data.chat_template =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
      "{{ '<|im_start|>assistant\\n' }}{% endif %}";
  return data;
}

int32_t id_of(const qlora::Tokenizer& tok, const std::string& text) {
  const auto id = tok.token_id(text);
  EXPECT_TRUE(id.has_value()) << text;
  return id.value_or(-1);
}

std::vector<std::string> words_of(const std::string& text, bool split_digits) {
  std::vector<qlora::detail::WordSpan> spans;
  qlora::detail::pre_tokenize(text, split_digits, spans);
  std::vector<std::string> words;
  for (const auto& span : spans) words.push_back(text.substr(span.first, span.last - span.first));
  return words;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Random text mixing ASCII, whitespace runs, digits, Latin-1, CJK, emoji and other planes;
// with `raw_bytes`, also bytes that make the text invalid UTF-8.
std::string random_text(std::mt19937& rng, bool raw_bytes) {
  const std::vector<std::pair<uint32_t, uint32_t>> ranges = {
      {0x20, 0x7E}, {0x20, 0x20}, {0x09, 0x0D}, {0x30, 0x39}, {0xA0, 0xFF}, {0x100, 0x24F},
      {0x370, 0x3FF}, {0x600, 0x6FF}, {0x2000, 0x206F}, {0x3000, 0x30FF}, {0x4E00, 0x9FFF},
      {0xAC00, 0xD7A3}, {0x1F300, 0x1FAFF}, {0x1D400, 0x1D7FF}, {0xE000, 0xF8FF}, {0x10FFF0, 0x10FFFF}};
  std::uniform_int_distribution<size_t> pick_range(0, ranges.size() - 1);
  std::uniform_int_distribution<int> length(0, kRoundTripMaxChars);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_int_distribution<int> coin(0, 19);
  std::string out;
  const int n = length(rng);
  for (int i = 0; i < n; ++i) {
    if (raw_bytes && coin(rng) == 0) {
      out += static_cast<char>(byte(rng));
      continue;
    }
    const auto [first, last] = ranges[pick_range(rng)];
    append_utf8(out, std::uniform_int_distribution<uint32_t>(first, last)(rng));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Byte alphabet and pre-tokenizer

TEST(tokenizer_byte_alphabet, matches_gpt2_table) {
  EXPECT_EQ(qlora::detail::byte_to_symbol(' '), "\u0120");
  EXPECT_EQ(qlora::detail::byte_to_symbol('\n'), "\u010A");
  EXPECT_EQ(qlora::detail::byte_to_symbol(0), "\u0100");
  EXPECT_EQ(qlora::detail::byte_to_symbol('a'), "a");
  EXPECT_EQ(qlora::detail::byte_to_symbol(0xAD), "\u0143");
  EXPECT_EQ(qlora::detail::byte_to_symbol(0xFF), "\u00FF");
}

TEST(tokenizer_pre_tokenize, splits_like_gpt2_regex) {
  using Words = std::vector<std::string>;
  EXPECT_EQ(words_of("Hello world", true), (Words{"Hello", " world"}));
  EXPECT_EQ(words_of("a  b", true), (Words{"a", " ", " b"}));
  EXPECT_EQ(words_of("a\n\nb", true), (Words{"a", "\n", "\n", "b"}));
  EXPECT_EQ(words_of("a \n b", true), (Words{"a", " \n", " b"}));
  EXPECT_EQ(words_of("end  ", true), (Words{"end", "  "}));
  EXPECT_EQ(words_of("\tword", true), (Words{"\t", "word"}));
  EXPECT_EQ(words_of("don't", true), (Words{"don", "'t"}));
  EXPECT_EQ(words_of("we'll 're", true), (Words{"we", "'ll", " '", "re"}));
  EXPECT_EQ(words_of("DON'T", true), (Words{"DON", "'", "T"}));
  EXPECT_EQ(words_of("x?!  ", true), (Words{"x", "?!", "  "}));
  EXPECT_EQ(words_of("caf\u00e9 \u4e16\u754c", true), (Words{"caf\u00e9", " \u4e16\u754c"}));
  EXPECT_EQ(words_of("a\u00a0b", true), (Words{"a", "\u00a0", "b"}));
  EXPECT_TRUE(words_of("", true).empty());
}

TEST(tokenizer_pre_tokenize, splits_digits_individually) {
  using Words = std::vector<std::string>;
  EXPECT_EQ(words_of("x 123", true), (Words{"x", " ", "1", "2", "3"}));
  EXPECT_EQ(words_of("x 123", false), (Words{"x", " 123"}));
  EXPECT_EQ(words_of("a1b", true), (Words{"a", "1", "b"}));
  // U+0661 ARABIC-INDIC DIGIT ONE and U+00BD VULGAR FRACTION ONE HALF are \p{N}.
  EXPECT_EQ(words_of("\u0661\u00bd", true), (Words{"\u0661", "\u00bd"}));
  // U+11DE0 is a number only from Unicode 17.0: Hugging Face tokenizers 0.23.3 splits it off
  // (Digits) but its regex treats it as "other".
  EXPECT_EQ(words_of("!\U00011DE0!", true), (Words{"!", "\U00011DE0", "!"}));
  EXPECT_EQ(words_of("!\U00011DE0!", false), (Words{"!\U00011DE0!"}));
}

TEST(tokenizer_pre_tokenize, keeps_invalid_utf8_bytes) {
  using Words = std::vector<std::string>;
  EXPECT_EQ(words_of("\xff\xfe" "ab", true), (Words{"\xff\xfe", "ab"}));
  EXPECT_EQ(words_of("a\xc3", true), (Words{"a", "\xc3"}));
  // An overlong encoding of '/' and a UTF-8-encoded surrogate are invalid byte by byte.
  EXPECT_EQ(words_of("\xc0\xaf", true), (Words{"\xc0\xaf"}));
  EXPECT_EQ(words_of("x\xed\xa0\x80", true), (Words{"x", "\xed\xa0\x80"}));
}

TEST(tokenizer_pre_tokenize, unicode_version_is_stated) {
  EXPECT_STREQ(qlora::detail::unicode_version(), "16.0.0");
}

// ---------------------------------------------------------------------------------------------
// Hand-made vocabulary

TEST(tokenizer_encode, merges_by_rank) {
  const qlora::Tokenizer tok(tiny_data());
  EXPECT_EQ(tok.encode("hello the"), (std::vector<int32_t>{id_of(tok, "hello"), id_of(tok, "Ġthe")}));
  // "a a" merges the leftmost pair first: aaa -> [aa, a].
  EXPECT_EQ(tok.encode("aaa"), (std::vector<int32_t>{id_of(tok, "aa"), 'a'}));
  // "y z" (rank 10) merges before "x y" (rank 11) can: xyz -> [x, yz].
  EXPECT_EQ(tok.encode("xyz"), (std::vector<int32_t>{'x', id_of(tok, "yz")}));
  // "Ġw or" (rank 8) applies once "o r" (rank 9) has made "or".
  EXPECT_EQ(tok.encode(" wor"), (std::vector<int32_t>{id_of(tok, "Ġwor")}));
  EXPECT_EQ(tok.encode("x 12"), (std::vector<int32_t>{'x', id_of(tok, "Ġ"), '1', '2'}));
}

TEST(tokenizer_encode, parses_special_tokens_when_asked) {
  const qlora::Tokenizer tok(tiny_data());
  const int32_t im_start = id_of(tok, "<|im_start|>");
  const int32_t tool = id_of(tok, "<tool>");

  const auto parsed = tok.encode("<|im_start|>he<tool>", {.add_special = false, .parse_special = true});
  EXPECT_EQ(parsed, (std::vector<int32_t>{im_start, id_of(tok, "he"), tool}));

  // Without parse_special, control tokens are plain text but user-defined ones still match.
  const auto plain = tok.encode("<|im_start|>he<tool>", {.add_special = false, .parse_special = false});
  EXPECT_EQ(std::count(plain.begin(), plain.end(), im_start), 0);
  EXPECT_EQ(plain.back(), tool);
  EXPECT_EQ(tok.decode(plain), "<|im_start|>he<tool>");
}

TEST(tokenizer_encode, adds_bos_and_eos_when_configured) {
  qlora::TokenizerData data = tiny_data();
  data.add_bos = true;
  data.add_eos = true;
  const qlora::Tokenizer tok(std::move(data));
  const auto ids = tok.encode("he");
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids.front(), tok.bos_id());
  EXPECT_EQ(ids.back(), tok.eos_id());
  EXPECT_EQ(tok.encode("he", {.add_special = false}).size(), 1u);
}

TEST(tokenizer_encode, missing_byte_symbol_dropped_or_unk) {
  // Byte 'q' loses its symbol. Dropped, it leaves 'h' and 'e' adjacent, so they merge.
  qlora::TokenizerData data = tiny_data();
  data.tokens['q'] = "<unk>";
  data.token_types['q'] = qlora::TokenType::unknown;
  data.unk_id = 'q';
  const qlora::Tokenizer dropping(data);
  EXPECT_EQ(dropping.encode("hqe"), (std::vector<int32_t>{id_of(dropping, "he")}));
  EXPECT_EQ(dropping.decode(dropping.encode("hqe")), "he");

  data.unk_for_missing_bytes = true;
  const qlora::Tokenizer with_unk(std::move(data));
  EXPECT_EQ(with_unk.encode("hqe"), (std::vector<int32_t>{'h', 'q', 'e'}));
}

TEST(tokenizer_decode, skips_special_tokens_when_asked) {
  const qlora::Tokenizer tok(tiny_data());
  const auto ids = tok.encode("<|im_start|>hello<|im_end|>", {.parse_special = true});
  EXPECT_EQ(tok.decode(ids), "<|im_start|>hello<|im_end|>");
  EXPECT_EQ(tok.decode(ids, {.skip_special = true}), "hello");
  EXPECT_EQ(tok.token_to_piece(id_of(tok, "Ġthe")), " the");
  EXPECT_EQ(tok.token_text(id_of(tok, "Ġthe")), "Ġthe");
  EXPECT_TRUE(tok.is_special(tok.eos_id()));
  EXPECT_FALSE(tok.is_special(id_of(tok, "<tool>")));
}

TEST(tokenizer_round_trip, random_utf8_and_invalid_bytes) {
  const qlora::Tokenizer tok(tiny_data());
  std::mt19937 rng(kSeed);
  for (int i = 0; i < kRoundTripStrings; ++i) {
    const std::string text = random_text(rng, /*raw_bytes=*/i % 2 == 1);
    ASSERT_EQ(tok.decode(tok.encode(text)), text) << "string " << i;
  }
}

TEST(tokenizer_encode, concurrent_calls_agree) {
  const qlora::Tokenizer tok(tiny_data());
  std::mt19937 rng(kSeed);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(random_text(rng, false));
  std::vector<std::vector<int32_t>> expected;
  for (const auto& text : texts) expected.push_back(tok.encode(text));

  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < mismatches.size(); ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = 0; i < texts.size(); ++i) {
        if (tok.encode(texts[(i + t * 50) % texts.size()]) != expected[(i + t * 50) % texts.size()]) {
          ++mismatches[t];
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches, std::vector<int>(mismatches.size(), 0));
}

TEST(tokenizer_round_trip, edge_cases) {
  const qlora::Tokenizer tok(tiny_data());
  const std::vector<std::string> cases = {
      "", " ", "  ", "\n", "\r\n\r\n", "\t \t", "'", "'s", "''s", std::string(1, '\0'),
      std::string("a\0b", 3), "\xef\xbb\xbf" "bom", "\xf4\x8f\xbf\xbf", "\xf0\x9f\x98", "<|im_start",
      std::string(5000, 'a'), std::string(3000, ' ') + "x"};
  for (const std::string& text : cases) {
    EXPECT_EQ(tok.decode(tok.encode(text, {.parse_special = true})), text);
  }
}

// ---------------------------------------------------------------------------------------------
// Malformed tokenizer data

TEST(tokenizer_errors, merge_naming_unknown_token) {
  qlora::TokenizerData data = tiny_data();
  data.merges.push_back("Ġthe re");
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::FormatError>(HasSubstr("names the unknown token \"re\"")));
  data.merges.back() = "q w";  // both tokens exist, their merge "qw" does not
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::FormatError>(HasSubstr("unknown token \"qw\"")));
}

TEST(tokenizer_errors, malformed_and_duplicate_merges) {
  qlora::TokenizerData data = tiny_data();
  data.merges.push_back("he");
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::FormatError>(HasSubstr("malformed merge 12: got \"he\"")));
  data.merges.back() = "h e";
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::FormatError>(HasSubstr("already merged at rank 0")));
}

TEST(tokenizer_errors, bad_ids_and_sizes) {
  qlora::TokenizerData data = tiny_data();
  data.bos_id = 100000;
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::InvalidArgument>(HasSubstr("invalid bos id: got 100000")));

  data = tiny_data();
  data.token_types.pop_back();
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::InvalidArgument>(HasSubstr("token types do not match")));

  data = tiny_data();
  data.bos_id = -1;
  data.add_bos = true;
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::InvalidArgument>(HasSubstr("no BOS id")));

  data = tiny_data();
  data.tokens.push_back("hello");
  data.token_types.push_back(qlora::TokenType::normal);
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::FormatError>(HasSubstr("duplicate token: \"hello\"")));

  data = tiny_data();
  data.token_types[3] = static_cast<qlora::TokenType>(9);
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::InvalidArgument>(HasSubstr("got 9, expected 1..6")));

  data = tiny_data();
  data.tokens[256] = "\u4e16";  // "he", a normal token
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::FormatError>(HasSubstr("outside the GPT-2 byte alphabet")));

  data = tiny_data();
  data.pre_tokenizer = "llama3";
  EXPECT_THAT([&] { qlora::Tokenizer tok(data); },
              ThrowsMessage<qlora::NotImplemented>(HasSubstr("got \"llama3\"")));

  const qlora::Tokenizer tok(tiny_data());
  const std::vector<int32_t> bad = {0, -3};
  EXPECT_THAT([&] { (void)tok.decode(bad); },
              ThrowsMessage<qlora::InvalidArgument>(HasSubstr("invalid token id: got -3")));
}

// ---------------------------------------------------------------------------------------------
// Chat template

TEST(tokenizer_chat, renders_plain_chatml) {
  const qlora::Tokenizer tok(tiny_data());
  const std::vector<qlora::ChatMessage> messages = {{"user", "hi"}, {"assistant", "hello"}};
  EXPECT_EQ(tok.apply_chat_template(messages, false),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n");
  EXPECT_EQ(tok.apply_chat_template(messages, true),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(tok.apply_chat_template({}, true), "<|im_start|>assistant\n");
}

TEST(tokenizer_chat, default_system_message) {
  qlora::TokenizerData data = tiny_data();
  data.chat_template =
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
      "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
      "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
  const qlora::Tokenizer tok(std::move(data));
  const std::vector<qlora::ChatMessage> user = {{"user", "hi"}};
  EXPECT_EQ(tok.apply_chat_template(user, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
  const std::vector<qlora::ChatMessage> system = {{"system", "S"}, {"user", "hi"}};
  EXPECT_EQ(tok.apply_chat_template(system, false),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
}

TEST(tokenizer_chat, rejects_unknown_template) {
  qlora::TokenizerData data = tiny_data();
  data.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}";
  const qlora::Tokenizer tok(std::move(data));
  const std::vector<qlora::ChatMessage> messages = {{"user", "hi"}};
  EXPECT_THAT([&] { (void)tok.apply_chat_template(messages, false); },
              ThrowsMessage<qlora::NotImplemented>(HasSubstr("unsupported chat template")));

  qlora::TokenizerData empty = tiny_data();
  empty.chat_template.clear();
  const qlora::Tokenizer no_template(std::move(empty));
  EXPECT_THAT([&] { (void)no_template.encode_chat(messages, false); },
              ThrowsMessage<qlora::NotImplemented>(HasSubstr("no chat template")));
}

TEST(tokenizer_chat, assistant_mask_covers_content_and_end) {
  const qlora::Tokenizer tok(tiny_data());
  const std::vector<qlora::ChatMessage> messages = {
      {"user", "hello"}, {"assistant", "hello the"}, {"user", "<|im_end|>"}};
  const qlora::ChatEncoding chat = tok.encode_chat(messages, false);
  ASSERT_EQ(chat.ids.size(), chat.assistant_mask.size());

  // The ids equal those of the rendered text, except that a message's "<|im_end|>" text is
  // not parsed as the control token.
  const std::vector<qlora::ChatMessage> first_two(messages.begin(), messages.begin() + 2);
  const qlora::ChatEncoding head = tok.encode_chat(first_two, false);
  EXPECT_EQ(head.ids, tok.encode(tok.apply_chat_template(first_two, false), {.parse_special = true}));

  const int32_t hello = id_of(tok, "hello");
  const int32_t the = id_of(tok, "Ġthe");
  const int32_t im_end = id_of(tok, "<|im_end|>");
  std::vector<int32_t> marked;
  for (size_t i = 0; i < chat.ids.size(); ++i) {
    if (chat.assistant_mask[i]) marked.push_back(chat.ids[i]);
  }
  EXPECT_EQ(marked, (std::vector<int32_t>{hello, the, im_end}));
  EXPECT_EQ(std::count(chat.ids.begin(), chat.ids.end(), im_end), 3);
  EXPECT_EQ(tok.decode(chat.ids), tok.apply_chat_template(messages, false));
}

// ---------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json (the committed tiny fixture, trained with tokenizers)

TEST(tokenizer_hf_json, tiny_fixture_matches_goldens) {
  const qlora::Tokenizer tok = qlora::Tokenizer::from_hf_tokenizer_json(kGoldenDir / "tiny/tokenizer.json");
  const json golden = read_json(kGoldenDir / "tiny_ids.json");
  EXPECT_EQ(tok.vocab_size(), golden["vocab_size"].get<int32_t>());
  for (const json& c : golden["cases"]) {
    const auto text = c["text"].get<std::string>();
    EXPECT_EQ(tok.encode(text, {.parse_special = true}), c["ids"].get<std::vector<int32_t>>()) << text;
    EXPECT_EQ(tok.decode(tok.encode(text, {.parse_special = true})), text);
  }
  EXPECT_EQ(tok.token_type(0), qlora::TokenType::control);

  // tokenizer_config.json beside it: ids of the roles and a plain ChatML template.
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  const json& chat = golden["chat"];
  std::vector<qlora::ChatMessage> messages;
  for (const json& m : chat["messages"]) {
    messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  }
  EXPECT_EQ(tok.apply_chat_template(messages, true), chat["text"].get<std::string>());
  EXPECT_EQ(tok.encode_chat(messages, true).ids, chat["ids"].get<std::vector<int32_t>>());
}

TEST(tokenizer_hf_json, string_merges_and_config) {
  json root = read_json(kGoldenDir / "tiny/tokenizer.json");
  json string_merges = json::array();
  for (const json& merge : root["model"]["merges"]) {
    string_merges.push_back(merge[0].get<std::string>() + " " + merge[1].get<std::string>());
  }
  root["model"]["merges"] = string_merges;
  const auto dir = temp_dir("string_merges");
  write_text(dir / "tokenizer.json", root.dump());
  write_text(dir / "tokenizer_config.json",
             json{{"bos_token", "<|im_start|>"},
                  {"eos_token", {{"content", "<|im_end|>"}}},
                  {"unk_token", "<|endoftext|>"},
                  {"add_bos_token", true},
                  {"chat_template", tiny_data().chat_template}}.dump());

  const qlora::Tokenizer tok = qlora::Tokenizer::from_hf_tokenizer_json(dir / "tokenizer.json");
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.unk_id(), 0);
  const json golden = read_json(kGoldenDir / "tiny_ids.json");
  for (const json& c : golden["cases"]) {
    const auto ids = tok.encode(c["text"].get<std::string>(), {.parse_special = true});
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids.front(), 1);  // add_bos_token
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end()), c["ids"].get<std::vector<int32_t>>());
  }
  const std::vector<qlora::ChatMessage> messages = {{"user", "hi"}};
  EXPECT_EQ(tok.apply_chat_template(messages, false), "<|im_start|>user\nhi<|im_end|>\n");
}

TEST(tokenizer_hf_json, malformed_files_raise) {
  const auto dir = temp_dir("malformed");
  const json good = read_json(kGoldenDir / "tiny/tokenizer.json");
  const auto load = [&](const json& root) {
    write_text(dir / "tokenizer.json", root.dump());
    return qlora::Tokenizer::from_hf_tokenizer_json(dir / "tokenizer.json");
  };

  EXPECT_THAT([&] { qlora::Tokenizer::from_hf_tokenizer_json(dir / "absent.json"); },
              ThrowsMessage<qlora::IoError>(HasSubstr("cannot open")));
  write_text(dir / "broken.json", "{\"model\": ");
  EXPECT_THAT([&] { qlora::Tokenizer::from_hf_tokenizer_json(dir / "broken.json"); },
              ThrowsMessage<qlora::FormatError>(HasSubstr("is not valid JSON")));

  json root = good;
  root.erase("model");
  EXPECT_THAT([&] { load(root); }, ThrowsMessage<qlora::FormatError>(HasSubstr("no \"model\" object")));

  root = good;
  root["model"].erase("merges");
  EXPECT_THAT([&] { load(root); }, ThrowsMessage<qlora::FormatError>(HasSubstr("merges")));

  root = good;
  root["model"]["vocab"]["Ġthe"] = 100000;
  EXPECT_THAT([&] { load(root); }, ThrowsMessage<qlora::FormatError>(HasSubstr("got 100000")));

  root = good;
  root["model"]["merges"].push_back(json::array({"Ġthe", "zzz"}));
  EXPECT_THAT([&] { load(root); }, ThrowsMessage<qlora::FormatError>(HasSubstr("unknown token \"zzz\"")));

  root = good;
  root["model"]["merges"].push_back(42);
  EXPECT_THAT([&] { load(root); }, ThrowsMessage<qlora::FormatError>(HasSubstr("malformed merge")));

  root = good;
  root["normalizer"] = json{{"type", "NFC"}};
  EXPECT_THAT([&] { load(root); }, ThrowsMessage<qlora::NotImplemented>(HasSubstr("normalizer")));

  root = good;
  root["pre_tokenizer"] = json{{"type", "Whitespace"}};
  EXPECT_THAT([&] { load(root); }, ThrowsMessage<qlora::NotImplemented>(HasSubstr("unsupported pre_tokenizer")));

  root = good;
  root["added_tokens"][0]["content"] = "<|other|>";
  EXPECT_THAT([&] { load(root); }, ThrowsMessage<qlora::FormatError>(HasSubstr("disagrees with the vocabulary")));
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata (a small file written here)

TEST(tokenizer_gguf, reads_tokenizer_keys) {
  const qlora::TokenizerData data = tiny_data();
  std::vector<int32_t> types;
  for (const qlora::TokenType t : data.token_types) types.push_back(static_cast<int32_t>(t));
  qlora::GgufWriter writer;
  writer.set("tokenizer.ggml.model", qlora::GgufValue("gpt2"));
  writer.set("tokenizer.ggml.pre", qlora::GgufValue("smollm"));
  writer.set("tokenizer.ggml.tokens", qlora::GgufValue::array_of<std::string>(data.tokens));
  writer.set("tokenizer.ggml.merges", qlora::GgufValue::array_of<std::string>(data.merges));
  writer.set("tokenizer.ggml.token_type", qlora::GgufValue::array_of<int32_t>(types));
  writer.set("tokenizer.ggml.bos_token_id", qlora::GgufValue(static_cast<uint32_t>(data.bos_id)));
  writer.set("tokenizer.ggml.eos_token_id", qlora::GgufValue(static_cast<uint32_t>(data.eos_id)));
  writer.set("tokenizer.ggml.add_bos_token", qlora::GgufValue(true));
  writer.set("tokenizer.chat_template", qlora::GgufValue(data.chat_template));
  const auto path = temp_dir("gguf") / "tiny.gguf";
  writer.write(path);

  const qlora::GgufFile file(path);
  const qlora::Tokenizer tok = qlora::Tokenizer::from_gguf(file);
  const qlora::Tokenizer direct(tiny_data());
  EXPECT_EQ(tok.vocab_size(), direct.vocab_size());
  EXPECT_EQ(tok.bos_id(), data.bos_id);
  EXPECT_EQ(tok.unk_id(), -1);
  const auto ids = tok.encode("hello the <|im_end|>", {.parse_special = true});
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), data.bos_id);
  EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end()),
            direct.encode("hello the <|im_end|>", {.parse_special = true}));

  writer.set("tokenizer.ggml.model", qlora::GgufValue("llama"));
  writer.write(path);
  const qlora::GgufFile llama(path);
  EXPECT_THAT([&] { qlora::Tokenizer::from_gguf(llama); },
              ThrowsMessage<qlora::NotImplemented>(HasSubstr("got tokenizer.ggml.model=\"llama\"")));

  writer.set("tokenizer.ggml.model", qlora::GgufValue("gpt2"));
  types[5] = 12;
  writer.set("tokenizer.ggml.token_type", qlora::GgufValue::array_of<int32_t>(types));
  writer.write(path);
  const qlora::GgufFile bad_type(path);
  EXPECT_THAT([&] { qlora::Tokenizer::from_gguf(bad_type); },
              ThrowsMessage<qlora::FormatError>(HasSubstr("token_type[5]")));
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 tokenizer (label `model`)

std::filesystem::path find_model() {
  const auto dir = kSourceDir / "models";
  const auto preferred = dir / "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (std::filesystem::exists(preferred)) return preferred;
  if (!std::filesystem::is_directory(dir)) return {};
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() == ".gguf") return entry.path();
  }
  return {};
}

// True for the bytes that have no symbol in SmolLM2's vocabulary (see the Tokenizer class
// comment); encoding drops them.
bool lacks_smollm2_symbol(char ch) {
  const auto b = static_cast<uint8_t>(ch);
  return b == 0x04 || b == 0x06 || b == 0x13 || b == 0x14 || b == 0x16 || b == 0x1D || b == 0xC0 ||
         b == 0xC1 || b == 0xF1 || b == 0xF2 || b >= 0xF5;
}

class Smollm2Tokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto path = find_model();
    if (path.empty()) return;
    file_ = new qlora::GgufFile(path);
    tok_ = new qlora::Tokenizer(qlora::Tokenizer::from_gguf(*file_));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete file_;
    tok_ = nullptr;
    file_ = nullptr;
  }
  void SetUp() override {
    if (tok_ == nullptr) {
      GTEST_SKIP() << "no models/*.gguf (run scripts/fetch-model to download SmolLM2)";
    }
  }
  static inline qlora::GgufFile* file_ = nullptr;
  static inline qlora::Tokenizer* tok_ = nullptr;
};

using smollm2_tokenizer = Smollm2Tokenizer;

TEST_F(smollm2_tokenizer, metadata) {
  const qlora::TokenizerData data = qlora::Tokenizer::data_from_gguf(*file_);
  EXPECT_EQ(data.tokens.size(), 49152u);
  EXPECT_EQ(data.merges.size(), 48900u);
  EXPECT_EQ(data.pre_tokenizer, "smollm");
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->unk_id(), 0);
  EXPECT_EQ(tok_->pad_id(), 2);
  EXPECT_FALSE(data.add_bos);
  for (int32_t id = 0; id < 17; ++id) EXPECT_EQ(tok_->token_type(id), qlora::TokenType::control) << id;
  EXPECT_EQ(tok_->token_text(1), "<|im_start|>");
  EXPECT_EQ(tok_->token_text(16), "<empty_output>");
  EXPECT_EQ(tok_->token_type(17), qlora::TokenType::normal);
  for (int b = 0; b < 256; ++b) {
    const char ch = static_cast<char>(b);
    EXPECT_EQ(tok_->token_id(qlora::detail::byte_to_symbol(static_cast<uint8_t>(b))).has_value(),
              !lacks_smollm2_symbol(ch))
        << "byte " << b;
  }
}

TEST_F(smollm2_tokenizer, golden_ids) {
  const json golden = read_json(kGoldenDir / "smollm2_ids.json");
  int matched = 0;
  for (const json& c : golden["cases"]) {
    const auto text = c["text"].get<std::string>();
    const auto expected = c["ids"].get<std::vector<int32_t>>();
    const bool parse_special = c["parse_special"].get<bool>();
    const auto ids = tok_->encode(text, {.add_special = true, .parse_special = parse_special});
    EXPECT_EQ(ids, expected) << c["name"].get<std::string>();
    matched += ids == expected ? 1 : 0;
  }
  EXPECT_EQ(matched, static_cast<int>(golden["cases"].size()));
}

TEST_F(smollm2_tokenizer, golden_decode) {
  const json golden = read_json(kGoldenDir / "smollm2_ids.json");
  for (const json& c : golden["cases"]) {
    auto text = c["text"].get<std::string>();
    std::erase_if(text, lacks_smollm2_symbol);  // such bytes are dropped when encoding
    EXPECT_EQ(tok_->decode(c["ids"].get<std::vector<int32_t>>()), text) << c["name"];
  }
}

TEST_F(smollm2_tokenizer, golden_chats) {
  const json golden = read_json(kGoldenDir / "smollm2_ids.json");
  for (const json& c : golden["chats"]) {
    std::vector<qlora::ChatMessage> messages;
    for (const json& m : c["messages"]) messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    const bool gen = c["add_generation_prompt"].get<bool>();
    EXPECT_EQ(tok_->apply_chat_template(messages, gen), c["text"].get<std::string>()) << c["name"];
    const auto expected = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok_->encode(c["text"].get<std::string>(), {.parse_special = true}), expected);
    const qlora::ChatEncoding chat = tok_->encode_chat(messages, gen);
    EXPECT_EQ(chat.ids, expected) << c["name"];
  }
}

TEST_F(smollm2_tokenizer, chat_mask_marks_assistant_turns) {
  const std::vector<qlora::ChatMessage> messages = {
      {"user", "Name a colour."}, {"assistant", "Blue, I think."}, {"user", "Thanks"}};
  const qlora::ChatEncoding chat = tok_->encode_chat(messages, false);
  std::vector<int32_t> marked;
  for (size_t i = 0; i < chat.ids.size(); ++i) {
    if (chat.assistant_mask[i]) marked.push_back(chat.ids[i]);
  }
  EXPECT_EQ(tok_->decode(marked), "Blue, I think.<|im_end|>");
}

TEST_F(smollm2_tokenizer, hf_json_of_same_vocab_matches) {
  // A tokenizer.json in the structure of SmolLM2's, written from the GGUF vocabulary.
  const qlora::TokenizerData data = qlora::Tokenizer::data_from_gguf(*file_);
  json vocab = json::object();
  json added = json::array();
  for (size_t id = 0; id < data.tokens.size(); ++id) {
    vocab[data.tokens[id]] = id;
    if (data.token_types[id] == qlora::TokenType::control) {
      added.push_back({{"id", id}, {"content", data.tokens[id]}, {"special", true},
                       {"lstrip", false}, {"rstrip", false}, {"single_word", false},
                       {"normalized", false}});
    }
  }
  const json root = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Digits"}, {"individual_digits", true}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                       {"use_regex", true}}})}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"unk_token", nullptr}, {"vocab", vocab}, {"merges", data.merges}}}};
  const auto dir = temp_dir("smollm2_json");
  write_text(dir / "tokenizer.json", root.dump());
  const qlora::Tokenizer tok = qlora::Tokenizer::from_hf_tokenizer_json(dir / "tokenizer.json");

  const json golden = read_json(kGoldenDir / "smollm2_ids.json");
  for (const json& c : golden["cases"]) {
    EXPECT_EQ(tok.encode(c["text"].get<std::string>(), {.parse_special = c["parse_special"].get<bool>()}),
              c["ids"].get<std::vector<int32_t>>())
        << c["name"];
  }
}

TEST_F(smollm2_tokenizer, round_trip_random_utf8) {
  std::mt19937 rng(kSeed);
  int checked = 0;
  for (int i = 0; i < kRoundTripStrings; ++i) {
    const std::string text = random_text(rng, false);
    if (std::any_of(text.begin(), text.end(), lacks_smollm2_symbol)) continue;
    ASSERT_EQ(tok_->decode(tok_->encode(text)), text) << "string " << i;
    ++checked;
  }
  EXPECT_GT(checked, kRoundTripStrings / 2);
}

}  // namespace
