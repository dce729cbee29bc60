// The output head (logits = x E^T over the 49152-token vocabulary of SmolLM2) and the
// cross-entropy loss with its gradient, computed in chunks of rows so that the full
// [tokens, vocab] logits are never stored.
//
// The fp32 products go through qlora::gemm_f32, whose results do not depend on the thread
// count.

#include <algorithm>
#include <cmath>
#include <limits>

#include "llama_impl.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/kernels/gemm.hpp"
#include "qlora/kernels/matmul.hpp"

namespace qlora::detail {
namespace {

// Rows of logits alive at once in the loss: 50 MB of fp32 logits for a 49,152-token
// vocabulary. Fewer rows make the GEMM repack the whole table for less work per element.
constexpr std::int64_t kLossChunkRows = 256;

}  // namespace

void head_forward(const LlamaTable& table, ConstRefRowMatrixF x, RowMatrixF& logits,
                  ActivationPrecision precision) {
  // x [R, hidden], logits [R, vocab]
  if (table.quantized) {
    logits.resize(x.rows(), table.quantized->rows);
    dequant_matmul(x, *table.quantized, logits, false, precision);
    return;
  }
  logits.resize(x.rows(), table.dense.rows());
  gemm_f32(x, Transpose::no, table.dense, Transpose::yes, logits);
}

void head_backward(const LlamaTable& table, ConstRefRowMatrixF d_logits, RowMatrixF& dx) {
  // d_logits [R, vocab], dx [R, hidden]
  if (table.quantized) {
    dx.resize(d_logits.rows(), table.quantized->cols);
    dequant_matmul_backward(d_logits, *table.quantized, dx, false);
    return;
  }
  dx.resize(d_logits.rows(), table.dense.cols());
  gemm_f32(d_logits, Transpose::no, table.dense, Transpose::no, dx);
}

LlamaLoss head_cross_entropy(const LlamaTable& table, const RowMatrixF& x,
                             std::span<const std::int32_t> targets,
                             std::span<const std::uint8_t> loss_mask, RowMatrixF* dx) {
  // x [M, hidden]; targets, loss_mask [M]; dx [M, hidden]
  std::vector<std::int64_t> rows;
  for (std::size_t m = 0; m < targets.size(); ++m) {
    const bool masked_out = !loss_mask.empty() && loss_mask[m] == 0;
    if (targets[m] != kIgnoreIndex && !masked_out) rows.push_back(static_cast<std::int64_t>(m));
  }
  if (dx != nullptr) dx->setZero(x.rows(), x.cols());

  LlamaLoss loss;
  loss.n_tokens = static_cast<std::int64_t>(rows.size());
  std::vector<double> row_loss;
  for (std::size_t chunk = 0; chunk < rows.size(); chunk += kLossChunkRows) {
    const std::int64_t n = std::min<std::int64_t>(
        kLossChunkRows, static_cast<std::int64_t>(rows.size() - chunk));
    RowMatrixF xs(n, x.cols());
    for (std::int64_t i = 0; i < n; ++i) xs.row(i) = x.row(rows[chunk + static_cast<std::size_t>(i)]);
    RowMatrixF logits;
    // The loss is a measurement and, with dx, a training step: never int8 activations, so
    // that a row's loss does not depend on the size of the chunk it falls in.
    head_forward(table, xs, logits, ActivationPrecision::fp32);

    // loss = logsumexp(logits) - logits[target]; d loss / d logits = softmax - one_hot.
    row_loss.assign(static_cast<std::size_t>(n), 0.0);
#pragma omp parallel for num_threads(num_threads()) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      float* row = logits.row(i).data();
      const std::int64_t vocab = logits.cols();
      const std::int32_t target =
          targets[static_cast<std::size_t>(rows[chunk + static_cast<std::size_t>(i)])];
      const float max_logit = *std::max_element(row, row + vocab);
      double sum_exp = 0.0;
      for (std::int64_t j = 0; j < vocab; ++j) sum_exp += std::exp(row[j] - max_logit);
      const double log_sum_exp = max_logit + std::log(sum_exp);
      row_loss[static_cast<std::size_t>(i)] = log_sum_exp - row[target];
      if (dx != nullptr) {
        for (std::int64_t j = 0; j < vocab; ++j) {
          row[j] = static_cast<float>(std::exp(static_cast<double>(row[j]) - log_sum_exp));
        }
        row[target] -= 1.0f;
      }
    }
    for (double value : row_loss) loss.sum += value;

    if (dx != nullptr) {
      RowMatrixF dxs;
      head_backward(table, logits, dxs);
      for (std::int64_t i = 0; i < n; ++i) {
        dx->row(rows[chunk + static_cast<std::size_t>(i)]) = dxs.row(i);
      }
    }
  }
  return loss;
}

}  // namespace qlora::detail
