// Loading a Llama checkpoint as the CLI and applications do: a GGUF file or a Hugging Face
// folder (config.json, model.safetensors or its sharded index, tokenizer.json), with its
// tokenizer, quantized projections and, optionally, LoftQ-initialised adapters.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <variant>

#include "qlora/io/gguf.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/lora/lora_config.hpp"
#include "qlora/model/llama.hpp"
#include "qlora/model/llama_config.hpp"
#include "qlora/model/tokenizer.hpp"

namespace qlora {

/// An open checkpoint: the file or folder the weights come from.
class ModelSource {
 public:
  /// Opens a .gguf file, or a folder holding config.json and safetensors weights. Throws
  /// qlora::IoError when `path` is neither, qlora::FormatError when it is malformed.
  explicit ModelSource(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  bool is_gguf() const { return gguf_ != nullptr; }
  const GgufFile& gguf() const;
  const LlamaConfig& config() const { return config_; }

  /// Reads every weight as fp32 (q and k rows in Hugging Face order).
  LlamaWeights weights() const;
  /// Reads one projection as fp32 [out, in] in Hugging Face row order.
  RowMatrixF projection_weight(int layer, LlamaProjection projection) const;
  /// The checkpoint's tokenizer: GGUF metadata, or tokenizer.json in the folder.
  Tokenizer tokenizer() const;

 private:
  std::filesystem::path path_;
  std::unique_ptr<GgufFile> gguf_;
  std::unique_ptr<SafetensorsCheckpoint> safetensors_;
  LlamaConfig config_;
};

/// Builds the model from `source` with projections quantized as `options` requests.
LlamaModel load_llama(const ModelSource& source, const LlamaLoadOptions& options);

/**
 * Adds the adapter `name` to every projection that `lora` targets, initialised by LoftQ from
 * the checkpoint's fp32 weights: each targeted projection's base is replaced by LoftQ's
 * re-quantized Q with the model's projection settings. Returns the summed ||W - dequant(Q)||
 * of QLoRA's start and of LoftQ's (Frobenius norms over all targeted projections).
 */
struct LoftqSummary {
  double qlora_error = 0.0;
  double loftq_error = 0.0;
  int n_projections = 0;
};
LoftqSummary add_loftq_adapter(LlamaModel& model, const ModelSource& source,
                               const std::string& name, const LoraConfig& lora);

/// Maps a PEFT module key ("model.layers.3.self_attn.q_proj") to its GGUF tensor name
/// ("blk.3.attn_q.weight"); throws qlora::InvalidArgument for other keys.
std::string gguf_tensor_name(const std::string& module_key);

}  // namespace qlora
