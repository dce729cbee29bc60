// fp32 GEMM throughput of qlora::gemm_f32 for every instruction set on the products of a
// SmolLM2-135M training step (seq 256, batch 4, LoRA rank 16), with Eigen (baseline flags, and
// built for this machine: eigen_native.hpp) and OpenBLAS (cblas_sgemm) measured on the same
// operands in the same binary. All of them run on
// qlora::num_threads() threads (OMP_NUM_THREADS), except the attention cases, which run on one
// thread as the model calls them, one per (sequence, head) task inside its own parallel loop.
//
// Names: gemm_f32/<isa>/<case>/M=..,N=..,K=.., sgemm_eigen/<case>/...,
// sgemm_eigen_native/<case>/..., sgemm_openblas/<case>/...
// where <case> names the product and its transposes (N = as stored, T = transposed).
// Counter: GFLOP/s (2 M N K per call).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <fmt/format.h>

#include "qlora/core/cpu.hpp"
#include "qlora/core/matrix.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/kernels/gemm.hpp"

#include "eigen_native.hpp"

extern "C" void openblas_set_num_threads(int n_threads);

namespace {

using qlora::Isa;
using qlora::Transpose;

struct Case {
  const char* name;
  Transpose op_a;
  Transpose op_b;
  std::int64_t M;
  std::int64_t N;
  std::int64_t K;
  bool single_thread;
};

// hidden 576, intermediate 1536, vocabulary 49152, head_dim 64, rank 16, 1024 tokens per step.
constexpr Case kCases[] = {
    {"head_forward_NT", Transpose::no, Transpose::yes, 512, 49152, 576, false},
    {"head_forward_NT", Transpose::no, Transpose::yes, 64, 49152, 576, false},
    {"head_forward_NT", Transpose::no, Transpose::yes, 1, 49152, 576, false},  // one decoding step
    {"head_backward_NN", Transpose::no, Transpose::no, 512, 576, 49152, false},
    {"head_backward_NN", Transpose::no, Transpose::no, 64, 576, 49152, false},
    {"lora_xAt_NT", Transpose::no, Transpose::yes, 1024, 16, 576, false},
    {"lora_uBt_NT", Transpose::no, Transpose::yes, 1024, 1536, 16, false},
    {"lora_dB_TN", Transpose::yes, Transpose::no, 1536, 16, 1024, false},
    {"lora_dA_TN", Transpose::yes, Transpose::no, 16, 576, 1024, false},
    {"lora_du_NN", Transpose::no, Transpose::no, 1024, 16, 1536, false},
    {"lora_dinput_NN", Transpose::no, Transpose::no, 1024, 576, 16, false},
    {"attention_scores_NT", Transpose::no, Transpose::yes, 256, 256, 64, true},
    {"attention_values_NN", Transpose::no, Transpose::no, 256, 64, 256, true},
    {"attention_dv_TN", Transpose::yes, Transpose::no, 256, 64, 256, true},
};

/// Reference values for spot checks: this many entries of C, computed in double.
constexpr int kSpotChecks = 64;
constexpr double kSpotRelTol = 1e-4;

std::vector<float> random_floats(std::int64_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = uniform(rng);
  return v;
}

/// The operands of one case, dense: A stored [M, K] or [K, M], B [K, N] or [N, K].
struct Operands {
  std::vector<float> a;
  std::vector<float> b;
  std::vector<float> c;
  std::int64_t lda = 0;
  std::int64_t ldb = 0;

  explicit Operands(const Case& k)
      : a(random_floats(k.M * k.K, 1)),
        b(random_floats(k.K * k.N, 2)),
        c(static_cast<std::size_t>(k.M * k.N)),
        lda(k.op_a == Transpose::yes ? k.M : k.K),
        ldb(k.op_b == Transpose::yes ? k.K : k.N) {}

  double op_a(const Case& k, std::int64_t m, std::int64_t i) const {
    return a[static_cast<std::size_t>(k.op_a == Transpose::yes ? i * lda + m : m * lda + i)];
  }
  double op_b(const Case& k, std::int64_t i, std::int64_t n) const {
    return b[static_cast<std::size_t>(k.op_b == Transpose::yes ? n * ldb + i : i * ldb + n)];
  }

  /// Checks kSpotChecks entries of c against sums in double, relative to sum |a b|.
  bool spot_check(const Case& k) const {
    std::mt19937 rng(9);
    for (int check = 0; check < kSpotChecks; ++check) {
      const std::int64_t m = static_cast<std::int64_t>(rng() % static_cast<std::uint32_t>(k.M));
      const std::int64_t n = static_cast<std::int64_t>(rng() % static_cast<std::uint32_t>(k.N));
      double sum = 0.0;
      double magnitude = 0.0;
      for (std::int64_t i = 0; i < k.K; ++i) {
        sum += op_a(k, m, i) * op_b(k, i, n);
        magnitude += std::abs(op_a(k, m, i) * op_b(k, i, n));
      }
      const double actual = c[static_cast<std::size_t>(m * k.N + n)];
      if (std::abs(actual - sum) > kSpotRelTol * magnitude) return false;
    }
    return true;
  }
};

void set_counters(benchmark::State& state, const Case& k) {
  state.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * static_cast<double>(k.M * k.N * k.K) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Sets qlora's, Eigen's and OpenBLAS's thread counts for one case and restores qlora's after.
class CaseThreads {
 public:
  explicit CaseThreads(const Case& k) : saved_(qlora::num_threads()) {
    const int n_threads = k.single_thread ? 1 : saved_;
    qlora::set_num_threads(n_threads);
    Eigen::setNbThreads(n_threads);
    openblas_set_num_threads(n_threads);
  }
  ~CaseThreads() { qlora::set_num_threads(saved_); }
  CaseThreads(const CaseThreads&) = delete;
  CaseThreads& operator=(const CaseThreads&) = delete;

 private:
  int saved_;
};

/// Runs `call` once and checks its result, then times it and sets the counters.
template <class Call>
void time_checked(benchmark::State& state, const Case& k, Operands& ops, const Call& call) {
  call();
  if (!ops.spot_check(k)) {
    state.SkipWithError("result differs from the double-precision sum");
    return;
  }
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(ops.c.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, k);
}

void bench_gemm_f32(benchmark::State& state, Case k, Isa isa) {
  Operands ops(k);
  const CaseThreads threads(k);
  const auto call = [&] {
    qlora::detail::gemm_f32(isa, k.op_a, k.op_b, k.M, k.N, k.K, 1.0f, ops.a.data(), ops.lda,
                            ops.b.data(), ops.ldb, false, ops.c.data(), k.N);
  };
  time_checked(state, k, ops, call);
}

void bench_eigen(benchmark::State& state, Case k) {
  Operands ops(k);
  const CaseThreads threads(k);
  using Map = qlora::ConstMapRowMatrixF;
  const Map a(ops.a.data(), k.op_a == Transpose::yes ? k.K : k.M, ops.lda);
  const Map b(ops.b.data(), k.op_b == Transpose::yes ? k.N : k.K, ops.ldb);
  qlora::MapRowMatrixF c(ops.c.data(), k.M, k.N);
  const auto call = [&] {
    const bool ta = k.op_a == Transpose::yes;
    const bool tb = k.op_b == Transpose::yes;
    if (ta && tb) {
      c.noalias() = a.transpose() * b.transpose();
    } else if (ta) {
      c.noalias() = a.transpose() * b;
    } else if (tb) {
      c.noalias() = a * b.transpose();
    } else {
      c.noalias() = a * b;
    }
  };
  time_checked(state, k, ops, call);
}

/// Times the same product through Eigen built for this machine (eigen_native.hpp).
void bench_eigen_native(benchmark::State& state, Case k) {
  Operands ops(k);
  const CaseThreads threads(k);
  const int n_threads = qlora::num_threads();
  const auto call = [&] {
    qlora_bench_eigen_native_sgemm(k.op_a == Transpose::yes, k.op_b == Transpose::yes, k.M, k.N,
                                   k.K, ops.a.data(), ops.lda, ops.b.data(), ops.ldb,
                                   ops.c.data(), n_threads);
  };
  time_checked(state, k, ops, call);
}

void bench_openblas(benchmark::State& state, Case k) {
  Operands ops(k);
  const CaseThreads threads(k);
  const auto call = [&] {
    cblas_sgemm(CblasRowMajor, k.op_a == Transpose::yes ? CblasTrans : CblasNoTrans,
                k.op_b == Transpose::yes ? CblasTrans : CblasNoTrans, static_cast<int>(k.M),
                static_cast<int>(k.N), static_cast<int>(k.K), 1.0f, ops.a.data(),
                static_cast<int>(ops.lda), ops.b.data(), static_cast<int>(ops.ldb), 0.0f,
                ops.c.data(), static_cast<int>(k.N));
  };
  time_checked(state, k, ops, call);
}

void register_all() {
  for (const Case& k : kCases) {
    const std::string shape = fmt::format("{}/M={},N={},K={}", k.name, k.M, k.N, k.K);
    for (const Isa isa : qlora::available_isas()) {
      // The scalar reference is a plain loop; it is measured on the small products only.
      if (isa == Isa::scalar && k.M * k.N * k.K > (std::int64_t{1} << 28)) continue;
      const std::string name = fmt::format("gemm_f32/{}/{}", qlora::to_string(isa), shape);
      benchmark::RegisterBenchmark(name.c_str(), bench_gemm_f32, k, isa)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
    benchmark::RegisterBenchmark(fmt::format("sgemm_eigen/{}", shape).c_str(), bench_eigen, k)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark(fmt::format("sgemm_eigen_native/{}", shape).c_str(),
                                 bench_eigen_native, k)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark(fmt::format("sgemm_openblas/{}", shape).c_str(), bench_openblas, k)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
}

}  // namespace

int main(int argc, char** argv) {
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
