// ChatML chat templates: recognising the template source, rendering conversations and encoding
// them with an assistant mask.
//
// Chat templates are Jinja programs. Instead of interpreting Jinja, the source is compared with
// the ChatML templates listed below; anything else raises NotImplemented.

#include <algorithm>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/model/tokenizer.hpp"
#include "tokenizer_impl.hpp"

namespace qlora {
namespace {

constexpr std::string_view kImStart = "<|im_start|>";
constexpr std::string_view kImEnd = "<|im_end|>";

// The message loop and generation prompt shared by the ChatML templates.
constexpr std::string_view kChatmlBody =
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

// Plain ChatML without a default system message.
constexpr std::string_view kChatmlHead = "{% for message in messages %}";

// SmolLM2-Instruct's template (HuggingFaceTB, as stored in its GGUF `tokenizer.chat_template`):
// ChatML with a default system message, whose text is between these two strings.
constexpr std::string_view kDefaultSystemHead =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n";
constexpr std::string_view kDefaultSystemTail = "<|im_end|>\n' }}{% endif %}";

// Replaces the two-character escape "\n" with a newline: templates written as JSON or Python
// source hold a newline inside the Jinja string literals either as itself or as this escape.
std::string unescape_newlines(std::string_view source) {
  std::string out;
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\\' && i + 1 < source.size() && source[i + 1] == 'n') {
      out += '\n';
      ++i;
    } else {
      out += source[i];
    }
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// One part of a rendered conversation: a ChatML marker or a run of text.
struct ChatPart {
  int32_t special_id;  // -1 for text
  std::string text;
  bool assistant;      // text of an assistant message's content, or the <|im_end|> closing it
};

}  // namespace

detail::ChatTemplateInfo detail::parse_chat_template(const std::string& source) {
  if (source.empty()) {
    raise<NotImplemented>("[chat_template] the tokenizer has no chat template, expected a ChatML "
                          "template (hint: set TokenizerData::chat_template)");
  }
  const std::string text = unescape_newlines(source);
  const std::string plain = std::string(kChatmlHead) + std::string(kChatmlBody);
  if (text == plain) return {std::nullopt};

  const std::string tail = std::string(kDefaultSystemTail) + std::string(kChatmlBody);
  if (text.size() > kDefaultSystemHead.size() + tail.size() && text.starts_with(kDefaultSystemHead) &&
      text.ends_with(tail)) {
    std::string system = text.substr(kDefaultSystemHead.size(),
                                     text.size() - kDefaultSystemHead.size() - tail.size());
    // Quotes, braces or backslashes would need Jinja's own parsing.
    if (system.find_first_of("'\"{}\\") == std::string::npos) return {std::move(system)};
  }
  raise<NotImplemented>(
      "[chat_template] unsupported chat template: got \"{:.120}...\", expected a ChatML template "
      "(hint: only plain ChatML and ChatML with a default system message, as in "
      "SmolLM2-Instruct, are supported)", source);
}

namespace {

// Renders `messages` into parts; throws NotImplemented when the template is not ChatML.
std::vector<ChatPart> render_chat(const Tokenizer::Impl& impl, const Tokenizer& tokenizer,
                                  std::span<const ChatMessage> messages,
                                  bool add_generation_prompt) {
  if (!impl.chat) raise<NotImplemented>("{}", impl.chat_error);
  const auto marker = [&](std::string_view text) {
    const std::optional<int32_t> id = tokenizer.token_id(text);
    if (!id || tokenizer.token_type(*id) != TokenType::control) {
      raise<InvalidArgument>("[chat_template] the vocabulary has no control token \"{}\", "
                             "expected one for ChatML", text);
    }
    return *id;
  };
  const int32_t im_start = marker(kImStart);
  const int32_t im_end = marker(kImEnd);

  std::vector<ChatPart> parts;
  const auto add_message = [&](const std::string& role, const std::string& content) {
    const bool assistant = role == "assistant";
    parts.push_back({im_start, std::string(kImStart), false});
    parts.push_back({-1, role + "\n", false});
    parts.push_back({-1, content, assistant});
    parts.push_back({im_end, std::string(kImEnd), assistant});
    parts.push_back({-1, "\n", false});
  };

  // The template inserts its default system message inside the loop, so only when there is
  // at least one message.
  if (impl.chat->default_system && !messages.empty() && messages.front().role != "system") {
    add_message("system", *impl.chat->default_system);
  }
  for (const ChatMessage& message : messages) add_message(message.role, message.content);
  if (add_generation_prompt) {
    parts.push_back({im_start, std::string(kImStart), false});
    parts.push_back({-1, "assistant\n", false});
  }
  return parts;
}

}  // namespace

std::string Tokenizer::apply_chat_template(std::span<const ChatMessage> messages,
                                           bool add_generation_prompt) const {
  std::string out;
  for (const ChatPart& part : render_chat(*impl_, *this, messages, add_generation_prompt)) {
    out += part.text;
  }
  return out;
}

ChatEncoding Tokenizer::encode_chat(std::span<const ChatMessage> messages,
                                    bool add_generation_prompt) const {
  const std::vector<ChatPart> parts = render_chat(*impl_, *this, messages, add_generation_prompt);
  ChatEncoding result;

  // Text between two markers is encoded as one run, as a tokenizer encoding the rendered
  // string would. `ranges` contains the byte ranges of assistant content within the run.
  std::string run;
  std::vector<std::pair<size_t, size_t>> ranges;
  std::vector<int32_t> ids;
  std::vector<uint32_t> offsets;
  const auto flush = [&] {
    ids.clear();
    offsets.clear();
    impl_->encode_text(run, false, ids, &offsets);
    for (size_t k = 0; k < ids.size(); ++k) {
      const size_t first = offsets[k];
      const size_t last = k + 1 < ids.size() ? offsets[k + 1] : run.size();
      const bool assistant = std::any_of(ranges.begin(), ranges.end(), [&](const auto& r) {
        return first < r.second && r.first < last;
      });
      result.ids.push_back(ids[k]);
      result.assistant_mask.push_back(assistant ? 1 : 0);
    }
    run.clear();
    ranges.clear();
  };

  for (const ChatPart& part : parts) {
    if (part.special_id >= 0) {
      flush();
      result.ids.push_back(part.special_id);
      result.assistant_mask.push_back(part.assistant ? 1 : 0);
      continue;
    }
    if (part.assistant && !part.text.empty()) {
      ranges.emplace_back(run.size(), run.size() + part.text.size());
    }
    run += part.text;
  }
  flush();
  return result;
}

}  // namespace qlora
