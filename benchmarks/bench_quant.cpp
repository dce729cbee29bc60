// Quantize and dequantize throughput of every format on a seeded N(0, 1) 4096 x 4096 matrix.
//
// Counters: GB/s of fp32 input (quantize) or fp32 output (dequantize), bits_per_weight and
// rmse of the round trip. dequantize_ref decodes element by element through the public
// arrays (nf4_absmax, scales, mins), as a naive baseline in the same binary, and memcpy
// measures the copy bandwidth of the same 64 MiB.
//
// Run: build/<dir>/benchmarks/bench_quant --benchmark_min_time=0.5
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "qlora/quant/quantize.hpp"

namespace {

constexpr Eigen::Index kRows = 4096;
constexpr Eigen::Index kCols = 4096;
constexpr double kBytes = 4.0 * static_cast<double>(kRows * kCols);

struct Format {
  const char* name;
  qlora::QuantConfig config;
};

const Format kFormats[] = {
    {"nf4", {.format = qlora::QuantFormat::nf4, .block_size = 64}},
    {"nf4_dq", {.format = qlora::QuantFormat::nf4, .block_size = 64, .double_quant = true}},
    {"int4_asym_g64", {.format = qlora::QuantFormat::int4, .block_size = 64}},
    {"int4_sym_g64", {.format = qlora::QuantFormat::int4, .block_size = 64, .symmetric = true}},
    {"int8_asym_g64", {.format = qlora::QuantFormat::int8, .block_size = 64}},
    {"int8_sym_g64", {.format = qlora::QuantFormat::int8, .block_size = 64, .symmetric = true}},
    {"int8_sym_row", {.format = qlora::QuantFormat::int8, .block_size = 0, .symmetric = true}},
};

const qlora::RowMatrixF& weights() {
  static const qlora::RowMatrixF w = [] {
    std::mt19937 rng(2023);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    qlora::RowMatrixF m(kRows, kCols);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
    return m;
  }();
  return w;
}

const qlora::QuantizedMatrix& quantized(const Format& f) {
  static std::map<std::string, qlora::QuantizedMatrix> cache;
  auto it = cache.find(f.name);
  if (it == cache.end()) it = cache.emplace(f.name, qlora::quantize(weights(), f.config)).first;
  return it->second;
}

double rmse(const qlora::RowMatrixF& a, const qlora::RowMatrixF& b) {
  return std::sqrt((a.cast<double>() - b.cast<double>()).array().square().mean());
}

// Element-by-element decode through the public arrays: the naive baseline.
void dequantize_ref(const qlora::QuantizedMatrix& q, const std::vector<float>& absmax,
                    float* out) {
  const std::int64_t n = q.rows * q.cols;
  for (std::int64_t k = 0; k < n; ++k) {
    const auto block = static_cast<std::size_t>(k / q.block_size);
    const auto byte = q.codes[static_cast<std::size_t>(q.format == qlora::QuantFormat::int8 ? k
                                                                                          : k / 2)];
    const int nibble = (k % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
    if (q.format == qlora::QuantFormat::nf4) {
      out[k] = qlora::kNf4Levels[static_cast<std::size_t>(nibble)] * absmax[block];
    } else if (q.format == qlora::QuantFormat::int4) {
      out[k] = q.symmetric ? q.scales[block] * static_cast<float>(nibble - 8)
                           : q.scales[block] * static_cast<float>(nibble) + q.mins[block];
    } else {
      out[k] = q.symmetric ? q.scales[block] * static_cast<float>(static_cast<std::int8_t>(byte))
                           : q.scales[block] * static_cast<float>(byte) + q.mins[block];
    }
  }
}

void set_counters(benchmark::State& state, const qlora::QuantizedMatrix& q) {
  state.counters["GB/s"] = benchmark::Counter(
      kBytes * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
  state.counters["bits_per_weight"] = qlora::bits_per_weight(q);
  state.counters["rmse"] = rmse(weights(), qlora::dequantize(q));
}

void bm_quantize(benchmark::State& state, const Format& f) {
  const qlora::RowMatrixF& w = weights();
  for (auto _ : state) {
    qlora::QuantizedMatrix q = qlora::quantize(w, f.config);
    benchmark::DoNotOptimize(q.codes.data());
  }
  set_counters(state, quantized(f));
}

void bm_dequantize(benchmark::State& state, const Format& f) {
  const qlora::QuantizedMatrix& q = quantized(f);
  qlora::RowMatrixF out(kRows, kCols);
  for (auto _ : state) {
    qlora::dequantize_rows(q, 0, kRows, out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, q);
}

void bm_dequantize_ref(benchmark::State& state, const Format& f) {
  const qlora::QuantizedMatrix& q = quantized(f);
  const std::vector<float> absmax =
      q.format == qlora::QuantFormat::nf4 ? qlora::nf4_absmax(q) : std::vector<float>{};
  qlora::RowMatrixF out(kRows, kCols);
  dequantize_ref(q, absmax, out.data());
  if (!out.isApprox(qlora::dequantize(q), 0.0f)) {
    state.SkipWithError("dequantize_ref disagrees with qlora::dequantize");
    return;
  }
  for (auto _ : state) {
    dequantize_ref(q, absmax, out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, q);
}

void bm_memcpy(benchmark::State& state) {
  const qlora::RowMatrixF& w = weights();
  std::vector<float> out(static_cast<std::size_t>(w.size()));
  for (auto _ : state) {
    std::memcpy(out.data(), w.data(), static_cast<std::size_t>(kBytes));
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(
      kBytes * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

const bool kRegistered = [] {
  const std::string shape = "/M=" + std::to_string(kRows) + ",K=" + std::to_string(kCols);
  for (const Format& f : kFormats) {
    benchmark::RegisterBenchmark(("quantize/" + std::string(f.name) + shape).c_str(),
                                 bm_quantize, f)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("dequantize/" + std::string(f.name) + shape).c_str(),
                                 bm_dequantize, f)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("dequantize_ref/" + std::string(f.name) + shape).c_str(),
                                 bm_dequantize_ref, f)
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark(("memcpy/fp32" + shape).c_str(), bm_memcpy)
      ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
