// AdamW over LoRA parameters, learning-rate schedules and gradient clipping.
//
// AdamW follows Loshchilov and Hutter ("Decoupled Weight Decay Regularization", ICLR 2019)
// as torch.optim.AdamW implements it: the decay multiplies the parameter by (1 - lr * wd)
// separately from the Adam update, and both moments are bias-corrected.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>

#include "qlora/core/matrix.hpp"

namespace qlora {

/// A named trainable parameter and its gradient, both [rows, cols].
struct ParamRef {
  std::string name;
  RowMatrixF* value = nullptr;
  RowMatrixF* grad = nullptr;
};

struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
};

class AdamW {
 public:
  explicit AdamW(AdamWConfig config = {}) : config_(config) {}

  /// Applies one update with learning rate `lr` to every parameter, creating its moments on
  /// first sight. Throws qlora::InvalidArgument when a parameter's shape changed.
  void step(std::span<const ParamRef> params, float lr);

  std::int64_t step_count() const { return step_count_; }
  const AdamWConfig& config() const { return config_; }

  /// First and second moments by parameter name, for checkpoints.
  struct Moments {
    RowMatrixF m;
    RowMatrixF v;
  };
  const std::map<std::string, Moments>& moments() const { return moments_; }
  /// Restores the state saved from moments() and step_count().
  void restore(std::map<std::string, Moments> moments, std::int64_t step_count);

 private:
  AdamWConfig config_;
  std::int64_t step_count_ = 0;
  std::map<std::string, Moments> moments_;
};

/// Returns the L2 norm of all gradients together, accumulated in double.
double global_grad_norm(std::span<const ParamRef> params);

/// Multiplies every gradient by `factor`.
void scale_grads(std::span<const ParamRef> params, float factor);

enum class LrSchedule { constant, linear, cosine };

std::string_view to_string(LrSchedule schedule);
/// Parses "constant", "linear" or "cosine"; throws qlora::InvalidArgument otherwise.
LrSchedule parse_lr_schedule(std::string_view name);

/**
 * Returns the learning rate of optimizer step `step` (0-based) out of `total_steps`: linear
 * warm-up from lr / warmup_steps to lr over the first `warmup_steps` steps, then constant,
 * linear decay to 0, or cosine decay to 0 at total_steps (as the schedules of Hugging Face
 * transformers' get_*_schedule_with_warmup).
 */
float scheduled_lr(LrSchedule schedule, float lr, std::int64_t step, std::int64_t warmup_steps,
                   std::int64_t total_steps);

}  // namespace qlora
