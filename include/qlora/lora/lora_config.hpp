// LoRA hyper-parameters and the selection of the layers that get adapters.
//
// The names and defaults follow PEFT's LoraConfig (peft 0.13-era `tuners/lora/config.py`):
// `rank` (PEFT's `r`), `alpha` (`lora_alpha`), `use_rslora`, `dropout` (`lora_dropout`),
// `target_modules`. One deliberate difference: the default targets are all seven Llama
// projections, as QLoRA, LoftQ and QA-LoRA train them, where PEFT's Llama default is only
// q_proj and v_proj.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

/// The initialisation of a new adapter's A and B.
enum class LoraInit {
  kaiming,   ///< PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform, a = sqrt(5)), B = 0
  gaussian,  ///< A ~ N(0, (1/rank)^2), B = 0
  loftq,     ///< A and B from LoftQ's alternating quantize / SVD; the base is re-quantized
  qalora,    ///< QA-LoRA: A [rank, in / group] Xavier-uniform over group-pooled inputs, B = 0
};

/// Returns "default", "gaussian", "loftq" or "qalora" (the CLI spelling).
std::string_view to_string(LoraInit init);

/// Parses the names that to_string returns; throws qlora::InvalidArgument otherwise.
LoraInit parse_lora_init(std::string_view name);

/// The SVD method that LoftQ uses on the quantization residual.
enum class SvdMethod {
  automatic,   ///< full SVD when min(out, in) <= LoftqOptions::full_svd_max_dim, else randomized
  full,        ///< Eigen's BDCSVD of the whole residual
  randomized,  ///< Halko-Martinsson-Tropp range finder with power iterations
};

/// Options of LoftQ initialisation (Li et al., arXiv 2310.08659, Algorithm 1).
struct LoftqOptions {
  int iterations = 1;  ///< T, alternations of quantize and SVD (PEFT's loftq_iter)
  /// PEFT's loftq_init ignores the LoRA scaling s, so dequant(Q) + s*B*A approximates W only
  /// when s = 1. By default qlora divides the factors by s so that it does for any alpha;
  /// true reproduces PEFT's unscaled split.
  bool peft_compatible = false;
  SvdMethod svd = SvdMethod::automatic;
  std::int64_t full_svd_max_dim = 1024;  ///< used by SvdMethod::automatic
  int oversampling = 10;                 ///< extra columns of the randomized range finder
  int power_iterations = 4;              ///< subspace iterations of the randomized SVD
  std::uint64_t seed = 0;                ///< seeds the randomized SVD's test matrix
};

/// The hyper-parameters of one LoRA adapter and the modules it is applied to.
struct LoraConfig {
  int rank = 8;
  float alpha = 8.0f;
  bool use_rslora = false;  ///< scaling alpha / sqrt(rank) instead of alpha / rank
  float dropout = 0.0f;     ///< on the adapter input only; the base path sees undropped x
  LoraInit init = LoraInit::kaiming;
  LoftqOptions loftq;

  /// Module names (a key matches when equal or ending with "." + name), "all-linear", or,
  /// with a single entry starting with "re:", a regular expression that must match the whole
  /// module key (for example "re:.*layers\.(0|1)\..*proj").
  std::vector<std::string> target_modules = {"q_proj", "k_proj",    "v_proj",   "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  /// Only these layer indexes get adapters; empty means every layer.
  std::vector<int> layers_to_transform;

  /// Returns the factor applied to B * A: alpha / rank, or alpha / sqrt(rank) with rsLoRA.
  float scaling() const {
    return use_rslora ? alpha / std::sqrt(static_cast<float>(rank))
                      : alpha / static_cast<float>(rank);
  }

  /// Throws qlora::InvalidArgument for a non-positive rank, a non-finite alpha, a dropout
  /// outside [0, 1), LoftQ iterations < 1, or an empty or invalid target list.
  void validate() const;
};

/**
 * Returns whether the module `key` (for example "model.layers.3.self_attn.q_proj") is
 * selected by `config.target_modules` and `config.layers_to_transform`. `layer` is the
 * module's layer index, or nullopt for modules outside the layer stack.
 */
bool lora_targets_module(const LoraConfig& config, std::string_view key,
                         std::optional<int> layer);

}  // namespace qlora
