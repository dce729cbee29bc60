// LoftQ initialisation (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
// Language Models", arXiv 2310.08659, Algorithm 1) and the truncated SVD it needs.
//
// LoftQ alternates T times between quantizing W - s*B*A and taking the best rank-r
// approximation of the residual W - dequant(Q), so that the quantized base plus the adapter
// starts close to W instead of carrying the whole quantization error.
#pragma once

#include <cstdint>
#include <vector>

#include "qlora/core/matrix.hpp"
#include "qlora/lora/lora_config.hpp"
#include "qlora/lora/lora_linear.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora {

/// The rank-r factors of a matrix: M ~= U diag(S) V^T.
struct LowRankFactors {
  RowMatrixF U;  ///< [rows, r], orthonormal columns
  VectorF S;     ///< [r], singular values, descending
  RowMatrixF V;  ///< [cols, r], orthonormal columns
};

/**
 * Computes the leading `rank` singular triplets of `m`, by a full SVD or a randomized range
 * finder (`rank + options.oversampling` columns, `options.power_iterations` subspace
 * iterations, test matrix seeded by `options.seed`), as `options.svd` selects.
 */
LowRankFactors truncated_svd(ConstRefRowMatrixF m, int rank, const LoftqOptions& options);

struct LoftqResult {
  QuantizedMatrix base;  ///< Q_T, the new frozen base
  LoraAdapter adapter;   ///< A_T and B_T with the config's rank, scaling and dropout
  /// ||W - dequant(quantize(W))||_F: the error of QLoRA's start (B = 0)
  double qlora_error = 0.0;
  /// ||W - (dequant(Q_t) + s B_t A_t)||_F after each iteration t = 1..T
  std::vector<double> errors;
};

/**
 * Runs LoftQ on `weights` [N, K] with the quantizer settings of `quant`, which must be the
 * settings used for training (block size and double quantization change Q), and the rank,
 * scaling and iterations of `config`.
 *
 * The singular values are split evenly between the factors. By default each factor is also
 * divided by sqrt(s), so that dequant(Q) + s*B*A approximates W for any alpha;
 * `config.loftq.peft_compatible` skips that division as PEFT's loftq_init does, which is
 * only equivalent when s = 1.
 */
LoftqResult loftq_init(ConstRefRowMatrixF weights, const QuantConfig& quant,
                       const LoraConfig& config);

}  // namespace qlora
