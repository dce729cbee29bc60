#include "qlora/lora/peft_io.hpp"

#include <cmath>
#include <set>
#include <string_view>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/io/mapped_file.hpp"
#include "qlora/io/safetensors.hpp"

namespace qlora {
namespace {

constexpr std::string_view kPrefix = "base_model.model.";
constexpr std::string_view kSuffixA = ".lora_A.weight";
constexpr std::string_view kSuffixB = ".lora_B.weight";

// The last component of a module key ("q_proj" of "model.layers.0.self_attn.q_proj").
std::string module_leaf(const std::string& key) {
  const auto dot = key.rfind('.');
  return dot == std::string::npos ? key : key.substr(dot + 1);
}

float alpha_of(const LoraAdapter& a, bool use_rslora) {
  const auto r = static_cast<float>(a.rank);
  return a.scaling * (use_rslora ? std::sqrt(r) : r);
}

float scaling_of(int rank, float alpha, bool use_rslora) {
  const auto r = static_cast<float>(rank);
  return use_rslora ? alpha / std::sqrt(r) : alpha / r;
}

// PEFT resolves rank_pattern / alpha_pattern keys by suffix match on the module key.
template <class T>
const T* find_pattern(const std::map<std::string, T>& patterns, const std::string& key) {
  for (const auto& [pattern, value] : patterns) {
    if (key == pattern || (key.size() > pattern.size() && key.ends_with(pattern) &&
                           key[key.size() - pattern.size() - 1] == '.')) {
      return &value;
    }
  }
  return nullptr;
}

}  // namespace

void save_peft_adapter(const std::filesystem::path& dir, const PeftAdapter& adapter) {
  QLORA_CHECK_ARG(!adapter.modules.empty(),
                  "[save_peft_adapter] the adapter has no modules (hint: add an adapter to the "
                  "model before saving)");
  const LoraAdapter& first = adapter.modules.begin()->second;
  const bool use_rslora = adapter.config.use_rslora;
  const int pool = first.pool_group_size;

  nlohmann::json rank_pattern = nlohmann::json::object();
  nlohmann::json alpha_pattern = nlohmann::json::object();
  std::set<std::string> targets;
  SafetensorsWriter tensors;
  for (const auto& [key, a] : adapter.modules) {
    QLORA_CHECK_ARG(a.pool_group_size == pool,
                    "[save_peft_adapter] module '{}' pools groups of {} where '{}' pools {}: one "
                    "directory holds one kind of adapter",
                    key, a.pool_group_size, adapter.modules.begin()->first, pool);
    if (a.rank != first.rank) rank_pattern[key] = a.rank;
    const float alpha = alpha_of(a, use_rslora);
    if (std::abs(alpha - alpha_of(first, use_rslora)) > 1e-6f * std::abs(alpha)) {
      alpha_pattern[key] = alpha;
    }
    targets.insert(module_leaf(key));

    const std::string name = std::string(kPrefix) + key;
    if (pool > 0) {
      const auto n_groups = static_cast<float>(a.A.cols());
      const RowMatrixF a_peft = a.A / n_groups;
      tensors.add(name + std::string(kSuffixA), a_peft);
    } else {
      tensors.add(name + std::string(kSuffixA), a.A);
    }
    tensors.add(name + std::string(kSuffixB), a.B);
  }

  nlohmann::json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", adapter.config.base_model_name_or_path},
      {"r", first.rank},
      {"lora_alpha", alpha_of(first, use_rslora)},
      {"use_rslora", use_rslora},
      {"lora_dropout", first.dropout},
      {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"use_dora", false},
      {"lora_bias", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"modules_to_save", nullptr},
      {"use_qalora", pool > 0},
      {"qalora_group_size", pool > 0 ? pool : 16},
  };
  if (!adapter.config.qlora.is_null()) config["qlora"] = adapter.config.qlora;

  std::filesystem::create_directories(dir);
  tensors.write(dir / "adapter_model.safetensors");
  write_text_file_atomic(dir / "adapter_config.json", config.dump(2) + "\n");
}

PeftAdapter load_peft_adapter(const std::filesystem::path& dir) {
  const auto config_path = dir / "adapter_config.json";
  const auto weights_path = dir / "adapter_model.safetensors";
  if (!std::filesystem::exists(config_path)) {
    raise<IoError>("[load_peft_adapter] {} not found (hint: pass the directory that PEFT's "
                   "save_pretrained or qlora export wrote)",
                   config_path.string());
  }
  if (!std::filesystem::exists(weights_path)) {
    raise<IoError>("[load_peft_adapter] {} not found (hint: only the safetensors format is "
                   "supported, not adapter_model.bin)",
                   weights_path.string());
  }

  nlohmann::json json;
  try {
    const MappedFile file(config_path);
    const auto bytes = file.bytes();
    json = nlohmann::json::parse(reinterpret_cast<const char*>(bytes.data()),
                                 reinterpret_cast<const char*>(bytes.data()) + bytes.size());
  } catch (const nlohmann::json::exception& e) {
    raise<FormatError>("[load_peft_adapter] {} is not valid JSON: {}", config_path.string(),
                       e.what());
  }

  PeftAdapter adapter;
  PeftAdapterConfig& c = adapter.config;
  try {
    if (json.value("peft_type", std::string("LORA")) != "LORA") {
      raise<NotImplemented>("[load_peft_adapter] peft_type {} is not supported, only LORA",
                            json["peft_type"].dump());
    }
    if (json.value("use_dora", false)) {
      raise<NotImplemented>("[load_peft_adapter] DoRA adapters (use_dora) are not supported");
    }
    if (json.value("fan_in_fan_out", false)) {
      raise<NotImplemented>("[load_peft_adapter] fan_in_fan_out adapters are not supported");
    }
    if (json.value("lora_bias", false) || json.value("bias", std::string("none")) != "none") {
      raise<NotImplemented>("[load_peft_adapter] adapters with biases are not supported");
    }
    c.r = json.at("r").get<int>();
    c.lora_alpha = json.value("lora_alpha", static_cast<float>(c.r));
    c.use_rslora = json.value("use_rslora", false);
    c.lora_dropout = json.value("lora_dropout", 0.0f);
    if (json.contains("target_modules") && json["target_modules"].is_array()) {
      c.target_modules = json["target_modules"].get<std::vector<std::string>>();
    } else if (json.contains("target_modules") && json["target_modules"].is_string()) {
      c.target_modules = {"re:" + json["target_modules"].get<std::string>()};
    }
    if (json.contains("base_model_name_or_path") && json["base_model_name_or_path"].is_string()) {
      c.base_model_name_or_path = json["base_model_name_or_path"].get<std::string>();
    }
    if (json.contains("rank_pattern") && json["rank_pattern"].is_object()) {
      c.rank_pattern = json["rank_pattern"].get<std::map<std::string, int>>();
    }
    if (json.contains("alpha_pattern") && json["alpha_pattern"].is_object()) {
      c.alpha_pattern = json["alpha_pattern"].get<std::map<std::string, float>>();
    }
    if (json.value("use_qalora", false)) c.qalora_group_size = json.value("qalora_group_size", 16);
    if (json.contains("qlora")) c.qlora = json["qlora"];
  } catch (const nlohmann::json::exception& e) {
    raise<FormatError>("[load_peft_adapter] {}: invalid field: {}", config_path.string(),
                       e.what());
  }
  QLORA_CHECK_ARG(c.r > 0, "[load_peft_adapter] {}: r must be positive: got {}",
                  config_path.string(), c.r);

  const SafetensorsFile file(weights_path);
  std::map<std::string, RowMatrixF> a_tensors, b_tensors;
  for (const SafetensorsTensor& t : file.tensors()) {
    std::string_view name = t.name;
    if (!name.starts_with(kPrefix)) {
      raise<FormatError>("[load_peft_adapter] unexpected tensor '{}': expected names starting "
                         "with '{}'",
                         t.name, kPrefix);
    }
    name.remove_prefix(kPrefix.size());
    if (t.shape.size() != 2) {
      raise<FormatError>("[load_peft_adapter] tensor '{}' has rank {}, expected 2", t.name,
                         t.shape.size());
    }
    if (name.ends_with(kSuffixA)) {
      a_tensors[std::string(name.substr(0, name.size() - kSuffixA.size()))] = file.to_matrix(t);
    } else if (name.ends_with(kSuffixB)) {
      b_tensors[std::string(name.substr(0, name.size() - kSuffixB.size()))] = file.to_matrix(t);
    } else {
      raise<NotImplemented>("[load_peft_adapter] tensor '{}' is not a lora_A or lora_B weight "
                            "(DoRA magnitudes, biases and embeddings are not supported)",
                            t.name);
    }
  }

  for (auto& [key, a_matrix] : a_tensors) {
    const std::string a_name = std::string(kPrefix) + key + std::string(kSuffixA);
    const std::string b_name = std::string(kPrefix) + key + std::string(kSuffixB);
    const auto b_it = b_tensors.find(key);
    if (b_it == b_tensors.end()) {
      raise<FormatError>("[load_peft_adapter] '{}' has no matching '{}'", a_name, b_name);
    }
    const int* rank_override = find_pattern(c.rank_pattern, key);
    const float* alpha_override = find_pattern(c.alpha_pattern, key);
    const int rank = rank_override != nullptr ? *rank_override : c.r;
    const float alpha = alpha_override != nullptr ? *alpha_override : c.lora_alpha;
    if (a_matrix.rows() != rank || b_it->second.cols() != rank) {
      raise<FormatError>("[load_peft_adapter] rank mismatch for '{}': got {} [{}, {}] and {} "
                         "[{}, {}], expected rank {} from adapter_config.json",
                         key, a_name, a_matrix.rows(), a_matrix.cols(), b_name,
                         b_it->second.rows(), b_it->second.cols(), rank);
    }

    LoraAdapter la;
    la.rank = rank;
    la.scaling = scaling_of(rank, alpha, c.use_rslora);
    la.dropout = c.lora_dropout;
    la.A = std::move(a_matrix);
    la.B = std::move(b_it->second);
    if (c.qalora_group_size > 0) {
      la.pool_group_size = c.qalora_group_size;
      la.A *= static_cast<float>(la.A.cols());  // undo the 1 / n_groups of the PEFT layout
    }
    la.zero_grad();
    adapter.modules.emplace(key, std::move(la));
    b_tensors.erase(b_it);
  }
  if (!b_tensors.empty()) {
    raise<FormatError>("[load_peft_adapter] '{}{}{}' has no matching lora_A weight", kPrefix,
                       b_tensors.begin()->first, kSuffixB);
  }
  if (adapter.modules.empty()) {
    raise<FormatError>("[load_peft_adapter] {} contains no LoRA tensors", weights_path.string());
  }
  return adapter;
}

void check_peft_adapter_fits(
    const PeftAdapter& adapter,
    const std::map<std::string, std::pair<std::int64_t, std::int64_t>>& layer_shapes) {
  std::string problems;
  for (const auto& [key, a] : adapter.modules) {
    const auto it = layer_shapes.find(key);
    if (it == layer_shapes.end()) {
      problems += fmt::format("\n  {}{}{}: the model has no module '{}'", kPrefix, key,
                              kSuffixA, key);
      continue;
    }
    const auto [out, in] = it->second;
    const std::int64_t expected_in = a.pool_group_size > 0 ? in / a.pool_group_size : in;
    if (a.A.cols() != expected_in) {
      problems += fmt::format("\n  {}{}{}: shape [{}, {}], expected [{}, {}]", kPrefix, key,
                              kSuffixA, a.A.rows(), a.A.cols(), a.rank, expected_in);
    }
    if (a.B.rows() != out) {
      problems += fmt::format("\n  {}{}{}: shape [{}, {}], expected [{}, {}]", kPrefix, key,
                              kSuffixB, a.B.rows(), a.B.cols(), out, a.rank);
    }
  }
  if (!problems.empty()) {
    raise<InvalidArgument>("[check_peft_adapter_fits] the adapter does not fit the model:{} "
                           "(hint: was it trained for a different base model?)",
                           problems);
  }
}

}  // namespace qlora
