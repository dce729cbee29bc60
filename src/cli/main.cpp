// qlora: fine-tune, evaluate, sample from, merge and export quantized LLMs with LoRA adapters.
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "commands.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/log.hpp"
#include "qlora/core/version.hpp"

namespace {

void add_quant_options(CLI::App* cmd, qlora::cli::QuantOptions& q) {
  cmd->add_option("--quant", q.format, "Quantization of the base projections")
      ->check(CLI::IsMember({"nf4", "int4", "int8"}))
      ->capture_default_str();
  cmd->add_option("--group-size", q.group_size,
                  "Elements per quantization block (NF4) or group (INT4, INT8)")
      ->capture_default_str();
  cmd->add_flag("--double-quant", q.double_quant, "Quantize NF4's block absmaxes to 8 bits");
  cmd->add_flag("--symmetric", q.symmetric, "Symmetric INT4 / INT8 (no offsets)");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qlora: fine-tune quantized LLMs with LoRA adapters on CPUs"};
  app.set_version_flag("--version", qlora::version_string());
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->capture_default_str();

  qlora::cli::FinetuneOptions ft;
  CLI::App* finetune = app.add_subcommand("finetune", "Train a LoRA adapter on text");
  finetune->add_option("model", ft.model, "GGUF file or Hugging Face model folder")->required();
  finetune->add_option("data", ft.data, "Training text (.txt) or JSONL (.jsonl)")->required();
  finetune->add_option("-o,--output", ft.output, "Run folder: checkpoints, metrics, adapter")
      ->required();
  add_quant_options(finetune, ft.quant);
  finetune->add_option("--init", ft.init, "Adapter initialisation")
      ->check(CLI::IsMember({"default", "gaussian", "loftq", "qalora"}))
      ->capture_default_str();
  finetune->add_option("--loftq-iter", ft.loftq_iterations, "LoftQ alternations T")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  finetune->add_option("--rank", ft.rank, "LoRA rank r")->check(CLI::PositiveNumber)->capture_default_str();
  finetune->add_option("--alpha", ft.alpha, "LoRA alpha (scaling alpha / r)")->capture_default_str();
  finetune->add_flag("--rslora", ft.rslora, "Scale by alpha / sqrt(r) (rsLoRA)");
  finetune->add_option("--dropout", ft.dropout, "LoRA dropout probability")->capture_default_str();
  finetune->add_option("--targets", ft.targets,
                       "Modules: comma-separated names, all-linear, or re:<regex>")
      ->capture_default_str();
  finetune->add_option("--layers", ft.layers, "Layers to adapt, e.g. 0-5,8 (default: all)");
  finetune->add_option("--lr", ft.lr, "Peak learning rate")->capture_default_str();
  finetune->add_option("--schedule", ft.schedule, "Learning-rate schedule")
      ->check(CLI::IsMember({"constant", "linear", "cosine"}))
      ->capture_default_str();
  finetune->add_option("--warmup", ft.warmup, "Warm-up steps")->capture_default_str();
  auto* steps = finetune->add_option("--steps", ft.steps, "Optimizer steps");
  finetune->add_option("--epochs", ft.epochs, "Passes over the data when --steps is not set")
      ->excludes(steps)
      ->capture_default_str();
  finetune->add_option("--seq-len", ft.seq_len, "Tokens per packed row")->check(CLI::Range(2, 1 << 20))->capture_default_str();
  finetune->add_option("--batch", ft.batch, "Rows per micro-batch")->check(CLI::PositiveNumber)->capture_default_str();
  finetune->add_option("--grad-accum", ft.grad_accum, "Micro-batches per optimizer step")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  finetune->add_option("--threads", ft.threads, "Threads (0: all cores)")->capture_default_str();
  finetune->add_option("--eval-every", ft.eval_every, "Evaluate every N steps (0: at the end)")
      ->capture_default_str();
  finetune->add_option("--eval-max-rows", ft.eval_max_rows, "Held-out rows per evaluation (0: all)")
      ->capture_default_str();
  finetune->add_option("--eval-fraction", ft.eval_fraction, "Share of documents held out")
      ->capture_default_str();
  finetune->add_option("--save-every", ft.save_every, "Checkpoint every N steps (0: at the end)")
      ->capture_default_str();
  finetune->add_option("--separator", ft.separator,
                       "Line that separates documents in .txt data (default: blank line)");
  finetune->add_option("--max-grad-norm", ft.max_grad_norm, "Clip the gradient norm (0: off)")
      ->capture_default_str();
  finetune->add_option("--weight-decay", ft.weight_decay, "AdamW weight decay")->capture_default_str();
  finetune->add_flag("--checkpointing", ft.checkpointing, "Recompute layers in backward to save memory");
  finetune->add_flag("--resume", ft.resume, "Continue the run in --output from its latest checkpoint");
  finetune->add_option("--seed", ft.seed, "Seed of initialisation, data order and dropout")
      ->capture_default_str();

  qlora::cli::EvalOptions ev;
  CLI::App* eval = app.add_subcommand("eval", "Held-out perplexity, with or without an adapter");
  eval->add_option("model", ev.model, "GGUF file or Hugging Face model folder")->required();
  eval->add_option("data", ev.data, "Text (.txt) or JSONL (.jsonl)")->required();
  eval->add_option("--adapter", ev.adapter, "PEFT adapter folder");
  add_quant_options(eval, ev.quant);
  eval->add_option("--seq-len", ev.seq_len, "Tokens per row")->capture_default_str();
  eval->add_option("--batch", ev.batch, "Rows per batch")->capture_default_str();
  eval->add_option("--eval-fraction", ev.eval_fraction, "Held-out share, as in finetune")
      ->capture_default_str();
  eval->add_flag("--all", ev.all_documents, "Evaluate every document, not the held-out split");
  eval->add_option("--separator", ev.separator, "Document separator line of .txt data");
  eval->add_option("--threads", ev.threads, "Threads (0: all cores)");

  qlora::cli::GenerateOptions gen;
  CLI::App* generate = app.add_subcommand("generate", "Generate text, streaming to stdout");
  generate->add_option("model", gen.model, "GGUF file or Hugging Face model folder")->required();
  generate->add_option("-p,--prompt", gen.prompt, "Prompt text")->required();
  generate->add_option("--adapter", gen.adapter, "PEFT adapter folder");
  add_quant_options(generate, gen.quant);
  generate->add_flag("--chat", gen.chat, "Wrap the prompt in the model's chat template");
  generate->add_option("--system", gen.system, "System message for --chat");
  generate->add_option("--temperature", gen.temperature, "0 picks the most likely token")
      ->capture_default_str();
  generate->add_option("--top-k", gen.top_k, "Sample from the k most likely tokens (0: all)")
      ->capture_default_str();
  generate->add_option("--top-p", gen.top_p, "Nucleus sampling threshold")->capture_default_str();
  generate->add_option("--seed", gen.seed, "Sampling seed")->capture_default_str();
  generate->add_option("-n,--max-tokens", gen.max_tokens, "Tokens to generate")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  generate->add_option("--threads", gen.threads, "Threads (0: all cores)");

  qlora::cli::MergeOptions mg;
  CLI::App* merge = app.add_subcommand("merge", "Merge an adapter into a GGUF model");
  merge->add_option("model", mg.model, "Base GGUF file")->required();
  merge->add_option("--adapter", mg.adapter, "PEFT adapter folder")->required();
  merge->add_option("-o,--output", mg.output, "Merged .gguf file")->required();
  merge->add_option("--type", mg.type, "Storage of the merged projections")
      ->check(CLI::IsMember({"f32", "f16", "q8_0"}))
      ->capture_default_str();
  add_quant_options(merge, mg.quant);
  merge->add_option("--threads", mg.threads, "Threads (0: all cores)");

  qlora::cli::ExportOptions ex;
  CLI::App* exporter = app.add_subcommand("export", "Write an adapter as PEFT or GGUF LoRA");
  exporter->add_option("adapter", ex.adapter, "PEFT adapter folder (a run's adapter/)")->required();
  exporter->add_option("--format", ex.format, "peft or gguf")
      ->check(CLI::IsMember({"peft", "gguf"}))
      ->capture_default_str();
  exporter->add_option("-o,--output", ex.output, "Output folder (peft) or file (gguf)")->required();
  exporter->add_option("--model", ex.model, "Base model, needed for --format gguf");

  std::string info_path;
  CLI::App* info = app.add_subcommand("info", "Describe a model or an adapter");
  info->add_option("path", info_path, "GGUF file, model folder or adapter folder")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    qlora::set_log_level(qlora::parse_log_level(log_level));
    if (finetune->parsed()) return qlora::cli::run_finetune(ft);
    if (eval->parsed()) return qlora::cli::run_eval(ev);
    if (generate->parsed()) return qlora::cli::run_generate(gen);
    if (merge->parsed()) return qlora::cli::run_merge(mg);
    if (exporter->parsed()) return qlora::cli::run_export(ex);
    if (info->parsed()) return qlora::cli::run_info(info_path);
  } catch (const qlora::Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "\nqlora: error: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "\nqlora: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
