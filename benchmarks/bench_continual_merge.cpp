// Time to merge two task adapters of one SmolLM2-135M projection, by method.
//
// The LoRA-space `svd` never forms the [N, K] update. `linear` forms it and takes a dense SVD,
// so it is the reference that shows what the LoRA-space path saves. `ties` and `dare_ties`
// must form it, because they act on single entries. Shapes: [576, 576] is q_proj and o_proj,
// [1536, 576] is gate_proj and up_proj. Counter: energy_kept, the share of the merged
// update's sigma^2 that the rank-16 result keeps.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "qlora/continual/merge.hpp"
#include "qlora/core/random.hpp"

namespace {

constexpr int kTaskRank = 16;
constexpr int kMergedRank = 16;

qlora::LoraAdapter random_adapter(std::int64_t n, std::int64_t k, std::uint64_t seed) {
  qlora::Rng rng(seed);
  qlora::LoraAdapter a;
  a.rank = kTaskRank;
  a.scaling = 2.0f;
  a.A.resize(kTaskRank, k);
  a.B.resize(n, kTaskRank);
  for (float& v : a.A.reshaped()) v = static_cast<float>(rng.normal()) * 0.05f;
  for (float& v : a.B.reshaped()) v = static_cast<float>(rng.normal()) * 0.01f;
  return a;
}

// Arguments: N, K, method (a qlora::continual::MergeMethod value).
void merge_two_adapters(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  const std::int64_t k = state.range(1);
  const auto method = static_cast<qlora::continual::MergeMethod>(state.range(2));
  const qlora::LoraAdapter a = random_adapter(n, k, 1);
  const qlora::LoraAdapter b = random_adapter(n, k, 2);
  const std::vector<const qlora::LoraAdapter*> adapters = {&a, &b};

  qlora::continual::MergeOptions options;
  options.method = method;
  options.rank = kMergedRank;
  if (method == qlora::continual::MergeMethod::ties ||
      method == qlora::continual::MergeMethod::dare_ties) {
    options.density = 0.2f;
  }
  double energy_kept = 0.0;
  for (auto _ : state) {
    const auto merged = qlora::continual::merge_adapters(adapters, options);
    energy_kept = merged.energy_kept;
    benchmark::DoNotOptimize(merged.adapter.A.data());
  }
  state.SetLabel(std::string(qlora::continual::to_string(method)));
  state.counters["energy_kept"] = energy_kept;
}

void merge_arguments(benchmark::internal::Benchmark* b) {
  using qlora::continual::MergeMethod;
  for (const auto& [n, k] : {std::pair<int, int>{576, 576}, std::pair<int, int>{1536, 576}}) {
    for (MergeMethod m : {MergeMethod::svd, MergeMethod::linear, MergeMethod::ties,
                          MergeMethod::dare_ties}) {
      b->Args({n, k, static_cast<int>(m)});
    }
  }
}

BENCHMARK(merge_two_adapters)
    ->Apply(merge_arguments)
    ->ArgNames({"N", "K", "method"})
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
