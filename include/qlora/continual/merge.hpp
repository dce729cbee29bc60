// Merging and compressing task adapters, and choosing an adapter by minimum loss on a prefix.
//
// A task vector is tau_i = s_i * B_i A_i, the dense update [N, K] of adapter i with scaling
// s_i. Every merge combines the task vectors with per-task weights w_i and returns one
// adapter whose scale lives in its factors (scaling 1, so alpha equals the rank):
//
//   concat       exact: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]
//   svd          sum_i w_i tau_i truncated to a rank budget in LoRA space, without forming
//                any [N, K] matrix: thin QR of B_cat and A_cat^T, then the SVD of R_B R_A^T
//   linear       the same sum formed densely, then a truncated SVD (what dare_linear gives
//                at density 1)
//   ties         TIES-Merging. Keep the largest `density` share of each tau_i by magnitude
//                and elect a sign per entry from the trimmed tau_i (+1 on a tie). Each entry
//                is the sum of the agreeing w_i tau_i entries divided by their count.
//   dare_linear  DARE: keep each entry with probability `density`, rescale by 1 / density, sum
//   dare_ties    DARE's random drop followed by the TIES sign election and disjoint mean
//
// The dense methods (linear, ties, dare_*) build each tau_i, combine them entry by entry as
// PEFT's src/peft/utils/merge_utils.py does (read at commit 0d4d848), and take a truncated
// SVD back to the rank budget: A = Vh[:k], B = U[:, :k] S[:k]. Every result reports the
// energy it kept, the sum of the kept sigma^2 over the sum of all sigma^2 of the combined
// update.
//
// Merging into the quantized base is not here: it goes through merge_into_quantized
// (qlora/lora/merge.hpp), which reports the rounding loss.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/lora/lora_linear.hpp"
#include "qlora/model/llama.hpp"

namespace qlora::continual {

/// The rule by which merge_adapters combines task vectors (see the table at the top of this
/// header).
enum class MergeMethod { concat, svd, linear, ties, dare_linear, dare_ties };

/// Returns the lowercase name: "concat", "svd", "linear", "ties", "dare_linear", "dare_ties".
std::string_view to_string(MergeMethod method);

/// Parses the names that to_string returns; throws qlora::InvalidArgument otherwise.
MergeMethod parse_merge_method(std::string_view name);

/// The TIES sign election of each entry, over the trimmed (unweighted) task vectors.
enum class SignElection {
  total,      ///< sign of the sum of the entries
  frequency,  ///< sign of the sum of the entries' signs
};

/// Returns "total" or "frequency".
std::string_view to_string(SignElection election);

/// Parses the names that to_string returns; throws qlora::InvalidArgument otherwise.
SignElection parse_sign_election(std::string_view name);

/// Options of merge_adapters and merge_model_adapters.
struct MergeOptions {
  MergeMethod method = MergeMethod::concat;
  /// w_i, one per adapter; empty means 1 for each.
  std::vector<float> weights = {};
  /**
   * Share of entries kept, in (0, 1]: by magnitude for ties, at random for dare_*. Must stay
   * 1 for the other methods.
   */
  float density = 1.0f;
  /// Used by ties and dare_ties only; must stay `total` for the other methods.
  SignElection sign_election = SignElection::total;
  /**
   * Rank budget of the result. 0 means the sum of the input ranks, capped at min(N, K), which
   * keeps concat, svd and linear exact. A budget above what the layer allows is lowered to
   * min(N, K) (dense methods) or to that capped sum (svd). concat accepts only 0 or a budget
   * of at least the sum of the ranks.
   */
  int rank = 0;
  /// Seeds dare_*'s random drop. Task i of a layer draws from Rng(mix_seed(seed, i)).
  std::uint64_t seed = 0;
};

/// The merged adapter of one layer and the share of the update it kept.
struct LayerMerge {
  /// Rank k, scaling 1, no dropout, frozen (trainable = false) and pool_group_size 0 (QA-LoRA
  /// inputs are expanded over their groups first). Set `trainable` to train it further.
  LoraAdapter adapter;
  /// Sum of the kept sigma^2 over the sum of all sigma^2; 1 for an exact result or a zero
  /// update.
  double energy_kept = 1.0;
  /// ||combined update||_F^2, the sum of all sigma^2.
  double energy_total = 0.0;
};

/**
 * Merges the adapters of one layer. Every adapter must have the same B rows N and the same
 * input width K (for QA-LoRA, K = A.cols() * pool_group_size).
 *
 * Throws qlora::InvalidArgument for an empty list, a null pointer, inconsistent factor
 * shapes, or layers that differ in N or K. It also rejects a non-finite factor, scaling or
 * weight, and a weights count other than the number of adapters. Among the options, a
 * density outside (0, 1] or set for a method that ignores it, a negative rank, and a concat
 * budget below the sum of the ranks are rejected.
 *
 * Example:
 *   const qlora::LoraAdapter* tasks[] = {&layer.adapter("task_a"), &layer.adapter("task_b")};
 *   qlora::continual::MergeOptions options{.method = qlora::continual::MergeMethod::ties,
 *                                          .density = 0.2f, .rank = 16};
 *   auto merged = qlora::continual::merge_adapters(tasks, options);
 *   layer.add_adapter("merged", std::move(merged.adapter));
 */
LayerMerge merge_adapters(std::span<const LoraAdapter* const> adapters,
                          const MergeOptions& options);

/**
 * Compresses one adapter to at most `max_rank` in LoRA space (thin QR of B and A^T and the
 * SVD of the small R_B R_A^T), without forming its [N, K] update. At max_rank >= the
 * adapter's rank the update is reproduced up to rounding. Throws qlora::InvalidArgument for
 * max_rank < 1 or a malformed adapter.
 */
LayerMerge compress_adapter(const LoraAdapter& adapter, int max_rank);

/// One projection's entry in a model-level merge.
struct ProjectionMergeEnergy {
  std::string key;  ///< PEFT module key, "model.layers.N.self_attn.q_proj"
  int rank = 0;     ///< rank of the merged adapter
  double energy_kept = 1.0;
  double energy_total = 0.0;
};

/// The energy kept by a model-level merge or compression, per projection and overall.
struct ModelMergeReport {
  std::vector<ProjectionMergeEnergy> projections;
  /// Sum over projections of the kept energy over the sum of the total energy; 1 when every
  /// update is zero.
  double energy_kept = 1.0;
};

/**
 * Merges the adapters `names` on every projection that contains at least one of them and adds
 * the result as adapter `output_name`. A projection that lacks one of the names treats it
 * as a zero task vector, so the weights stay matched to `names`. DARE's draws for a task do
 * not depend on which other tasks a projection contains: task i of projection p draws from
 * mix_seed(mix_seed(seed, p), i), with p counted over LlamaModel::projections().
 *
 * The active adapter set of every projection is left as it was, so the new adapter is
 * inactive until LlamaModel::set_active_adapters names it. Every projection is merged
 * before any is changed, so an error leaves the model untouched.
 *
 * Throws qlora::InvalidArgument for an empty or duplicated name list, a name that no
 * projection contains, an empty `output_name` or one that a projection already contains
 * (including an input), and for everything merge_adapters rejects.
 */
ModelMergeReport merge_model_adapters(LlamaModel& model, std::span<const std::string> names,
                                      const std::string& output_name,
                                      const MergeOptions& options);

/**
 * Compresses adapter `name` on every projection that contains it to at most `max_rank` (see
 * compress_adapter) and stores the result as `output_name`, which may equal `name` to
 * replace it. Active sets are left as they were. Throws qlora::InvalidArgument for
 * max_rank < 1, a name that no projection contains, or an `output_name` other than `name`
 * that a projection already contains.
 */
ModelMergeReport compress_model_adapter(LlamaModel& model, const std::string& name,
                                        int max_rank, const std::string& output_name);

/// The result of route_by_min_loss.
struct RouteResult {
  std::size_t best = 0;         ///< index into the adapter names; the first on a tie
  std::vector<double> losses;   ///< mean NLL of the prefix per adapter, nats per token
};

/**
 * Picks the adapter under which `prefix` (for example the first 32 tokens of a document) is
 * most likely: activates each adapter alone, computes the mean NLL of prefix[1:] given the
 * tokens before it, and returns the lowest. Every projection's active set and the disabled
 * flag are restored afterwards, also when an error is thrown.
 *
 * Throws qlora::InvalidArgument for an empty or duplicated name list or a name that no
 * projection contains. It also rejects a prefix of fewer than 2 tokens, or of more than
 * max_position_embeddings when the config sets it, a token id out of range, and a non-finite
 * loss, whose message names the adapter.
 */
RouteResult route_by_min_loss(LlamaModel& model, std::span<const std::string> adapter_names,
                              std::span<const std::int32_t> prefix);

}  // namespace qlora::continual
