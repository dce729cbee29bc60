#include "qlora/continual/olora.hpp"

#include <cmath>

#include "qlora/core/error.hpp"

namespace qlora::continual {
namespace {

// Subgradient of |x|, with 0 at 0 as PyTorch's sign gives.
float sign_of(float v) { return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f); }

double overlap_and_gradient(LlamaModel& model, const std::string& current,
                            const std::vector<std::string>& previous, float lambda_orth,
                            bool add_gradient) {
  double total = 0.0;
  bool found = false;
  for (const LlamaProjectionRef& ref : model.projections()) {
    if (ref.linear == nullptr || !ref.linear->has_adapter(current)) continue;
    found = true;
    LoraAdapter& a = ref.linear->adapter(current);
    for (const std::string& name : previous) {
      if (!ref.linear->has_adapter(name)) continue;
      const LoraAdapter& old = ref.linear->adapter(name);
      QLORA_CHECK_ARG(old.A.cols() == a.A.cols(),
                      "[olora_penalty] {}: adapter '{}' has A with {} columns, '{}' has {} (hint: "
                      "O-LoRA needs the same adapter kind for every task)",
                      ref.key, name, old.A.cols(), current, a.A.cols());
      const RowMatrixF overlap = old.A * a.A.transpose();  // [r_old, r]
      double sum = 0.0;
      for (float v : overlap.reshaped()) sum += std::fabs(static_cast<double>(v));
      total += sum;
      if (add_gradient && lambda_orth != 0.0f) {
        const RowMatrixF signs = overlap.unaryExpr([](float v) { return sign_of(v); });
        a.dA.noalias() += lambda_orth * (signs.transpose() * old.A);
      }
    }
  }
  QLORA_CHECK_ARG(found, "[olora_penalty] no projection holds the adapter '{}'", current);
  return total;
}

}  // namespace

double olora_overlap(LlamaModel& model, const std::string& current,
                     const std::vector<std::string>& previous) {
  return overlap_and_gradient(model, current, previous, 0.0f, false);
}

double olora_penalty(LlamaModel& model, const std::string& current,
                     const std::vector<std::string>& previous, const OloraOptions& options,
                     bool add_gradient) {
  QLORA_CHECK_ARG(std::isfinite(options.lambda_orth) && options.lambda_orth >= 0.0f &&
                      std::isfinite(options.lambda_l2) && options.lambda_l2 >= 0.0f,
                  "[olora_penalty] lambdas must be finite and >= 0: got lambda_orth {} and "
                  "lambda_l2 {}",
                  options.lambda_orth, options.lambda_l2);
  double penalty = 0.0;
  if (options.lambda_orth != 0.0f) {
    penalty += options.lambda_orth *
               overlap_and_gradient(model, current, previous, options.lambda_orth, add_gradient);
  }
  if (options.lambda_l2 != 0.0f) {
    for (const LlamaProjectionRef& ref : model.projections()) {
      if (ref.linear == nullptr || !ref.linear->has_adapter(current)) continue;
      LoraAdapter& a = ref.linear->adapter(current);
      const double norm_a = a.A.norm();
      const double norm_b = a.B.norm();
      penalty += options.lambda_l2 * (norm_a + norm_b);
      if (!add_gradient) continue;
      // d||X||_F / dX = X / ||X||_F, taken as 0 at X = 0 (B starts at zero).
      if (norm_a > 0.0) a.dA += (options.lambda_l2 / static_cast<float>(norm_a)) * a.A;
      if (norm_b > 0.0) a.dB += (options.lambda_l2 / static_cast<float>(norm_b)) * a.B;
    }
  }
  return penalty;
}

}  // namespace qlora::continual
