// GGUF reading speed: opening the SmolLM2-135M Q4_1 model (header and metadata parsing, no
// tensor copies) and dequantizing all of its tensors, plus single-row dequantization per
// ggml type with an fp32 copy (memcpy) as the bandwidth reference.
//
// The model benchmarks need models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-model) and
// report an error without it.
#include <cstdint>
#include <filesystem>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include "qlora/io/ggml_types.hpp"
#include "qlora/io/gguf.hpp"

namespace {

const std::filesystem::path kModel =
    std::filesystem::path(QLORA_SOURCE_DIR) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";

void BM_gguf_open(benchmark::State& state) {
  if (!std::filesystem::exists(kModel)) {
    state.SkipWithError("model absent: run scripts/fetch-model");
    return;
  }
  for (auto _ : state) {
    qlora::GgufFile file(kModel);
    benchmark::DoNotOptimize(file.tensors().data());
  }
}
BENCHMARK(BM_gguf_open)->Name("gguf_open/smollm2_q4_1")->Unit(benchmark::kMillisecond);

void BM_gguf_dequantize_model(benchmark::State& state) {
  if (!std::filesystem::exists(kModel)) {
    state.SkipWithError("model absent: run scripts/fetch-model");
    return;
  }
  const qlora::GgufFile file(kModel);
  std::int64_t n_elements = 0;
  for (auto _ : state) {
    n_elements = 0;
    for (const qlora::GgufTensor& tensor : file.tensors()) {
      qlora::RowMatrixF values = file.dequantize(tensor);
      benchmark::DoNotOptimize(values.data());
      n_elements += values.size();
    }
  }
  state.counters["elements/s"] = benchmark::Counter(
      static_cast<double>(n_elements), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_gguf_dequantize_model)
    ->Name("gguf_dequantize/smollm2_q4_1/all_tensors")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// One row of 4096 elements; fp16 scale fields hold random bits, which does not change the work.
void BM_dequantize_row(benchmark::State& state, qlora::GgmlType type) {
  constexpr std::int64_t kCols = 4096;
  const qlora::GgmlTypeTraits traits = qlora::ggml_type_traits(type);
  std::vector<std::byte> blocks(static_cast<std::size_t>(kCols / traits.block_size * traits.type_size));
  std::mt19937 rng(7);
  for (std::byte& b : blocks) b = static_cast<std::byte>(rng() & 0xffu);
  std::vector<float> out(kCols);
  for (auto _ : state) {
    qlora::dequantize_ggml(type, blocks.data(), out.data(), kCols);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["weight GB/s"] = benchmark::Counter(
      static_cast<double>(blocks.size()) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["elements/s"] =
      benchmark::Counter(static_cast<double>(kCols), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK_CAPTURE(BM_dequantize_row, f32_memcpy_reference, qlora::GgmlType::f32)
    ->Name("dequantize_row/F32/ref/K=4096");
BENCHMARK_CAPTURE(BM_dequantize_row, q8_0, qlora::GgmlType::q8_0)->Name("dequantize_row/Q8_0/ref/K=4096");
BENCHMARK_CAPTURE(BM_dequantize_row, q4_1, qlora::GgmlType::q4_1)->Name("dequantize_row/Q4_1/ref/K=4096");
BENCHMARK_CAPTURE(BM_dequantize_row, q5_0, qlora::GgmlType::q5_0)->Name("dequantize_row/Q5_0/ref/K=4096");
BENCHMARK_CAPTURE(BM_dequantize_row, q4_k, qlora::GgmlType::q4_k)->Name("dequantize_row/Q4_K/ref/K=4096");
BENCHMARK_CAPTURE(BM_dequantize_row, q5_k, qlora::GgmlType::q5_k)->Name("dequantize_row/Q5_K/ref/K=4096");
BENCHMARK_CAPTURE(BM_dequantize_row, q6_k, qlora::GgmlType::q6_k)->Name("dequantize_row/Q6_K/ref/K=4096");

}  // namespace

BENCHMARK_MAIN();
