// Exporting adapters and merged models to GGUF, the format llama.cpp runs.
//
// GGUF LoRA adapters follow what llama.cpp's convert_lora_to_gguf.py writes and
// src/llama-adapter.cpp loads: general.type "adapter", adapter.type "lora", the float32
// adapter.lora.alpha, and per adapted tensor T (for example blk.0.attn_q.weight) the tensors
// T.lora_a [r, in] and T.lora_b [out, r] (GGUF ne [in, r] and [r, out], the same bytes).
// llama.cpp scales by alpha / rank, so rsLoRA's alpha / sqrt(rank) is carried by writing
// alpha' = scaling * rank; modules whose scaling differs get it folded into B. The rows of
// lora_b for attn_q and attn_k are permuted into GGUF's interleaved RoPE order, as the base
// weights are. QA-LoRA adapters are written with A expanded to every input (A[:, i / g] / g),
// which gives the same update.
#pragma once

#include <filesystem>
#include <string>

#include "qlora/io/ggml_types.hpp"
#include "qlora/lora/peft_io.hpp"
#include "qlora/model/load.hpp"

namespace qlora {

/// Writes `adapter` (module keys in Hugging Face naming) as a GGUF LoRA adapter for a model
/// with `config`, atomically. Throws qlora::InvalidArgument for a module key that is not a
/// Llama projection.
void export_gguf_lora(const PeftAdapter& adapter, const LlamaConfig& config,
                      const std::filesystem::path& path);

/**
 * Writes a GGUF model equal to `source` with the adapter `adapter_name` of `model` merged:
 * each adapted projection becomes W' = dequant(Q) + s B A, where Q is the quantized base the
 * adapter was trained on (so a LoftQ adapter is merged into LoftQ's base, not into the
 * original weights), stored as `storage`: F32, F16 or Q8_0. Every other tensor and all
 * metadata are copied from `source`, which must be the GGUF file `model` was loaded from.
 * Throws qlora::InvalidArgument for another storage type or a model without the adapter.
 */
void merge_to_gguf(const ModelSource& source, LlamaModel& model, const std::string& adapter_name,
                   GgmlType storage, const std::filesystem::path& path);

}  // namespace qlora
