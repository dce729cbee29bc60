// LlamaModel: construction and quantization of the weights, adapters, and the training and
// evaluation passes over a batch.

#include <cmath>
#include <utility>

#include "llama_impl.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora {
namespace detail {

LlamaDims llama_dims(const LlamaConfig& config) {
  return {.hidden = config.hidden_size,
          .n_heads = config.num_attention_heads,
          .n_kv_heads = config.num_key_value_heads,
          .head_dim = config.head_dim,
          .intermediate = config.intermediate_size,
          .rms_norm_eps = config.rms_norm_eps};
}

}  // namespace detail

namespace {

using detail::LlamaLayerContext;
using detail::LlamaTable;

void check_matrix(const RowMatrixF& m, std::int64_t rows, std::int64_t cols,
                  const std::string& name) {
  QLORA_CHECK_ARG(m.rows() == rows && m.cols() == cols,
                  "[LlamaModel] weight {} has shape [{}, {}], expected [{}, {}] from the config",
                  name, m.rows(), m.cols(), rows, cols);
}

void check_vector(const VectorF& v, std::int64_t size, const std::string& name) {
  QLORA_CHECK_ARG(v.size() == size, "[LlamaModel] weight {} has {} elements, expected {}", name,
                  v.size(), size);
}

LlamaTable make_table(RowMatrixF weights, const std::optional<QuantConfig>& quant) {
  LlamaTable table;
  if (quant) {
    table.quantized = quantize(weights, *quant);
  } else {
    table.dense = std::move(weights);
  }
  return table;
}

// RoPE inverse frequencies theta^(-2i / head_dim), divided by the factor of linear scaling.
std::vector<double> rope_inv_freq(const LlamaConfig& config) {
  double factor = 1.0;
  if (config.rope_scaling.type == "linear") {
    factor = config.rope_scaling.factor;
  } else if (config.rope_scaling.type != "none") {
    raise<NotImplemented>(
        "[LlamaModel] RoPE scaling '{}' is not supported: expected none or linear",
        config.rope_scaling.type);
  }
  std::vector<double> inv_freq(static_cast<std::size_t>(config.head_dim / 2));
  for (std::size_t i = 0; i < inv_freq.size(); ++i) {
    const double exponent = 2.0 * static_cast<double>(i) / static_cast<double>(config.head_dim);
    inv_freq[i] = 1.0 / (std::pow(static_cast<double>(config.rope_theta), exponent) * factor);
  }
  return inv_freq;
}

// Positions 0, 1, ... per row that restart wherever the segment id changes.
std::vector<std::int32_t> default_positions(const LlamaBatch& batch) {
  std::vector<std::int32_t> positions(static_cast<std::size_t>(batch.n_tokens()));
  for (std::int64_t b = 0; b < batch.batch_size; ++b) {
    std::int32_t position = 0;
    for (std::int64_t t = 0; t < batch.seq_len; ++t) {
      const auto i = static_cast<std::size_t>(b * batch.seq_len + t);
      if (t > 0 && !batch.segment_ids.empty() &&
          batch.segment_ids[i] != batch.segment_ids[i - 1]) {
        position = 0;
      }
      positions[i] = position++;
    }
  }
  return positions;
}

LlamaLayerContext make_context(const LlamaConfig& config, std::int64_t batch_size,
                               std::int64_t seq_len, std::span<const std::int32_t> positions,
                               std::span<const std::int32_t> segment_ids,
                               std::span<const double> inv_freq) {
  LlamaLayerContext context;
  context.dims = detail::llama_dims(config);
  context.batch_size = batch_size;
  context.seq_len = seq_len;
  context.positions = positions;
  context.segment_ids = segment_ids;
  context.inv_freq = inv_freq;
  return context;
}

}  // namespace

LlamaTrainState::LlamaTrainState() = default;
LlamaTrainState::~LlamaTrainState() = default;
LlamaTrainState::LlamaTrainState(LlamaTrainState&&) noexcept = default;
LlamaTrainState& LlamaTrainState::operator=(LlamaTrainState&&) noexcept = default;

const LlamaLoss& LlamaTrainState::loss() const {
  QLORA_CHECK_ARG(cache_ != nullptr,
                  "[LlamaTrainState::loss] the state is empty (hint: call LlamaModel::forward)");
  return cache_->loss;
}

LlamaModel::LlamaModel(LlamaConfig config, LlamaWeights weights, const LlamaLoadOptions& options)
    : config_(std::move(config)), options_(options) {
  config_.validate();
  QLORA_CHECK_ARG(config_.head_dim % 2 == 0,
                  "[LlamaModel] head_dim must be even for RoPE: got {}", config_.head_dim);
  inv_freq_ = rope_inv_freq(config_);

  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t q_dim = config_.num_attention_heads * config_.head_dim;
  const std::int64_t kv_dim = config_.num_key_value_heads * config_.head_dim;
  const std::int64_t inter = config_.intermediate_size;
  check_matrix(weights.embed_tokens, config_.vocab_size, hidden, "embed_tokens");
  check_vector(weights.norm, hidden, "norm");
  QLORA_CHECK_ARG(std::cmp_equal(weights.layers.size(), config_.num_hidden_layers),
                  "[LlamaModel] got weights for {} layers, expected num_hidden_layers = {}",
                  weights.layers.size(), config_.num_hidden_layers);
  if (weights.lm_head.size() > 0) {
    check_matrix(weights.lm_head, config_.vocab_size, hidden, "lm_head");
  }

  // The shapes of the seven projections, in LlamaProjection order.
  const std::array<std::pair<std::int64_t, std::int64_t>, kLlamaProjectionCount> shapes = {{
      {q_dim, hidden}, {kv_dim, hidden}, {kv_dim, hidden}, {hidden, q_dim},
      {inter, hidden}, {inter, hidden}, {hidden, inter}}};

  layers_.resize(weights.layers.size());
  for (std::size_t l = 0; l < weights.layers.size(); ++l) {
    LlamaLayerWeights& source = weights.layers[l];
    detail::LlamaLayer& layer = layers_[l];
    for (LlamaProjection p : kLlamaProjections) {
      const auto index = static_cast<std::size_t>(p);
      RowMatrixF& w = source.projection(p);
      check_matrix(w, shapes[index].first, shapes[index].second,
                   llama_module_key(static_cast<int>(l), p));
      if (options_.projections) {
        layer.proj[index].lora = QuantLoraLinear(quantize(w, *options_.projections));
      } else {
        layer.proj[index].dense = std::move(w);
      }
      w = RowMatrixF();  // release the float copy as soon as it is quantized
    }
    check_vector(source.input_layernorm, hidden, fmt::format("layers.{}.input_layernorm", l));
    check_vector(source.post_attention_layernorm, hidden,
                 fmt::format("layers.{}.post_attention_layernorm", l));
    layer.input_layernorm = std::move(source.input_layernorm);
    layer.post_attention_layernorm = std::move(source.post_attention_layernorm);
  }

  norm_ = std::move(weights.norm);
  embed_tokens_ = make_table(std::move(weights.embed_tokens), options_.embeddings);
  if (weights.lm_head.size() > 0) {
    lm_head_ = make_table(std::move(weights.lm_head), options_.embeddings);
  }
}

LlamaModel LlamaModel::from_gguf(const GgufFile& file, const LlamaLoadOptions& options) {
  LlamaConfig config = LlamaConfig::from_gguf(file);
  LlamaWeights weights = load_llama_gguf_weights(file, config);
  return LlamaModel(std::move(config), std::move(weights), options);
}

void LlamaModel::add_adapter(const std::string& name, const LoraConfig& config,
                             std::uint64_t seed) {
  if (!options_.projections) {
    raise<NotImplemented>(
        "[LlamaModel::add_adapter] adapter '{}' needs quantized projections, but this model "
        "keeps them fp32 (hint: load with LlamaLoadOptions::projections set)",
        name);
  }
  config.validate();
  int n_added = 0;
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    for (LlamaProjection p : kLlamaProjections) {
      const int layer = static_cast<int>(l);
      if (!lora_targets_module(config, llama_module_key(layer, p), layer)) continue;
      const std::uint64_t projection_seed =
          mix_seed(mix_seed(seed, l), static_cast<std::uint64_t>(p));
      layers_[l].proj[static_cast<std::size_t>(p)].lora.add_adapter(name, config,
                                                                    projection_seed);
      ++n_added;
    }
  }
  QLORA_CHECK_ARG(n_added > 0,
                  "[LlamaModel::add_adapter] adapter '{}' targets no projection: target_modules "
                  "has {} entries (hint: use names such as q_proj or all-linear)",
                  name, config.target_modules.size());
}

void LlamaModel::remove_adapter(const std::string& name) {
  for (const LlamaProjectionRef& ref : projections()) {
    if (ref.linear->has_adapter(name)) ref.linear->remove_adapter(name);
  }
}

void LlamaModel::set_active_adapters(const std::vector<std::string>& names) {
  for (const LlamaProjectionRef& ref : projections()) {
    std::vector<std::string> held;
    for (const std::string& name : names) {
      if (ref.linear->has_adapter(name)) held.push_back(name);
    }
    ref.linear->set_active_adapters(std::move(held));
  }
}

void LlamaModel::set_adapters_disabled(bool disabled) {
  for (const LlamaProjectionRef& ref : projections()) ref.linear->set_adapters_disabled(disabled);
}

std::vector<LlamaProjectionRef> LlamaModel::projections() {
  std::vector<LlamaProjectionRef> refs;
  if (!options_.projections) return refs;
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    for (LlamaProjection p : kLlamaProjections) {
      const int layer = static_cast<int>(l);
      refs.push_back({llama_module_key(layer, p), layer, p,
                      &layers_[l].proj[static_cast<std::size_t>(p)].lora});
    }
  }
  return refs;
}

QuantLoraLinear& LlamaModel::projection(int layer, LlamaProjection which) {
  QLORA_CHECK_ARG(layer >= 0 && std::cmp_less(layer, layers_.size()),
                  "[LlamaModel::projection] layer out of range: got {}, expected 0 <= layer < {}",
                  layer, layers_.size());
  QLORA_CHECK_ARG(options_.projections.has_value(),
                  "[LlamaModel::projection] this model keeps its projections fp32, so it has no "
                  "QuantLoraLinear (hint: load with LlamaLoadOptions::projections set)");
  return layers_[static_cast<std::size_t>(layer)].proj[static_cast<std::size_t>(which)].lora;
}

void LlamaModel::zero_grad() {
  for (const LlamaProjectionRef& ref : projections()) ref.linear->zero_grad();
}

void LlamaModel::check_batch(const LlamaBatch& batch, bool needs_targets) const {
  const std::int64_t n = batch.n_tokens();
  QLORA_CHECK_ARG(batch.batch_size > 0 && batch.seq_len > 0,
                  "[LlamaModel] batch shape must be positive: got batch_size={}, seq_len={}",
                  batch.batch_size, batch.seq_len);
  const auto check_size = [&](std::size_t size, const char* field) {
    QLORA_CHECK_ARG(size == 0 || std::cmp_equal(size, n),
                    "[LlamaModel] batch.{} has {} entries, expected batch_size * seq_len = {} or "
                    "none",
                    field, size, n);
  };
  check_size(batch.tokens.size(), "tokens");
  check_size(batch.positions.size(), "positions");
  check_size(batch.segment_ids.size(), "segment_ids");
  check_size(batch.targets.size(), "targets");
  check_size(batch.loss_mask.size(), "loss_mask");

  if (batch.tokens.empty()) {
    QLORA_CHECK_ARG(batch.inputs_embeds.rows() == n &&
                        batch.inputs_embeds.cols() == config_.hidden_size,
                    "[LlamaModel] batch has no tokens and inputs_embeds is [{}, {}], expected "
                    "[{}, {}] (hint: set batch.tokens or batch.inputs_embeds)",
                    batch.inputs_embeds.rows(), batch.inputs_embeds.cols(), n,
                    config_.hidden_size);
  }
  for (std::size_t i = 0; i < batch.tokens.size(); ++i) {
    QLORA_CHECK_ARG(batch.tokens[i] >= 0 && batch.tokens[i] < config_.vocab_size,
                    "[LlamaModel] token id out of range at index {}: got {}, expected 0 <= id < "
                    "vocab_size = {}",
                    i, batch.tokens[i], config_.vocab_size);
  }
  for (std::size_t i = 0; i < batch.positions.size(); ++i) {
    QLORA_CHECK_ARG(batch.positions[i] >= 0,
                    "[LlamaModel] negative position at index {}: got {}", i, batch.positions[i]);
  }
  if (needs_targets) {
    QLORA_CHECK_ARG(!batch.targets.empty(),
                    "[LlamaModel] the loss needs batch.targets: got none, expected {} ids "
                    "(hint: use kIgnoreIndex for tokens without loss)",
                    n);
  }
  for (std::size_t i = 0; i < batch.targets.size(); ++i) {
    const std::int32_t t = batch.targets[i];
    QLORA_CHECK_ARG(t == kIgnoreIndex || (t >= 0 && t < config_.vocab_size),
                    "[LlamaModel] target id out of range at index {}: got {}, expected 0 <= id "
                    "< {} or kIgnoreIndex ({})",
                    i, t, config_.vocab_size, kIgnoreIndex);
  }
}

RowMatrixF LlamaModel::embed(const LlamaBatch& batch) const {
  if (batch.tokens.empty()) return batch.inputs_embeds;
  const std::int64_t n = batch.n_tokens();
  RowMatrixF hidden(n, config_.hidden_size);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t token = batch.tokens[static_cast<std::size_t>(i)];
    if (embed_tokens_.quantized) {
      dequantize_rows(*embed_tokens_.quantized, token, token + 1, hidden.row(i).data());
    } else {
      hidden.row(i) = embed_tokens_.dense.row(token);
    }
  }
  return hidden;
}

const detail::LlamaTable& LlamaModel::output_table() const {
  const bool untied = lm_head_.dense.size() > 0 || lm_head_.quantized.has_value();
  return untied ? lm_head_ : embed_tokens_;
}

RowMatrixF LlamaModel::final_hidden(const LlamaBatch& batch,
                                    ActivationPrecision precision) const {
  const std::vector<std::int32_t> positions =
      batch.positions.empty() ? default_positions(batch) : batch.positions;
  LlamaLayerContext context = make_context(config_, batch.batch_size, batch.seq_len, positions,
                                           batch.segment_ids, inv_freq_);
  context.precision = precision;
  RowMatrixF hidden = embed(batch);
  RowMatrixF next;
  for (const detail::LlamaLayer& layer : layers_) {
    detail::layer_forward(layer, context, hidden, next, nullptr);
    std::swap(hidden, next);
  }
  RowMatrixF normed;
  detail::rms_norm_forward(hidden, norm_, config_.rms_norm_eps, normed, nullptr);
  return normed;
}

RowMatrixF LlamaModel::logits(const LlamaBatch& batch, ActivationPrecision precision) const {
  check_batch(batch, false);
  RowMatrixF out;
  detail::head_forward(output_table(), final_hidden(batch, precision), out, precision);
  return out;
}

LlamaLoss LlamaModel::loss(const LlamaBatch& batch) const {
  check_batch(batch, true);
  return detail::head_cross_entropy(output_table(),
                                    final_hidden(batch, ActivationPrecision::fp32), batch.targets,
                                    batch.loss_mask, nullptr);
}

LlamaLoss LlamaModel::forward(const LlamaBatch& batch, LlamaTrainState& state,
                              const LlamaTrainOptions& options) {
  check_batch(batch, true);
  auto cache = std::make_unique<detail::LlamaTrainCache>();
  cache->options = options;
  cache->batch_size = batch.batch_size;
  cache->seq_len = batch.seq_len;
  cache->positions = batch.positions.empty() ? default_positions(batch) : batch.positions;
  cache->segment_ids = batch.segment_ids;

  LlamaLayerContext context = make_context(config_, batch.batch_size, batch.seq_len,
                                           cache->positions, cache->segment_ids, inv_freq_);
  context.training = options.dropout;
  context.dropout_seed = options.dropout_seed;

  // The layers; with checkpointing only each layer's input survives.
  RowMatrixF hidden = embed(batch);
  RowMatrixF next;
  cache->layers.resize(layers_.size());
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    context.layer = static_cast<int>(l);
    detail::LlamaLayerCache& layer_cache = cache->layers[l];
    if (options.gradient_checkpointing) {
      detail::LlamaLayerCache scratch;
      detail::layer_forward(layers_[l], context, hidden, next, &scratch);
      layer_cache.x = std::move(scratch.x);
    } else {
      detail::layer_forward(layers_[l], context, hidden, next, &layer_cache);
    }
    std::swap(hidden, next);
  }

  // The final norm and the loss, with d(loss sum) / d(normed) for backward.
  RowMatrixF normed;
  detail::rms_norm_forward(hidden, norm_, config_.rms_norm_eps, normed, &cache->final_rstd);
  cache->final_x = std::move(hidden);
  cache->loss = detail::head_cross_entropy(output_table(), normed, batch.targets, batch.loss_mask,
                                           &cache->d_final_unscaled);

  const LlamaLoss loss = cache->loss;
  state.cache_ = std::move(cache);
  return loss;
}

void LlamaModel::backward(LlamaTrainState& state, float loss_scale, RowMatrixF* d_embeddings) {
  QLORA_CHECK_ARG(state.cache_ != nullptr && !state.cache_->spent,
                  "[LlamaModel::backward] the state holds no forward to differentiate (hint: "
                  "call forward before each backward)");
  detail::LlamaTrainCache& cache = *state.cache_;
  QLORA_CHECK_ARG(cache.layers.size() == layers_.size(),
                  "[LlamaModel::backward] the state has {} layers, this model {} (hint: pass the "
                  "state of this model's forward)",
                  cache.layers.size(), layers_.size());
  cache.spent = true;

  LlamaLayerContext context = make_context(config_, cache.batch_size, cache.seq_len,
                                           cache.positions, cache.segment_ids, inv_freq_);
  context.training = cache.options.dropout;
  context.dropout_seed = cache.options.dropout_seed;

  // Through the final norm.
  const RowMatrixF d_normed = cache.d_final_unscaled * loss_scale;
  RowMatrixF dh = RowMatrixF::Zero(d_normed.rows(), d_normed.cols());
  detail::rms_norm_backward(cache.final_x, cache.final_rstd, norm_, d_normed, dh);

  // Through the layers, last to first; checkpointed layers are recomputed first.
  RowMatrixF dx;
  for (std::size_t l = layers_.size(); l-- > 0;) {
    context.layer = static_cast<int>(l);
    detail::LlamaLayerCache& layer_cache = cache.layers[l];
    if (cache.options.gradient_checkpointing) {
      detail::LlamaLayerCache full;
      RowMatrixF out;
      detail::layer_forward(layers_[l], context, layer_cache.x, out, &full);
      detail::layer_backward(layers_[l], context, full, dh, dx);
    } else {
      detail::layer_backward(layers_[l], context, layer_cache, dh, dx);
    }
    layer_cache = detail::LlamaLayerCache();  // free the activations as soon as possible
    std::swap(dh, dx);
  }
  if (d_embeddings != nullptr) *d_embeddings = std::move(dh);
}

}  // namespace qlora
