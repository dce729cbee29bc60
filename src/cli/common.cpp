#include <sstream>

#include "commands.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/log.hpp"

namespace qlora::cli {

QuantConfig QuantOptions::to_config() const {
  QuantConfig config;
  if (format == "nf4") {
    config.format = QuantFormat::nf4;
  } else if (format == "int4") {
    config.format = QuantFormat::int4;
  } else if (format == "int8") {
    config.format = QuantFormat::int8;
  } else {
    raise<InvalidArgument>("--quant: unknown format '{}', expected nf4, int4 or int8", format);
  }
  config.block_size = group_size;
  config.double_quant = double_quant;
  config.symmetric = symmetric;
  QLORA_CHECK_ARG(!double_quant || config.format == QuantFormat::nf4,
                  "--double-quant applies to nf4 only: got --quant {}", format);
  QLORA_CHECK_ARG(!symmetric || config.format != QuantFormat::nf4,
                  "--symmetric applies to int4 and int8 only: got --quant nf4");
  return config;
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

std::vector<std::string> parse_targets(const std::string& text) {
  if (text.starts_with("re:") || text == "all-linear") return {text};
  const std::vector<std::string> targets = split_list(text);
  QLORA_CHECK_ARG(!targets.empty(), "--targets is empty (hint: q_proj,v_proj or all-linear)");
  return targets;
}

std::vector<int> parse_layers(const std::string& text) {
  std::vector<int> layers;
  for (const std::string& item : split_list(text)) {
    try {
      const auto dash = item.find('-');
      if (dash == std::string::npos) {
        layers.push_back(std::stoi(item));
        continue;
      }
      const int first = std::stoi(item.substr(0, dash));
      const int last = std::stoi(item.substr(dash + 1));
      QLORA_CHECK_ARG(first <= last, "--layers: empty range '{}'", item);
      for (int l = first; l <= last; ++l) layers.push_back(l);
    } catch (const std::logic_error&) {
      raise<InvalidArgument>("--layers: invalid entry '{}', expected N or N-M", item);
    }
  }
  return layers;
}

LlamaModel load_model_with_adapter(const ModelSource& source, const QuantOptions& quant,
                                   const std::string& dir) {
  PeftAdapter adapter = load_peft_adapter(dir);
  QuantOptions effective = quant;
  const nlohmann::json& meta = adapter.config.qlora;
  if (meta.is_object() && meta.contains("quant")) {
    // The base must be quantized exactly as in training for the adapter to fit it.
    effective.format = meta["quant"].value("format", quant.format);
    effective.group_size = meta["quant"].value("group_size", quant.group_size);
    effective.double_quant = meta["quant"].value("double_quant", quant.double_quant);
    effective.symmetric = meta["quant"].value("symmetric", quant.symmetric);
  }
  LlamaLoadOptions load;
  load.projections = effective.to_config();
  LlamaModel model = load_llama(source, load);

  std::map<std::string, std::pair<std::int64_t, std::int64_t>> shapes;
  for (const LlamaProjectionRef& ref : model.projections()) {
    shapes[ref.key] = {ref.linear->out_features(), ref.linear->in_features()};
  }
  check_peft_adapter_fits(adapter, shapes);

  if (meta.is_object() && meta.value("init", std::string()) == "loftq") {
    // Rebuild LoftQ's base with the recorded settings; the trained A and B replace its
    // initial factors below.
    LoraConfig lora;
    lora.rank = adapter.config.r;
    lora.alpha = adapter.config.lora_alpha;
    lora.use_rslora = adapter.config.use_rslora;
    lora.loftq.iterations = meta.value("loftq_iterations", 1);
    lora.target_modules = {};
    for (const auto& [key, unused] : adapter.modules) lora.target_modules.push_back(key);
    QLORA_LOG_INFO("rebuilding the LoftQ base of {} projections", adapter.modules.size());
    add_loftq_adapter(model, source, "default", lora);
  }
  for (const LlamaProjectionRef& ref : model.projections()) {
    const auto it = adapter.modules.find(ref.key);
    if (it == adapter.modules.end()) continue;
    ref.linear->add_adapter("default", std::move(it->second));
  }
  model.set_active_adapters({"default"});
  return model;
}

}  // namespace qlora::cli
