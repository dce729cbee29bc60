#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include <fmt/format.h>

#include "commands.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/train/data.hpp"

namespace qlora::cli {
namespace {

LlamaModel load_for_inference(const ModelSource& source, const QuantOptions& quant,
                              const std::string& adapter) {
  if (!adapter.empty()) return load_model_with_adapter(source, quant, adapter);
  LlamaLoadOptions load;
  load.projections = quant.to_config();
  return load_llama(source, load);
}

// Samples a token from logits with temperature, top-k and top-p (nucleus) filtering;
// temperature 0 picks the most likely token.
std::int32_t sample(const RowVectorF& logits, const GenerateOptions& o, Rng& rng) {
  const auto n = static_cast<std::size_t>(logits.size());
  if (o.temperature <= 0.0f) {
    Eigen::Index best = 0;
    logits.maxCoeff(&best);
    return static_cast<std::int32_t>(best);
  }
  std::vector<std::int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  const std::size_t k = o.top_k > 0 ? std::min(n, static_cast<std::size_t>(o.top_k)) : n;
  std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(k), ids.end(),
                    [&logits](std::int32_t a, std::int32_t b) { return logits(a) > logits(b); });
  ids.resize(k);

  std::vector<double> probs(k);
  const double max_logit = logits(ids[0]);
  double total = 0.0;
  for (std::size_t i = 0; i < k; ++i) {
    probs[i] = std::exp((logits(ids[i]) - max_logit) / static_cast<double>(o.temperature));
    total += probs[i];
  }
  // Keep the smallest prefix whose probability reaches top_p.
  std::size_t keep = k;
  if (o.top_p > 0.0f && o.top_p < 1.0f) {
    double cumulative = 0.0;
    for (std::size_t i = 0; i < k; ++i) {
      cumulative += probs[i] / total;
      if (cumulative >= static_cast<double>(o.top_p)) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept_total = 0.0;
  for (std::size_t i = 0; i < keep; ++i) kept_total += probs[i];
  double u = rng.uniform_double() * kept_total;
  for (std::size_t i = 0; i < keep; ++i) {
    u -= probs[i];
    if (u <= 0.0) return ids[i];
  }
  return ids[keep - 1];
}

// Length of the longest prefix of `text` that does not end inside a UTF-8 sequence.
std::size_t complete_utf8_prefix(const std::string& text) {
  std::size_t end = text.size();
  std::size_t i = end;
  while (i > 0 && end - i < 4) {
    const auto c = static_cast<unsigned char>(text[i - 1]);
    if ((c & 0xc0) != 0x80) {
      std::size_t need = 1;  // bytes of the sequence that this lead byte starts
      if (c >= 0xf0) {
        need = 4;
      } else if (c >= 0xe0) {
        need = 3;
      } else if (c >= 0xc0) {
        need = 2;
      }
      return (end - (i - 1) >= need) ? end : i - 1;
    }
    --i;
  }
  return end;
}

}  // namespace

int run_eval(const EvalOptions& o) {
  if (o.threads > 0) set_num_threads(o.threads);
  const ModelSource source(o.model);
  const Tokenizer tokenizer = source.tokenizer();
  DataOptions data;
  data.text_separator = o.separator;
  data.eval_fraction = o.eval_fraction;
  std::vector<Document> train_docs, eval_docs;
  std::vector<Document> docs = load_documents(o.data, tokenizer, data);
  if (o.all_documents) {
    eval_docs = std::move(docs);
  } else {
    split_documents(std::move(docs), data, train_docs, eval_docs);
  }
  QLORA_CHECK_ARG(!eval_docs.empty(), "eval: no held-out documents in {} (hint: pass --all)",
                  o.data);
  const std::int32_t pad = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : tokenizer.eos_id();
  const std::vector<PackedRow> rows = pack_documents(eval_docs, o.seq_len, pad);

  LlamaModel model = load_for_inference(source, o.quant, o.adapter);
  double sum = 0.0;
  std::int64_t tokens = 0;
  for (std::size_t begin = 0; begin < rows.size(); begin += static_cast<std::size_t>(o.batch)) {
    std::vector<const PackedRow*> batch;
    for (std::size_t i = begin; i < std::min(rows.size(), begin + static_cast<std::size_t>(o.batch)); ++i) {
      batch.push_back(&rows[i]);
    }
    const LlamaLoss loss = model.loss(make_batch(batch));
    sum += loss.sum;
    tokens += loss.n_tokens;
  }
  const double nll = sum / static_cast<double>(std::max<std::int64_t>(1, tokens));
  fmt::print("{} documents, {} tokens: loss {:.4f}, perplexity {:.3f}{}\n", eval_docs.size(),
             tokens, nll, std::exp(nll), o.adapter.empty() ? "" : " (with adapter)");
  return 0;
}

int run_generate(const GenerateOptions& o) {
  if (o.threads > 0) set_num_threads(o.threads);
  const ModelSource source(o.model);
  const Tokenizer tokenizer = source.tokenizer();
  LlamaModel model = load_for_inference(source, o.quant, o.adapter);

  std::vector<std::int32_t> prompt;
  if (o.chat) {
    std::vector<ChatMessage> messages;
    if (!o.system.empty()) messages.push_back({"system", o.system});
    messages.push_back({"user", o.prompt});
    prompt = tokenizer.encode_chat(messages, /*add_generation_prompt=*/true).ids;
  } else {
    prompt = tokenizer.encode(o.prompt, {.add_special = true});
  }
  QLORA_CHECK_ARG(!prompt.empty(), "generate: the prompt is empty (hint: pass --prompt TEXT)");

  const std::int64_t capacity = static_cast<std::int64_t>(prompt.size()) + o.max_tokens;
  LlamaKvCache cache(model.config(), capacity);
  Rng rng(o.seed);
  RowVectorF logits = model.prefill(cache, prompt);
  std::vector<std::int32_t> generated;
  std::size_t printed = 0;
  const std::int32_t end_of_turn = tokenizer.token_id("<|im_end|>").value_or(-1);
  for (int i = 0; i < o.max_tokens; ++i) {
    const std::int32_t next = sample(logits, o, rng);
    if (next == tokenizer.eos_id() || next == end_of_turn) break;
    generated.push_back(next);
    // Stream the text decoded so far, holding back an incomplete UTF-8 character.
    const std::string text = tokenizer.decode(generated, {.skip_special = true});
    const std::size_t ready = complete_utf8_prefix(text);
    if (ready > printed) {
      fmt::print("{}", text.substr(printed, ready - printed));
      std::fflush(stdout);
      printed = ready;
    }
    if (i + 1 < o.max_tokens) logits = model.forward_next(cache, next);
  }
  const std::string text = tokenizer.decode(generated, {.skip_special = true});
  if (text.size() > printed) fmt::print("{}", text.substr(printed));
  fmt::print("\n");
  return 0;
}

}  // namespace qlora::cli
