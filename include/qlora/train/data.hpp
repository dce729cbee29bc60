// Training data: documents read from plain text or JSONL, tokenized, split into training and
// held-out sets, and packed into fixed-length rows.
//
// Formats (chosen by DataFormat, or by the file extension with DataFormat::automatic):
// - text: documents separated by a separator line (by default a blank line; "%" for
//   fortune files); the loss covers every token.
// - JSONL with a "text" field: one document per line; the loss covers every token.
// - JSONL with "prompt" and "completion": the loss covers the completion only.
// - JSONL with "messages" (a list of {"role", "content"}): rendered through the model's chat
//   template; the loss covers assistant turns only.
//
// Packing: documents, each followed by EOS, are laid end to end and cut into rows of
// seq_len tokens. Every token carries the id of its document, so attention and positions
// restart at each document boundary, and no token is trained to predict the next document.
// A document longer than a row continues in the next row as a new segment.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "qlora/model/llama.hpp"
#include "qlora/model/tokenizer.hpp"

namespace qlora {

enum class DataFormat { automatic, text, jsonl };

/// One tokenized document: `loss_mask[i]` is 1 when token i is a training target.
struct Document {
  std::vector<std::int32_t> ids;
  std::vector<std::uint8_t> loss_mask;
  std::uint64_t content_hash = 0;  ///< FNV-1a of the raw text, for the held-out split
};

struct DataOptions {
  DataFormat format = DataFormat::automatic;
  /// Separator line of plain-text files; empty means one or more blank lines.
  std::string text_separator;
  /// Share of documents held out for evaluation, chosen by a hash of their content so that
  /// the split does not change when documents are added or reordered.
  double eval_fraction = 0.1;
  std::uint64_t split_seed = 0;
  bool append_eos = true;  ///< end every document with the tokenizer's EOS
};

/// Reads and tokenizes every document of `path`. Throws qlora::IoError when the file cannot
/// be read and qlora::FormatError naming the line for malformed JSONL.
std::vector<Document> load_documents(const std::filesystem::path& path,
                                     const Tokenizer& tokenizer, const DataOptions& options);

/// Splits documents into training and held-out sets by their content hash.
void split_documents(std::vector<Document> documents, const DataOptions& options,
                     std::vector<Document>& train, std::vector<Document>& eval);

/// Keeps documents in the order of their content hash until `max_tokens` tokens are reached
/// (the document that crosses the limit is dropped); 0 keeps all, in hash order. Held-out
/// sets capped this way stay the same when documents are added elsewhere or reordered.
std::vector<Document> first_documents_by_hash(std::vector<Document> documents,
                                              std::int64_t max_tokens);

/// A packed row of seq_len tokens with next-token targets (kIgnoreIndex where no loss).
struct PackedRow {
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;
  std::vector<std::int32_t> segment_ids;
  std::int64_t n_targets = 0;  ///< tokens whose target counts
};

/// Packs documents, in order, into rows of `seq_len` tokens (the last row is padded with
/// pad or EOS tokens that carry no loss).
std::vector<PackedRow> pack_documents(const std::vector<Document>& documents,
                                      std::int64_t seq_len, std::int32_t pad_id);

/// Builds a LlamaBatch [rows.size(), seq_len] from packed rows.
LlamaBatch make_batch(const std::vector<const PackedRow*>& rows);

}  // namespace qlora
