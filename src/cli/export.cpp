#include <filesystem>

#include <fmt/format.h>

#include "commands.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/lora/gguf_export.hpp"

namespace qlora::cli {

int run_export(const ExportOptions& o) {
  const PeftAdapter adapter = load_peft_adapter(o.adapter);
  if (o.format == "peft") {
    save_peft_adapter(o.output, adapter);
    fmt::print("wrote PEFT adapter {} ({} modules)\n", o.output, adapter.modules.size());
    return 0;
  }
  if (o.format == "gguf") {
    QLORA_CHECK_ARG(!o.model.empty(),
                    "export --format gguf needs --model (the base model, for its head counts)");
    const ModelSource source(o.model);
    export_gguf_lora(adapter, source.config(), o.output);
    fmt::print("wrote GGUF LoRA adapter {} ({} modules); use it with llama.cpp's --lora\n",
               o.output, adapter.modules.size());
    return 0;
  }
  raise<InvalidArgument>("export: unknown --format '{}', expected peft or gguf", o.format);
}

int run_merge(const MergeOptions& o) {
  if (o.threads > 0) set_num_threads(o.threads);
  GgmlType storage = GgmlType::f16;
  if (o.type == "f32") {
    storage = GgmlType::f32;
  } else if (o.type == "f16") {
    storage = GgmlType::f16;
  } else if (o.type == "q8_0") {
    storage = GgmlType::q8_0;
  } else {
    raise<InvalidArgument>("merge: unknown --type '{}', expected f32, f16 or q8_0", o.type);
  }
  const ModelSource source(o.model);
  QLORA_CHECK_ARG(source.is_gguf(), "merge: --model must be a GGUF file, got {}", o.model);
  LlamaModel model = load_model_with_adapter(source, o.quant, o.adapter);
  merge_to_gguf(source, model, "default", storage, o.output);
  fmt::print("wrote merged model {} (projections as {})\n", o.output, o.type);
  return 0;
}

int run_info(const std::string& path) {
  namespace fs = std::filesystem;
  if (fs::is_directory(path) && fs::exists(fs::path(path) / "adapter_config.json")) {
    const PeftAdapter adapter = load_peft_adapter(path);
    std::int64_t params = 0;
    for (const auto& [key, a] : adapter.modules) params += a.A.size() + a.B.size();
    fmt::print("PEFT LoRA adapter {}\n  modules: {}\n  r: {}, lora_alpha: {}, use_rslora: {}\n"
               "  parameters: {}\n",
               path, adapter.modules.size(), adapter.config.r, adapter.config.lora_alpha,
               adapter.config.use_rslora, params);
    if (!adapter.config.qlora.is_null()) fmt::print("  qlora: {}\n", adapter.config.qlora.dump());
    return 0;
  }
  const ModelSource source(path);
  const LlamaConfig& c = source.config();
  fmt::print("{} model {}\n  layers {}, hidden {}, heads {} (KV {}), head_dim {}, intermediate {}\n"
             "  vocabulary {}, context {}, rope_theta {}, rms_norm_eps {}, tied embeddings {}\n",
             source.is_gguf() ? "GGUF" : "safetensors", path, c.num_hidden_layers, c.hidden_size,
             c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size,
             c.vocab_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps,
             c.tie_word_embeddings);
  if (source.is_gguf()) {
    const GgufFile& f = source.gguf();
    std::map<std::string, int> types;
    for (const GgufTensor& t : f.tensors()) ++types[std::string(to_string(t.type))];
    std::string summary;
    for (const auto& [type, n] : types) summary += fmt::format(" {} x{}", type, n);
    fmt::print("  GGUF v{}, {} tensors:{}\n", f.version(), f.tensors().size(), summary);
  }
  return 0;
}

}  // namespace qlora::cli
