// The Llama decoder (SmolLM2 and other plain Llama checkpoints) with quantized projections and
// LoRA adapters. It provides a training forward that returns the cross-entropy loss, a backward
// that accumulates adapter gradients and can return the gradient at the embedding output,
// gradient checkpointing, and a KV cache for generation.
//
// Weight order: q_proj and k_proj are kept in Hugging Face order, and RoPE is Hugging Face's
// rotate-half form (dimension i pairs with i + head_dim / 2). GGUF files store those rows in
// llama.cpp's interleaved order (within each head, GGUF row 2i is HF row i and GGUF row 2i + 1
// is HF row i + head_dim / 2), so load_llama_gguf_weights un-permutes them. Adapter keys and
// shapes therefore match PEFT's, and exporters to GGUF must permute LoRA B of q/k back.
//
// Computation is fp32 throughout. The frozen weights never get gradients. Attention, norms,
// RoPE and the fp32 output head split work over OpenMP threads in fixed blocks, so with
// quantized projections the logits do not depend on the thread count (tested for 1 and 2
// threads). NOTE: fp32 projections use Eigen's own GEMM threading, which is not tested for
// that. Not supported:
// attention or MLP biases, RoPE scaling other than "none" and "linear", partial rotary
// dimensions, sliding-window attention, and adapters on the embedding or the output head.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/core/matrix.hpp"
#include "qlora/kernels/matmul.hpp"
#include "qlora/lora/lora_config.hpp"
#include "qlora/lora/lora_linear.hpp"
#include "qlora/model/llama_config.hpp"
#include "qlora/quant/quant_config.hpp"
#include "qlora/quant/quantized_matrix.hpp"

namespace qlora {

class GgufFile;

/// The seven linear projections of a Llama layer, in Hugging Face module order.
enum class LlamaProjection { q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj };

inline constexpr int kLlamaProjectionCount = 7;

inline constexpr std::array<LlamaProjection, kLlamaProjectionCount> kLlamaProjections = {
    LlamaProjection::q_proj,    LlamaProjection::k_proj,  LlamaProjection::v_proj,
    LlamaProjection::o_proj,    LlamaProjection::gate_proj, LlamaProjection::up_proj,
    LlamaProjection::down_proj};

/// Returns the Hugging Face module name: "q_proj", ..., "down_proj".
std::string_view to_string(LlamaProjection projection);

/// Returns the PEFT module key, for example "model.layers.3.self_attn.q_proj" or
/// "model.layers.3.mlp.down_proj".
std::string llama_module_key(int layer, LlamaProjection projection);

/// The float weights of one layer, Hugging Face names and order; every matrix is [out, in].
struct LlamaLayerWeights {
  RowMatrixF q_proj;     ///< [heads * head_dim, hidden], HF (rotate-half) row order
  RowMatrixF k_proj;     ///< [kv_heads * head_dim, hidden], HF row order
  RowMatrixF v_proj;     ///< [kv_heads * head_dim, hidden]
  RowMatrixF o_proj;     ///< [hidden, heads * head_dim]
  RowMatrixF gate_proj;  ///< [intermediate, hidden]
  RowMatrixF up_proj;    ///< [intermediate, hidden]
  RowMatrixF down_proj;  ///< [hidden, intermediate]
  VectorF input_layernorm;           ///< [hidden]
  VectorF post_attention_layernorm;  ///< [hidden]

  RowMatrixF& projection(LlamaProjection which);
};

/// The float weights of a whole model.
struct LlamaWeights {
  RowMatrixF embed_tokens;  ///< [vocab, hidden]
  std::vector<LlamaLayerWeights> layers;
  VectorF norm;        ///< [hidden]
  RowMatrixF lm_head;  ///< [vocab, hidden]; empty when the embeddings are tied
};

/**
 * Reads every weight of a Llama GGUF file as fp32 and un-permutes attn_q / attn_k rows to
 * Hugging Face order. Throws qlora::FormatError naming the tensor when one is missing or its
 * shape disagrees with `config`.
 */
LlamaWeights load_llama_gguf_weights(const GgufFile& file, const LlamaConfig& config);

/// Reorders the rows of a GGUF attn_q / attn_k weight [n_heads * head_dim, in] to HF order.
RowMatrixF unpermute_gguf_rope_rows(ConstRefRowMatrixF weight, std::int64_t n_heads);
/// The inverse of unpermute_gguf_rope_rows: HF row order to GGUF's interleaved order.
RowMatrixF permute_hf_rope_rows(ConstRefRowMatrixF weight, std::int64_t n_heads);

/// Storage formats of the model's weights.
struct LlamaLoadOptions {
  /// Quantization of the seven projections of every layer (NF4, block 64 by default).
  /// nullopt keeps them fp32: that model evaluates and differentiates with respect to
  /// activations, but cannot hold adapters.
  std::optional<QuantConfig> projections = QuantConfig{};
  /// Quantization of the token embedding and the output head; nullopt (the default) keeps
  /// them fp32.
  std::optional<QuantConfig> embeddings;
};

/// The target id that contributes no loss (Hugging Face's ignore_index).
inline constexpr std::int32_t kIgnoreIndex = -100;

/**
 * A batch of B sequences of T tokens each, row-major [B, T] flattened to B * T entries.
 *
 * - tokens: the input ids; or leave empty and set inputs_embeds [B * T, hidden].
 * - positions: RoPE positions; empty means 0, 1, ... per row, restarting at 0 wherever the
 *   segment id changes.
 * - segment_ids: document ids of packed rows; a token attends only to earlier tokens with the
 *   same id. Empty means one document per row.
 * - targets: next-token ids for the loss; kIgnoreIndex marks tokens without loss. Empty for
 *   logits-only calls.
 * - loss_mask: optional, nonzero where the loss counts (on top of kIgnoreIndex).
 */
struct LlamaBatch {
  std::int64_t batch_size = 1;
  std::int64_t seq_len = 0;
  std::vector<std::int32_t> tokens;
  RowMatrixF inputs_embeds;
  std::vector<std::int32_t> positions;
  std::vector<std::int32_t> segment_ids;
  std::vector<std::int32_t> targets;
  std::vector<std::uint8_t> loss_mask;

  std::int64_t n_tokens() const { return batch_size * seq_len; }
};

/// The summed cross-entropy over the counted tokens and their number.
struct LlamaLoss {
  double sum = 0.0;
  std::int64_t n_tokens = 0;
  /// The mean loss (natural log), or 0 when no token counts.
  double mean() const { return n_tokens > 0 ? sum / static_cast<double>(n_tokens) : 0.0; }
};

/// Options of a training forward.
struct LlamaTrainOptions {
  /// Keep only each layer's input and recompute the layer during backward.
  bool gradient_checkpointing = false;
  /// Apply LoRA dropout; each (layer, projection) derives its mask from dropout_seed.
  bool dropout = true;
  std::uint64_t dropout_seed = 0;
};

namespace detail {
struct LlamaTrainCache;
}  // namespace detail

/// The activations that a training forward keeps for backward. Movable; use one per forward
/// call in flight.
class LlamaTrainState {
 public:
  LlamaTrainState();
  ~LlamaTrainState();
  LlamaTrainState(LlamaTrainState&&) noexcept;
  LlamaTrainState& operator=(LlamaTrainState&&) noexcept;

  /// The loss that the forward computed.
  const LlamaLoss& loss() const;

 private:
  friend class LlamaModel;
  std::unique_ptr<detail::LlamaTrainCache> cache_;
};

/**
 * Keys and values (after RoPE) of one sequence for incremental decoding.
 * Per layer [capacity, kv_heads * head_dim].
 */
class LlamaKvCache {
 public:
  LlamaKvCache(const LlamaConfig& config, std::int64_t capacity);

  std::int64_t size() const { return size_; }
  std::int64_t capacity() const { return capacity_; }
  /// Drops every token, keeping the memory.
  void clear() { size_ = 0; }
  /// Keeps the first `n_tokens` tokens (for example to reuse a shared prompt prefix).
  void truncate(std::int64_t n_tokens);

 private:
  friend class LlamaModel;
  std::int64_t capacity_ = 0;
  std::int64_t size_ = 0;
  std::int64_t kv_dim_ = 0;
  std::vector<RowMatrixF> keys_;
  std::vector<RowMatrixF> values_;
};

namespace detail {

/// A projection: a quantized base with adapters, or an fp32 weight without adapters.
struct LlamaLinear {
  QuantLoraLinear lora;
  RowMatrixF dense;  ///< [out, in] when the projections are fp32, else empty
  bool is_dense() const { return dense.size() > 0; }
};

struct LlamaLayer {
  std::array<LlamaLinear, kLlamaProjectionCount> proj;
  VectorF input_layernorm;
  VectorF post_attention_layernorm;
};

/// The token embedding or the output head: fp32 or quantized [vocab, hidden].
struct LlamaTable {
  RowMatrixF dense;
  std::optional<QuantizedMatrix> quantized;
};

}  // namespace detail

/// One named projection of the model, as returned by LlamaModel::projections.
struct LlamaProjectionRef {
  std::string key;  ///< PEFT module key, "model.layers.N.self_attn.q_proj"
  int layer = 0;
  LlamaProjection projection = LlamaProjection::q_proj;
  QuantLoraLinear* linear = nullptr;
};

/**
 * A Llama causal language model.
 *
 * Example:
 *   qlora::GgufFile file("models/SmolLM2-135M-Instruct.Q4_1.gguf");
 *   auto model = qlora::LlamaModel::from_gguf(file);          // NF4 projections
 *   model.add_adapter("default", qlora::LoraConfig{}, 42);
 *   qlora::LlamaTrainState state;
 *   auto loss = model.forward(batch, state);
 *   model.backward(state, 1.0f / loss.n_tokens);              // mean loss
 */
class LlamaModel {
 public:
  /// Builds the model from float weights, quantizing as `options` requests. Throws
  /// qlora::InvalidArgument naming the tensor when a shape disagrees with `config`.
  LlamaModel(LlamaConfig config, LlamaWeights weights, const LlamaLoadOptions& options = {});

  /// Reads the configuration and weights of a Llama GGUF file.
  static LlamaModel from_gguf(const GgufFile& file, const LlamaLoadOptions& options = {});

  const LlamaConfig& config() const { return config_; }
  const LlamaLoadOptions& load_options() const { return options_; }
  bool projections_quantized() const { return options_.projections.has_value(); }

  // Adapters.

  /// Adds the adapter `name` to every projection that `config` targets, each seeded from
  /// `seed`, the layer and the projection. Throws qlora::NotImplemented for fp32 projections
  /// and qlora::InvalidArgument when `config` targets no projection.
  /// NOTE: LoraInit::loftq throws qlora::InvalidArgument here, because the model does not keep
  /// the float weights that LoftQ needs; run loftq_init on each projection instead.
  void add_adapter(const std::string& name, const LoraConfig& config, std::uint64_t seed);
  /// Removes `name` from every projection that contains it.
  void remove_adapter(const std::string& name);
  /// Activates `names` on every projection, skipping those that a projection lacks.
  void set_active_adapters(const std::vector<std::string>& names);
  void set_adapters_disabled(bool disabled);
  /// Every projection with its PEFT key (empty for fp32 projections).
  std::vector<LlamaProjectionRef> projections();
  QuantLoraLinear& projection(int layer, LlamaProjection which);
  /// Clears every adapter gradient.
  void zero_grad();

  // Training and evaluation.

  /**
   * Runs the model and returns the logits [B * T, vocab] at every position (the position
   * rows of LlamaBatch). Adapters apply without dropout. With `precision` automatic and up to
   * kInt8ActivationMaxRows positions in all, the quantized projections may round activations
   * to int8 (see qlora::set_int8_activations); ActivationPrecision::fp32 never does.
   */
  RowMatrixF logits(const LlamaBatch& batch,
                    ActivationPrecision precision = ActivationPrecision::automatic) const;

  /// Returns the cross-entropy over batch.targets without keeping anything for backward; the
  /// logits are computed in row chunks and never stored whole. Always fp32 activations, so
  /// that the loss is the function that training minimizes.
  LlamaLoss loss(const LlamaBatch& batch) const;

  /**
   * Runs a training forward: returns the loss over batch.targets and fills `state` with what
   * backward needs.
   */
  LlamaLoss forward(const LlamaBatch& batch, LlamaTrainState& state,
                    const LlamaTrainOptions& options = {});

  /**
   * Accumulates into every trainable active adapter's dA and dB the gradient of
   * `loss_scale * loss().sum` (pass 1 / n_tokens for the mean loss). When `d_embeddings` is
   * not null it receives the gradient with respect to the embedding output [B * T, hidden].
   * The state is spent afterwards.
   */
  void backward(LlamaTrainState& state, float loss_scale, RowMatrixF* d_embeddings = nullptr);

  // Generation.

  /**
   * Appends `tokens` to `cache` and returns the logits [vocab] of the last one. Throws
   * qlora::InvalidArgument when the tokens do not fit in the cache or an id is out of range.
   */
  RowVectorF prefill(LlamaKvCache& cache, std::span<const std::int32_t> tokens) const;
  /// Appends one token and returns the logits of the next.
  RowVectorF forward_next(LlamaKvCache& cache, std::int32_t token) const;

 private:
  void check_batch(const LlamaBatch& batch, bool needs_targets) const;
  RowMatrixF embed(const LlamaBatch& batch) const;
  /// The final-norm output [B * T, hidden] of an evaluation pass (no dropout, no cache).
  RowMatrixF final_hidden(const LlamaBatch& batch, ActivationPrecision precision) const;
  /// The output head: lm_head, or the token embedding when tied.
  const detail::LlamaTable& output_table() const;

  LlamaConfig config_;
  LlamaLoadOptions options_;
  detail::LlamaTable embed_tokens_;
  detail::LlamaTable lm_head_;  ///< empty when tied to embed_tokens_
  std::vector<detail::LlamaLayer> layers_;
  VectorF norm_;
  std::vector<double> inv_freq_;  ///< RoPE inverse frequencies [head_dim / 2]
};

}  // namespace qlora
