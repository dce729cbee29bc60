// Tokenizer throughput on real English text: SmolLM2's tokenizer (models/*.gguf, from
// scripts/fetch-model) encoding the Debian `fortunes` files (/usr/share/games/fortunes, from
// `apt-get install fortunes`). Every benchmark skips when either is absent.
//
// Measured: the pre-tokenizer alone, encode with a cold word cache (a new Tokenizer per
// iteration, so every distinct word goes through BPE), encode with a warm cache, and decode.
// Counters: tokens/s and bytes/s. The round trip decode(encode(text)) == text is checked once
// before timing.

#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "qlora/io/gguf.hpp"
#include "qlora/model/tokenizer.hpp"

namespace {

const std::filesystem::path kSourceDir = QLORA_SOURCE_DIR;
const std::filesystem::path kFortunesDir = "/usr/share/games/fortunes";

std::filesystem::path find_model() {
  const auto dir = kSourceDir / "models";
  if (!std::filesystem::is_directory(dir)) return {};
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() == ".gguf") return entry.path();
  }
  return {};
}

// The fortune files themselves (not the .dat indexes or the .u8 links), concatenated.
std::string read_fortunes() {
  std::string text;
  if (!std::filesystem::is_directory(kFortunesDir)) return text;
  for (const auto& entry : std::filesystem::directory_iterator(kFortunesDir)) {
    if (!entry.is_regular_file() || entry.is_symlink() || entry.path().has_extension()) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    text += buffer.str();
  }
  return text;
}

struct Setup {
  qlora::TokenizerData data;
  std::unique_ptr<qlora::Tokenizer> tokenizer;
  std::string text;
  std::vector<int32_t> ids;
  std::string skip_reason;  // empty when the benchmarks can run
};

const Setup& setup() {
  static const Setup s = [] {
    Setup out;
    const auto model = find_model();
    if (model.empty()) {
      out.skip_reason = "no models/*.gguf (run scripts/fetch-model)";
      return out;
    }
    out.text = read_fortunes();
    if (out.text.empty()) {
      out.skip_reason = "no text in /usr/share/games/fortunes (apt-get install fortunes)";
      return out;
    }
    const qlora::GgufFile file(model);
    out.data = qlora::Tokenizer::data_from_gguf(file);
    out.tokenizer = std::make_unique<qlora::Tokenizer>(out.data);
    out.ids = out.tokenizer->encode(out.text, {.add_special = false});
    if (out.tokenizer->decode(out.ids) != out.text) {
      out.skip_reason = "decode(encode(fortunes)) differs from the text";
    }
    return out;
  }();
  return s;
}

void set_counters(benchmark::State& state, const Setup& s) {
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(
      iterations * static_cast<double>(s.ids.size()), benchmark::Counter::kIsRate);
  state.counters["tokens"] = static_cast<double>(s.ids.size());
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(s.text.size()));
}

void BM_pre_tokenize(benchmark::State& state) {
  const Setup& s = setup();
  if (!s.skip_reason.empty()) return state.SkipWithError(s.skip_reason.c_str());
  std::vector<qlora::detail::WordSpan> words;
  for (auto _ : state) {
    qlora::detail::pre_tokenize(s.text, true, words);
    benchmark::DoNotOptimize(words.data());
  }
  set_counters(state, s);
}

void BM_encode_cold_cache(benchmark::State& state) {
  const Setup& s = setup();
  if (!s.skip_reason.empty()) return state.SkipWithError(s.skip_reason.c_str());
  for (auto _ : state) {
    state.PauseTiming();
    auto fresh = std::make_unique<qlora::Tokenizer>(s.data);
    state.ResumeTiming();

    const auto ids = fresh->encode(s.text, {.add_special = false});
    benchmark::DoNotOptimize(ids.data());

    state.PauseTiming();  // the Tokenizer's destruction is not timed
    fresh.reset();
    state.ResumeTiming();
  }
  set_counters(state, s);
}

void BM_encode_warm_cache(benchmark::State& state) {
  const Setup& s = setup();
  if (!s.skip_reason.empty()) return state.SkipWithError(s.skip_reason.c_str());
  for (auto _ : state) {
    const auto ids = s.tokenizer->encode(s.text, {.add_special = false});
    benchmark::DoNotOptimize(ids.data());
  }
  set_counters(state, s);
}

void BM_decode(benchmark::State& state) {
  const Setup& s = setup();
  if (!s.skip_reason.empty()) return state.SkipWithError(s.skip_reason.c_str());
  for (auto _ : state) {
    const std::string text = s.tokenizer->decode(s.ids);
    benchmark::DoNotOptimize(text.data());
  }
  set_counters(state, s);
}

}  // namespace

BENCHMARK(BM_pre_tokenize)->Name("pre_tokenize/smollm2/fortunes")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_encode_cold_cache)->Name("encode/smollm2/cold_cache/fortunes")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_encode_warm_cache)->Name("encode/smollm2/warm_cache/fortunes")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_decode)->Name("decode/smollm2/fortunes")->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
