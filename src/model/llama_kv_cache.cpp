// The KV cache and incremental decoding: prefill appends a prompt, forward_next one token.

#include "llama_impl.hpp"
#include "qlora/core/error.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora {

LlamaKvCache::LlamaKvCache(const LlamaConfig& config, std::int64_t capacity)
    : capacity_(capacity), kv_dim_(config.num_key_value_heads * config.head_dim) {
  QLORA_CHECK_ARG(capacity > 0, "[LlamaKvCache] capacity must be positive: got {}", capacity);
  QLORA_CHECK_ARG(config.num_hidden_layers > 0 && kv_dim_ > 0,
                  "[LlamaKvCache] config has {} layers and KV width {}, expected both positive",
                  config.num_hidden_layers, kv_dim_);
  keys_.assign(static_cast<std::size_t>(config.num_hidden_layers),
               RowMatrixF::Zero(capacity, kv_dim_));
  values_ = keys_;
}

void LlamaKvCache::truncate(std::int64_t n_tokens) {
  QLORA_CHECK_ARG(n_tokens >= 0 && n_tokens <= size_,
                  "[LlamaKvCache::truncate] got {} tokens, expected 0 <= n <= size = {}",
                  n_tokens, size_);
  size_ = n_tokens;
}

RowVectorF LlamaModel::prefill(LlamaKvCache& cache, std::span<const std::int32_t> tokens) const {
  const auto n = static_cast<std::int64_t>(tokens.size());
  QLORA_CHECK_ARG(n > 0, "[LlamaModel::prefill] no tokens given");
  QLORA_CHECK_ARG(std::cmp_equal(cache.keys_.size(), layers_.size()) &&
                      cache.kv_dim_ == config_.num_key_value_heads * config_.head_dim,
                  "[LlamaModel::prefill] cache has {} layers of width {}, the model {} of width "
                  "{} (hint: build the cache from this model's config)",
                  cache.keys_.size(), cache.kv_dim_, layers_.size(),
                  config_.num_key_value_heads * config_.head_dim);
  QLORA_CHECK_ARG(cache.size_ + n <= cache.capacity_,
                  "[LlamaModel::prefill] cache full: holds {} of {} tokens, got {} more (hint: "
                  "build a larger LlamaKvCache)",
                  cache.size_, cache.capacity_, n);

  LlamaBatch batch;
  batch.seq_len = n;
  batch.tokens.assign(tokens.begin(), tokens.end());
  check_batch(batch, false);

  std::vector<std::int32_t> positions(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    positions[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(cache.size_ + i);
  }
  detail::LlamaLayerContext context;
  context.dims = detail::llama_dims(config_);
  context.seq_len = n;
  context.positions = positions;
  context.inv_freq = inv_freq_;
  context.kv_start = cache.size_;

  RowMatrixF hidden = embed(batch);
  RowMatrixF next;
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    context.layer = static_cast<int>(l);
    context.kv_keys = &cache.keys_[l];
    context.kv_values = &cache.values_[l];
    detail::layer_forward(layers_[l], context, hidden, next, nullptr);
    std::swap(hidden, next);
  }
  cache.size_ += n;

  // Only the last position's logits are needed.
  RowMatrixF normed;
  detail::rms_norm_forward(hidden.bottomRows(1), norm_, config_.rms_norm_eps, normed, nullptr);
  RowMatrixF logits;
  detail::head_forward(output_table(), normed, logits, ActivationPrecision::automatic);
  return logits.row(0);
}

RowVectorF LlamaModel::forward_next(LlamaKvCache& cache, std::int32_t token) const {
  return prefill(cache, std::span<const std::int32_t>(&token, 1));
}

}  // namespace qlora
