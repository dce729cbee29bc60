#include "qlora/lora/gguf_export.hpp"

#include <cmath>
#include <cstring>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/io/gguf_writer.hpp"
#include "qlora/lora/merge.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora {
namespace {

// Returns the head count of the RoPE row permutation that a projection's output rows need in
// GGUF, or 0 when they need none.
std::int64_t rope_heads(const std::string& module_key, const LlamaConfig& config) {
  if (module_key.ends_with(".q_proj")) return config.num_attention_heads;
  if (module_key.ends_with(".k_proj")) return config.num_key_value_heads;
  return 0;
}

// A with QA-LoRA's pooling folded in: [r, in], each column A[:, i / g] / g.
RowMatrixF expanded_a(const LoraAdapter& a, std::int64_t in_features) {
  if (a.pool_group_size == 0) return a.A;
  const int g = a.pool_group_size;
  RowMatrixF out(a.A.rows(), in_features);
  for (std::int64_t i = 0; i < in_features; ++i) out.col(i) = a.A.col(i / g) / static_cast<float>(g);
  return out;
}

// Quantizes one row of n (a multiple of 32) floats to ggml's Q8_0: per 32 values an fp16
// scale d = absmax / 127 and int8 codes round(x / d), rounding half away from zero as ggml's
// reference quantize_row_q8_0_ref does.
void quantize_row_q8_0(const float* x, std::int64_t n, std::byte* out) {
  for (std::int64_t b = 0; b < n / 32; ++b) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::abs(x[b * 32 + j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const std::uint16_t d16 = fp32_to_fp16(d);
    std::byte* block = out + b * 34;
    std::memcpy(block, &d16, 2);
    for (int j = 0; j < 32; ++j) {
      const auto q = static_cast<std::int8_t>(std::round(x[b * 32 + j] * id));
      std::memcpy(block + 2 + j, &q, 1);
    }
  }
}

}  // namespace

void export_gguf_lora(const PeftAdapter& adapter, const LlamaConfig& config,
                      const std::filesystem::path& path) {
  QLORA_CHECK_ARG(!adapter.modules.empty(), "[export_gguf_lora] the adapter has no modules");
  const LoraAdapter& first = adapter.modules.begin()->second;
  // One alpha per file: llama.cpp applies alpha / rank, so this alpha reproduces the first
  // module's scaling; other modules fold the ratio into B.
  const float file_alpha = first.scaling * static_cast<float>(first.rank);

  GgufWriter writer;
  writer.set("general.architecture", GgufValue(std::string("llama")));
  writer.set("general.type", GgufValue(std::string("adapter")));
  writer.set("general.name", GgufValue(std::string("qlora adapter")));
  writer.set("adapter.type", GgufValue(std::string("lora")));
  writer.set("adapter.lora.alpha", GgufValue(file_alpha));

  for (const auto& [key, a] : adapter.modules) {
    const std::string tensor = gguf_tensor_name(key);
    const std::int64_t in = a.pool_group_size > 0 ? a.A.cols() * a.pool_group_size : a.A.cols();
    const RowMatrixF lora_a = expanded_a(a, in);
    const float fold = a.scaling * static_cast<float>(a.rank) / file_alpha;
    RowMatrixF lora_b = a.B * fold;
    if (const std::int64_t heads = rope_heads(key, config); heads > 0) {
      lora_b = permute_hf_rope_rows(lora_b, heads);
    }
    const std::int64_t a_shape[] = {lora_a.rows(), lora_a.cols()};
    const std::int64_t b_shape[] = {lora_b.rows(), lora_b.cols()};
    writer.add_tensor(tensor + ".lora_a", a_shape,
                      std::span<const float>(lora_a.data(), static_cast<std::size_t>(lora_a.size())));
    writer.add_tensor(tensor + ".lora_b", b_shape,
                      std::span<const float>(lora_b.data(), static_cast<std::size_t>(lora_b.size())));
  }
  writer.write(path);
}

void merge_to_gguf(const ModelSource& source, LlamaModel& model, const std::string& adapter_name,
                   GgmlType storage, const std::filesystem::path& path) {
  QLORA_CHECK_ARG(storage == GgmlType::f32 || storage == GgmlType::f16 || storage == GgmlType::q8_0,
                  "[merge_to_gguf] unsupported storage type {}: expected F32, F16 or Q8_0",
                  to_string(storage));
  const GgufFile& base = source.gguf();
  GgufWriter writer(static_cast<std::uint32_t>(base.alignment()));
  for (const GgufKeyValue& kv : base.metadata()) {
    if (kv.key == "general.alignment") continue;
    writer.set(kv.key, kv.value);
  }

  // The merged projections, by GGUF tensor name.
  std::map<std::string, RowMatrixF> merged;
  int n_merged = 0;
  for (const LlamaProjectionRef& ref : model.projections()) {
    if (ref.linear == nullptr) continue;
    RowMatrixF w = dequantize(ref.linear->base());
    if (ref.linear->has_adapter(adapter_name)) {
      merge_adapter(w, ref.linear->adapter(adapter_name), /*safe_merge=*/true);
      ++n_merged;
    }
    if (const std::int64_t heads = rope_heads(ref.key, model.config()); heads > 0) {
      w = permute_hf_rope_rows(w, heads);
    }
    merged.emplace(gguf_tensor_name(ref.key), std::move(w));
  }
  QLORA_CHECK_ARG(n_merged > 0, "[merge_to_gguf] the model holds no adapter named '{}'",
                  adapter_name);

  for (const GgufTensor& t : base.tensors()) {
    const auto it = merged.find(t.name);
    if (it == merged.end()) {
      const std::vector<std::int64_t> ne(t.ne.begin(), t.ne.begin() + t.n_dims);
      writer.add_tensor(t.name, t.type, ne, t.data);
      continue;
    }
    const RowMatrixF& w = it->second;
    const std::int64_t shape[] = {w.rows(), w.cols()};
    if (storage == GgmlType::q8_0) {
      QLORA_CHECK_ARG(w.cols() % 32 == 0, "[merge_to_gguf] Q8_0 needs rows of a multiple of 32 "
                                          "values: {} has {}",
                      t.name, w.cols());
      std::vector<std::byte> bytes(static_cast<std::size_t>(w.rows() * (w.cols() / 32) * 34));
      for (std::int64_t r = 0; r < w.rows(); ++r) {
        quantize_row_q8_0(w.row(r).data(), w.cols(),
                          bytes.data() + r * (w.cols() / 32) * 34);
      }
      const std::int64_t ne[] = {w.cols(), w.rows()};
      writer.add_tensor(t.name, GgmlType::q8_0, ne, bytes);
    } else {
      writer.add_tensor(t.name, shape,
                        std::span<const float>(w.data(), static_cast<std::size_t>(w.size())),
                        storage);
    }
  }
  writer.write(path);
}

}  // namespace qlora
