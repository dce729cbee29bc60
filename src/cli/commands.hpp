// The qlora command-line tool's subcommands. Each run_* function performs one subcommand and
// throws qlora::Error with a one-line message on bad input; main() prints it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qlora/lora/lora_config.hpp"
#include "qlora/lora/peft_io.hpp"
#include "qlora/model/load.hpp"
#include "qlora/quant/quantize.hpp"
#include "qlora/train/optimizer.hpp"

namespace qlora::cli {

/// The quantization of the base projections (--quant, --group-size, --double-quant,
/// --symmetric).
struct QuantOptions {
  std::string format = "nf4";
  int group_size = 64;
  bool double_quant = false;
  bool symmetric = false;

  QuantConfig to_config() const;
};

struct FinetuneOptions {
  std::string model;
  std::string data;
  std::string output;
  QuantOptions quant;
  std::string init = "default";
  int loftq_iterations = 1;
  int rank = 16;
  float alpha = 16.0f;
  bool rslora = false;
  float dropout = 0.05f;
  std::string targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
  std::string layers;
  float lr = 2e-4f;
  std::string schedule = "cosine";
  std::int64_t warmup = 0;
  std::int64_t steps = 0;
  double epochs = 1.0;
  std::int64_t seq_len = 256;
  std::int64_t batch = 4;
  std::int64_t grad_accum = 1;
  int threads = 0;
  std::int64_t eval_every = 0;
  std::int64_t save_every = 0;
  std::int64_t eval_max_rows = 0;
  double eval_fraction = 0.1;
  std::string separator;
  float max_grad_norm = 1.0f;
  float weight_decay = 0.0f;
  bool checkpointing = false;
  bool resume = false;
  std::uint64_t seed = 42;
};

struct EvalOptions {
  std::string model;
  std::string data;
  std::string adapter;
  QuantOptions quant;
  std::int64_t seq_len = 256;
  std::int64_t batch = 4;
  double eval_fraction = 0.1;
  bool all_documents = false;
  std::string separator;
  int threads = 0;
};

struct GenerateOptions {
  std::string model;
  std::string adapter;
  QuantOptions quant;
  std::string prompt;
  bool chat = false;
  std::string system;
  float temperature = 0.7f;
  int top_k = 40;
  float top_p = 0.9f;
  std::uint64_t seed = 0;
  int max_tokens = 128;
  int threads = 0;
};

struct ExportOptions {
  std::string adapter;
  std::string format = "peft";
  std::string output;
  std::string model;  ///< needed for GGUF (architecture and head counts)
};

struct MergeOptions {
  std::string model;
  std::string adapter;
  std::string output;
  std::string type = "f16";
  QuantOptions quant;
  int threads = 0;
};

/// `qlora continual learn`: one more task into a run folder.
struct ContinualOptions {
  std::string model;
  std::string data;
  std::string run;
  std::string task;
  std::string control;
  std::string method = "continual";
  std::string policy = "per-task";
  std::string inference = "sum-all";
  float olora = -1.0f;  ///< < 0: off
  std::int64_t replay_windows = 0;
  double replay_fraction = 0.25;
  bool replay_per_task = false;
  QuantOptions quant;
  int rank = 16;
  float alpha = 32.0f;
  float dropout = 0.0f;
  std::string targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
  float lr = 1e-3f;
  std::string schedule = "constant";
  std::int64_t warmup = 4;
  std::int64_t steps = 0;
  double epochs = 1.0;
  std::int64_t seq_len = 128;
  std::int64_t batch = 4;
  std::int64_t grad_accum = 1;
  double eval_fraction = 0.1;
  std::int64_t eval_max_tokens = 0;
  std::string separator;
  int threads = 0;
  std::uint64_t seed = 42;
};

/// `qlora continual merge`: several task adapters of a run into one PEFT adapter.
struct ContinualMergeOptions {
  std::string model;
  std::string run;
  std::string tasks;  ///< comma-separated; empty: every adapter of the bank
  std::string method = "concat";
  std::string weights;
  float density = 1.0f;
  int rank = 0;
  std::uint64_t seed = 0;
  std::string output;
  int threads = 0;
};

/// `qlora continual route`: which task's adapter fits a prompt best.
struct ContinualRouteOptions {
  std::string model;
  std::string run;
  std::string prompt;
  int prefix_tokens = 32;
  int threads = 0;
};

int run_finetune(const FinetuneOptions& options);
int run_continual_merge(const ContinualMergeOptions& options);
int run_continual_route(const ContinualRouteOptions& options);
int run_continual_learn(const ContinualOptions& options);
int run_continual_report(const std::string& run, bool json);
int run_continual_clear_replay(const std::string& run);
int run_eval(const EvalOptions& options);
int run_generate(const GenerateOptions& options);
int run_export(const ExportOptions& options);
int run_merge(const MergeOptions& options);
int run_info(const std::string& path);

/// Splits a comma-separated list, dropping empty items.
std::vector<std::string> split_list(const std::string& text);
/// Parses --targets: a comma-separated list of module names, "all-linear", or "re:<regex>".
std::vector<std::string> parse_targets(const std::string& text);
/// Parses --layers: "3", "0-5", "0,2,4-7"; empty means every layer.
std::vector<int> parse_layers(const std::string& text);

/**
 * Loads `source` with `quant`, then attaches the PEFT adapter in `dir` as "default". When
 * the adapter records that it was trained on a LoftQ base (its "qlora" metadata), LoftQ is
 * run again with the recorded settings to rebuild that base before the weights are loaded.
 */
LlamaModel load_model_with_adapter(const ModelSource& source, const QuantOptions& quant,
                                   const std::string& dir);

}  // namespace qlora::cli
