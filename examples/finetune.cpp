// Fine-tune LoRA adapters on a GGUF model with the trainer API, step by step.
//
//   example_finetune MODEL.gguf TEXT_FILE OUTPUT_DIR
//   (for example models/SmolLM2-135M-Instruct.Q4_1.gguf /usr/share/games/fortunes/wisdom
//   runs/example)
#include <cstdio>

#include <qlora/qlora.hpp>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s MODEL.gguf TEXT_FILE OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  try {
    // The model with NF4 projections, and its own tokenizer.
    const qlora::ModelSource source(argv[1]);
    qlora::LlamaModel model = qlora::load_llama(source, {});
    const qlora::Tokenizer tokenizer = source.tokenizer();

    // Documents separated by "%" lines (the fortune format), 10% held out, packed into rows.
    qlora::DataOptions data;
    data.text_separator = "%";
    std::vector<qlora::Document> train, eval;
    qlora::split_documents(qlora::load_documents(argv[2], tokenizer, data), data, train, eval);
    const std::int32_t pad = tokenizer.eos_id();

    // A rank-8 adapter on all seven projections of every layer.
    qlora::LoraConfig lora;
    lora.rank = 8;
    lora.alpha = 16.0f;
    model.add_adapter("default", lora, /*seed=*/1);

    qlora::TrainerConfig config;
    config.max_steps = 4;
    config.batch_size = 2;
    config.lr = 1e-3f;
    config.eval_max_rows = 4;
    config.output_dir = argv[3];
    qlora::Trainer trainer(model, qlora::pack_documents(train, 64, pad),
                           qlora::pack_documents(eval, 64, pad), config);

    std::printf("held-out loss before: %.4f\n", trainer.evaluate().loss);
    while (!trainer.done()) {
      const qlora::StepMetrics m = trainer.step();
      std::printf("step %ld: loss %.4f, %.0f tokens/s\n", static_cast<long>(m.step), m.loss,
                  m.tokens_per_second);
    }
    std::printf("held-out loss after: %.4f\n", trainer.eval_history().back().loss);
  } catch (const qlora::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
