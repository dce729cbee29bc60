#include "qlora/model/load.hpp"

#include <cmath>
#include <regex>

#include "qlora/core/error.hpp"
#include "qlora/core/log.hpp"
#include "qlora/init/loftq.hpp"

namespace qlora {
namespace {

constexpr const char* kGgufNames[] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                      "ffn_gate", "ffn_up", "ffn_down"};

std::string hf_projection_name(int layer, LlamaProjection projection) {
  return llama_module_key(layer, projection) + ".weight";
}

}  // namespace

ModelSource::ModelSource(const std::filesystem::path& path) : path_(path) {
  namespace fs = std::filesystem;
  if (fs::is_regular_file(path)) {
    gguf_ = std::make_unique<GgufFile>(path);
    config_ = LlamaConfig::from_gguf(*gguf_);
    return;
  }
  if (fs::is_directory(path)) {
    if (!fs::exists(path / "config.json")) {
      raise<IoError>("[ModelSource] {} has no config.json (hint: pass a .gguf file or a Hugging "
                     "Face model folder)",
                     path.string());
    }
    config_ = LlamaConfig::from_hf_config_json(path / "config.json");
    safetensors_ = std::make_unique<SafetensorsCheckpoint>(path);
    return;
  }
  raise<IoError>("[ModelSource] model not found: {} (hint: run scripts/fetch-model, or pass a "
                 ".gguf file or a Hugging Face model folder)",
                 path.string());
}

const GgufFile& ModelSource::gguf() const {
  if (!gguf_) raise<InvalidArgument>("[ModelSource] {} is not a GGUF file", path_.string());
  return *gguf_;
}

LlamaWeights ModelSource::weights() const {
  if (gguf_) return load_llama_gguf_weights(*gguf_, config_);

  LlamaWeights w;
  const SafetensorsCheckpoint& st = *safetensors_;
  const auto vector = [&st](const std::string& name) {
    const std::vector<float> v = st.to_float(name);
    return VectorF(Eigen::Map<const VectorF>(v.data(), static_cast<Eigen::Index>(v.size())));
  };
  w.embed_tokens = st.to_matrix("model.embed_tokens.weight");
  for (int l = 0; l < static_cast<int>(config_.num_hidden_layers); ++l) {
    LlamaLayerWeights layer;
    for (LlamaProjection p : kLlamaProjections) {
      layer.projection(p) = st.to_matrix(hf_projection_name(l, p));
    }
    const std::string prefix = fmt::format("model.layers.{}.", l);
    layer.input_layernorm = vector(prefix + "input_layernorm.weight");
    layer.post_attention_layernorm = vector(prefix + "post_attention_layernorm.weight");
    w.layers.push_back(std::move(layer));
  }
  w.norm = vector("model.norm.weight");
  if (!config_.tie_word_embeddings) w.lm_head = st.to_matrix("lm_head.weight");
  return w;
}

RowMatrixF ModelSource::projection_weight(int layer, LlamaProjection projection) const {
  if (!gguf_) return safetensors_->to_matrix(hf_projection_name(layer, projection));
  const std::string name = gguf_tensor_name(llama_module_key(layer, projection));
  RowMatrixF w = gguf_->dequantize(name);
  if (projection == LlamaProjection::q_proj) {
    return unpermute_gguf_rope_rows(w, config_.num_attention_heads);
  }
  if (projection == LlamaProjection::k_proj) {
    return unpermute_gguf_rope_rows(w, config_.num_key_value_heads);
  }
  return w;
}

Tokenizer ModelSource::tokenizer() const {
  if (gguf_) return Tokenizer::from_gguf(*gguf_);
  const auto path = path_ / "tokenizer.json";
  if (!std::filesystem::exists(path)) {
    raise<IoError>("[ModelSource] {} has no tokenizer.json", path_.string());
  }
  return Tokenizer::from_hf_tokenizer_json(path);
}

LlamaModel load_llama(const ModelSource& source, const LlamaLoadOptions& options) {
  return LlamaModel(source.config(), source.weights(), options);
}

LoftqSummary add_loftq_adapter(LlamaModel& model, const ModelSource& source,
                               const std::string& name, const LoraConfig& lora) {
  lora.validate();
  QLORA_CHECK_ARG(model.projections_quantized(),
                  "[add_loftq_adapter] LoftQ needs quantized projections");
  const QuantConfig quant = *model.load_options().projections;
  LoftqSummary summary;
  double qlora_sq = 0.0, loftq_sq = 0.0;
  for (const LlamaProjectionRef& ref : model.projections()) {
    if (!lora_targets_module(lora, ref.key, ref.layer)) continue;
    const RowMatrixF w = source.projection_weight(ref.layer, ref.projection);
    LoftqResult result = loftq_init(w, quant, lora);
    qlora_sq += result.qlora_error * result.qlora_error;
    loftq_sq += result.errors.back() * result.errors.back();
    ref.linear->set_base(std::move(result.base));
    ref.linear->add_adapter(name, std::move(result.adapter));
    ++summary.n_projections;
  }
  QLORA_CHECK_ARG(summary.n_projections > 0,
                  "[add_loftq_adapter] the target modules select no projection of the model");
  summary.qlora_error = std::sqrt(qlora_sq);
  summary.loftq_error = std::sqrt(loftq_sq);
  return summary;
}

std::string gguf_tensor_name(const std::string& module_key) {
  static const std::regex pattern(R"(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj))");
  std::smatch match;
  if (std::regex_match(module_key, match, pattern)) {
    const std::string proj = match[3].str();
    for (std::size_t i = 0; i < kLlamaProjections.size(); ++i) {
      if (proj == to_string(kLlamaProjections[i])) {
        return fmt::format("blk.{}.{}.weight", match[1].str(), kGgufNames[i]);
      }
    }
  }
  raise<InvalidArgument>("[gguf_tensor_name] not a Llama projection key: '{}', expected "
                         "model.layers.N.self_attn.q_proj and similar",
                         module_key);
}

}  // namespace qlora
