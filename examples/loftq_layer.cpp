// LoftQ-initialise one layer and print how much of the quantization error the adapter
// removes at its start.
//
//   build/release/examples/example_loftq_layer
#include <cstdio>

#include <qlora/qlora.hpp>

int main() {
  // A weight with some low-rank structure, like trained projections have.
  const qlora::RowMatrixF w = 0.02f * qlora::RowMatrixF::Random(384, 768) +
                              0.01f * qlora::RowMatrixF::Random(384, 8) *
                                  qlora::RowMatrixF::Random(8, 768);

  qlora::LoraConfig lora;
  lora.rank = 16;
  lora.alpha = 32.0f;
  lora.loftq.iterations = 5;
  const qlora::QuantConfig quant{.format = qlora::QuantFormat::nf4, .block_size = 64};

  const qlora::LoftqResult result = qlora::loftq_init(w, quant, lora);
  std::printf("||W - dequant(Q)||        (QLoRA start): %.4f\n", result.qlora_error);
  for (std::size_t t = 0; t < result.errors.size(); ++t) {
    std::printf("||W - (Q + s*B*A)||  LoftQ T=%zu:        %.4f\n", t + 1, result.errors[t]);
  }

  // The layer trains on the re-quantized base with the adapter already in place.
  qlora::QuantLoraLinear layer(result.base);
  layer.add_adapter("default", result.adapter);
  std::printf("adapter A [%ld, %ld], B [%ld, %ld]\n", static_cast<long>(result.adapter.A.rows()),
              static_cast<long>(result.adapter.A.cols()), static_cast<long>(result.adapter.B.rows()),
              static_cast<long>(result.adapter.B.cols()));
  return result.errors.back() < result.qlora_error ? 0 : 1;
}
