// Reading Llama weights from GGUF (tensor names as llama.cpp writes them) and the RoPE row
// permutation between llama.cpp's interleaved q/k order and Hugging Face's.

#include <fmt/format.h>

#include "qlora/core/error.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/model/llama.hpp"

namespace qlora {
namespace {

// Checks the shared preconditions of the two permutations and returns head_dim.
std::int64_t rope_head_dim(ConstRefRowMatrixF weight, std::int64_t n_heads, const char* op) {
  QLORA_CHECK_ARG(n_heads > 0 && weight.rows() % n_heads == 0 &&
                      (weight.rows() / n_heads) % 2 == 0,
                  "[{}] rows must split into heads of even size: got {} rows and {} heads "
                  "(hint: pass num_attention_heads for q and num_key_value_heads for k)",
                  op, weight.rows(), n_heads);
  return weight.rows() / n_heads;
}

// Reads tensor `name` as fp32 [rows, cols] and checks its shape.
RowMatrixF read_matrix(const GgufFile& file, const std::string& name, std::int64_t rows,
                       std::int64_t cols) {
  const GgufTensor& tensor = file.tensor(name);
  if (tensor.rows() != rows || tensor.cols() != cols) {
    raise<FormatError>(
        "[load_llama_gguf_weights] {}: tensor {} has shape [{}, {}], expected [{}, {}] from the "
        "model's llama.* metadata",
        file.path().string(), name, tensor.rows(), tensor.cols(), rows, cols);
  }
  return file.dequantize(tensor);
}

VectorF read_vector(const GgufFile& file, const std::string& name, std::int64_t size) {
  const GgufTensor& tensor = file.tensor(name);
  if (tensor.n_elements() != size) {
    raise<FormatError>(
        "[load_llama_gguf_weights] {}: tensor {} has {} elements, expected {}",
        file.path().string(), name, tensor.n_elements(), size);
  }
  const RowMatrixF values = file.dequantize(tensor);
  return Eigen::Map<const VectorF>(values.data(), size);
}

}  // namespace

std::string_view to_string(LlamaProjection projection) {
  switch (projection) {
    case LlamaProjection::q_proj: return "q_proj";
    case LlamaProjection::k_proj: return "k_proj";
    case LlamaProjection::v_proj: return "v_proj";
    case LlamaProjection::o_proj: return "o_proj";
    case LlamaProjection::gate_proj: return "gate_proj";
    case LlamaProjection::up_proj: return "up_proj";
    case LlamaProjection::down_proj: return "down_proj";
  }
  return "unknown";
}

std::string llama_module_key(int layer, LlamaProjection projection) {
  const bool attention = projection == LlamaProjection::q_proj ||
                         projection == LlamaProjection::k_proj ||
                         projection == LlamaProjection::v_proj ||
                         projection == LlamaProjection::o_proj;
  return fmt::format("model.layers.{}.{}.{}", layer, attention ? "self_attn" : "mlp",
                     to_string(projection));
}

RowMatrixF& LlamaLayerWeights::projection(LlamaProjection which) {
  switch (which) {
    case LlamaProjection::q_proj: return q_proj;
    case LlamaProjection::k_proj: return k_proj;
    case LlamaProjection::v_proj: return v_proj;
    case LlamaProjection::o_proj: return o_proj;
    case LlamaProjection::gate_proj: return gate_proj;
    case LlamaProjection::up_proj: return up_proj;
    case LlamaProjection::down_proj: return down_proj;
  }
  raise<InvalidArgument>("[LlamaLayerWeights::projection] unknown projection: got {}",
                         static_cast<int>(which));
}

RowMatrixF unpermute_gguf_rope_rows(ConstRefRowMatrixF weight, std::int64_t n_heads) {
  const std::int64_t head_dim = rope_head_dim(weight, n_heads, "unpermute_gguf_rope_rows");
  const std::int64_t half = head_dim / 2;
  RowMatrixF out(weight.rows(), weight.cols());
  for (std::int64_t h = 0; h < n_heads; ++h) {
    const std::int64_t base = h * head_dim;
    for (std::int64_t i = 0; i < half; ++i) {
      // GGUF row 2i is HF row i, GGUF row 2i + 1 is HF row i + head_dim / 2.
      out.row(base + i) = weight.row(base + 2 * i);
      out.row(base + i + half) = weight.row(base + 2 * i + 1);
    }
  }
  return out;
}

RowMatrixF permute_hf_rope_rows(ConstRefRowMatrixF weight, std::int64_t n_heads) {
  const std::int64_t head_dim = rope_head_dim(weight, n_heads, "permute_hf_rope_rows");
  const std::int64_t half = head_dim / 2;
  RowMatrixF out(weight.rows(), weight.cols());
  for (std::int64_t h = 0; h < n_heads; ++h) {
    const std::int64_t base = h * head_dim;
    for (std::int64_t i = 0; i < half; ++i) {
      out.row(base + 2 * i) = weight.row(base + i);
      out.row(base + 2 * i + 1) = weight.row(base + i + half);
    }
  }
  return out;
}

LlamaWeights load_llama_gguf_weights(const GgufFile& file, const LlamaConfig& config) {
  config.validate(file.path().string());
  const std::int64_t hidden = config.hidden_size;
  const std::int64_t q_dim = config.num_attention_heads * config.head_dim;
  const std::int64_t kv_dim = config.num_key_value_heads * config.head_dim;
  const std::int64_t inter = config.intermediate_size;

  LlamaWeights weights;
  weights.embed_tokens = read_matrix(file, "token_embd.weight", config.vocab_size, hidden);
  weights.norm = read_vector(file, "output_norm.weight", hidden);
  if (file.find_tensor("output.weight") != nullptr) {
    weights.lm_head = read_matrix(file, "output.weight", config.vocab_size, hidden);
  }

  weights.layers.resize(static_cast<std::size_t>(config.num_hidden_layers));
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
    LlamaLayerWeights& layer = weights.layers[static_cast<std::size_t>(l)];
    const std::string prefix = fmt::format("blk.{}.", l);
    layer.q_proj = unpermute_gguf_rope_rows(
        read_matrix(file, prefix + "attn_q.weight", q_dim, hidden), config.num_attention_heads);
    layer.k_proj = unpermute_gguf_rope_rows(
        read_matrix(file, prefix + "attn_k.weight", kv_dim, hidden),
        config.num_key_value_heads);
    layer.v_proj = read_matrix(file, prefix + "attn_v.weight", kv_dim, hidden);
    layer.o_proj = read_matrix(file, prefix + "attn_output.weight", hidden, q_dim);
    layer.gate_proj = read_matrix(file, prefix + "ffn_gate.weight", inter, hidden);
    layer.up_proj = read_matrix(file, prefix + "ffn_up.weight", inter, hidden);
    layer.down_proj = read_matrix(file, prefix + "ffn_down.weight", hidden, inter);
    layer.input_layernorm = read_vector(file, prefix + "attn_norm.weight", hidden);
    layer.post_attention_layernorm = read_vector(file, prefix + "ffn_norm.weight", hidden);
  }
  return weights;
}

}  // namespace qlora
