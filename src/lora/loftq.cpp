#include "qlora/init/loftq.hpp"

#include <algorithm>
#include <cmath>

#include <Eigen/QR>
#include <Eigen/SVD>

#include "qlora/core/error.hpp"
#include "qlora/core/log.hpp"
#include "qlora/core/random.hpp"

namespace qlora {
namespace {

using ColMatrixF = Eigen::MatrixXf;

// Returns an orthonormal basis of the column space of `m` (thin Q of a Householder QR).
ColMatrixF orthonormal_basis(const ColMatrixF& m) {
  Eigen::HouseholderQR<ColMatrixF> qr(m);
  return qr.householderQ() * ColMatrixF::Identity(m.rows(), m.cols());
}

LowRankFactors take_leading(const ColMatrixF& u, const Eigen::VectorXf& s, const ColMatrixF& v,
                            int rank) {
  LowRankFactors f;
  f.U = u.leftCols(rank);
  f.S = s.head(rank);
  f.V = v.leftCols(rank);
  return f;
}

LowRankFactors full_svd(const ColMatrixF& m, int rank) {
  Eigen::BDCSVD<ColMatrixF> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return take_leading(svd.matrixU(), svd.singularValues(), svd.matrixV(), rank);
}

// Halko, Martinsson and Tropp, "Finding structure with randomness" (2011), Algorithms 4.4
// and 5.1: a Gaussian range finder with re-orthonormalised subspace iterations.
LowRankFactors randomized_svd(const ColMatrixF& m, int rank, const LoftqOptions& options) {
  const std::int64_t width = std::min<std::int64_t>(
      rank + options.oversampling, std::min(m.rows(), m.cols()));
  Rng rng(options.seed);
  ColMatrixF omega(m.cols(), width);
  for (float& v : omega.reshaped()) v = static_cast<float>(rng.normal());

  ColMatrixF q = orthonormal_basis(m * omega);
  for (int i = 0; i < options.power_iterations; ++i) {
    const ColMatrixF z = orthonormal_basis(m.transpose() * q);
    q = orthonormal_basis(m * z);
  }
  const ColMatrixF small = q.transpose() * m;  // [width, cols]
  Eigen::BDCSVD<ColMatrixF> svd(small, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const ColMatrixF u = q * svd.matrixU();
  return take_leading(u, svd.singularValues(), svd.matrixV(), rank);
}

double frobenius_distance(const RowMatrixF& a, const RowMatrixF& b) {
  return (a.cast<double>() - b.cast<double>()).norm();
}

}  // namespace

LowRankFactors truncated_svd(ConstRefRowMatrixF m, int rank, const LoftqOptions& options) {
  const std::int64_t min_dim = std::min(m.rows(), m.cols());
  QLORA_CHECK_ARG(rank > 0 && rank <= min_dim,
                  "[truncated_svd] rank must be in [1, min(rows, cols)]: got rank {} for a "
                  "[{}, {}] matrix",
                  rank, m.rows(), m.cols());
  const ColMatrixF col_major = m;
  SvdMethod method = options.svd;
  if (method == SvdMethod::automatic) {
    method = min_dim <= options.full_svd_max_dim ? SvdMethod::full : SvdMethod::randomized;
  }
  return method == SvdMethod::full ? full_svd(col_major, rank)
                                   : randomized_svd(col_major, rank, options);
}

LoftqResult loftq_init(ConstRefRowMatrixF weights, const QuantConfig& quant,
                       const LoraConfig& config) {
  config.validate();
  const std::int64_t N = weights.rows();
  const std::int64_t K = weights.cols();
  QLORA_CHECK_ARG(config.rank <= std::min(N, K),
                  "[loftq_init] rank {} exceeds the layer's smaller dimension: layer is [{}, {}]",
                  config.rank, N, K);

  const RowMatrixF w = weights;
  const float s = config.scaling();
  // The scaling-aware split puts 1/sqrt(s) into each factor so that s * B * A equals the
  // rank-r residual; PEFT's split leaves B * A equal to it.
  const float factor_scale = config.loftq.peft_compatible ? 1.0f : 1.0f / std::sqrt(s);

  LoftqResult result;
  result.adapter.rank = config.rank;
  result.adapter.scaling = s;
  result.adapter.dropout = config.dropout;

  RowMatrixF low_rank = RowMatrixF::Zero(N, K);  // what the next quantization subtracts
  for (int t = 0; t < config.loftq.iterations; ++t) {
    result.base = quantize(w - low_rank, quant);
    const RowMatrixF q_float = dequantize(result.base);
    if (t == 0) result.qlora_error = frobenius_distance(w, q_float);

    const RowMatrixF residual = w - q_float;
    LoftqOptions svd_options = config.loftq;
    svd_options.seed = mix_seed(config.loftq.seed, static_cast<std::uint64_t>(t));
    const LowRankFactors f = truncated_svd(residual, config.rank, svd_options);

    const VectorF root = f.S.cwiseSqrt();
    result.adapter.B = (f.U * root.asDiagonal()) * factor_scale;              // [N, r]
    result.adapter.A = (root.asDiagonal() * f.V.transpose()) * factor_scale;  // [r, K]
    // PEFT subtracts B * A unscaled in its next iteration, and qlora subtracts s * B * A.
    // Both are the rank-r residual, so the iterations agree.
    low_rank = result.adapter.B * result.adapter.A;
    if (!config.loftq.peft_compatible) low_rank *= s;

    const RowMatrixF start = q_float + s * (result.adapter.B * result.adapter.A);
    result.errors.push_back(frobenius_distance(w, start));
  }
  result.adapter.zero_grad();
  QLORA_LOG_DEBUG("[loftq_init] [{}, {}] rank {}: QLoRA start error {:.4g}, LoftQ error {:.4g}",
                  N, K, config.rank, result.qlora_error, result.errors.back());
  return result;
}

}  // namespace qlora
