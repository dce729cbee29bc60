#include "qlora/train/data.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"

namespace qlora {
namespace {

std::uint64_t fnv1a(std::string_view text) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (char c : text) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string trim_newlines(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  std::size_t start = 0;
  while (start < text.size() && (text[start] == '\n' || text[start] == '\r')) ++start;
  return text.substr(start);
}

Document text_document(std::string_view text, const Tokenizer& tokenizer, bool append_eos) {
  Document doc;
  doc.ids = tokenizer.encode(text, {.add_special = true, .parse_special = false});
  if (append_eos && tokenizer.eos_id() >= 0) doc.ids.push_back(tokenizer.eos_id());
  doc.loss_mask.assign(doc.ids.size(), 1);
  doc.content_hash = fnv1a(text);
  return doc;
}

// Splits plain text into documents at separator lines (blank lines when `separator` is
// empty). Lines keep their newlines, except the one before a separator.
std::vector<std::string> split_text(std::istream& in, const std::string& separator) {
  std::vector<std::string> documents;
  std::string current;
  std::string line;
  const auto flush = [&] {
    std::string doc = trim_newlines(std::move(current));
    if (!doc.empty()) documents.push_back(std::move(doc));
    current.clear();
  };
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const bool is_separator = separator.empty()
                                  ? line.find_first_not_of(" \t") == std::string::npos
                                  : line == separator;
    if (is_separator) {
      flush();
      continue;
    }
    current += line;
    current += '\n';
  }
  flush();
  return documents;
}

Document jsonl_document(const nlohmann::json& record, const Tokenizer& tokenizer,
                        bool append_eos, const std::string& where) {
  if (record.contains("text")) {
    if (!record["text"].is_string()) {
      raise<FormatError>("[load_documents] {}: \"text\" must be a string", where);
    }
    return text_document(record["text"].get<std::string>(), tokenizer, append_eos);
  }

  if (record.contains("prompt") || record.contains("completion")) {
    if (!record.contains("prompt") || !record.contains("completion") ||
        !record["prompt"].is_string() || !record["completion"].is_string()) {
      raise<FormatError>("[load_documents] {}: expected string fields \"prompt\" and "
                         "\"completion\" together",
                         where);
    }
    const std::string prompt = record["prompt"].get<std::string>();
    const std::string completion = record["completion"].get<std::string>();
    Document doc;
    doc.ids = tokenizer.encode(prompt, {.add_special = true, .parse_special = false});
    const std::size_t n_prompt = doc.ids.size();
    const auto completion_ids =
        tokenizer.encode(completion, {.add_special = false, .parse_special = false});
    doc.ids.insert(doc.ids.end(), completion_ids.begin(), completion_ids.end());
    if (append_eos && tokenizer.eos_id() >= 0) doc.ids.push_back(tokenizer.eos_id());
    doc.loss_mask.assign(doc.ids.size(), 1);
    std::fill(doc.loss_mask.begin(), doc.loss_mask.begin() + static_cast<std::ptrdiff_t>(n_prompt),
              std::uint8_t{0});
    doc.content_hash = fnv1a(prompt + '\x1f' + completion);
    return doc;
  }

  if (record.contains("messages")) {
    if (!record["messages"].is_array()) {
      raise<FormatError>("[load_documents] {}: \"messages\" must be a list", where);
    }
    std::vector<ChatMessage> messages;
    std::string joined;
    for (const auto& m : record["messages"]) {
      if (!m.is_object() || !m.contains("role") || !m.contains("content") ||
          !m["role"].is_string() || !m["content"].is_string()) {
        raise<FormatError>("[load_documents] {}: each message needs string \"role\" and "
                           "\"content\"",
                           where);
      }
      messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
      joined += messages.back().role + '\x1f' + messages.back().content + '\x1e';
    }
    ChatEncoding encoded = tokenizer.encode_chat(messages, false);
    Document doc;
    doc.ids = std::move(encoded.ids);
    doc.loss_mask = std::move(encoded.assistant_mask);
    doc.content_hash = fnv1a(joined);
    return doc;
  }

  raise<FormatError>("[load_documents] {}: expected a \"text\", \"prompt\"/\"completion\" or "
                     "\"messages\" field",
                     where);
}

}  // namespace

std::vector<Document> load_documents(const std::filesystem::path& path,
                                     const Tokenizer& tokenizer, const DataOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    raise<IoError>("[load_documents] cannot open {} (hint: check the path passed as the data "
                   "file)",
                   path.string());
  }
  DataFormat format = options.format;
  if (format == DataFormat::automatic) {
    const std::string ext = path.extension().string();
    format = (ext == ".jsonl" || ext == ".json") ? DataFormat::jsonl : DataFormat::text;
  }

  std::vector<Document> documents;
  if (format == DataFormat::text) {
    for (const std::string& text : split_text(in, options.text_separator)) {
      documents.push_back(text_document(text, tokenizer, options.append_eos));
    }
  } else {
    std::string line;
    std::int64_t line_number = 0;
    while (std::getline(in, line)) {
      ++line_number;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = fmt::format("{} line {}", path.string(), line_number);
      nlohmann::json record;
      try {
        record = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        raise<FormatError>("[load_documents] {}: invalid JSON: {}", where, e.what());
      }
      if (!record.is_object()) {
        raise<FormatError>("[load_documents] {}: expected a JSON object per line", where);
      }
      documents.push_back(jsonl_document(record, tokenizer, options.append_eos, where));
    }
  }
  if (documents.empty()) {
    raise<FormatError>("[load_documents] {} contains no documents", path.string());
  }
  return documents;
}

void split_documents(std::vector<Document> documents, const DataOptions& options,
                     std::vector<Document>& train, std::vector<Document>& eval) {
  QLORA_CHECK_ARG(options.eval_fraction >= 0.0 && options.eval_fraction < 1.0,
                  "[split_documents] eval_fraction must be in [0, 1): got {}",
                  options.eval_fraction);
  train.clear();
  eval.clear();
  for (Document& doc : documents) {
    // Map the hash to [0, 1): a document's side depends on its text alone.
    const std::uint64_t h = mix_seed(doc.content_hash, options.split_seed);
    const double u = static_cast<double>(h >> 11) * 0x1p-53;
    (u < options.eval_fraction ? eval : train).push_back(std::move(doc));
  }
}

std::vector<Document> first_documents_by_hash(std::vector<Document> documents,
                                              std::int64_t max_tokens) {
  QLORA_CHECK_ARG(max_tokens >= 0, "[first_documents_by_hash] max_tokens must be >= 0: got {}",
                  max_tokens);
  std::stable_sort(documents.begin(), documents.end(), [](const Document& a, const Document& b) {
    return a.content_hash < b.content_hash;
  });
  if (max_tokens == 0) return documents;
  std::int64_t total = 0;
  std::size_t keep = 0;
  while (keep < documents.size() &&
         total + static_cast<std::int64_t>(documents[keep].ids.size()) <= max_tokens) {
    total += static_cast<std::int64_t>(documents[keep].ids.size());
    ++keep;
  }
  documents.resize(keep);
  return documents;
}

std::vector<PackedRow> pack_documents(const std::vector<Document>& documents,
                                      std::int64_t seq_len, std::int32_t pad_id) {
  QLORA_CHECK_ARG(seq_len >= 2, "[pack_documents] seq_len must be at least 2: got {}", seq_len);
  std::vector<PackedRow> rows;
  PackedRow row;
  std::int32_t segment = 0;
  const auto finish_row = [&] {
    while (static_cast<std::int64_t>(row.tokens.size()) < seq_len) {
      row.tokens.push_back(pad_id);
      row.targets.push_back(kIgnoreIndex);
      row.segment_ids.push_back(segment);
    }
    rows.push_back(std::move(row));
    row = PackedRow{};
    segment = 0;
  };

  for (const Document& doc : documents) {
    const auto n = static_cast<std::int64_t>(doc.ids.size());
    for (std::int64_t i = 0; i < n; ++i) {
      if (static_cast<std::int64_t>(row.tokens.size()) == seq_len) finish_row();
      row.tokens.push_back(doc.ids[static_cast<std::size_t>(i)]);
      row.segment_ids.push_back(segment);
      // The target is the next token of the same document, when it is a training target
      // and lies in this row.
      const bool next_in_row = static_cast<std::int64_t>(row.tokens.size()) < seq_len;
      const bool has_target = i + 1 < n && next_in_row &&
                              doc.loss_mask[static_cast<std::size_t>(i + 1)] != 0;
      row.targets.push_back(has_target ? doc.ids[static_cast<std::size_t>(i + 1)] : kIgnoreIndex);
      if (has_target) ++row.n_targets;
    }
    ++segment;
  }
  if (!row.tokens.empty()) finish_row();
  return rows;
}

LlamaBatch make_batch(const std::vector<const PackedRow*>& rows) {
  QLORA_CHECK_ARG(!rows.empty(), "[make_batch] no rows");
  LlamaBatch batch;
  batch.batch_size = static_cast<std::int64_t>(rows.size());
  batch.seq_len = static_cast<std::int64_t>(rows.front()->tokens.size());
  for (const PackedRow* row : rows) {
    QLORA_CHECK_ARG(static_cast<std::int64_t>(row->tokens.size()) == batch.seq_len,
                    "[make_batch] rows differ in length: {} vs {}", row->tokens.size(),
                    batch.seq_len);
    batch.tokens.insert(batch.tokens.end(), row->tokens.begin(), row->tokens.end());
    batch.targets.insert(batch.targets.end(), row->targets.begin(), row->targets.end());
    batch.segment_ids.insert(batch.segment_ids.end(), row->segment_ids.begin(),
                             row->segment_ids.end());
  }
  return batch;
}

}  // namespace qlora
