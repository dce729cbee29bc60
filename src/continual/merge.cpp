#include "qlora/continual/merge.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <set>
#include <utility>

#include <Eigen/QR>
#include <Eigen/SVD>

#include "qlora/core/error.hpp"
#include "qlora/core/log.hpp"
#include "qlora/core/random.hpp"

namespace qlora::continual {
namespace {

// Internal arithmetic runs in double: the factors are small, and the exact methods must
// reproduce the update to 1e-5 relative after a QR and an SVD.
using MatrixD = Eigen::MatrixXd;

// The validated inputs of one layer's merge.
struct LayerInputs {
  std::int64_t out_features = 0;  // N
  std::int64_t in_features = 0;   // K
  int rank_sum = 0;
  std::vector<const LoraAdapter*> adapters;
  std::vector<double> weights;             // w_i, one per adapter
  std::vector<std::uint64_t> task_ids;     // seeds DARE's draws of each adapter
};

// A rank-k result in double before it becomes a LoraAdapter: update = B A.
struct LowRank {
  MatrixD B;  // [N, k]
  MatrixD A;  // [k, K]
  double energy_kept = 1.0;
  double energy_total = 0.0;
};

bool uses_density(MergeMethod method) {
  return method == MergeMethod::ties || method == MergeMethod::dare_linear ||
         method == MergeMethod::dare_ties;
}

bool uses_sign_election(MergeMethod method) {
  return method == MergeMethod::ties || method == MergeMethod::dare_ties;
}

std::int64_t expanded_in_features(const LoraAdapter& adapter) {
  return adapter.pool_group_size > 0 ? adapter.A.cols() * adapter.pool_group_size
                                     : adapter.A.cols();
}

bool all_finite(const RowMatrixF& m) { return m.allFinite(); }

// Names adapter i in messages: "adapter 2", or "adapter 'task_b' on model.layers.0.mlp.up_proj".
std::string adapter_label(std::span<const std::string> labels, std::size_t i) {
  return labels.empty() ? fmt::format("adapter {}", i) : fmt::format("adapter {}", labels[i]);
}

void check_adapter(const LoraAdapter& adapter, const std::string& label, const char* op) {
  QLORA_CHECK_ARG(adapter.rank > 0 && adapter.A.rows() == adapter.rank &&
                      adapter.B.cols() == adapter.rank && adapter.A.cols() > 0 &&
                      adapter.B.rows() > 0,
                  "[{}] {} has inconsistent factors: got rank {}, A [{}, {}], B [{}, {}], "
                  "expected A [rank, K] and B [N, rank] with rank >= 1",
                  op, label, adapter.rank, adapter.A.rows(), adapter.A.cols(), adapter.B.rows(),
                  adapter.B.cols());
  QLORA_CHECK_ARG(adapter.pool_group_size >= 0,
                  "[{}] {} has a negative pool_group_size: got {}, expected 0 or a QA-LoRA "
                  "group size",
                  op, label, adapter.pool_group_size);
  QLORA_CHECK_ARG(std::isfinite(adapter.scaling),
                  "[{}] {} has a non-finite scaling: got {}", op, label, adapter.scaling);
  QLORA_CHECK_ARG(all_finite(adapter.A) && all_finite(adapter.B),
                  "[{}] {} holds NaN or infinite values in A or B (hint: the adapter diverged "
                  "in training; retrain it or leave it out of the merge)",
                  op, label);
}

// Checks what every method needs and fills in the shapes, ranks and weights. `labels`, when
// not empty, names each adapter in messages.
LayerInputs check_inputs(std::span<const LoraAdapter* const> adapters,
                         const MergeOptions& options, const char* op,
                         std::span<const std::string> labels = {}) {
  QLORA_CHECK_ARG(!adapters.empty(),
                  "[{}] no adapters to merge: got an empty list, expected at least one", op);
  LayerInputs in;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const std::string label = adapter_label(labels, i);
    QLORA_CHECK_ARG(adapters[i] != nullptr, "[{}] {} is a null pointer", op, label);
    check_adapter(*adapters[i], label, op);
    const std::int64_t n = adapters[i]->B.rows();
    const std::int64_t k = expanded_in_features(*adapters[i]);
    if (i == 0) {
      in.out_features = n;
      in.in_features = k;
    }
    QLORA_CHECK_ARG(n == in.out_features && k == in.in_features,
                    "[{}] {} belongs to a layer of another shape: got [N, K] = [{}, {}], "
                    "expected [{}, {}] as the first adapter (hint: merge only adapters of the "
                    "same projection)",
                    op, label, n, k, in.out_features, in.in_features);
    in.rank_sum += adapters[i]->rank;
    in.adapters.push_back(adapters[i]);
    in.task_ids.push_back(i);
  }

  QLORA_CHECK_ARG(options.weights.empty() || options.weights.size() == adapters.size(),
                  "[{}] weights count does not match the adapters: got {} weights for {} "
                  "adapters (hint: give one weight per adapter, or none for 1 each)",
                  op, options.weights.size(), adapters.size());
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const float w = options.weights.empty() ? 1.0f : options.weights[i];
    QLORA_CHECK_ARG(std::isfinite(w), "[{}] weight {} is not finite: got {}", op, i, w);
    in.weights.push_back(static_cast<double>(w));
  }

  QLORA_CHECK_ARG(options.density > 0.0f && options.density <= 1.0f,
                  "[{}] density must be in (0, 1]: got {} (hint: 0.2 keeps a fifth of the "
                  "entries)",
                  op, options.density);
  QLORA_CHECK_ARG(uses_density(options.method) || options.density == 1.0f,
                  "[{}] density {} has no effect on method {}, expected 1 (hint: density applies "
                  "to ties, dare_linear and dare_ties)",
                  op, options.density, to_string(options.method));
  QLORA_CHECK_ARG(uses_sign_election(options.method) ||
                      options.sign_election == SignElection::total,
                  "[{}] sign election {} has no effect on method {}, expected total (hint: the "
                  "election applies to ties and dare_ties)",
                  op, to_string(options.sign_election), to_string(options.method));
  QLORA_CHECK_ARG(options.rank >= 0,
                  "[{}] rank budget must be non-negative: got {} (hint: 0 keeps the sum of the "
                  "input ranks)",
                  op, options.rank);
  QLORA_CHECK_ARG(options.method != MergeMethod::concat || options.rank == 0 ||
                      options.rank >= in.rank_sum,
                  "[{}] concat keeps every rank, but the budget is smaller: got rank {}, "
                  "expected 0 or at least the sum of the ranks, {} (hint: use method svd to "
                  "truncate)",
                  op, options.rank, in.rank_sum);
  return in;
}

// A with each pooled column spread over its group: the [rank, K] matrix that the adapter's
// update uses, so QA-LoRA and ordinary adapters can be stacked.
MatrixD expanded_a(const LoraAdapter& adapter) {
  const MatrixD a = adapter.A.cast<double>();
  if (adapter.pool_group_size == 0) return a;
  const int g = adapter.pool_group_size;
  MatrixD full(a.rows(), a.cols() * g);
  for (std::int64_t c = 0; c < a.cols(); ++c) {
    for (int j = 0; j < g; ++j) full.col(c * g + j) = a.col(c) / static_cast<double>(g);
  }
  return full;
}

// tau_i = s_i B_i A_i [N, K].
MatrixD task_vector(const LoraAdapter& adapter) {
  return static_cast<double>(adapter.scaling) * (adapter.B.cast<double>() * expanded_a(adapter));
}

double energy_share(const Eigen::VectorXd& sigma, std::int64_t k) {
  const double total = sigma.squaredNorm();
  if (total == 0.0) return 1.0;
  return sigma.head(k).squaredNorm() / total;
}

// Truncates B_cat A_cat [N, K] to rank k through the QR factors of B_cat [N, R] and
// A_cat^T [K, R]: B_cat A_cat = Q_B (R_B R_A^T) Q_A^T, so only the SVD of the small
// [min(N, R), min(K, R)] core is needed.
LowRank lora_space_svd(const MatrixD& b_cat, const MatrixD& a_cat, std::int64_t k) {
  const Eigen::HouseholderQR<MatrixD> qr_b(b_cat);
  const Eigen::HouseholderQR<MatrixD> qr_a(a_cat.transpose());
  const std::int64_t m_b = std::min(b_cat.rows(), b_cat.cols());
  const std::int64_t m_a = std::min(a_cat.cols(), a_cat.rows());
  const MatrixD q_b = qr_b.householderQ() * MatrixD::Identity(b_cat.rows(), m_b);
  const MatrixD q_a = qr_a.householderQ() * MatrixD::Identity(a_cat.cols(), m_a);
  const MatrixD r_b = qr_b.matrixQR().topRows(m_b).triangularView<Eigen::Upper>();
  const MatrixD r_a = qr_a.matrixQR().topRows(m_a).triangularView<Eigen::Upper>();

  const MatrixD core = r_b * r_a.transpose();  // [m_b, m_a]
  const Eigen::JacobiSVD<MatrixD> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd& sigma = svd.singularValues();

  LowRank out;
  out.B = q_b * svd.matrixU().leftCols(k) * sigma.head(k).asDiagonal();
  out.A = (q_a * svd.matrixV().leftCols(k)).transpose();
  out.energy_total = sigma.squaredNorm();
  out.energy_kept = energy_share(sigma, k);
  return out;
}

// Truncates a dense update [N, K] to rank k: A = Vh[:k], B = U[:, :k] S[:k].
// NOTE: a full double-precision SVD costs about 0.2 s for [576, 576] and 0.4 s for
// [1536, 576] on one core, which dominates ties and dare_*. A randomized SVD of rank k
// would be faster but would make energy_kept an estimate.
LowRank dense_svd(const MatrixD& delta, std::int64_t k) {
  const Eigen::BDCSVD<MatrixD> svd(delta, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd& sigma = svd.singularValues();
  LowRank out;
  out.B = svd.matrixU().leftCols(k) * sigma.head(k).asDiagonal();
  out.A = svd.matrixV().leftCols(k).transpose();
  out.energy_total = sigma.squaredNorm();
  out.energy_kept = energy_share(sigma, k);
  return out;
}

// Keeps the floor(density * numel) entries of largest magnitude (TIES's trim). Equal
// magnitudes are ordered by index, so the result does not depend on the sort.
MatrixD trim_by_magnitude(const MatrixD& tau, double density) {
  if (density >= 1.0) return tau;
  const std::int64_t numel = tau.size();
  const auto keep = static_cast<std::int64_t>(std::floor(density * static_cast<double>(numel)));
  MatrixD out = MatrixD::Zero(tau.rows(), tau.cols());
  if (keep == 0) return out;

  std::vector<std::int64_t> order(static_cast<std::size_t>(numel));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  const double* values = tau.data();
  const auto larger = [values](std::int64_t a, std::int64_t b) {
    const double ma = std::abs(values[a]);
    const double mb = std::abs(values[b]);
    return ma != mb ? ma > mb : a < b;
  };
  std::nth_element(order.begin(), order.begin() + (keep - 1), order.end(), larger);
  for (std::int64_t i = 0; i < keep; ++i) {
    const std::int64_t index = order[static_cast<std::size_t>(i)];
    out.data()[index] = values[index];
  }
  return out;
}

// DARE's drop: keeps each entry with probability `density` and divides the kept ones by it.
// Draws run over the entries in row-major order, one uniform each.
MatrixD drop_and_rescale(const MatrixD& tau, double density, Rng& rng) {
  if (density >= 1.0) return tau;
  MatrixD out = MatrixD::Zero(tau.rows(), tau.cols());
  for (std::int64_t r = 0; r < tau.rows(); ++r) {
    for (std::int64_t c = 0; c < tau.cols(); ++c) {
      if (rng.uniform_double() < density) out(r, c) = tau(r, c) / density;
    }
  }
  return out;
}

int sign_of(double v) { return (v > 0.0) - (v < 0.0); }

// TIES's sign election and disjoint mean. Per entry, the elected sign is that of the sum of
// the entries (`total`) or of their signs (`frequency`), and +1 on a tie. The result is the
// sum of w_i tau_i over the tasks whose entry has that sign, divided by their count (at
// least 1), so a zero entry never counts as agreeing.
MatrixD elect_and_mean(const std::vector<MatrixD>& taus, const std::vector<double>& weights,
                       SignElection election) {
  const std::int64_t rows = taus.front().rows();
  const std::int64_t cols = taus.front().cols();
  MatrixD out(rows, cols);
  for (std::int64_t c = 0; c < cols; ++c) {
    for (std::int64_t r = 0; r < rows; ++r) {
      double vote = 0.0;
      for (const MatrixD& tau : taus) {
        vote += election == SignElection::total ? tau(r, c) : sign_of(tau(r, c));
      }
      const int elected = vote >= 0.0 ? 1 : -1;
      double sum = 0.0;
      int agreeing = 0;
      for (std::size_t i = 0; i < taus.size(); ++i) {
        if (sign_of(taus[i](r, c)) != elected) continue;
        sum += weights[i] * taus[i](r, c);
        ++agreeing;
      }
      out(r, c) = sum / static_cast<double>(std::max(agreeing, 1));
    }
  }
  return out;
}

// The combined dense update of linear, ties and dare_*.
MatrixD combine_dense(const LayerInputs& in, const MergeOptions& options,
                      std::uint64_t layer_seed) {
  const double density = static_cast<double>(options.density);
  std::vector<MatrixD> taus;
  taus.reserve(in.adapters.size());
  for (std::size_t i = 0; i < in.adapters.size(); ++i) {
    MatrixD tau = task_vector(*in.adapters[i]);
    if (options.method == MergeMethod::ties) {
      tau = trim_by_magnitude(tau, density);
    } else if (options.method == MergeMethod::dare_linear ||
               options.method == MergeMethod::dare_ties) {
      Rng rng(mix_seed(layer_seed, in.task_ids[i]));
      tau = drop_and_rescale(tau, density, rng);
    }
    taus.push_back(std::move(tau));
  }

  if (uses_sign_election(options.method)) {
    return elect_and_mean(taus, in.weights, options.sign_election);
  }
  MatrixD sum = MatrixD::Zero(in.out_features, in.in_features);
  for (std::size_t i = 0; i < taus.size(); ++i) sum += in.weights[i] * taus[i];
  return sum;
}

LayerMerge to_layer_merge(const LowRank& low_rank, const char* op) {
  LayerMerge out;
  out.adapter.rank = static_cast<int>(low_rank.B.cols());
  out.adapter.scaling = 1.0f;
  out.adapter.dropout = 0.0f;
  out.adapter.pool_group_size = 0;
  out.adapter.trainable = false;
  out.adapter.B = low_rank.B.cast<float>();
  out.adapter.A = low_rank.A.cast<float>();
  QLORA_CHECK_ARG(all_finite(out.adapter.A) && all_finite(out.adapter.B),
                  "[{}] the merged factors overflow float: got ||update||_F^2 = {:.6g} (hint: "
                  "the weights or adapters are too large)",
                  op, low_rank.energy_total);
  out.adapter.zero_grad();
  out.energy_kept = low_rank.energy_kept;
  out.energy_total = low_rank.energy_total;
  return out;
}

LayerMerge merge_layer(const LayerInputs& in, const MergeOptions& options,
                       std::uint64_t layer_seed, const char* op) {
  const std::int64_t min_dim = std::min(in.out_features, in.in_features);
  const std::int64_t exact_rank = std::min<std::int64_t>(in.rank_sum, min_dim);
  const std::int64_t budget = options.rank == 0 ? exact_rank : options.rank;

  if (options.method == MergeMethod::concat || options.method == MergeMethod::svd) {
    MatrixD b_cat(in.out_features, in.rank_sum);
    MatrixD a_cat(in.rank_sum, in.in_features);
    std::int64_t offset = 0;
    for (std::size_t i = 0; i < in.adapters.size(); ++i) {
      const LoraAdapter& adapter = *in.adapters[i];
      const double scale = in.weights[i] * static_cast<double>(adapter.scaling);
      b_cat.middleCols(offset, adapter.rank) = adapter.B.cast<double>();
      a_cat.middleRows(offset, adapter.rank) = scale * expanded_a(adapter);
      offset += adapter.rank;
    }
    if (options.method == MergeMethod::concat) {
      // Exact, so no SVD: ||B A||_F^2 = trace((B^T B)(A A^T)) gives the energy in O(R^2 (N + K)).
      LowRank exact{b_cat, a_cat, 1.0,
                    ((b_cat.transpose() * b_cat) * (a_cat * a_cat.transpose())).trace()};
      return to_layer_merge(exact, op);
    }
    return to_layer_merge(lora_space_svd(b_cat, a_cat, std::min(budget, exact_rank)), op);
  }

  const MatrixD combined = combine_dense(in, options, layer_seed);
  return to_layer_merge(dense_svd(combined, std::min(budget, min_dim)), op);
}

// Restores every projection's active adapters and disabled flag when it goes out of scope.
class ActiveSetGuard {
 public:
  explicit ActiveSetGuard(LlamaModel& model) : refs_(model.projections()) {
    for (const LlamaProjectionRef& ref : refs_) {
      active_.push_back(ref.linear->active_adapters());
      disabled_.push_back(ref.linear->adapters_disabled());
    }
  }
  ActiveSetGuard(const ActiveSetGuard&) = delete;
  ActiveSetGuard& operator=(const ActiveSetGuard&) = delete;
  ~ActiveSetGuard() {
    for (std::size_t i = 0; i < refs_.size(); ++i) {
      refs_[i].linear->set_active_adapters(active_[i]);
      refs_[i].linear->set_adapters_disabled(disabled_[i]);
    }
  }

 private:
  std::vector<LlamaProjectionRef> refs_;
  std::vector<std::vector<std::string>> active_;
  std::vector<bool> disabled_;
};

void check_names(LlamaModel& model, std::span<const std::string> names, const char* op) {
  QLORA_CHECK_ARG(!names.empty(),
                  "[{}] no adapter names: got an empty list, expected at least one", op);
  std::set<std::string> seen;
  for (const std::string& name : names) {
    QLORA_CHECK_ARG(seen.insert(name).second,
                    "[{}] adapter '{}' is listed twice (hint: give each adapter once and use "
                    "weights to count one more)",
                    op, name);
  }
  const std::vector<LlamaProjectionRef> refs = model.projections();
  for (const std::string& name : names) {
    const bool held = std::any_of(refs.begin(), refs.end(), [&](const LlamaProjectionRef& ref) {
      return ref.linear->has_adapter(name);
    });
    QLORA_CHECK_ARG(held,
                    "[{}] adapter '{}' not found on any projection of the model (hint: check "
                    "the name against the adapters that were added or loaded)",
                    op, name);
  }
}

void check_output_name_free(LlamaModel& model, const std::string& output_name, const char* op) {
  QLORA_CHECK_ARG(!output_name.empty(), "[{}] output adapter name is empty", op);
  for (const LlamaProjectionRef& ref : model.projections()) {
    QLORA_CHECK_ARG(!ref.linear->has_adapter(output_name),
                    "[{}] adapter '{}' already exists on {} (hint: choose another name or "
                    "remove the old adapter first)",
                    op, output_name, ref.key);
  }
}

double overall_energy(const ModelMergeReport& report) {
  double kept = 0.0;
  double total = 0.0;
  for (const ProjectionMergeEnergy& p : report.projections) {
    kept += p.energy_kept * p.energy_total;
    total += p.energy_total;
  }
  return total == 0.0 ? 1.0 : kept / total;
}

// Adds each projection's result under `output_name` and puts back the active sets, which
// QuantLoraLinear::add_adapter would otherwise extend.
void install_results(std::vector<std::pair<QuantLoraLinear*, LayerMerge>>& results,
                     const std::string& output_name) {
  for (auto& [linear, merged] : results) {
    const std::vector<std::string> active = linear->active_adapters();
    linear->add_adapter(output_name, std::move(merged.adapter));
    linear->set_active_adapters(active);
  }
}

}  // namespace

std::string_view to_string(MergeMethod method) {
  switch (method) {
    case MergeMethod::concat: return "concat";
    case MergeMethod::svd: return "svd";
    case MergeMethod::linear: return "linear";
    case MergeMethod::ties: return "ties";
    case MergeMethod::dare_linear: return "dare_linear";
    case MergeMethod::dare_ties: return "dare_ties";
  }
  return "unknown";
}

MergeMethod parse_merge_method(std::string_view name) {
  for (MergeMethod m : {MergeMethod::concat, MergeMethod::svd, MergeMethod::linear,
                        MergeMethod::ties, MergeMethod::dare_linear, MergeMethod::dare_ties}) {
    if (name == to_string(m)) return m;
  }
  raise<InvalidArgument>(
      "[parse_merge_method] unknown merge method: got '{}', expected one of concat, svd, "
      "linear, ties, dare_linear, dare_ties",
      name);
}

std::string_view to_string(SignElection election) {
  return election == SignElection::total ? "total" : "frequency";
}

SignElection parse_sign_election(std::string_view name) {
  if (name == "total") return SignElection::total;
  if (name == "frequency") return SignElection::frequency;
  raise<InvalidArgument>(
      "[parse_sign_election] unknown sign election: got '{}', expected total or frequency",
      name);
}

LayerMerge merge_adapters(std::span<const LoraAdapter* const> adapters,
                          const MergeOptions& options) {
  const LayerInputs in = check_inputs(adapters, options, "merge_adapters");
  return merge_layer(in, options, options.seed, "merge_adapters");
}

LayerMerge compress_adapter(const LoraAdapter& adapter, int max_rank) {
  QLORA_CHECK_ARG(max_rank >= 1,
                  "[compress_adapter] max_rank must be at least 1: got {} (hint: the rank "
                  "budget of the compressed adapter)",
                  max_rank);
  const LoraAdapter* one[] = {&adapter};
  MergeOptions options;
  options.method = MergeMethod::svd;
  options.rank = max_rank;
  const LayerInputs in = check_inputs(one, options, "compress_adapter");
  return merge_layer(in, options, 0, "compress_adapter");
}

ModelMergeReport merge_model_adapters(LlamaModel& model, std::span<const std::string> names,
                                      const std::string& output_name,
                                      const MergeOptions& options) {
  constexpr const char* kOp = "merge_model_adapters";
  check_names(model, names, kOp);
  check_output_name_free(model, output_name, kOp);
  QLORA_CHECK_ARG(options.weights.empty() || options.weights.size() == names.size(),
                  "[{}] weights count does not match the adapters: got {} weights for {} "
                  "adapters (hint: give one weight per adapter, or none for 1 each)",
                  kOp, options.weights.size(), names.size());

  ModelMergeReport report;
  std::vector<std::pair<QuantLoraLinear*, LayerMerge>> results;
  const std::vector<LlamaProjectionRef> refs = model.projections();
  for (std::size_t p = 0; p < refs.size(); ++p) {
    const QuantLoraLinear& linear = *refs[p].linear;

    // The adapters this projection contains, with the weights and task ids of their names.
    std::vector<const LoraAdapter*> held;
    MergeOptions layer_options = options;
    layer_options.weights.clear();
    std::vector<std::uint64_t> task_ids;
    std::vector<std::string> labels;
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (!linear.has_adapter(names[i])) continue;
      held.push_back(&linear.adapter(names[i]));
      layer_options.weights.push_back(options.weights.empty() ? 1.0f : options.weights[i]);
      task_ids.push_back(i);
      labels.push_back(fmt::format("'{}' on {}", names[i], refs[p].key));
    }
    if (held.empty()) continue;

    LayerInputs in = check_inputs(held, layer_options, kOp, labels);
    in.task_ids = std::move(task_ids);
    // A budget above this layer's bound is lowered, as merge_adapters documents.
    const std::uint64_t layer_seed = mix_seed(options.seed, p);
    LayerMerge merged = merge_layer(in, layer_options, layer_seed, kOp);
    report.projections.push_back(
        {refs[p].key, merged.adapter.rank, merged.energy_kept, merged.energy_total});
    results.emplace_back(refs[p].linear, std::move(merged));
  }
  report.energy_kept = overall_energy(report);

  install_results(results, output_name);
  QLORA_LOG_INFO("[{}] merged {} adapters into '{}' with {} on {} projections: energy kept {:.6f}",
                 kOp, names.size(), output_name, to_string(options.method), results.size(),
                 report.energy_kept);
  return report;
}

ModelMergeReport compress_model_adapter(LlamaModel& model, const std::string& name,
                                        int max_rank, const std::string& output_name) {
  constexpr const char* kOp = "compress_model_adapter";
  QLORA_CHECK_ARG(max_rank >= 1,
                  "[{}] max_rank must be at least 1: got {} (hint: the rank budget of the "
                  "compressed adapter)",
                  kOp, max_rank);
  const std::string names[] = {name};
  check_names(model, names, kOp);
  if (output_name != name) check_output_name_free(model, output_name, kOp);

  ModelMergeReport report;
  std::vector<std::pair<QuantLoraLinear*, LayerMerge>> results;
  for (const LlamaProjectionRef& ref : model.projections()) {
    if (!ref.linear->has_adapter(name)) continue;
    const LoraAdapter* one[] = {&ref.linear->adapter(name)};
    const std::string labels[] = {fmt::format("'{}' on {}", name, ref.key)};
    MergeOptions options;
    options.method = MergeMethod::svd;
    options.rank = max_rank;
    const LayerInputs in = check_inputs(one, options, kOp, labels);
    LayerMerge merged = merge_layer(in, options, 0, kOp);
    report.projections.push_back(
        {ref.key, merged.adapter.rank, merged.energy_kept, merged.energy_total});
    results.emplace_back(ref.linear, std::move(merged));
  }
  report.energy_kept = overall_energy(report);

  install_results(results, output_name);
  QLORA_LOG_INFO("[{}] compressed '{}' to rank <= {} as '{}' on {} projections: energy kept "
                 "{:.6f}",
                 kOp, name, max_rank, output_name, results.size(), report.energy_kept);
  return report;
}

RouteResult route_by_min_loss(LlamaModel& model, std::span<const std::string> adapter_names,
                              std::span<const std::int32_t> prefix) {
  constexpr const char* kOp = "route_by_min_loss";
  check_names(model, adapter_names, kOp);
  QLORA_CHECK_ARG(prefix.size() >= 2,
                  "[{}] prefix too short: got {} tokens, expected at least 2 (the loss scores "
                  "each token after the first)",
                  kOp, prefix.size());
  const std::int64_t max_positions = model.config().max_position_embeddings;
  QLORA_CHECK_ARG(max_positions == 0 || std::cmp_less_equal(prefix.size(), max_positions),
                  "[{}] prefix longer than the model's context: got {} tokens, expected at most "
                  "max_position_embeddings = {} (hint: a prefix of 32 tokens is enough to route)",
                  kOp, prefix.size(), max_positions);

  const std::int64_t vocab_size = model.config().vocab_size;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    QLORA_CHECK_ARG(prefix[i] >= 0 && prefix[i] < vocab_size,
                    "[{}] prefix token id out of range at index {}: got {}, expected 0 <= id < "
                    "vocab_size = {} (hint: tokenize with the model's own tokenizer)",
                    kOp, i, prefix[i], vocab_size);
  }

  // Inputs prefix[0 : n-1] predict targets prefix[1 : n].
  LlamaBatch batch;
  batch.batch_size = 1;
  batch.seq_len = static_cast<std::int64_t>(prefix.size()) - 1;
  batch.tokens.assign(prefix.begin(), prefix.end() - 1);
  batch.targets.assign(prefix.begin() + 1, prefix.end());

  RouteResult result;
  {
    const ActiveSetGuard guard(model);
    model.set_adapters_disabled(false);
    for (const std::string& name : adapter_names) {
      model.set_active_adapters({name});
      const double loss = model.loss(batch).mean();
      QLORA_CHECK_ARG(std::isfinite(loss),
                      "[{}] adapter '{}' gives a non-finite loss on the prefix: got {} (hint: "
                      "the adapter holds NaN or infinite weights)",
                      kOp, name, loss);
      result.losses.push_back(loss);
    }
  }
  result.best = static_cast<std::size_t>(
      std::min_element(result.losses.begin(), result.losses.end()) - result.losses.begin());
  QLORA_LOG_DEBUG("[{}] {} prefix tokens: adapter '{}' has the lowest loss, {:.4f}", kOp,
                  prefix.size(), adapter_names[result.best], result.losses[result.best]);
  return result;
}

}  // namespace qlora::continual
