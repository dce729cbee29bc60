// Load a base model and a PEFT adapter, then generate text with a KV cache.
//
//   example_generate MODEL.gguf ADAPTER_DIR PROMPT
//   (for example models/SmolLM2-135M-Instruct.Q4_1.gguf runs/demo/adapter "Life is")
#include <cstdio>

#include <qlora/qlora.hpp>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s MODEL.gguf ADAPTER_DIR PROMPT\n", argv[0]);
    return 2;
  }
  try {
    const qlora::ModelSource source(argv[1]);
    const qlora::Tokenizer tokenizer = source.tokenizer();
    qlora::LlamaModel model = qlora::load_llama(source, {});

    // Attach every module of the adapter to its projection.
    qlora::PeftAdapter adapter = qlora::load_peft_adapter(argv[2]);
    for (const qlora::LlamaProjectionRef& ref : model.projections()) {
      auto it = adapter.modules.find(ref.key);
      if (it != adapter.modules.end()) ref.linear->add_adapter("default", std::move(it->second));
    }

    // Greedy decoding of 32 tokens.
    std::vector<std::int32_t> tokens = tokenizer.encode(argv[3]);
    qlora::LlamaKvCache cache(model.config(), static_cast<std::int64_t>(tokens.size()) + 32);
    qlora::RowVectorF logits = model.prefill(cache, tokens);
    std::vector<std::int32_t> generated;
    for (int i = 0; i < 32; ++i) {
      Eigen::Index next = 0;
      logits.maxCoeff(&next);
      if (next == tokenizer.eos_id()) break;
      generated.push_back(static_cast<std::int32_t>(next));
      if (i + 1 < 32) logits = model.forward_next(cache, static_cast<std::int32_t>(next));
    }
    std::printf("%s%s\n", argv[3], tokenizer.decode(generated).c_str());
  } catch (const qlora::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
