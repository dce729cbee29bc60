#include "qlora/lora/lora_config.hpp"

#include <algorithm>
#include <cmath>
#include <regex>

#include "qlora/core/error.hpp"

namespace qlora {

std::string_view to_string(LoraInit init) {
  switch (init) {
    case LoraInit::kaiming:
      return "default";
    case LoraInit::gaussian:
      return "gaussian";
    case LoraInit::loftq:
      return "loftq";
    case LoraInit::qalora:
      return "qalora";
  }
  return "unknown";
}

LoraInit parse_lora_init(std::string_view name) {
  for (LoraInit init : {LoraInit::kaiming, LoraInit::gaussian, LoraInit::loftq, LoraInit::qalora}) {
    if (name == to_string(init)) return init;
  }
  raise<InvalidArgument>(
      "[parse_lora_init] unknown LoRA initialisation: got '{}', expected one of default, "
      "gaussian, loftq, qalora",
      name);
}

void LoraConfig::validate() const {
  QLORA_CHECK_ARG(rank > 0, "[LoraConfig] rank must be positive: got {}", rank);
  QLORA_CHECK_ARG(std::isfinite(alpha) && alpha > 0.0f,
                  "[LoraConfig] alpha must be positive and finite: got {}", alpha);
  QLORA_CHECK_ARG(dropout >= 0.0f && dropout < 1.0f,
                  "[LoraConfig] dropout must be in [0, 1): got {}", dropout);
  QLORA_CHECK_ARG(loftq.iterations >= 1,
                  "[LoraConfig] LoftQ needs at least one iteration: got {}", loftq.iterations);
  QLORA_CHECK_ARG(loftq.oversampling >= 0 && loftq.power_iterations >= 0,
                  "[LoraConfig] randomized SVD settings must not be negative: got "
                  "oversampling={}, power_iterations={}",
                  loftq.oversampling, loftq.power_iterations);
  QLORA_CHECK_ARG(!target_modules.empty(),
                  "[LoraConfig] no target modules (hint: use \"all-linear\" or names such as "
                  "q_proj, v_proj)");
  if (target_modules.size() == 1 && target_modules[0].starts_with("re:")) {
    try {
      std::regex pattern(target_modules[0].substr(3));
    } catch (const std::regex_error& e) {
      raise<InvalidArgument>("[LoraConfig] invalid target_modules regular expression '{}': {}",
                             target_modules[0].substr(3), e.what());
    }
  }
}

bool lora_targets_module(const LoraConfig& config, std::string_view key,
                         std::optional<int> layer) {
  if (!config.layers_to_transform.empty()) {
    if (!layer.has_value()) return false;
    const auto& layers = config.layers_to_transform;
    if (std::find(layers.begin(), layers.end(), *layer) == layers.end()) return false;
  }

  const auto& targets = config.target_modules;
  if (targets.size() == 1 && targets[0].starts_with("re:")) {
    const std::regex pattern(targets[0].substr(3));
    return std::regex_match(key.begin(), key.end(), pattern);
  }
  for (const std::string& target : targets) {
    // "all-linear" selects every projection of the layer stack, never the output head.
    if (target == "all-linear") {
      if (layer.has_value() && key.ends_with("_proj")) return true;
      continue;
    }
    if (key == target) return true;
    if (key.size() > target.size() && key.ends_with(target) &&
        key[key.size() - target.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

}  // namespace qlora
