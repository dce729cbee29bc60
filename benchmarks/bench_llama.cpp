// Forward throughput of LlamaModel on SmolLM2-135M-Instruct: a 256-token prompt (prefill into a
// KV cache, logits of the last position) and single-token decoding steps after a 256-token
// context, with NF4 projections (qlora's dequant-matmul kernels) and with fp32 projections
// (Eigen GEMM) as the reference. Needs scripts/fetch-model.
//
// Before timing, each model's prefill is checked against the fp32 model: the top token of the
// NF4 model must be among the fp32 model's top 5.

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "qlora/core/random.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/model/llama.hpp"

namespace {

constexpr std::int64_t kPromptTokens = 256;
constexpr int kThreads = 2;

const std::filesystem::path kModelPath =
    std::filesystem::path(QLORA_SOURCE_DIR) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";

std::vector<std::int32_t> prompt_tokens(std::int64_t vocab) {
  qlora::Rng rng(2024);
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(kPromptTokens));
  // Ordinary vocabulary ids, past the 17 special tokens.
  for (auto& t : tokens) {
    t = static_cast<std::int32_t>(17 + rng.below(static_cast<std::uint64_t>(vocab - 17)));
  }
  return tokens;
}

// Loads each variant once per process; returns null when the model file is absent.
const qlora::LlamaModel* model(const std::string& variant) {
  static std::map<std::string, std::unique_ptr<qlora::LlamaModel>> models;
  if (!std::filesystem::exists(kModelPath)) return nullptr;
  auto& slot = models[variant];
  if (!slot) {
    const qlora::GgufFile file(kModelPath);
    qlora::LlamaLoadOptions options;
    if (variant == "f32") options.projections = std::nullopt;
    slot = std::make_unique<qlora::LlamaModel>(qlora::LlamaModel::from_gguf(file, options));
  }
  return slot.get();
}

std::int32_t argmax(const qlora::RowVectorF& logits) {
  Eigen::Index index = 0;
  logits.maxCoeff(&index);
  return static_cast<std::int32_t>(index);
}

// Checks the variant's prefill against the fp32 model before timing it.
bool check_against_f32(benchmark::State& state, const qlora::LlamaModel& m,
                       const std::vector<std::int32_t>& tokens) {
  const qlora::LlamaModel* reference = model("f32");
  qlora::LlamaKvCache cache_ref(reference->config(), kPromptTokens);
  qlora::LlamaKvCache cache(m.config(), kPromptTokens);
  const qlora::RowVectorF expected = reference->prefill(cache_ref, tokens);
  const qlora::RowVectorF actual = m.prefill(cache, tokens);
  std::vector<std::int32_t> top(static_cast<std::size_t>(expected.size()));
  std::iota(top.begin(), top.end(), 0);
  std::partial_sort(top.begin(), top.begin() + 5, top.end(), [&](std::int32_t a, std::int32_t b) {
    return expected[a] > expected[b];
  });
  if (std::find(top.begin(), top.begin() + 5, argmax(actual)) == top.begin() + 5) {
    state.SkipWithError("the top token is not among the fp32 model's top 5");
    return false;
  }
  return true;
}

void bm_llama_prefill(benchmark::State& state, const std::string& variant) {
  qlora::set_num_threads(kThreads);
  const qlora::LlamaModel* m = model(variant);
  if (m == nullptr) {
    state.SkipWithError("models/SmolLM2-135M-Instruct.Q4_1.gguf is absent (run scripts/fetch-model)");
    return;
  }
  const std::vector<std::int32_t> tokens = prompt_tokens(m->config().vocab_size);
  if (!check_against_f32(state, *m, tokens)) return;

  qlora::LlamaKvCache cache(m->config(), kPromptTokens);
  for (auto _ : state) {
    cache.clear();
    benchmark::DoNotOptimize(m->prefill(cache, tokens));
  }
  state.counters["tokens/s"] = benchmark::Counter(
      static_cast<double>(state.iterations() * kPromptTokens), benchmark::Counter::kIsRate);
  state.counters["threads"] = kThreads;
}

void bm_llama_decode(benchmark::State& state, const std::string& variant) {
  qlora::set_num_threads(kThreads);
  const qlora::LlamaModel* m = model(variant);
  if (m == nullptr) {
    state.SkipWithError("models/SmolLM2-135M-Instruct.Q4_1.gguf is absent (run scripts/fetch-model)");
    return;
  }
  const std::vector<std::int32_t> tokens = prompt_tokens(m->config().vocab_size);
  if (!check_against_f32(state, *m, tokens)) return;

  // Each step attends to the 256-token context plus at most 64 generated tokens.
  qlora::LlamaKvCache cache(m->config(), kPromptTokens + 64);
  qlora::RowVectorF logits = m->prefill(cache, tokens);
  for (auto _ : state) {
    if (cache.size() == cache.capacity()) cache.truncate(kPromptTokens);
    logits = m->forward_next(cache, argmax(logits));
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["threads"] = kThreads;
}

BENCHMARK_CAPTURE(bm_llama_prefill, nf4, std::string("nf4"))
    ->Name("llama_prefill/nf4/smollm2_135m/T=256")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(bm_llama_prefill, f32, std::string("f32"))
    ->Name("llama_prefill/f32_eigen/smollm2_135m/T=256")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(bm_llama_decode, nf4, std::string("nf4"))
    ->Name("llama_decode/nf4/smollm2_135m/context=256")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(bm_llama_decode, f32, std::string("f32"))
    ->Name("llama_decode/f32_eigen/smollm2_135m/context=256")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
