// `qlora continual`: learn task after task into one run folder, print the forgetting report,
// and manage the replay buffer.
#include <cstdio>
#include <filesystem>
#include <memory>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "qlora/continual/learner.hpp"
#include "qlora/continual/merge.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/io/mapped_file.hpp"
#include "qlora/train/data.hpp"

namespace qlora::cli {
namespace {

namespace fs = std::filesystem;

// The settings that must stay the same for every task of a run, recorded in run.json.
nlohmann::json run_settings(const ContinualOptions& o) {
  return {{"model", fs::absolute(o.model).lexically_normal().string()},
          {"quant",
           {{"format", o.quant.format},
            {"group_size", o.quant.group_size},
            {"double_quant", o.quant.double_quant},
            {"symmetric", o.quant.symmetric}}},
          {"rank", o.rank},
          {"alpha", o.alpha},
          {"targets", o.targets},
          {"seq_len", o.seq_len}};
}

// A run's model with its adapter bank loaded. The learner refers to the model, so both live
// on the heap at fixed addresses.
struct OpenRun {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<continual::ContinualLearner> learner;
  std::unique_ptr<Tokenizer> tokenizer;
};

// Loads the model with the quantization recorded in the run's run.json, so the bank sits on
// the base it was trained on, then the bank itself.
OpenRun open_run(const std::string& model_path, const std::string& run) {
  const fs::path settings_path = fs::path(run) / "run.json";
  QLORA_CHECK_ARG(fs::exists(settings_path),
                  "--run {}: no run.json (hint: create the run with `qlora continual learn`)",
                  run);
  const auto settings =
      nlohmann::json::parse(read_text_file(settings_path, "qlora continual"));
  QuantOptions quant;
  try {
    const auto& q = settings.at("quant");
    quant.format = q.at("format").get<std::string>();
    quant.group_size = q.at("group_size").get<int>();
    quant.double_quant = q.at("double_quant").get<bool>();
    quant.symmetric = q.at("symmetric").get<bool>();
  } catch (const nlohmann::json::exception& e) {
    raise<FormatError>("{}: invalid quant settings: {}", settings_path.string(), e.what());
  }
  const ModelSource source(model_path);
  OpenRun open;
  open.tokenizer = std::make_unique<Tokenizer>(source.tokenizer());
  LlamaLoadOptions load;
  load.projections = quant.to_config();
  open.model = std::make_unique<LlamaModel>(load_llama(source, load));
  continual::ContinualConfig config;
  config.lora.rank = settings.at("rank").get<int>();
  config.lora.alpha = settings.at("alpha").get<float>();
  open.learner = std::make_unique<continual::ContinualLearner>(*open.model, config);
  open.learner->load(run);
  return open;
}

std::vector<PackedRow> rows_from(const std::string& path, const Tokenizer& tokenizer,
                                 const ContinualOptions& o, bool held_out_only,
                                 std::vector<PackedRow>* train_rows) {
  DataOptions data;
  data.text_separator = o.separator;
  data.eval_fraction = o.eval_fraction;
  std::vector<Document> train, eval;
  std::vector<Document> docs = load_documents(path, tokenizer, data);
  if (held_out_only) {
    eval = std::move(docs);
  } else {
    split_documents(std::move(docs), data, train, eval);
  }
  eval = first_documents_by_hash(std::move(eval), o.eval_max_tokens);
  const std::int32_t pad = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : tokenizer.eos_id();
  if (train_rows != nullptr) *train_rows = pack_documents(train, o.seq_len, pad);
  return pack_documents(eval, o.seq_len, pad);
}

void print_report(const continual::ForgettingReport& report) {
  fmt::print("{}", report.table());
  std::fflush(stdout);
}

}  // namespace

int run_continual_learn(const ContinualOptions& o) {
  if (o.threads > 0) set_num_threads(o.threads);
  QLORA_CHECK_ARG(!o.task.empty() && o.task.find_first_of("/\\") == std::string::npos &&
                      o.task != "." && o.task != "..",
                  "--task: '{}' is not usable as a folder name (hint: a short name such as "
                  "poems)",
                  o.task);
  const fs::path run(o.run);
  const fs::path settings_path = run / "run.json";
  const nlohmann::json settings = run_settings(o);
  const bool resuming = fs::exists(run / "state" / "continual.json") ||
                        fs::exists(run / ".state.old" / "continual.json");
  if (resuming && fs::exists(settings_path)) {
    const auto saved =
        nlohmann::json::parse(read_text_file(settings_path, "qlora continual learn"));
    for (const auto& [key, value] : settings.items()) {
      QLORA_CHECK_ARG(saved.contains(key) && saved.at(key) == value,
                      "--run {}: '{}' was {} for the earlier tasks, now {} (hint: keep the model, "
                      "quantization, rank, alpha, targets and sequence length of the run)",
                      o.run, key, saved.contains(key) ? saved.at(key).dump() : "unset",
                      value.dump());
    }
  }
  QLORA_CHECK_ARG(o.control.empty() || !resuming,
                  "--control: the run in {} has its control set already; it can only be set "
                  "with the first task",
                  o.run);

  continual::ContinualConfig config;
  config.method = o.method;
  config.lora.rank = o.rank;
  config.lora.alpha = o.alpha;
  config.lora.dropout = o.dropout;
  config.lora.target_modules = parse_targets(o.targets);
  config.train.batch_size = o.batch;
  config.train.grad_accum = o.grad_accum;
  config.train.max_steps = o.steps;
  config.train.epochs = o.epochs;
  config.train.lr = o.lr;
  config.train.schedule = parse_lr_schedule(o.schedule);
  config.train.warmup_steps = o.warmup;
  config.train.seed = o.seed;
  config.policy =
      o.policy == "shared" ? continual::AdapterPolicy::shared : continual::AdapterPolicy::per_task;
  config.inference =
      o.inference == "oracle" ? continual::Inference::oracle : continual::Inference::sum_all;
  if (o.olora >= 0.0f) config.olora = continual::OloraOptions{.lambda_orth = o.olora};
  config.replay = {.capacity = o.replay_windows,
                   .batch_fraction = o.replay_windows > 0 ? o.replay_fraction : 0.0,
                   .per_task_quota = o.replay_per_task,
                   .seed = o.seed};
  config.seed = o.seed;

  const ModelSource source(o.model);
  const Tokenizer tokenizer = source.tokenizer();
  continual::ContinualTask task;
  task.name = o.task;
  task.eval = rows_from(o.data, tokenizer, o, false, &task.train);
  fmt::print(stderr, "task {}: {} training rows, {} held-out rows of {} tokens\n", o.task,
             task.train.size(), task.eval.size(), o.seq_len);

  LlamaLoadOptions load;
  load.projections = o.quant.to_config();
  LlamaModel model = load_llama(source, load);
  fs::create_directories(run);
  continual::ContinualLearner learner(model, config, run);
  if (resuming) {
    learner.load(run);
    fmt::print(stderr, "run {}: {} earlier tasks\n", o.run, learner.tasks().size());
  } else {
    write_text_file_atomic(settings_path, settings.dump(2) + "\n");
  }
  if (!o.control.empty()) {
    learner.set_control(fs::path(o.control).stem().string(),
                        rows_from(o.control, tokenizer, o, true, nullptr));
  }
  const continual::TaskRecord& record = learner.learn(task, [](const StepMetrics& m) {
    fmt::print(stderr, "step {} loss {:.4f} lr {:.3e} tokens/s {:.0f}{}\n", m.step, m.loss, m.lr,
               m.tokens_per_second,
               m.regularizer != 0.0 ? fmt::format(" regularizer {:.4f}", m.regularizer) : "");
  });
  const continual::MemoryUsage memory = learner.memory_usage();
  fmt::print(stderr,
             "task {}: {} steps in {:.1f} s ({:.0f} trained tokens/s), {} replayed rows per "
             "micro-batch\nmemory: adapters {:.1f} MB, replay buffer {:.2f} MB ({} windows), "
             "held-out sets {:.2f} MB\n",
             record.name, record.steps, record.seconds, record.tokens_per_second,
             record.replayed_rows_per_batch, static_cast<double>(memory.adapters) / 1e6,
             static_cast<double>(memory.replay) / 1e6, learner.replay().size(),
             static_cast<double>(memory.held_out) / 1e6);
  learner.report().write_json(run / "report.json");
  write_text_file_atomic(run / "report.txt", learner.report().table());
  print_report(learner.report());
  return 0;
}

int run_continual_merge(const ContinualMergeOptions& o) {
  if (o.threads > 0) set_num_threads(o.threads);
  OpenRun open = open_run(o.model, o.run);
  continual::ContinualLearner& learner = *open.learner;
  std::vector<std::string> names = split_list(o.tasks);
  if (names.empty()) names = learner.adapter_names();
  // Task names map to the adapters that hold them.
  for (std::string& name : names) {
    bool found = false;
    for (const continual::TaskRecord& t : learner.tasks()) {
      if (t.name == name) {
        name = t.adapter;
        found = true;
      }
    }
    QLORA_CHECK_ARG(found, "--tasks: the run has no task '{}' (hint: `qlora continual report "
                           "--run {}` lists them)",
                    name, o.run);
  }
  continual::MergeOptions options;
  options.method = continual::parse_merge_method(o.method);
  for (const std::string& w : split_list(o.weights)) {
    try {
      options.weights.push_back(std::stof(w));
    } catch (const std::logic_error&) {
      raise<InvalidArgument>("--weights: '{}' is not a number", w);
    }
  }
  options.density = o.density;
  options.rank = o.rank;
  options.seed = o.seed;
  const continual::ModelMergeReport merged =
      continual::merge_model_adapters(*open.model, names, "merged", options);

  PeftAdapter peft;
  peft.config.base_model_name_or_path = o.model;
  for (const LlamaProjectionRef& ref : open.model->projections()) {
    if (ref.linear != nullptr && ref.linear->has_adapter("merged")) {
      peft.modules[ref.key] = ref.linear->adapter("merged");
    }
  }
  save_peft_adapter(o.output, peft);
  fmt::print("merged {} ({}) into {}: energy kept {:.4f}\n", fmt::join(names, ", "), o.method,
             o.output, merged.energy_kept);
  // How the merged adapter alone does on every task, next to the bank's last row.
  const continual::ForgettingReport& report = learner.report();
  for (std::size_t j = 0; j < learner.tasks().size(); ++j) {
    const double nll = learner.evaluate_with(learner.held_out(j), {"merged"}).mean();
    fmt::print("  {:<20} NLL {:.4f} merged, {:.4f} in the bank's last row\n",
               learner.tasks()[j].name, nll, report.nll.back()[j]);
  }
  return 0;
}

int run_continual_route(const ContinualRouteOptions& o) {
  if (o.threads > 0) set_num_threads(o.threads);
  OpenRun open = open_run(o.model, o.run);
  std::vector<std::int32_t> ids = open.tokenizer->encode(o.prompt);
  QLORA_CHECK_ARG(ids.size() >= 2, "--prompt: needs at least 2 tokens, got {}", ids.size());
  if (o.prefix_tokens > 0 && ids.size() > static_cast<std::size_t>(o.prefix_tokens)) {
    ids.resize(static_cast<std::size_t>(o.prefix_tokens));
  }
  const std::vector<std::string> names = open.learner->adapter_names();
  const continual::RouteResult route = continual::route_by_min_loss(*open.model, names, ids);
  for (std::size_t i = 0; i < names.size(); ++i) {
    fmt::print("{:<20} NLL {:.4f}{}\n", names[i], route.losses[i],
               i == route.best ? "  <- chosen" : "");
  }
  return 0;
}

int run_continual_report(const std::string& run, bool json) {
  const fs::path path = fs::path(run) / "state" / "report.json";
  QLORA_CHECK_ARG(fs::exists(path),
                  "--run {}: no report yet (hint: learn a task first with `qlora continual "
                  "learn`)",
                  run);
  const auto report = continual::ForgettingReport::read_json(path);
  if (json) {
    fmt::print("{}\n", report.to_json().dump(2));
  } else {
    print_report(report);
  }
  return 0;
}

int run_continual_clear_replay(const std::string& run) {
  const fs::path path = fs::path(run) / "state" / "replay.safetensors";
  QLORA_CHECK_ARG(fs::exists(path), "--run {}: no replay buffer at {}", run, path.string());
  continual::ReplayBuffer buffer = continual::ReplayBuffer::load(path);
  const std::int64_t windows = buffer.size();
  buffer.clear();
  buffer.save(path);
  fmt::print("cleared {} stored windows from {}\n", windows, path.string());
  return 0;
}

}  // namespace qlora::cli
