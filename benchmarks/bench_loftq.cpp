// LoftQ initialisation time and the error it leaves, on a 4096 x 4096 NF4 layer.
//
// Counters: qlora_error = ||W - dequant(Q)||_F / ||W||_F (QLoRA's start, B = 0) and
// loftq_error = ||W - (dequant(Q) + s B A)||_F / ||W||_F after T iterations. The weights are a
// seeded Gaussian plus a rank-64 component, so that a low-rank adapter has something to
// capture beyond the quantization noise.
#include <benchmark/benchmark.h>

#include <cstdint>

#include "qlora/core/random.hpp"
#include "qlora/init/loftq.hpp"

namespace {

constexpr std::int64_t kRows = 4096;
constexpr std::int64_t kCols = 4096;

const qlora::RowMatrixF& weights() {
  static const qlora::RowMatrixF w = [] {
    qlora::Rng rng(1);
    const auto gaussian = [&rng](std::int64_t r, std::int64_t c) {
      qlora::RowMatrixF m(r, c);
      for (float& v : m.reshaped()) v = static_cast<float>(rng.normal());
      return m;
    };
    return qlora::RowMatrixF(0.02f * gaussian(kRows, kCols) +
                             0.002f * (gaussian(kRows, 64) * gaussian(64, kCols)));
  }();
  return w;
}

// Arguments: rank, iterations T, SVD method (0 full, 1 randomized).
void loftq_nf4(benchmark::State& state) {
  const qlora::RowMatrixF& w = weights();
  qlora::LoraConfig config;
  config.rank = static_cast<int>(state.range(0));
  config.alpha = static_cast<float>(config.rank);
  config.loftq.iterations = static_cast<int>(state.range(1));
  config.loftq.svd = state.range(2) == 0 ? qlora::SvdMethod::full : qlora::SvdMethod::randomized;
  const qlora::QuantConfig quant{.format = qlora::QuantFormat::nf4, .block_size = 64};

  qlora::LoftqResult result;
  for (auto _ : state) {
    result = qlora::loftq_init(w, quant, config);
    benchmark::DoNotOptimize(result.adapter.A.data());
  }
  const double w_norm = w.cast<double>().norm();
  state.counters["qlora_error"] = result.qlora_error / w_norm;
  state.counters["loftq_error"] = result.errors.back() / w_norm;
  state.SetLabel(state.range(2) == 0 ? "full_svd" : "randomized_svd");
}

BENCHMARK(loftq_nf4)
    ->ArgNames({"r", "T", "svd"})
    ->ArgsProduct({{16, 64}, {1, 5}, {1}})
    ->Args({16, 1, 0})
    ->Args({64, 1, 0})
    ->Iterations(1)
    ->Unit(benchmark::kSecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
