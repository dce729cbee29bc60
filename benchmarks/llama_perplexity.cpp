// Perplexity of SmolLM2-135M on held-out English text (Debian's `fortunes` package) with the
// seven projections of every layer kept fp32 or quantized to NF4, NF4 with double
// quantization, INT4 and INT8 (groups of 64, affine). The embeddings stay fp32.
//
// The split is fixed: the plain-text fortune files of the directory (no .dat / .u8), in byte
// order of their names, are cut at lines "%" into fortunes; every tenth fortune (index 0, 10,
// 20, ...) is held out. The held-out fortunes, joined by "\n%\n", are tokenized once, and the
// first `--tokens` predictions are scored in independent windows of 256 tokens (each window
// predicts its tokens 1..256 from the ones before it in that window).
//
// Usage: llama_perplexity MODEL.gguf [FORTUNES_DIR] [--tokens N] [--dump-ids FILE]
// Prints one Markdown table row per configuration. --dump-ids writes the scored token ids, one
// window of 257 ids per line, for cross-checks with other implementations.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/model/llama.hpp"
#include "qlora/model/tokenizer.hpp"

namespace {

constexpr std::int64_t kWindow = 256;
constexpr std::int64_t kWindowsPerBatch = 4;
constexpr std::size_t kHeldOutEvery = 10;

std::string held_out_text(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string ext = entry.path().extension().string();
    if (entry.is_regular_file() && ext != ".dat" && ext != ".u8") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    qlora::raise<qlora::IoError>(
        "[llama_perplexity] no fortune files in {} (hint: apt-get install fortunes)",
        dir.string());
  }

  std::vector<std::string> fortunes;
  for (const auto& path : files) {
    std::ifstream in(path);
    std::string line;
    std::string current;
    while (std::getline(in, line)) {
      if (line == "%") {
        if (!current.empty()) fortunes.push_back(current);
        current.clear();
      } else {
        current += line + "\n";
      }
    }
    if (!current.empty()) fortunes.push_back(current);
  }

  std::string text;
  for (std::size_t i = 0; i < fortunes.size(); i += kHeldOutEvery) {
    if (!text.empty()) text += "%\n";
    text += fortunes[i];
  }
  std::fprintf(stderr, "%zu files, %zu fortunes, %zu held out (%zu bytes)\n", files.size(),
               fortunes.size(), (fortunes.size() + kHeldOutEvery - 1) / kHeldOutEvery,
               text.size());
  return text;
}

struct Variant {
  const char* name;
  std::optional<qlora::QuantConfig> projections;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> positional;
    std::int64_t n_predictions = 8192;
    std::string dump_path;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--tokens" && i + 1 < argc) {
        n_predictions = std::stoll(argv[++i]);
      } else if (arg == "--dump-ids" && i + 1 < argc) {
        dump_path = argv[++i];
      } else {
        positional.push_back(arg);
      }
    }
    if (positional.empty()) {
      std::fprintf(stderr,
                   "usage: llama_perplexity MODEL.gguf [FORTUNES_DIR] [--tokens N] "
                   "[--dump-ids FILE]\n");
      return 2;
    }
    const std::filesystem::path fortunes_dir =
        positional.size() > 1 ? positional[1] : "/usr/share/games/fortunes";

    const qlora::GgufFile file(positional[0]);
    const qlora::Tokenizer tokenizer = qlora::Tokenizer::from_gguf(file);
    const std::vector<std::int32_t> ids =
        tokenizer.encode(held_out_text(fortunes_dir), {.add_special = false});
    const std::int64_t n_windows =
        std::min<std::int64_t>(n_predictions / kWindow,
                               (static_cast<std::int64_t>(ids.size()) - 1) / kWindow);
    std::fprintf(stderr, "%zu held-out tokens; scoring %lld windows of %lld, %d threads\n",
                 ids.size(), static_cast<long long>(n_windows), static_cast<long long>(kWindow),
                 qlora::num_threads());

    if (!dump_path.empty()) {
      std::ofstream out(dump_path);
      for (std::int64_t w = 0; w < n_windows; ++w) {
        for (std::int64_t i = 0; i <= kWindow; ++i) {
          out << ids[static_cast<std::size_t>(w * kWindow + i)] << (i == kWindow ? "\n" : " ");
        }
      }
    }

    using qlora::QuantConfig;
    using qlora::QuantFormat;
    const std::vector<Variant> variants = {
        {"fp32 (dequantized Q4_1 GGUF)", std::nullopt},
        {"NF4, block 64", QuantConfig{.format = QuantFormat::nf4, .block_size = 64}},
        {"NF4, block 64, double quant",
         QuantConfig{.format = QuantFormat::nf4, .block_size = 64, .double_quant = true}},
        {"INT4, group 64, affine", QuantConfig{.format = QuantFormat::int4, .block_size = 64}},
        {"INT8, group 64, affine", QuantConfig{.format = QuantFormat::int8, .block_size = 64}},
    };

    std::printf("| projections | perplexity | mean loss (nats) | tokens scored | eval time |\n");
    std::printf("| --- | ---: | ---: | ---: | ---: |\n");
    for (const Variant& variant : variants) {
      const qlora::LlamaModel model =
          qlora::LlamaModel::from_gguf(
              file, {.projections = variant.projections, .embeddings = std::nullopt});
      const auto start = std::chrono::steady_clock::now();
      qlora::LlamaLoss total;
      for (std::int64_t w = 0; w < n_windows; w += kWindowsPerBatch) {
        qlora::LlamaBatch batch;
        batch.batch_size = std::min(kWindowsPerBatch, n_windows - w);
        batch.seq_len = kWindow;
        for (std::int64_t b = 0; b < batch.batch_size; ++b) {
          const auto begin = ids.begin() + (w + b) * kWindow;
          batch.tokens.insert(batch.tokens.end(), begin, begin + kWindow);
          batch.targets.insert(batch.targets.end(), begin + 1, begin + kWindow + 1);
        }
        const qlora::LlamaLoss loss = model.loss(batch);
        total.sum += loss.sum;
        total.n_tokens += loss.n_tokens;
      }
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("| %s | %.3f | %.4f | %lld | %.0f s |\n", variant.name,
                  std::exp(total.mean()), total.mean(),
                  static_cast<long long>(total.n_tokens), seconds);
      std::fflush(stdout);
    }
    return 0;
  } catch (const qlora::Error& e) {
    std::fprintf(stderr, "llama_perplexity: %s\n", e.what());
    return 1;
  }
}
