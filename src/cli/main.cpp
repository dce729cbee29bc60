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

  qlora::cli::ContinualOptions cl;
  CLI::App* continual_cmd =
      app.add_subcommand("continual", "Learn task after task without forgetting");
  continual_cmd->require_subcommand(1);
  CLI::App* learn = continual_cmd->add_subcommand(
      "learn", "Train one more task into a run folder, then evaluate every task");
  learn->add_option("model", cl.model, "GGUF file or Hugging Face model folder")->required();
  learn->add_option("data", cl.data, "The task's text (.txt) or JSONL (.jsonl)")->required();
  learn->add_option("--run", cl.run, "Run folder: adapter bank, replay buffer, report")->required();
  learn->add_option("--task", cl.task, "Task name (also its adapter's name)")->required();
  learn->add_option("--control", cl.control,
                    "Never-trained text whose drift is tracked (first task only)");
  learn->add_option("--method", cl.method, "Label of the report")->capture_default_str();
  learn->add_option("--policy", cl.policy, "per-task: a new adapter per task; shared: one adapter")
      ->check(CLI::IsMember({"per-task", "shared"}))
      ->capture_default_str();
  learn->add_option("--inference", cl.inference,
                    "sum-all: every adapter at once; oracle: each task's own adapter")
      ->check(CLI::IsMember({"sum-all", "oracle"}))
      ->capture_default_str();
  learn->add_option("--olora", cl.olora, "O-LoRA orthogonality weight (per-task policy)")
      ->check(CLI::NonNegativeNumber);
  learn->add_option("--replay", cl.replay_windows, "Replay buffer size in windows (0: off)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  learn->add_option("--replay-fraction", cl.replay_fraction, "Share of each batch replayed")
      ->check(CLI::Range(0.0, 0.99))
      ->capture_default_str();
  learn->add_flag("--replay-per-task", cl.replay_per_task, "Equal buffer quota for every task");
  add_quant_options(learn, cl.quant);
  learn->add_option("--rank", cl.rank, "LoRA rank r")->check(CLI::PositiveNumber)->capture_default_str();
  learn->add_option("--alpha", cl.alpha, "LoRA alpha")->capture_default_str();
  learn->add_option("--dropout", cl.dropout, "LoRA dropout")->capture_default_str();
  learn->add_option("--targets", cl.targets, "Modules: names, all-linear, or re:<regex>")
      ->capture_default_str();
  learn->add_option("--lr", cl.lr, "Learning rate")->capture_default_str();
  learn->add_option("--schedule", cl.schedule, "Learning-rate schedule")
      ->check(CLI::IsMember({"constant", "linear", "cosine"}))
      ->capture_default_str();
  learn->add_option("--warmup", cl.warmup, "Warm-up steps")->capture_default_str();
  auto* learn_steps = learn->add_option("--steps", cl.steps, "Optimizer steps for this task");
  learn->add_option("--epochs", cl.epochs, "Passes over the task when --steps is not set")
      ->excludes(learn_steps)
      ->capture_default_str();
  learn->add_option("--seq-len", cl.seq_len, "Tokens per packed row")
      ->check(CLI::Range(2, 1 << 20))
      ->capture_default_str();
  learn->add_option("--batch", cl.batch, "Rows per micro-batch")->check(CLI::PositiveNumber)->capture_default_str();
  learn->add_option("--grad-accum", cl.grad_accum, "Micro-batches per step")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  learn->add_option("--eval-fraction", cl.eval_fraction, "Share of the task held out")
      ->capture_default_str();
  learn->add_option("--eval-max-tokens", cl.eval_max_tokens,
                    "Cap on held-out tokens per task, first by content hash (0: all)")
      ->capture_default_str();
  learn->add_option("--separator", cl.separator, "Document separator line of .txt data (% for fortunes)");
  learn->add_option("--threads", cl.threads, "Threads (0: all cores)");
  learn->add_option("--seed", cl.seed, "Seed")->capture_default_str();
  std::string report_run;
  bool report_json = false;
  CLI::App* report = continual_cmd->add_subcommand("report", "Print a run's forgetting report");
  report->add_option("--run", report_run, "Run folder")->required();
  report->add_flag("--json", report_json, "Print the JSON form");
  qlora::cli::ContinualMergeOptions cm;
  CLI::App* cmerge = continual_cmd->add_subcommand(
      "merge", "Merge task adapters of a run into one PEFT adapter (or compress one)");
  cmerge->add_option("model", cm.model, "The run's model")->required();
  cmerge->add_option("--run", cm.run, "Run folder")->required();
  cmerge->add_option("--tasks", cm.tasks, "Tasks to merge, comma-separated (default: all)");
  cmerge->add_option("--method", cm.method, "concat (exact), svd, linear, ties, dare_linear, dare_ties")
      ->check(CLI::IsMember({"concat", "svd", "linear", "ties", "dare_linear", "dare_ties"}))
      ->capture_default_str();
  cmerge->add_option("--weights", cm.weights, "One weight per task, comma-separated (default: 1)");
  cmerge->add_option("--density", cm.density, "Share of entries kept by ties and dare_*")
      ->capture_default_str();
  cmerge->add_option("--rank", cm.rank, "Rank budget of the result (0: exact)")->capture_default_str();
  cmerge->add_option("--seed", cm.seed, "Seed of DARE's drops")->capture_default_str();
  cmerge->add_option("-o,--output", cm.output, "Output PEFT adapter folder")->required();
  cmerge->add_option("--threads", cm.threads, "Threads (0: all cores)");
  qlora::cli::ContinualRouteOptions cr;
  CLI::App* croute = continual_cmd->add_subcommand(
      "route", "Pick the task adapter with the lowest loss on a prompt's first tokens");
  croute->add_option("model", cr.model, "The run's model")->required();
  croute->add_option("--run", cr.run, "Run folder")->required();
  croute->add_option("-p,--prompt", cr.prompt, "Text to route")->required();
  croute->add_option("--prefix-tokens", cr.prefix_tokens, "Tokens scored (0: all)")
      ->capture_default_str();
  croute->add_option("--threads", cr.threads, "Threads (0: all cores)");
  std::string clear_run;
  CLI::App* clear = continual_cmd->add_subcommand(
      "clear-replay", "Erase the stored training text of a run's replay buffer");
  clear->add_option("--run", clear_run, "Run folder")->required();

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
    if (learn->parsed()) return qlora::cli::run_continual_learn(cl);
    if (report->parsed()) return qlora::cli::run_continual_report(report_run, report_json);
    if (clear->parsed()) return qlora::cli::run_continual_clear_replay(clear_run);
    if (cmerge->parsed()) return qlora::cli::run_continual_merge(cm);
    if (croute->parsed()) return qlora::cli::run_continual_route(cr);
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
