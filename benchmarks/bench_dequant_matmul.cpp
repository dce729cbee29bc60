// Dequant-matmul throughput for every format, instruction set and direction on the shapes of
// SmolLM2-135M and Llama-7B. The same binary measures the references: fp32 GEMM on a dense
// matrix of the same shape with Eigen (built with the library's baseline flags, and built for
// this machine with -march=native) and with OpenBLAS (cblas_sgemm), and memory read bandwidth
// probes. All of them run on qlora::num_threads() threads (OMP_NUM_THREADS).
//
// Names: dequant_matmul[_backward]/<format>/<isa>/M=..,N=..,K=.. (fp32 activations),
// dequant_matmul_q8/<format>/<isa>/M=.. (activations quantized to int8, integer dot products),
// sgemm_eigen/M=..,N=..,K=.., sgemm_eigen_native/..., sgemm_openblas/...,
// read_bandwidth/MiB=1024 (a fresh buffer) and read_bandwidth/<format>/N=65536,K=4096 (the very
// weight that the M = 1 kernels stream, so both read the same physical pages). Counters: GFLOP/s
// (2 M N K per call) and, for the quantized kernels and the weight probes, weight_GB/s (codes,
// scales and mins read per call).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <Eigen/Core>
#include <fmt/format.h>
#include <omp.h>

#include "qlora/core/cpu.hpp"
#include "qlora/core/matrix.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/kernels/matmul.hpp"
#include "qlora/kernels/ref/dequant_matmul.hpp"
#include "qlora/quant/tables.hpp"

#include "eigen_native.hpp"

extern "C" void openblas_set_num_threads(int n_threads);

namespace {

using qlora::Isa;
using qlora::QuantFormat;
using qlora::QuantizedMatrix;

struct Format {
  QuantFormat format;
  bool symmetric;
  bool double_quant;
  const char* name;
};

constexpr Format kFormats[] = {
    {QuantFormat::nf4, false, false, "nf4"},   {QuantFormat::nf4, false, true, "nf4_dq"},
    {QuantFormat::int4, false, false, "int4"}, {QuantFormat::int4, true, false, "int4_sym"},
    {QuantFormat::int8, false, false, "int8"}, {QuantFormat::int8, true, false, "int8_sym"},
};

constexpr int kBlockSize = 64;

struct Shape {
  std::int64_t N;
  std::int64_t K;
};

// SmolLM2-135M and Llama-7B projections, [out, in].
constexpr Shape kShapes[] = {{576, 576},   {1536, 576},   {576, 1536},   {49152, 576},
                             {4096, 4096}, {11008, 4096}, {4096, 11008}};
// For M = 1 only: 4-bit weights of 128 MiB, several times a 32 MiB last-level cache.
constexpr Shape kLargeShape = {65536, 4096};
constexpr std::int64_t kBatchSizes[] = {1, 16, 128, 512};
// The int8-activation path is measured up to M = 128, past its threshold
// (qlora::kInt8ActivationMaxRows), to compare it with the fp32 GEMM on both sides of it.
constexpr std::int64_t kInt8MaxBatch = 128;

// Spot-check tolerances relative to sum |a * w|: fp32 kernels, and int8 activations (whose
// rounding of x adds up to about max|x| / 254 per weight).
constexpr double kFp32CheckTol = 1e-4;
constexpr double kInt8CheckTol = 1e-2;

/// The activation format of a forward benchmark.
enum class Activations { fp32, int8 };

/// Random codes, scales and mins of the right sizes; the values do not change the timing.
QuantizedMatrix random_weight(const Format& format, std::int64_t N, std::int64_t K) {
  std::mt19937 rng(1234);
  QuantizedMatrix w;
  w.format = format.format;
  w.rows = N;
  w.cols = K;
  w.block_size = kBlockSize;
  w.symmetric = format.symmetric;
  w.double_quant = format.double_quant;

  const bool four_bit = format.format != QuantFormat::int8;
  w.codes.resize(static_cast<std::size_t>(four_bit ? N * K / 2 : N * K));
  for (auto& byte : w.codes) byte = static_cast<std::uint8_t>(rng());
  if (format.format == QuantFormat::int4 && format.symmetric) {
    for (auto& byte : w.codes) byte = static_cast<std::uint8_t>(byte | 0x11);
  }
  if (format.format == QuantFormat::int8 && format.symmetric) {
    for (auto& byte : w.codes) byte = byte == 0x80 ? 0x81 : byte;
  }

  const auto n_blocks = static_cast<std::size_t>(w.n_blocks());
  std::uniform_real_distribution<float> dist(0.5f, 1.5f);
  if (format.double_quant) {
    w.absmax_codes.resize(n_blocks);
    for (auto& code : w.absmax_codes) code = static_cast<std::uint8_t>(rng());
    w.nested_absmax.assign((n_blocks + 255) / 256, 0.02f);
    w.nested_offset = 0.03f;
  } else {
    w.scales.resize(n_blocks);
    for (auto& v : w.scales) v = 0.01f * dist(rng);
  }
  if (format.format != QuantFormat::nf4 && !format.symmetric) w.mins.assign(n_blocks, -0.05f);
  return w;
}

/// Bytes of quantized weight data one call reads (codes, scales or absmax codes, mins).
double weight_bytes(const QuantizedMatrix& w) {
  double bytes = static_cast<double>(w.codes.size());
  bytes += static_cast<double>(w.scales.size() * sizeof(float) + w.mins.size() * sizeof(float));
  bytes += static_cast<double>(w.absmax_codes.size() + w.nested_absmax.size() * sizeof(float));
  return bytes;
}

const QuantizedMatrix& cached_weight(const Format& format, Shape shape) {
  static std::map<std::tuple<std::string, std::int64_t, std::int64_t>,
                  std::unique_ptr<QuantizedMatrix>>
      cache;
  auto& slot = cache[{format.name, shape.N, shape.K}];
  if (!slot) slot = std::make_unique<QuantizedMatrix>(random_weight(format, shape.N, shape.K));
  return *slot;
}

std::vector<float> random_floats(std::int64_t n) {
  std::mt19937 rng(99);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

/// Returns w[n, k] dequantized by the reference decoder.
float weight_at(const QuantizedMatrix& w, const std::vector<float>& scales, std::int64_t n,
                std::int64_t k) {
  using qlora::kernels::KernelFormat;
  qlora::kernels::WeightView view{w.codes.data(), scales.data(),
                                  w.mins.empty() ? nullptr : w.mins.data(), w.rows, w.cols,
                                  w.block_size};
  switch (w.format) {
    case QuantFormat::nf4:
      return qlora::kernels::ref::dequant_element<KernelFormat::nf4>(view, n, k);
    case QuantFormat::int4:
      return w.symmetric ? qlora::kernels::ref::dequant_element<KernelFormat::int4_sym>(view, n, k)
                         : qlora::kernels::ref::dequant_element<KernelFormat::int4>(view, n, k);
    case QuantFormat::int8:
      return w.symmetric ? qlora::kernels::ref::dequant_element<KernelFormat::int8_sym>(view, n, k)
                         : qlora::kernels::ref::dequant_element<KernelFormat::int8>(view, n, k);
  }
  return 0.0f;
}

/**
 * Checks a few outputs of c against double-precision sums over the reference decoder, relative
 * to sum |a * w|; returns false and reports the first mismatch.
 */
bool spot_check(const QuantizedMatrix& w, bool backward, const std::vector<float>& a,
                std::int64_t M, const std::vector<float>& c, double tolerance) {
  std::vector<float> scales = w.scales;
  if (w.double_quant) {
    scales.resize(w.absmax_codes.size());
    for (std::size_t b = 0; b < scales.size(); ++b) {
      scales[b] = qlora::kDynamicMap[w.absmax_codes[b]] * w.nested_absmax[b / 256] + w.nested_offset;
    }
  }
  const std::int64_t out_cols = backward ? w.cols : w.rows;
  const std::int64_t red = backward ? w.rows : w.cols;
  std::mt19937 rng(5);
  for (int trial = 0; trial < 8; ++trial) {
    const std::int64_t m = static_cast<std::int64_t>(rng() % static_cast<std::uint32_t>(M));
    const std::int64_t j = static_cast<std::int64_t>(rng() % static_cast<std::uint32_t>(out_cols));
    double sum = 0.0;
    double mag = 1e-30;
    for (std::int64_t r = 0; r < red; ++r) {
      const double term = static_cast<double>(a[static_cast<std::size_t>(m * red + r)]) *
                          (backward ? weight_at(w, scales, r, j) : weight_at(w, scales, j, r));
      sum += term;
      mag += std::abs(term);
    }
    const double got = c[static_cast<std::size_t>(m * out_cols + j)];
    if (std::abs(got - sum) > tolerance * mag) {
      std::fprintf(stderr, "mismatch at [%ld, %ld]: got %g, expected %g\n", static_cast<long>(m),
                   static_cast<long>(j), got, sum);
      return false;
    }
  }
  return true;
}

/// Sums `bytes` bytes from p as 64-bit words (and any trailing bytes) over n_threads threads.
std::uint64_t sum_words(const void* p, std::size_t bytes, int n_threads) {
  const auto* bytes_p = static_cast<const unsigned char*>(p);
  const std::size_t n_words = bytes / sizeof(std::uint64_t);
  std::uint64_t total = 0;
#pragma omp parallel for schedule(static) num_threads(n_threads) reduction(+ : total)
  for (std::size_t i = 0; i < n_words; ++i) {
    std::uint64_t word;
    std::memcpy(&word, bytes_p + i * sizeof(word), sizeof(word));
    total += word;
  }
  for (std::size_t i = n_words * sizeof(std::uint64_t); i < bytes; ++i) total += bytes_p[i];
  return total;
}

/// Reads every byte of w's codes, scales, mins and absmax codes once; returns their word sum.
std::uint64_t read_weight(const QuantizedMatrix& w, int n_threads) {
  std::uint64_t total = sum_words(w.codes.data(), w.codes.size(), n_threads);
  total += sum_words(w.scales.data(), w.scales.size() * sizeof(float), n_threads);
  total += sum_words(w.mins.data(), w.mins.size() * sizeof(float), n_threads);
  total += sum_words(w.absmax_codes.data(), w.absmax_codes.size(), n_threads);
  return total;
}

void set_counters(benchmark::State& state, double flops, double bytes) {
  if (flops > 0) {
    state.counters["GFLOP/s"] =
        benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  }
  if (bytes > 0) {
    state.counters["weight_GB/s"] =
        benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  }
}

void bench_dequant_matmul(benchmark::State& state, const Format& format, Isa isa, Shape shape,
                          std::int64_t M, bool backward, Activations activations) {
  const QuantizedMatrix& w = cached_weight(format, shape);
  const std::int64_t in_cols = backward ? shape.N : shape.K;
  const std::int64_t out_cols = backward ? shape.K : shape.N;
  const std::vector<float> a = random_floats(M * in_cols);
  std::vector<float> c(static_cast<std::size_t>(M * out_cols));
  const auto call = [&] {
    if (backward) {
      qlora::detail::dequant_matmul_backward(isa, a.data(), M, w, c.data(), false);
    } else if (activations == Activations::int8) {
      qlora::detail::dequant_matmul_int8(isa, a.data(), M, w, c.data(), false);
    } else {
      qlora::detail::dequant_matmul(isa, a.data(), M, w, c.data(), false);
    }
  };
  call();
  const double tolerance = activations == Activations::int8 ? kInt8CheckTol : kFp32CheckTol;
  if (!spot_check(w, backward, a, M, c, tolerance)) {
    state.SkipWithError("result differs from the reference decoder");
    return;
  }
  // On the larger-than-cache weight, every call is followed by an untimed read of the same
  // weight memory (the read_bandwidth/<format> probe), so that the ratio of the two compares
  // them under the same memory conditions, which drift on a shared machine.
  const bool probe = shape.N == kLargeShape.N && shape.K == kLargeShape.K;
  double probe_seconds = 0.0;
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
    if (probe) {
      state.PauseTiming();
      const auto start = std::chrono::steady_clock::now();
      benchmark::DoNotOptimize(read_weight(w, qlora::num_threads()));
      probe_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      state.ResumeTiming();
    }
  }
  set_counters(state, 2.0 * static_cast<double>(M * shape.N * shape.K), weight_bytes(w));
  if (probe && probe_seconds > 0) {
    const double probe_rate = weight_bytes(w) * static_cast<double>(state.iterations()) / probe_seconds;
    state.counters["probe_GB/s"] = probe_rate * 1e-9;
    // weight_GB/s over probe_GB/s: the share of the read bandwidth that the kernel reaches.
    state.counters["of_probe"] = benchmark::Counter(
        weight_bytes(w) / probe_rate, benchmark::Counter::kIsIterationInvariantRate);
  }
}

/// The fp32 GEMM libraries measured as references.
enum class Sgemm { eigen, eigen_native, openblas };

const char* sgemm_name(Sgemm library) {
  switch (library) {
    case Sgemm::eigen:
      return "sgemm_eigen";
    case Sgemm::eigen_native:
      return "sgemm_eigen_native";
    case Sgemm::openblas:
      return "sgemm_openblas";
  }
  return "";
}

void bench_sgemm(benchmark::State& state, Sgemm library, Shape shape, std::int64_t M) {
  // y[M, N] = x[M, K] * W[N, K]^T with a dense fp32 W, the product the kernels replace.
  const std::vector<float> w = random_floats(shape.N * shape.K);
  const std::vector<float> x = random_floats(M * shape.K);
  std::vector<float> y(static_cast<std::size_t>(M * shape.N));
  const int n_threads = qlora::num_threads();
  Eigen::setNbThreads(n_threads);
  openblas_set_num_threads(n_threads);
  const qlora::ConstMapRowMatrixF w_map(w.data(), shape.N, shape.K);
  const qlora::ConstMapRowMatrixF x_map(x.data(), M, shape.K);
  qlora::MapRowMatrixF y_map(y.data(), M, shape.N);
  for (auto _ : state) {
    if (library == Sgemm::openblas) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M),
                  static_cast<int>(shape.N), static_cast<int>(shape.K), 1.0f, x.data(),
                  static_cast<int>(shape.K), w.data(), static_cast<int>(shape.K), 0.0f, y.data(),
                  static_cast<int>(shape.N));
    } else if (library == Sgemm::eigen_native) {
      qlora_bench_eigen_native_sgemm(false, true, M, shape.N, shape.K, x.data(), shape.K,
                                     w.data(), shape.K, y.data(), n_threads);
    } else {
      y_map.noalias() = x_map * w_map.transpose();
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 2.0 * static_cast<double>(M * shape.N * shape.K), 0.0);
}

void bench_read_bandwidth(benchmark::State& state, std::int64_t mib) {
  // Sums 64-bit words with four independent chains per thread, split over the threads.
  const std::size_t n_words = static_cast<std::size_t>(mib) * (1u << 20) / sizeof(std::uint64_t);
  std::vector<std::uint64_t> data(n_words, 1);
  const int n_threads = qlora::num_threads();
  for (auto _ : state) {
    std::uint64_t total = 0;
#pragma omp parallel for schedule(static) num_threads(n_threads) reduction(+ : total)
    for (std::size_t i = 0; i < n_words; i += 4) {
      total += data[i] + data[i + 1] + data[i + 2] + data[i + 3];
    }
    benchmark::DoNotOptimize(total);
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(n_words * sizeof(std::uint64_t)) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

/**
 * Sums the codes, scales, mins and absmax codes of the cached M = 1 weight with the same threads
 * as the kernels: the read bandwidth of exactly the memory that they stream.
 */
void bench_weight_read(benchmark::State& state, const Format& format, Shape shape) {
  const QuantizedMatrix& w = cached_weight(format, shape);
  const int n_threads = qlora::num_threads();
  for (auto _ : state) benchmark::DoNotOptimize(read_weight(w, n_threads));
  set_counters(state, 0.0, weight_bytes(w));
}

std::string shape_name(std::int64_t M, Shape shape) {
  return fmt::format("M={},N={},K={}", M, shape.N, shape.K);
}

void register_all() {
  benchmark::RegisterBenchmark("read_bandwidth/MiB=1024", bench_read_bandwidth, 1024)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();

  std::vector<std::pair<std::int64_t, Shape>> cases;
  for (const Shape& shape : kShapes) {
    for (const std::int64_t M : kBatchSizes) cases.emplace_back(M, shape);
  }
  cases.emplace_back(1, kLargeShape);

  for (const Format& format : kFormats) {
    const std::string name =
        fmt::format("read_bandwidth/{}/N={},K={}", format.name, kLargeShape.N, kLargeShape.K);
    benchmark::RegisterBenchmark(name.c_str(), bench_weight_read, format, kLargeShape)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }

  for (const auto& [M, shape] : cases) {
    if (shape.N != kLargeShape.N) {
      for (const Sgemm library : {Sgemm::eigen, Sgemm::eigen_native, Sgemm::openblas}) {
        const std::string name = fmt::format("{}/{}", sgemm_name(library), shape_name(M, shape));
        benchmark::RegisterBenchmark(name.c_str(), bench_sgemm, library, shape, M)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
    }
    for (const bool backward : {false, true}) {
      for (const Format& format : kFormats) {
        for (const Isa isa : qlora::available_isas()) {
          // The scalar reference sums in double and is far too slow for large batches.
          if (isa == Isa::scalar && M > 16) continue;
          const std::string name = fmt::format(
              "{}/{}/{}/{}", backward ? "dequant_matmul_backward" : "dequant_matmul", format.name,
              qlora::to_string(isa), shape_name(M, shape));
          benchmark::RegisterBenchmark(name.c_str(), bench_dequant_matmul, format, isa, shape, M,
                                       backward, Activations::fp32)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime();
          if (backward || isa == Isa::scalar || M > kInt8MaxBatch) continue;
          const std::string q8_name = fmt::format("dequant_matmul_q8/{}/{}/{}", format.name,
                                                  qlora::to_string(isa), shape_name(M, shape));
          benchmark::RegisterBenchmark(q8_name.c_str(), bench_dequant_matmul, format, isa, shape,
                                       M, false, Activations::int8)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime();
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  // dequant_matmul/... measures the fp32 kernels whatever QLORA_INT8_ACT is set to.
  qlora::set_int8_activations(false);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("qlora_threads", std::to_string(qlora::num_threads()));
  benchmark::AddCustomContext("cpu_features", qlora::to_string(qlora::cpu_features()));
  benchmark::AddCustomContext("eigen_native_simd", qlora_bench_eigen_native_simd());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
