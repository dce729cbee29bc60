// O-LoRA (Wang et al., 2023, arXiv 2310.14152): keeps a new task's adapter in a subspace
// orthogonal to the earlier tasks' adapters by penalising the overlap of their input-side
// factors. For every adapted layer, with A_old the frozen A of an earlier task ([r_old, in])
// and A_t the trainable A of the current task ([r, in]):
//
//   penalty = lambda_orth * sum over layers and earlier tasks of sum_ik |(A_old A_t^T)[i, k]|
//           + lambda_l2 * sum over layers of (||A_t||_F + ||B_t||_F)
//
// B_t is not constrained by the first term. The subgradient with respect to A_t is
// lambda_orth * sign(A_old A_t^T)^T A_old (sign(0) = 0). Add it once per optimizer step
// (Trainer::regularizer does), not once per micro-batch.
#pragma once

#include <string>
#include <vector>

#include "qlora/model/llama.hpp"

namespace qlora::continual {

struct OloraOptions {
  float lambda_orth = 0.5f;
  float lambda_l2 = 0.0f;
};

/**
 * Returns the O-LoRA penalty of adapter `current` against the adapters `previous` over every
 * projection that contains them, and, with `add_gradient`, adds its gradient to `current`'s dA and
 * dB. Throws qlora::InvalidArgument when `current` is missing, an earlier adapter's A has a
 * different input width, or a lambda is negative or not finite.
 */
double olora_penalty(LlamaModel& model, const std::string& current,
                     const std::vector<std::string>& previous, const OloraOptions& options,
                     bool add_gradient = true);

/// sum |A_old A_t^T| over layers and earlier adapters, without the lambda: the overlap that
/// the penalty drives down.
double olora_overlap(LlamaModel& model, const std::string& current,
                     const std::vector<std::string>& previous);

}  // namespace qlora::continual
