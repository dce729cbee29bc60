// The internals of LlamaModel shared by its translation units: the pieces of one decoder
// layer (RMSNorm, RoPE, attention, SwiGLU, projections) as forward / backward pairs, and what
// a training forward keeps for backward.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "qlora/core/matrix.hpp"
#include "qlora/lora/lora_linear.hpp"
#include "qlora/model/llama.hpp"

namespace qlora::detail {

/// The sizes that every layer shares.
struct LlamaDims {
  std::int64_t hidden = 0;
  std::int64_t n_heads = 0;
  std::int64_t n_kv_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t intermediate = 0;
  float rms_norm_eps = 1e-5f;

  std::int64_t q_dim() const { return n_heads * head_dim; }
  std::int64_t kv_dim() const { return n_kv_heads * head_dim; }
};

LlamaDims llama_dims(const LlamaConfig& config);

/**
 * The layout of one layer call: how the M = batch_size * seq_len rows of a layer's input split into attention problems.
 * Training and evaluation: batch_size rows of seq_len tokens, with optional segment ids
 * [M] (attention only within one segment). Decoding: one sequence of seq_len new tokens whose
 * keys and values are appended to `kv_keys` / `kv_values` [capacity, kv_dim] at row `kv_start`.
 */
struct LlamaLayerContext {
  LlamaDims dims;
  std::int64_t batch_size = 1;
  std::int64_t seq_len = 0;
  std::span<const std::int32_t> positions;    ///< [M]
  std::span<const std::int32_t> segment_ids;  ///< [M] or empty
  std::span<const double> inv_freq;           ///< [head_dim / 2]

  RowMatrixF* kv_keys = nullptr;
  RowMatrixF* kv_values = nullptr;
  std::int64_t kv_start = 0;

  int layer = 0;
  bool training = false;  ///< LoRA dropout on
  std::uint64_t dropout_seed = 0;
  /// Activation precision of the quantized projections (int8 only for small inference batches).
  ActivationPrecision precision = ActivationPrecision::automatic;
};

/// The activations that one layer's forward keeps for its backward.
struct LlamaLayerCache {
  RowMatrixF x;         ///< layer input [M, hidden]
  VectorF attn_rstd;    ///< 1 / rms of each row of x [M]
  RowMatrixF q;         ///< queries after RoPE [M, q_dim]
  RowMatrixF k;         ///< keys after RoPE [M, kv_dim]
  RowMatrixF v;         ///< values [M, kv_dim]
  /// Attention probabilities [batch, n_heads, seq_len, seq_len].
  // NOTE: this grows with seq_len^2 per layer (9.4 MB per layer for SmolLM2 at B = 4,
  // T = 256); gradient checkpointing keeps only one layer's copy alive.
  std::vector<float> probs;
  RowMatrixF h;         ///< residual after attention [M, hidden]
  VectorF ffn_rstd;     ///< 1 / rms of each row of h [M]
  RowMatrixF gate;      ///< gate_proj output [M, intermediate]
  RowMatrixF up;        ///< up_proj output [M, intermediate]
  std::array<LoraLinearCache, kLlamaProjectionCount> proj;
};

/// The activations and loss gradient that LlamaModel::forward keeps for backward.
struct LlamaTrainCache {
  LlamaLoss loss;
  LlamaTrainOptions options;
  std::int64_t batch_size = 0;
  std::int64_t seq_len = 0;
  std::vector<std::int32_t> positions;
  std::vector<std::int32_t> segment_ids;
  /// One per layer: everything, or only `x` with gradient checkpointing.
  std::vector<LlamaLayerCache> layers;
  RowMatrixF final_x;     ///< input of the final norm [M, hidden]
  VectorF final_rstd;     ///< [M]
  RowMatrixF d_final_unscaled;  ///< d(loss sum) / d(final norm output) [M, hidden]
  bool spent = false;
};

// RMSNorm: y = (x / sqrt(mean(x^2) + eps)) * w, row by row.
void rms_norm_forward(ConstRefRowMatrixF x, const VectorF& weight, float eps, RowMatrixF& y,
                      VectorF* rstd);
// Adds to dx [M, H] the gradient through the norm of dy [M, H].
void rms_norm_backward(ConstRefRowMatrixF x, const VectorF& rstd, const VectorF& weight,
                       ConstRefRowMatrixF dy, RowMatrixF& dx);

// Rotates x [M, n_heads * head_dim] in place by the angle positions[m] * inv_freq[i] on the
// pairs (i, i + head_dim / 2) of each head. With `inverse` it rotates back, which is the
// backward.
void rope_rotate(RowMatrixF& x, std::int64_t n_heads, std::span<const std::int32_t> positions,
                 std::span<const double> inv_freq, bool inverse);

// Attention over context.batch_size sequences of seq_len tokens (causal, within segments):
// q [M, q_dim], k and v [M, kv_dim], out [M, q_dim]. With `probs` it keeps the attention
// probabilities [batch, n_heads, seq_len, seq_len] for the backward.
void attention_forward(const LlamaLayerContext& context, const RowMatrixF& q,
                       const RowMatrixF& k, const RowMatrixF& v, RowMatrixF& out,
                       std::vector<float>* probs);
// Given d_out [M, q_dim], writes dq [M, q_dim], dk and dv [M, kv_dim].
void attention_backward(const LlamaLayerContext& context, const RowMatrixF& q,
                        const RowMatrixF& k, const RowMatrixF& v,
                        const std::vector<float>& probs, const RowMatrixF& d_out,
                        RowMatrixF& dq, RowMatrixF& dk, RowMatrixF& dv);
// Decoding: the seq_len new queries q [seq_len, q_dim] attend to the first
// kv_start + seq_len rows of the context's KV cache.
void attention_forward_cached(const LlamaLayerContext& context, const RowMatrixF& q,
                              RowMatrixF& out);

// SwiGLU: act = silu(gate) * up.
void swiglu_forward(const RowMatrixF& gate, const RowMatrixF& up, RowMatrixF& act);
// Writes d_gate and d_up from d_act.
void swiglu_backward(const RowMatrixF& gate, const RowMatrixF& up, const RowMatrixF& d_act,
                     RowMatrixF& d_gate, RowMatrixF& d_up);

// A projection y [M, out] = x [M, in] W^T (+ adapters).
void linear_forward(const LlamaLinear& linear, ConstRefRowMatrixF x, RowMatrixF& y,
                    LoraLinearCache* cache, const LoraForwardOptions& options);
// Accumulates adapter gradients and writes (or with `accumulate` adds) dx [M, in].
void linear_backward(LlamaLinear& linear, ConstRefRowMatrixF dy, const LoraLinearCache& cache,
                     RowMatrixF& dx, bool accumulate);

// One decoder layer: out [M, hidden] from x [M, hidden]. `cache` (training) keeps what
// layer_backward needs.
void layer_forward(const LlamaLayer& layer, const LlamaLayerContext& context,
                   const RowMatrixF& x, RowMatrixF& out, LlamaLayerCache* cache);
// Given d_out, accumulates adapter gradients and writes dx [M, hidden].
void layer_backward(LlamaLayer& layer, const LlamaLayerContext& context,
                    const LlamaLayerCache& cache, const RowMatrixF& d_out, RowMatrixF& dx);

// The output head: logits [rows, vocab] = x [rows, hidden] table^T.
void head_forward(const LlamaTable& table, ConstRefRowMatrixF x, RowMatrixF& logits,
                  ActivationPrecision precision);
// dx [rows, hidden] = d_logits [rows, vocab] table.
void head_backward(const LlamaTable& table, ConstRefRowMatrixF d_logits, RowMatrixF& dx);

/**
 * Cross-entropy of the rows of `x` (final-norm output [M, hidden]) that have a target and a
 * nonzero mask. Computes the logits in chunks of rows. With `dx` (resized to [M, hidden] and
 * zeroed), also writes d(loss sum) / dx.
 */
LlamaLoss head_cross_entropy(const LlamaTable& table, const RowMatrixF& x,
                             std::span<const std::int32_t> targets,
                             std::span<const std::uint8_t> loss_mask, RowMatrixF* dx);

}  // namespace qlora::detail
