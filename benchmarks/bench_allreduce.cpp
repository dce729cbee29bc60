// The per-step gradient all-reduce of data-parallel training, over MPI between the ranks of
// one job: `mpiexec -n 2 bench_allreduce`. Built only with -DQLORA_WITH_MPI=ON.
//
// The buffer is what Trainer::step sums: the dA and dB of LoRA rank r on all seven projections
// of every layer of SmolLM2-135M (30 layers, hidden 576, MLP 1536, 9 query and 3 key-value
// heads of 64), in float32. An 8-float buffer measures the latency alone. Every rank runs a
// fixed number of iterations, because Google Benchmark's adaptive count could differ between
// ranks and leave one waiting in a collective. Only rank 0 reports. Before timing, one
// all-reduce is checked against the expected sum.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <span>
#include <vector>

#include "qlora/dist/mpi_communicator.hpp"

namespace {

qlora::MpiCommunicator* g_comm = nullptr;

// Trainable LoRA parameters of SmolLM2-135M with all seven targets at rank r: every
// projection [out, in] adds A [r, in] and B [out, r].
std::int64_t smollm2_lora_params(std::int64_t r) {
  constexpr std::int64_t kLayers = 30, kHidden = 576, kMlp = 1536, kKv = 3 * 64;
  const std::int64_t in_plus_out = (kHidden + kHidden) + 2 * (kHidden + kKv) +
                                   (kHidden + kHidden) + 2 * (kHidden + kMlp) + (kMlp + kHidden);
  return kLayers * r * in_plus_out;
}

void all_reduce(benchmark::State& state, std::int64_t n_floats) {
  qlora::Communicator& comm = *g_comm;
  std::vector<float> grads(static_cast<std::size_t>(n_floats), 1.0f);
  comm.all_reduce_sum(std::span<float>(grads));
  if (grads.front() != static_cast<float>(comm.size()) ||
      grads.back() != static_cast<float>(comm.size())) {
    state.SkipWithError("all-reduce returned a wrong sum");
    return;
  }
  for (auto _ : state) {
    comm.all_reduce_sum(std::span<float>(grads));
    benchmark::DoNotOptimize(grads.data());
  }
  const double bytes = 4.0 * static_cast<double>(n_floats);
  state.counters["bytes"] = bytes;
  state.counters["ranks"] = comm.size();
  // Bus bandwidth: a ring all-reduce moves 2 (N - 1) / N of the buffer through each rank's
  // link, so this is comparable with the link's bandwidth.
  state.counters["bus_bandwidth"] = benchmark::Counter(
      bytes * 2.0 * (comm.size() - 1) / comm.size(), benchmark::Counter::kIsIterationInvariantRate,
      benchmark::Counter::kIs1024);
}

void register_benchmarks() {
  benchmark::RegisterBenchmark("all_reduce/f32/mpi/latency,n=8",
                               [](benchmark::State& s) { all_reduce(s, 8); })
      ->Iterations(2000)
      ->UseRealTime();
  for (const std::int64_t r : {8, 16, 64}) {
    const std::int64_t n = smollm2_lora_params(r);
    benchmark::RegisterBenchmark(
        ("all_reduce/f32/mpi/smollm2_135m,r=" + std::to_string(r) + ",n=" + std::to_string(n))
            .c_str(),
        [n](benchmark::State& s) { all_reduce(s, n); })
        ->Iterations(r == 64 ? 20 : 50)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

// Discards the results of the ranks other than 0.
class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  qlora::MpiCommunicator comm;
  g_comm = &comm;
  benchmark::Initialize(&argc, argv);
  register_benchmarks();
  if (comm.is_root()) {
    std::printf("%d ranks\n", comm.size());
    benchmark::RunSpecifiedBenchmarks();
  } else {
    SilentReporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  return 0;
}
