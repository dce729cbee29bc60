#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <vector>

#include <fmt/format.h>

#include "commands.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/dist/communicator.hpp"
#include "qlora/io/mapped_file.hpp"
#include "qlora/train/data.hpp"
#include "qlora/train/trainer.hpp"
#if defined(QLORA_WITH_MPI)
#include "qlora/dist/mpi_communicator.hpp"
#endif

namespace qlora::cli {
namespace {

std::string format_duration(double seconds) {
  const auto s = static_cast<long>(std::lround(std::max(0.0, seconds)));
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

// Draws a one-line progress bar on a terminal, or prints plain log lines otherwise.
class Progress {
 public:
  explicit Progress(std::int64_t total) : total_(total), terminal_(isatty(STDERR_FILENO) != 0) {}

  void step(const StepMetrics& m) {
    elapsed_ += m.seconds;
    const double eta = elapsed_ / static_cast<double>(m.step) * static_cast<double>(total_ - m.step);
    if (terminal_) {
      constexpr int kWidth = 24;
      const auto filled = static_cast<int>(kWidth * m.step / std::max<std::int64_t>(1, total_));
      fmt::print(stderr, "\r[{}{}] step {}/{} loss {:.4f} lr {:.2e} {:.0f} tok/s ETA {}   ",
                 std::string(static_cast<std::size_t>(filled), '#'),
                 std::string(static_cast<std::size_t>(kWidth - filled), '.'), m.step, total_,
                 m.loss, m.lr, m.tokens_per_second, format_duration(eta));
      if (m.step == total_) fmt::print(stderr, "\n");
    } else {
      fmt::print(stderr, "step {}/{} loss {:.4f} lr {:.3e} grad_norm {:.3f} tokens/s {:.0f} eta {}\n",
                 m.step, total_, m.loss, m.lr, m.grad_norm, m.tokens_per_second,
                 format_duration(eta));
    }
    std::fflush(stderr);
  }

  void eval(const EvalMetrics& e) {
    if (terminal_) fmt::print(stderr, "\n");
    fmt::print(stderr, "eval at step {}: loss {:.4f} perplexity {:.3f} ({} tokens)\n", e.step,
               e.loss, e.perplexity, e.tokens);
    std::fflush(stderr);
  }

 private:
  std::int64_t total_;
  bool terminal_;
  double elapsed_ = 0.0;
};

// Rejects target names that match no projection of the model, naming them.
void check_targets(LlamaModel& model, const LoraConfig& lora) {
  if (lora.target_modules.size() == 1 &&
      (lora.target_modules[0] == "all-linear" || lora.target_modules[0].starts_with("re:"))) {
    return;
  }
  for (const std::string& target : lora.target_modules) {
    LoraConfig single = lora;
    single.target_modules = {target};
    bool found = false;
    for (const LlamaProjectionRef& ref : model.projections()) {
      if (lora_targets_module(single, ref.key, ref.layer)) {
        found = true;
        break;
      }
    }
    QLORA_CHECK_ARG(found,
                    "--targets: the model has no module '{}' (hint: Llama projections are q_proj, "
                    "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; or use all-linear)",
                    target);
  }
}

// Hashes the model file, or every file of a Hugging Face model folder in name order, so that
// the ranks of a data-parallel job can check that they hold the same model.
std::uint64_t hash_model_files(const std::filesystem::path& model) {
  namespace fs = std::filesystem;
  std::vector<fs::path> files;
  if (fs::is_directory(model)) {
    for (const auto& entry : fs::directory_iterator(model)) {
      if (entry.is_regular_file()) files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(model);
  }
  std::uint64_t h = 0;
  for (const fs::path& file : files) {
    const std::string name = file.filename().string();
    h = hash_bytes(std::as_bytes(std::span(name.data(), name.size())), h);
    if (fs::file_size(file) > 0) h = hash_bytes(MappedFile(file).bytes(), h);
  }
  return h;
}

int run_finetune_on(const FinetuneOptions& o, Communicator& comm) {
  // Rank 0 alone prints progress and writes the final adapter, but every rank trains.
  const bool root = comm.is_root();
  if (o.threads > 0) set_num_threads(o.threads);
  const QuantConfig quant = o.quant.to_config();
  const ModelSource source(o.model);
  const LlamaConfig& config = source.config();
  QLORA_CHECK_ARG(config.max_position_embeddings == 0 || o.seq_len <= config.max_position_embeddings,
                  "--seq-len {} exceeds the model's context of {} tokens", o.seq_len,
                  config.max_position_embeddings);

  LoraConfig lora;
  lora.rank = o.rank;
  lora.alpha = o.alpha;
  lora.use_rslora = o.rslora;
  lora.dropout = o.dropout;
  lora.init = parse_lora_init(o.init);
  lora.loftq.iterations = o.loftq_iterations;
  lora.target_modules = parse_targets(o.targets);
  lora.layers_to_transform = parse_layers(o.layers);
  lora.validate();
  QLORA_CHECK_ARG(lora.init != LoraInit::qalora || quant.format != QuantFormat::nf4,
                  "--init qalora needs --quant int4 or int8 (QA-LoRA folds into group offsets)");

  // Data.
  const Tokenizer tokenizer = source.tokenizer();
  DataOptions data;
  data.text_separator = o.separator;
  data.eval_fraction = o.eval_fraction;
  std::vector<Document> train_docs, eval_docs;
  split_documents(load_documents(o.data, tokenizer, data), data, train_docs, eval_docs);
  const std::int32_t pad = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : tokenizer.eos_id();
  std::vector<PackedRow> train_rows = pack_documents(train_docs, o.seq_len, pad);
  std::vector<PackedRow> eval_rows = pack_documents(eval_docs, o.seq_len, pad);
  if (root) {
    fmt::print(stderr, "data: {} training documents in {} rows of {} tokens, {} held-out rows\n",
               train_docs.size(), train_rows.size(), o.seq_len, eval_rows.size());
  }

  // Model and adapter.
  LlamaLoadOptions load;
  load.projections = quant;
  const auto load_start = std::chrono::steady_clock::now();
  LlamaModel model = load_llama(source, load);
  check_targets(model, lora);
  if (lora.init == LoraInit::loftq) {
    const LoftqSummary s = add_loftq_adapter(model, source, "default", lora);
    if (root) {
      fmt::print(stderr,
                 "LoftQ on {} projections: quantization error {:.4g} -> {:.4g} ({:.1f}% removed)\n",
                 s.n_projections, s.qlora_error, s.loftq_error,
                 100.0 * (1.0 - s.loftq_error / s.qlora_error));
    }
  } else {
    model.add_adapter("default", lora, o.seed);
  }
  if (root) {
    const auto load_time = std::chrono::steady_clock::now() - load_start;
    fmt::print(stderr, "model: {} layers, {} projections quantized to {} in {:.1f} s\n",
               config.num_hidden_layers, model.projections().size(), o.quant.format,
               std::chrono::duration<double>(load_time).count());
  }

  TrainerConfig tc;
  tc.batch_size = o.batch;
  tc.grad_accum = o.grad_accum;
  tc.max_steps = o.steps;
  tc.epochs = o.epochs;
  tc.lr = o.lr;
  tc.schedule = parse_lr_schedule(o.schedule);
  tc.warmup_steps = o.warmup;
  tc.adamw.weight_decay = o.weight_decay;
  tc.max_grad_norm = o.max_grad_norm;
  tc.eval_every = o.eval_every;
  tc.save_every = o.save_every;
  tc.eval_max_rows = o.eval_max_rows;
  tc.output_dir = o.output;
  tc.seed = o.seed;
  tc.gradient_checkpointing = o.checkpointing;
  tc.communicator = &comm;
  if (comm.size() > 1) {
    tc.model_fingerprint = hash_model_files(o.model);
    if (root) {
      fmt::print(stderr, "data parallel: {} ranks, {} rows per step in all\n", comm.size(),
                 comm.size() * o.batch * o.grad_accum);
    }
  }
  Trainer trainer(model, std::move(train_rows), std::move(eval_rows), tc);
  if (o.resume) trainer.resume(o.output);

  Progress progress(trainer.total_steps());
  if (root) {
    trainer.on_step = [&progress](const StepMetrics& m) { progress.step(m); };
    trainer.on_eval = [&progress](const EvalMetrics& e) { progress.eval(e); };
  }
  if (!o.resume) trainer.evaluate();
  while (!trainer.done()) trainer.step();
  trainer.write_loss_curve();
  if (!root) return 0;

  // The final adapter, in PEFT's format with qlora's record of the base it was trained on.
  PeftAdapter adapter;
  adapter.config.use_rslora = o.rslora;
  adapter.config.base_model_name_or_path = o.model;
  adapter.config.qlora = {{"quant",
                           {{"format", o.quant.format},
                            {"group_size", o.quant.group_size},
                            {"double_quant", o.quant.double_quant},
                            {"symmetric", o.quant.symmetric}}},
                          {"init", o.init},
                          {"loftq_iterations", o.loftq_iterations}};
  for (const LlamaProjectionRef& ref : model.projections()) {
    if (ref.linear->has_adapter("default")) adapter.modules[ref.key] = ref.linear->adapter("default");
  }
  const auto adapter_dir = std::filesystem::path(o.output) / "adapter";
  save_peft_adapter(adapter_dir, adapter);

  const auto& evals = trainer.eval_history();
  if (evals.size() >= 2) {
    fmt::print("held-out perplexity: {:.3f} before, {:.3f} after ({} steps)\n",
               evals.front().perplexity, evals.back().perplexity, trainer.current_step());
  }
  fmt::print("adapter: {}\nmetrics: {}\nloss curve: {}\n", adapter_dir.string(),
             (std::filesystem::path(o.output) / "metrics.jsonl").string(),
             (std::filesystem::path(o.output) / "loss_curve.svg").string());
  return 0;
}

}  // namespace

int run_finetune(const FinetuneOptions& o) {
#if defined(QLORA_WITH_MPI)
  if (MpiCommunicator::launched_by_mpi()) {
    MpiCommunicator comm;
    try {
      return run_finetune_on(o, comm);
    } catch (const RankMismatch& e) {
      // Every rank raised the same error after comparing hashes, so rank 0 prints it once
      // and every rank ends normally.
      if (comm.is_root()) fmt::print(stderr, "\nqlora: error: {}\n", e.what());
      return 1;
    } catch (const TrainingDiverged& e) {
      // Raised on every rank alike, because the loss and gradients are summed first.
      if (comm.is_root()) fmt::print(stderr, "\nqlora: error: {}\n", e.what());
      return 1;
    } catch (const std::exception& e) {
      // The other ranks may be waiting inside a collective for this one, so end them all.
      std::fflush(stdout);
      fmt::print(stderr, "\nqlora: error on rank {} of {}: {}\n", comm.rank(), comm.size(),
                 e.what());
      std::fflush(stderr);
      comm.abort(1);
    }
  }
#endif
  return run_finetune_on(o, single_process_communicator());
}

}  // namespace qlora::cli
