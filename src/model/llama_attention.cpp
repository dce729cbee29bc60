// RoPE and grouped-query causal attention of the Llama layer, forward and backward, and the
// decoding form that reads keys and values from a KV cache.
//
// Work is split over (sequence, head) pairs with a static OpenMP schedule, and each pair is
// computed by one thread in a fixed order, so results do not depend on the thread count.

#include <cmath>
#include <limits>

#include "llama_impl.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/kernels/gemm.hpp"

namespace qlora::detail {
namespace {

using StridedMap = Eigen::Map<RowMatrixF, 0, Eigen::OuterStride<>>;
using ConstStridedMap = Eigen::Map<const RowMatrixF, 0, Eigen::OuterStride<>>;

// One head's columns of rows [row_begin, row_begin + n_rows) of a [M, n * head_dim] matrix.
ConstStridedMap head_block(const RowMatrixF& m, std::int64_t row_begin, std::int64_t n_rows,
                           std::int64_t head, std::int64_t head_dim) {
  return ConstStridedMap(m.data() + row_begin * m.cols() + head * head_dim, n_rows, head_dim,
                         Eigen::OuterStride<>(m.cols()));
}

StridedMap head_block(RowMatrixF& m, std::int64_t row_begin, std::int64_t n_rows,
                      std::int64_t head, std::int64_t head_dim) {
  return StridedMap(m.data() + row_begin * m.cols() + head * head_dim, n_rows, head_dim,
                    Eigen::OuterStride<>(m.cols()));
}

// Turns the scores s [n_q, n_k] into probabilities row by row. Query i attends to key j when
// j <= i + (n_k - n_q) and, with segment ids [n_k] (queries are the last n_q keys), when both
// are in the same segment. Every row attends to at least its own key, so no row is empty.
void masked_softmax(RowMatrixF& s, const std::int32_t* segments) {
  const std::int64_t n_q = s.rows();
  const std::int64_t n_k = s.cols();
  const std::int64_t offset = n_k - n_q;
  for (std::int64_t i = 0; i < n_q; ++i) {
    const std::int64_t last = i + offset;  // the last visible key
    float* row = s.row(i).data();
    float max_score = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j <= last; ++j) {
      if (segments != nullptr && segments[j] != segments[last]) continue;
      max_score = std::max(max_score, row[j]);
    }
    float sum = 0.0f;
    for (std::int64_t j = 0; j < n_k; ++j) {
      const bool visible =
          j <= last && (segments == nullptr || segments[j] == segments[last]);
      row[j] = visible ? std::exp(row[j] - max_score) : 0.0f;
      sum += row[j];
    }
    const float inv_sum = 1.0f / sum;
    for (std::int64_t j = 0; j <= last; ++j) row[j] *= inv_sum;
  }
}

}  // namespace

void rope_rotate(RowMatrixF& x, std::int64_t n_heads, std::span<const std::int32_t> positions,
                 std::span<const double> inv_freq, bool inverse) {
  // x [M, n_heads * head_dim], positions [M], inv_freq [head_dim / 2]
  const std::int64_t M = x.rows();
  const std::int64_t half = static_cast<std::int64_t>(inv_freq.size());
  const std::int64_t head_dim = 2 * half;
  const float sign = inverse ? -1.0f : 1.0f;

#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t m = 0; m < M; ++m) {
    std::vector<float> cos_table(static_cast<std::size_t>(half));
    std::vector<float> sin_table(static_cast<std::size_t>(half));
    for (std::int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(positions[static_cast<std::size_t>(m)]) *
                           inv_freq[static_cast<std::size_t>(i)];
      cos_table[static_cast<std::size_t>(i)] = static_cast<float>(std::cos(angle));
      sin_table[static_cast<std::size_t>(i)] = sign * static_cast<float>(std::sin(angle));
    }
    float* row = x.row(m).data();
    for (std::int64_t h = 0; h < n_heads; ++h) {
      float* head = row + h * head_dim;
      for (std::int64_t i = 0; i < half; ++i) {
        const float c = cos_table[static_cast<std::size_t>(i)];
        const float s = sin_table[static_cast<std::size_t>(i)];
        const float x1 = head[i];
        const float x2 = head[i + half];
        head[i] = x1 * c - x2 * s;
        head[i + half] = x2 * c + x1 * s;
      }
    }
  }
}

void attention_forward(const LlamaLayerContext& context, const RowMatrixF& q,
                       const RowMatrixF& k, const RowMatrixF& v, RowMatrixF& out,
                       std::vector<float>* probs) {
  // q [M, q_dim], k and v [M, kv_dim], out [M, q_dim]
  const LlamaDims& d = context.dims;
  const std::int64_t T = context.seq_len;
  const std::int64_t n_tasks = context.batch_size * d.n_heads;
  const std::int64_t group = d.n_heads / d.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.head_dim));

  out.resize(q.rows(), d.q_dim());
  if (probs != nullptr) probs->assign(static_cast<std::size_t>(n_tasks * T * T), 0.0f);

#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t task = 0; task < n_tasks; ++task) {
    const std::int64_t b = task / d.n_heads;
    const std::int64_t h = task % d.n_heads;
    const std::int64_t kv_head = h / group;
    const std::int32_t* segments =
        context.segment_ids.empty() ? nullptr : context.segment_ids.data() + b * T;

    // Scores, then probabilities, then the weighted sum of values. gemm_f32 runs on this
    // thread alone inside the parallel loop.
    RowMatrixF s(T, T);
    gemm_f32(head_block(q, b * T, T, h, d.head_dim), Transpose::no,
             head_block(k, b * T, T, kv_head, d.head_dim), Transpose::yes, s, scale);
    masked_softmax(s, segments);
    gemm_f32(s, Transpose::no, head_block(v, b * T, T, kv_head, d.head_dim), Transpose::no,
             head_block(out, b * T, T, h, d.head_dim));

    if (probs != nullptr) {
      std::copy(s.data(), s.data() + T * T, probs->data() + task * T * T);
    }
  }
}

void attention_backward(const LlamaLayerContext& context, const RowMatrixF& q,
                        const RowMatrixF& k, const RowMatrixF& v,
                        const std::vector<float>& probs, const RowMatrixF& d_out,
                        RowMatrixF& dq, RowMatrixF& dk, RowMatrixF& dv) {
  // q, d_out, dq [M, q_dim]; k, v, dk, dv [M, kv_dim]; probs [batch, n_heads, T, T]
  const LlamaDims& d = context.dims;
  const std::int64_t T = context.seq_len;
  const std::int64_t group = d.n_heads / d.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.head_dim));
  const std::int64_t n_tasks = context.batch_size * d.n_kv_heads;

  dq.resize(q.rows(), q.cols());
  dk.setZero(k.rows(), k.cols());
  dv.setZero(v.rows(), v.cols());

  // One task per (sequence, KV head): it owns that head's dk and dv, and the dq of the query
  // heads that share it, so no two threads write the same element.
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t task = 0; task < n_tasks; ++task) {
    const std::int64_t b = task / d.n_kv_heads;
    const std::int64_t kv_head = task % d.n_kv_heads;
    const auto k_h = head_block(k, b * T, T, kv_head, d.head_dim);
    const auto v_h = head_block(v, b * T, T, kv_head, d.head_dim);
    auto dk_h = head_block(dk, b * T, T, kv_head, d.head_dim);
    auto dv_h = head_block(dv, b * T, T, kv_head, d.head_dim);

    for (std::int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      const ConstMapRowMatrixF p(probs.data() + (b * d.n_heads + h) * T * T, T, T);
      const auto d_out_h = head_block(d_out, b * T, T, h, d.head_dim);
      const auto q_h = head_block(q, b * T, T, h, d.head_dim);

      // Through o = p v, then through the softmax: ds = p * (dp - rowsum(p * dp)).
      gemm_f32(p, Transpose::yes, d_out_h, Transpose::no, dv_h, 1.0f, true);
      RowMatrixF ds(T, T);
      gemm_f32(d_out_h, Transpose::no, v_h, Transpose::yes, ds);
      const VectorF row_dot = p.cwiseProduct(ds).rowwise().sum();
      ds = p.cwiseProduct(ds.colwise() - row_dot);

      // Through s = scale * q k^T.
      gemm_f32(ds, Transpose::no, k_h, Transpose::no, head_block(dq, b * T, T, h, d.head_dim),
               scale);
      gemm_f32(ds, Transpose::yes, q_h, Transpose::no, dk_h, scale, true);
    }
  }
}

void attention_forward_cached(const LlamaLayerContext& context, const RowMatrixF& q,
                              RowMatrixF& out) {
  // q [n_new, q_dim]; the cache contains kv_start + n_new valid rows [*, kv_dim]
  const LlamaDims& d = context.dims;
  const std::int64_t n_new = q.rows();
  const std::int64_t n_keys = context.kv_start + n_new;
  const std::int64_t group = d.n_heads / d.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.head_dim));
  const RowMatrixF& keys = *context.kv_keys;
  const RowMatrixF& values = *context.kv_values;

  out.resize(n_new, d.q_dim());

#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t h = 0; h < d.n_heads; ++h) {
    const std::int64_t kv_head = h / group;
    RowMatrixF s = head_block(q, 0, n_new, h, d.head_dim) *
                   head_block(keys, 0, n_keys, kv_head, d.head_dim).transpose();
    s *= scale;
    masked_softmax(s, nullptr);
    head_block(out, 0, n_new, h, d.head_dim).noalias() =
        s * head_block(values, 0, n_keys, kv_head, d.head_dim);
  }
}

}  // namespace qlora::detail
