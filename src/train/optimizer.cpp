#include "qlora/train/optimizer.hpp"

#include <cmath>
#include <numbers>

#include "qlora/core/error.hpp"

namespace qlora {

void AdamW::step(std::span<const ParamRef> params, float lr) {
  ++step_count_;
  const auto t = static_cast<double>(step_count_);
  const auto bias1 = static_cast<float>(1.0 - std::pow(static_cast<double>(config_.beta1), t));
  const auto bias2 = static_cast<float>(1.0 - std::pow(static_cast<double>(config_.beta2), t));
  const float step_size = lr / bias1;
  const float bias2_sqrt = std::sqrt(bias2);

  for (const ParamRef& p : params) {
    RowMatrixF& value = *p.value;
    const RowMatrixF& grad = *p.grad;
    QLORA_CHECK_ARG(value.rows() == grad.rows() && value.cols() == grad.cols(),
                    "[AdamW::step] parameter '{}' is [{}, {}] but its gradient is [{}, {}]",
                    p.name, value.rows(), value.cols(), grad.rows(), grad.cols());
    auto [it, inserted] = moments_.try_emplace(p.name);
    Moments& state = it->second;
    if (inserted) {
      state.m.setZero(value.rows(), value.cols());
      state.v.setZero(value.rows(), value.cols());
    }
    QLORA_CHECK_ARG(state.m.rows() == value.rows() && state.m.cols() == value.cols(),
                    "[AdamW::step] parameter '{}' changed shape from [{}, {}] to [{}, {}]",
                    p.name, state.m.rows(), state.m.cols(), value.rows(), value.cols());

    if (config_.weight_decay != 0.0f) value *= 1.0f - lr * config_.weight_decay;
    state.m = config_.beta1 * state.m + (1.0f - config_.beta1) * grad;
    state.v = config_.beta2 * state.v + (1.0f - config_.beta2) * grad.cwiseProduct(grad);
    // torch's form: p -= (lr / bias1) * m / (sqrt(v) / sqrt(bias2) + eps)
    value.array() -= step_size * state.m.array() /
                     ((state.v.array().sqrt() / bias2_sqrt) + config_.eps);
  }
}

void AdamW::restore(std::map<std::string, Moments> moments, std::int64_t step_count) {
  QLORA_CHECK_ARG(step_count >= 0, "[AdamW::restore] step count must not be negative: got {}",
                  step_count);
  moments_ = std::move(moments);
  step_count_ = step_count;
}

double global_grad_norm(std::span<const ParamRef> params) {
  double sum = 0.0;
  for (const ParamRef& p : params) sum += p.grad->cast<double>().squaredNorm();
  return std::sqrt(sum);
}

void scale_grads(std::span<const ParamRef> params, float factor) {
  for (const ParamRef& p : params) *p.grad *= factor;
}

std::string_view to_string(LrSchedule schedule) {
  switch (schedule) {
    case LrSchedule::constant:
      return "constant";
    case LrSchedule::linear:
      return "linear";
    case LrSchedule::cosine:
      return "cosine";
  }
  return "unknown";
}

LrSchedule parse_lr_schedule(std::string_view name) {
  for (LrSchedule s : {LrSchedule::constant, LrSchedule::linear, LrSchedule::cosine}) {
    if (name == to_string(s)) return s;
  }
  raise<InvalidArgument>("[parse_lr_schedule] unknown schedule '{}', expected constant, linear "
                         "or cosine",
                         name);
}

float scheduled_lr(LrSchedule schedule, float lr, std::int64_t step, std::int64_t warmup_steps,
                   std::int64_t total_steps) {
  if (step < warmup_steps) {
    return lr * static_cast<float>(step + 1) / static_cast<float>(warmup_steps);
  }
  if (schedule == LrSchedule::constant || total_steps <= warmup_steps) return lr;
  const double progress = std::min(
      1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps));
  if (schedule == LrSchedule::linear) return lr * static_cast<float>(1.0 - progress);
  return lr * static_cast<float>(0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
}

}  // namespace qlora
