// Saving and loading LoRA adapters in PEFT's directory format, so that PEFT loads what qlora
// writes and qlora loads what PEFT writes.
//
// A directory contains `adapter_config.json` and `adapter_model.safetensors`. Tensor names are
// the model's module keys in Hugging Face naming with PEFT's prefix and suffixes:
//   base_model.model.<key>.lora_A.weight  [r, in]
//   base_model.model.<key>.lora_B.weight  [out, r]
// for example <key> = "model.layers.0.self_attn.q_proj" (peft 0.13, save_and_load.py).
//
// QA-LoRA: PEFT's QA-LoRA variant (use_qalora) multiplies the group-averaged input by the
// number of groups in / g, where qlora averages. qlora therefore stores A / (in / g) under
// use_qalora = true, so PEFT computes the same output, and multiplies it back on load.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/lora/lora_linear.hpp"

namespace qlora {

/// The fields of adapter_config.json that qlora reads and writes.
struct PeftAdapterConfig {
  int r = 8;
  float lora_alpha = 8.0f;
  bool use_rslora = false;
  float lora_dropout = 0.0f;
  std::vector<std::string> target_modules;
  std::string base_model_name_or_path;
  std::string init_lora_weights = "true";  ///< as PEFT writes it: true, "gaussian", "loftq"
  std::map<std::string, int> rank_pattern;
  std::map<std::string, float> alpha_pattern;
  int qalora_group_size = 0;  ///< non-zero: the adapters pool groups of this many inputs
  /// qlora's own record of how the adapter was made (quantization of the base, LoftQ
  /// settings), written under the key "qlora"; PEFT ignores keys it does not know.
  nlohmann::json qlora;
};

/// An adapter for a whole model: one LoraAdapter per module key.
struct PeftAdapter {
  PeftAdapterConfig config;
  std::map<std::string, LoraAdapter> modules;
};

/**
 * Writes `adapter` to the directory `dir` (created when missing). Each file is written
 * atomically, so an interrupted save leaves the previous files intact. The config's r and
 * lora_alpha are taken from the first module; modules whose rank or scaling differ get
 * rank_pattern / alpha_pattern entries. Throws qlora::InvalidArgument for an empty adapter
 * or modules that mix pooled and ordinary adapters, and qlora::IoError when writing fails.
 */
void save_peft_adapter(const std::filesystem::path& dir, const PeftAdapter& adapter);

/**
 * Reads a PEFT adapter directory. Checks that every module has both lora_A and lora_B, that
 * their shapes agree with each other and with the rank from r or rank_pattern, and that no
 * other tensors are present; any mismatch throws qlora::FormatError naming the tensor.
 * Unsupported features (DoRA, lora biases, fan_in_fan_out) throw qlora::NotImplemented.
 */
PeftAdapter load_peft_adapter(const std::filesystem::path& dir);

/**
 * Checks a loaded adapter against a model's layer shapes ([out, in] per module key) and
 * throws qlora::InvalidArgument listing every module the model lacks and every tensor whose
 * shape does not fit, by tensor name.
 */
void check_peft_adapter_fits(const PeftAdapter& adapter,
                             const std::map<std::string, std::pair<std::int64_t, std::int64_t>>&
                                 layer_shapes);

}  // namespace qlora
