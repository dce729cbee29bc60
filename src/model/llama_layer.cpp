// One Llama decoder layer as a forward / backward pair, with its RMSNorm and projections:
//
//   a = rms_norm(x) w_attn;  q, k, v = a Wq^T, a Wk^T, a Wv^T;  rope(q), rope(k)
//   h = x + attention(q, k, v) Wo^T
//   m = rms_norm(h) w_ffn;  out = h + (silu(m Wg^T) * (m Wu^T)) Wd^T

#include <cmath>

#include "llama_impl.hpp"
#include "qlora/core/random.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/kernels/gemm.hpp"

namespace qlora::detail {
namespace {

constexpr std::size_t index_of(LlamaProjection p) { return static_cast<std::size_t>(p); }

// Each (layer, projection) gets its own dropout seed, because QuantLoraLinear derives the
// mask from the seed and the adapter name alone.
LoraForwardOptions projection_options(const LlamaLayerContext& context, LlamaProjection p) {
  const std::uint64_t layer_seed =
      mix_seed(context.dropout_seed, static_cast<std::uint64_t>(context.layer));
  return {.training = context.training,
          .dropout_seed = mix_seed(layer_seed, static_cast<std::uint64_t>(index_of(p))),
          .precision = context.precision};
}

}  // namespace

void rms_norm_forward(ConstRefRowMatrixF x, const VectorF& weight, float eps, RowMatrixF& y,
                      VectorF* rstd) {
  // x, y [M, H]; weight [H]; rstd [M]
  const std::int64_t M = x.rows();
  const std::int64_t H = x.cols();
  y.resize(M, H);
  if (rstd != nullptr) rstd->resize(M);

#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t m = 0; m < M; ++m) {
    double sum_sq = 0.0;
    for (std::int64_t j = 0; j < H; ++j) sum_sq += static_cast<double>(x(m, j)) * x(m, j);
    const float r =
        static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(H) + eps));
    // (x r) w, the order of Hugging Face's LlamaRMSNorm.
    for (std::int64_t j = 0; j < H; ++j) y(m, j) = weight[j] * (x(m, j) * r);
    if (rstd != nullptr) (*rstd)[m] = r;
  }
}

void rms_norm_backward(ConstRefRowMatrixF x, const VectorF& rstd, const VectorF& weight,
                       ConstRefRowMatrixF dy, RowMatrixF& dx) {
  // x, dy, dx [M, H]; rstd [M]; weight [H]
  const std::int64_t M = x.rows();
  const std::int64_t H = x.cols();

#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t m = 0; m < M; ++m) {
    // y_j = w_j x_j r with r = (mean(x^2) + eps)^(-1/2), so dr/dx_k = -r^3 x_k / H.
    double dot = 0.0;
    for (std::int64_t j = 0; j < H; ++j) {
      dot += static_cast<double>(weight[j]) * dy(m, j) * x(m, j);
    }
    const float r = rstd[m];
    const float coeff = static_cast<float>(dot * r * r * r / static_cast<double>(H));
    for (std::int64_t j = 0; j < H; ++j) {
      dx(m, j) += r * weight[j] * dy(m, j) - coeff * x(m, j);
    }
  }
}

void linear_forward(const LlamaLinear& linear, ConstRefRowMatrixF x, RowMatrixF& y,
                    LoraLinearCache* cache, const LoraForwardOptions& options) {
  // x [M, in], y [M, out]
  if (linear.is_dense()) {
    y.resize(x.rows(), linear.dense.rows());
    gemm_f32(x, Transpose::no, linear.dense, Transpose::yes, y);
    return;
  }
  y.resize(x.rows(), linear.lora.out_features());
  linear.lora.forward(x, y, false, cache, options);
}

void linear_backward(LlamaLinear& linear, ConstRefRowMatrixF dy, const LoraLinearCache& cache,
                     RowMatrixF& dx, bool accumulate) {
  // dy [M, out], dx [M, in]
  if (linear.is_dense()) {
    if (!accumulate) dx.resize(dy.rows(), linear.dense.cols());
    gemm_f32(dy, Transpose::no, linear.dense, Transpose::no, dx, 1.0f, accumulate);
    return;
  }
  if (!accumulate) dx.resize(dy.rows(), linear.lora.in_features());
  linear.lora.backward(dy, cache, dx, accumulate);
}

void layer_forward(const LlamaLayer& layer, const LlamaLayerContext& context,
                   const RowMatrixF& x, RowMatrixF& out, LlamaLayerCache* cache) {
  // x, out [M, hidden]
  const LlamaDims& d = context.dims;
  const auto& proj = layer.proj;
  auto proj_cache = [&](LlamaProjection p) {
    return cache != nullptr ? &cache->proj[index_of(p)] : nullptr;
  };
  auto forward = [&](LlamaProjection p, const RowMatrixF& input, RowMatrixF& output) {
    linear_forward(proj[index_of(p)], input, output, proj_cache(p),
                   projection_options(context, p));
  };

  // Attention block.
  RowMatrixF a;
  rms_norm_forward(x, layer.input_layernorm, d.rms_norm_eps, a,
                   cache != nullptr ? &cache->attn_rstd : nullptr);
  RowMatrixF q;
  RowMatrixF k;
  RowMatrixF v;
  forward(LlamaProjection::q_proj, a, q);
  forward(LlamaProjection::k_proj, a, k);
  forward(LlamaProjection::v_proj, a, v);
  rope_rotate(q, d.n_heads, context.positions, context.inv_freq, false);
  rope_rotate(k, d.n_kv_heads, context.positions, context.inv_freq, false);

  RowMatrixF attn;
  if (context.kv_keys != nullptr) {
    context.kv_keys->middleRows(context.kv_start, x.rows()) = k;
    context.kv_values->middleRows(context.kv_start, x.rows()) = v;
    attention_forward_cached(context, q, attn);
  } else {
    attention_forward(context, q, k, v, attn, cache != nullptr ? &cache->probs : nullptr);
  }
  RowMatrixF o;
  forward(LlamaProjection::o_proj, attn, o);
  RowMatrixF h = x + o;

  // MLP block.
  RowMatrixF m;
  rms_norm_forward(h, layer.post_attention_layernorm, d.rms_norm_eps, m,
                   cache != nullptr ? &cache->ffn_rstd : nullptr);
  RowMatrixF gate;
  RowMatrixF up;
  forward(LlamaProjection::gate_proj, m, gate);
  forward(LlamaProjection::up_proj, m, up);
  RowMatrixF act;
  swiglu_forward(gate, up, act);
  forward(LlamaProjection::down_proj, act, out);
  out += h;

  if (cache != nullptr) {
    cache->x = x;
    cache->q = std::move(q);
    cache->k = std::move(k);
    cache->v = std::move(v);
    cache->h = std::move(h);
    cache->gate = std::move(gate);
    cache->up = std::move(up);
  }
}

void layer_backward(LlamaLayer& layer, const LlamaLayerContext& context,
                    const LlamaLayerCache& cache, const RowMatrixF& d_out, RowMatrixF& dx) {
  // d_out, dx [M, hidden]
  const LlamaDims& d = context.dims;
  auto backward = [&](LlamaProjection p, const RowMatrixF& dy, RowMatrixF& d_input,
                      bool accumulate) {
    linear_backward(layer.proj[index_of(p)], dy, cache.proj[index_of(p)], d_input, accumulate);
  };

  // MLP block: out = h + down(swiglu(gate(m), up(m))), m = rms_norm(h).
  RowMatrixF d_act;
  backward(LlamaProjection::down_proj, d_out, d_act, false);
  RowMatrixF d_gate;
  RowMatrixF d_up;
  swiglu_backward(cache.gate, cache.up, d_act, d_gate, d_up);
  RowMatrixF dm;
  backward(LlamaProjection::gate_proj, d_gate, dm, false);
  backward(LlamaProjection::up_proj, d_up, dm, true);
  RowMatrixF dh = d_out;
  rms_norm_backward(cache.h, cache.ffn_rstd, layer.post_attention_layernorm, dm, dh);

  // Attention block: h = x + o_proj(attention(rope(q), rope(k), v)).
  RowMatrixF d_attn;
  backward(LlamaProjection::o_proj, dh, d_attn, false);
  RowMatrixF dq;
  RowMatrixF dk;
  RowMatrixF dv;
  attention_backward(context, cache.q, cache.k, cache.v, cache.probs, d_attn, dq, dk, dv);
  rope_rotate(dq, d.n_heads, context.positions, context.inv_freq, true);
  rope_rotate(dk, d.n_kv_heads, context.positions, context.inv_freq, true);
  RowMatrixF da;
  backward(LlamaProjection::q_proj, dq, da, false);
  backward(LlamaProjection::k_proj, dk, da, true);
  backward(LlamaProjection::v_proj, dv, da, true);

  dx = std::move(dh);
  rms_norm_backward(cache.x, cache.attn_rstd, layer.input_layernorm, da, dx);
}

}  // namespace qlora::detail
