#include "qlora/train/trainer.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <numeric>
#include <sstream>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/core/log.hpp"
#include "qlora/core/random.hpp"
#include "qlora/io/mapped_file.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/lora/peft_io.hpp"

namespace qlora {
namespace {

using Clock = std::chrono::steady_clock;

std::uint64_t fingerprint_rows(const std::vector<PackedRow>& rows) {
  std::uint64_t h = 0x9e3779b97f4a7c15ull;
  for (const PackedRow& row : rows) {
    for (std::int32_t t : row.tokens) h = mix_seed(h, static_cast<std::uint64_t>(t));
    for (std::int32_t t : row.targets) h = mix_seed(h, static_cast<std::uint64_t>(t));
  }
  return h;
}

std::vector<std::int64_t> epoch_order(std::size_t n_rows, std::uint64_t seed, std::int64_t epoch) {
  std::vector<std::int64_t> order(n_rows);
  std::iota(order.begin(), order.end(), 0);
  // Fisher-Yates with the portable generator, so the order is the same everywhere.
  Rng rng(mix_seed(seed, static_cast<std::uint64_t>(epoch)));
  for (std::size_t i = n_rows; i > 1; --i) {
    const auto j = static_cast<std::size_t>(rng.below(i));
    std::swap(order[i - 1], order[j]);
  }
  return order;
}

std::uint64_t hash_quantized(const QuantizedMatrix& q, std::uint64_t h) {
  h = mix_seed(h, static_cast<std::uint64_t>(q.format));
  h = mix_seed(h, static_cast<std::uint64_t>(q.rows * 1000003 + q.cols));
  h = mix_seed(h, static_cast<std::uint64_t>(q.block_size));
  h = hash_values<std::uint8_t>(q.codes, h);
  h = hash_values<float>(q.scales, h);
  h = hash_values<float>(q.mins, h);
  h = hash_values<std::uint8_t>(q.absmax_codes, h);
  return hash_values<float>(q.nested_absmax, h);
}

std::uint64_t hash_matrix(const RowMatrixF& m, std::uint64_t h) {
  h = mix_seed(h, static_cast<std::uint64_t>(m.rows() * 1000003 + m.cols()));
  return hash_values<float>(std::span<const float>(m.data(), static_cast<std::size_t>(m.size())),
                            h);
}

// Hashes the settings that every rank must share. The thread count and the communicator may
// differ between ranks.
std::uint64_t hash_settings(const TrainerConfig& c) {
  std::uint64_t h = 0;
  for (const std::int64_t v : {c.batch_size, c.grad_accum, c.max_steps, c.warmup_steps,
                               c.eval_every, c.save_every, c.eval_max_rows, c.replay_rows,
                               static_cast<std::int64_t>(c.keep_checkpoints),
                               static_cast<std::int64_t>(c.schedule),
                               static_cast<std::int64_t>(c.gradient_checkpointing)}) {
    h = mix_seed(h, static_cast<std::uint64_t>(v));
  }
  const std::array<double, 7> reals = {c.epochs,          c.lr,           c.adamw.beta1,
                                       c.adamw.beta2,     c.adamw.eps,    c.adamw.weight_decay,
                                       c.max_grad_norm};
  h = hash_values<double>(reals, h);
  const std::string text = c.output_dir.string() + '\n' + c.adapter_name;
  return hash_bytes(std::as_bytes(std::span(text.data(), text.size())), h);
}

}  // namespace

Trainer::Trainer(LlamaModel& model, std::vector<PackedRow> train_rows,
                 std::vector<PackedRow> eval_rows, TrainerConfig config)
    : model_(model),
      train_rows_(std::move(train_rows)),
      eval_rows_(std::move(eval_rows)),
      config_(std::move(config)),
      comm_(config_.communicator != nullptr ? *config_.communicator
                                            : single_process_communicator()),
      optimizer_(config_.adamw) {
  QLORA_CHECK_ARG(!train_rows_.empty(), "[Trainer] no training rows (hint: the data file is "
                                        "empty or every document went to the held-out split)");
  QLORA_CHECK_ARG(config_.batch_size > 0 && config_.grad_accum > 0,
                  "[Trainer] batch size and gradient accumulation must be positive: got {} and {}",
                  config_.batch_size, config_.grad_accum);
  QLORA_CHECK_ARG(config_.replay_rows >= 0 && config_.replay_rows < config_.batch_size,
                  "[Trainer] replay rows per micro-batch must be in [0, batch size): got {} with "
                  "batch size {} (hint: lower --replay-fraction or raise the batch size)",
                  config_.replay_rows, config_.batch_size);
  QLORA_CHECK_ARG(std::isfinite(config_.lr) && config_.lr > 0.0f,
                  "[Trainer] learning rate must be positive: got {}", config_.lr);
  QLORA_CHECK_ARG(config_.max_steps > 0 || config_.epochs > 0.0,
                  "[Trainer] set max_steps or epochs: got {} and {}", config_.max_steps,
                  config_.epochs);
  QLORA_CHECK_ARG(!trainable_params().empty(),
                  "[Trainer] the model holds no adapter named '{}' (hint: add it with "
                  "LlamaModel::add_adapter first)",
                  config_.adapter_name);

  // Replayed rows do not consume the training set.
  const std::int64_t rows_per_step =
      (config_.batch_size - config_.replay_rows) * config_.grad_accum * comm_.size();
  global_batch_rows_ = rows_per_step;
  total_steps_ = config_.max_steps > 0
                     ? config_.max_steps
                     : std::max<std::int64_t>(
                           1, static_cast<std::int64_t>(std::ceil(
                                  config_.epochs * static_cast<double>(train_rows_.size()) /
                                  static_cast<double>(rows_per_step))));
  order_ = epoch_order(train_rows_.size(), config_.seed, 0);
  data_fingerprint_ = mix_seed(fingerprint_rows(train_rows_),
                               mix_seed(static_cast<std::uint64_t>(rows_per_step), config_.seed));
  if (config_.replay_rows > 0) {
    data_fingerprint_ =
        mix_seed(data_fingerprint_, static_cast<std::uint64_t>(config_.replay_rows));
  }
  check_ranks_agree();
  if (writes_files()) std::filesystem::create_directories(config_.output_dir);
}

void Trainer::check_ranks_agree() {
  if (comm_.size() == 1) return;
  struct Part {
    const char* what;
    const char* hint;
    std::uint64_t hash;
  };
  std::uint64_t weights = 0;
  for (const LlamaProjectionRef& ref : model_.projections()) {
    if (ref.linear != nullptr) weights = hash_quantized(ref.linear->base(), weights);
  }
  std::uint64_t adapter = 0;
  for (const ParamRef& p : trainable_params()) adapter = hash_matrix(*p.value, adapter);
  const std::array<Part, 7> parts = {{
      {"model file", "give every rank the same model file", config_.model_fingerprint},
      {"quantized model weights", "give every rank the same model and quantization settings",
       weights},
      {"seed", "pass the same seed to every rank", config_.seed},
      {"training settings", "pass the same options to every rank", hash_settings(config_)},
      {"initial adapter", "use the same LoRA settings and seed on every rank", adapter},
      {"training data", "give every rank the same data file and sequence length",
       fingerprint_rows(train_rows_)},
      {"held-out data", "give every rank the same data file and held-out fraction",
       fingerprint_rows(eval_rows_)},
  }};
  std::array<std::uint64_t, parts.size()> mine{};
  for (std::size_t i = 0; i < parts.size(); ++i) mine[i] = parts[i].hash;
  const std::vector<std::uint64_t> all = comm_.all_gather(mine);

  // All ranks gather the same hashes, so each raises the same error, naming the first part
  // that differs. The seed comes before the adapter because the adapter is drawn from it.
  for (std::size_t i = 0; i < parts.size(); ++i) {
    std::vector<int> differing;
    for (int r = 1; r < comm_.size(); ++r) {
      if (all[static_cast<std::size_t>(r) * parts.size() + i] != all[i]) differing.push_back(r);
    }
    if (differing.empty()) continue;
    const int r = differing.front();
    raise<RankMismatch>(
        "[Trainer] the ranks disagree on the {}: rank {} has hash {:016x}, rank 0 has {:016x} "
        "({} of {} ranks differ from rank 0) (hint: {})",
        parts[i].what, r, all[static_cast<std::size_t>(r) * parts.size() + i], all[i],
        differing.size(), comm_.size(), parts[i].hint);
  }
}

std::uint64_t Trainer::training_state_hash() {
  std::uint64_t h = mix_seed(static_cast<std::uint64_t>(step_),
                             static_cast<std::uint64_t>(optimizer_.step_count()));
  h = mix_seed(h, static_cast<std::uint64_t>(epoch_ * 1000003 + cursor_));
  for (const ParamRef& p : trainable_params()) h = hash_matrix(*p.value, h);
  return h;
}

void Trainer::check_state_agrees(const char* op) {
  if (comm_.size() == 1) return;
  const std::uint64_t mine = training_state_hash();
  const std::vector<std::uint64_t> all = comm_.all_gather(std::span(&mine, 1));
  for (int r = 1; r < comm_.size(); ++r) {
    if (all[static_cast<std::size_t>(r)] == all[0]) continue;
    raise<RankMismatch>(
        "[{}] the adapter or data position of rank {} differs from rank 0 at step {}: hash "
        "{:016x} against {:016x} (hint: every rank must read the same checkpoint; on several "
        "machines put the output folder on a shared file system)",
        op, r, step_, all[static_cast<std::size_t>(r)], all[0]);
  }
}

void Trainer::all_reduce_grads(const std::vector<ParamRef>& params) {
  if (comm_.size() == 1) return;
  std::size_t n = 0;
  for (const ParamRef& p : params) n += static_cast<std::size_t>(p.grad->size());
  grad_buffer_.resize(n);
  float* flat = grad_buffer_.data();
  for (const ParamRef& p : params) flat = std::copy_n(p.grad->data(), p.grad->size(), flat);
  comm_.all_reduce_sum(std::span<float>(grad_buffer_));
  const float* summed = grad_buffer_.data();
  for (const ParamRef& p : params) {
    std::copy_n(summed, p.grad->size(), p.grad->data());
    summed += p.grad->size();
  }
}

std::vector<ParamRef> Trainer::trainable_params() {
  std::vector<ParamRef> params;
  for (const LlamaProjectionRef& ref : model_.projections()) {
    if (ref.linear == nullptr || !ref.linear->has_adapter(config_.adapter_name)) continue;
    LoraAdapter& a = ref.linear->adapter(config_.adapter_name);
    if (!a.trainable) continue;
    params.push_back({ref.key + ".lora_A", &a.A, &a.dA});
    params.push_back({ref.key + ".lora_B", &a.B, &a.dB});
  }
  return params;
}

const PackedRow& Trainer::next_row() {
  if (cursor_ >= static_cast<std::int64_t>(order_.size())) {
    ++epoch_;
    cursor_ = 0;
    order_ = epoch_order(train_rows_.size(), config_.seed, epoch_);
  }
  return train_rows_[static_cast<std::size_t>(order_[static_cast<std::size_t>(cursor_++)])];
}

StepMetrics Trainer::step() {
  QLORA_CHECK_ARG(!done(), "[Trainer::step] training is complete: {} of {} steps taken", step_,
                  total_steps_);
  const auto start = Clock::now();

  // Gather the step's micro-batches first: the loss is normalised by the trained tokens of
  // the whole step, so that 2 micro-batches of 4 rows equal 1 of 8.
  std::vector<std::vector<const PackedRow*>> micro_batches(
      static_cast<std::size_t>(config_.grad_accum));
  std::int64_t n_targets = 0;
  std::int64_t n_inputs = 0;
  QLORA_CHECK_ARG(config_.replay_rows == 0 || replay_source,
                  "[Trainer::step] replay_rows is {} but no replay_source is set",
                  config_.replay_rows);
  // With N ranks each micro-batch takes N shares of fresh rows from the order that every rank
  // walks alike, and rank r keeps share r, so the data position stays the same everywhere.
  // Replay draws are numbered by rank too, so the ranks replay different rows.
  const std::int64_t fresh_rows = config_.batch_size - config_.replay_rows;
  const auto rank = static_cast<std::uint64_t>(comm_.rank());
  const auto n_ranks = static_cast<std::uint64_t>(comm_.size());
  for (std::size_t m = 0; m < micro_batches.size(); ++m) {
    auto& micro = micro_batches[m];
    for (std::int64_t i = 0; i < fresh_rows * comm_.size(); ++i) {
      const PackedRow& row = next_row();
      if (i / fresh_rows == comm_.rank()) micro.push_back(&row);
    }
    const std::uint64_t micro_index = static_cast<std::uint64_t>(step_ * config_.grad_accum) + m;
    for (std::int64_t i = fresh_rows; i < config_.batch_size; ++i) {
      const std::uint64_t draw = (micro_index * n_ranks + rank) *
                                     static_cast<std::uint64_t>(config_.batch_size) +
                                 static_cast<std::uint64_t>(i);
      micro.push_back(&replay_source(draw));
    }
    for (const PackedRow* row : micro) {
      n_targets += row->n_targets;
      n_inputs += static_cast<std::int64_t>(row->tokens.size());
    }
  }
  // The loss is normalised by the trained tokens of every rank and micro-batch, not per rank.
  std::array<double, 2> counts = {static_cast<double>(n_targets), static_cast<double>(n_inputs)};
  comm_.all_reduce_sum(std::span<double>(counts));
  n_targets = static_cast<std::int64_t>(counts[0]);
  n_inputs = static_cast<std::int64_t>(counts[1]);

  std::vector<ParamRef> params = trainable_params();
  model_.zero_grad();
  double loss_sum = 0.0;
  std::int64_t bad_micro_batch = -1;
  const float loss_scale = n_targets > 0 ? 1.0f / static_cast<float>(n_targets) : 0.0f;
  for (std::size_t m = 0; m < micro_batches.size(); ++m) {
    const LlamaBatch batch = make_batch(micro_batches[m]);
    LlamaTrainState state;
    // Each micro-batch and rank draws its own dropout masks. With one rank the index is the
    // same as without data parallelism, so single-process runs are unchanged.
    const std::uint64_t micro_index =
        (static_cast<std::uint64_t>(step_ * config_.grad_accum) + static_cast<std::uint64_t>(m)) *
            n_ranks +
        rank;
    const LlamaLoss loss =
        model_.forward(batch, state,
                       {.gradient_checkpointing = config_.gradient_checkpointing,
                        .dropout = true,
                        .dropout_seed = mix_seed(config_.seed, micro_index)});
    // A non-finite loss is raised after the collectives below, so that every rank raises it
    // instead of leaving the others waiting.
    if (!std::isfinite(loss.sum)) {
      if (bad_micro_batch < 0) bad_micro_batch = static_cast<std::int64_t>(m);
      loss_sum += loss.sum;
      continue;
    }
    loss_sum += loss.sum;
    if (loss.n_tokens > 0) model_.backward(state, loss_scale);
  }

  // One all-reduce of every adapter gradient per step, then the loss sum in double.
  // NOTE: the all-reduce blocks and starts after the whole backward pass. Overlapping it with
  // backward would hide its time on slow networks.
  all_reduce_grads(params);
  std::array<double, 2> sums = {loss_sum, bad_micro_batch >= 0 ? 1.0 : 0.0};
  comm_.all_reduce_sum(std::span<double>(sums));
  loss_sum = sums[0];
  if (sums[1] > 0.0 || !std::isfinite(loss_sum)) {
    // Every rank takes this branch, so one more collective finds the rank to name.
    const auto mine = static_cast<std::uint64_t>(bad_micro_batch + 1);
    const std::vector<std::uint64_t> bad = comm_.all_gather(std::span(&mine, 1));
    std::string where = "in the sum over ranks";
    for (std::size_t r = 0; r < bad.size(); ++r) {
      if (bad[r] > 0) {
        where = fmt::format("micro-batch {} on rank {}", bad[r] - 1, r);
        break;
      }
    }
    raise<TrainingDiverged>(
        "[Trainer::step] the loss is {} at step {} ({}); the last checkpoint in {} is unchanged "
        "(hint: lower the learning rate or enable clipping)",
        loss_sum, step_ + 1, where, config_.output_dir.string());
  }
  const double penalty = regularizer ? regularizer() : 0.0;
  if (!std::isfinite(penalty)) {
    raise<TrainingDiverged>("[Trainer::step] the regularizer is {} at step {}", penalty,
                            step_ + 1);
  }

  const double grad_norm = global_grad_norm(params);
  if (!std::isfinite(grad_norm)) {
    raise<TrainingDiverged>(
        "[Trainer::step] the gradient norm is {} at step {}; the last checkpoint in {} is "
        "unchanged (hint: lower the learning rate)",
        grad_norm, step_ + 1, config_.output_dir.string());
  }
  if (config_.max_grad_norm > 0.0f && grad_norm > static_cast<double>(config_.max_grad_norm)) {
    scale_grads(params, static_cast<float>(static_cast<double>(config_.max_grad_norm) /
                                           (grad_norm + 1e-6)));
  }
  const float lr =
      scheduled_lr(config_.schedule, config_.lr, step_, config_.warmup_steps, total_steps_);
  if (n_targets > 0) optimizer_.step(params, lr);
  ++step_;

  StepMetrics metrics;
  metrics.step = step_;
  metrics.loss = n_targets > 0 ? loss_sum / static_cast<double>(n_targets) : 0.0;
  metrics.lr = lr;
  metrics.grad_norm = grad_norm;
  metrics.regularizer = penalty;
  metrics.tokens = n_targets;
  metrics.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  metrics.tokens_per_second = static_cast<double>(n_inputs) / metrics.seconds;
  history_.push_back(metrics);
  append_metrics(nlohmann::json{{"type", "train"},
                                {"step", metrics.step},
                                {"loss", metrics.loss},
                                {"lr", metrics.lr},
                                {"grad_norm", metrics.grad_norm},
                                {"regularizer", metrics.regularizer},
                                {"tokens", metrics.tokens},
                                {"tokens_per_second", metrics.tokens_per_second}}
                     .dump());
  if (on_step) on_step(metrics);

  const bool last = done();
  if (!eval_rows_.empty() &&
      (last || (config_.eval_every > 0 && step_ % config_.eval_every == 0))) {
    evaluate();
  }
  if (!config_.output_dir.empty() &&
      (last || (config_.save_every > 0 && step_ % config_.save_every == 0))) {
    save_checkpoint();
  }
  return metrics;
}

EvalMetrics Trainer::evaluate() {
  EvalMetrics metrics;
  metrics.step = step_;
  std::size_t n_rows = eval_rows_.size();
  if (config_.eval_max_rows > 0) {
    n_rows = std::min(n_rows, static_cast<std::size_t>(config_.eval_max_rows));
  }
  // Rank r evaluates batches r, r + N, r + 2N and so on, and the sums are then reduced.
  std::array<double, 2> sums = {0.0, 0.0};
  std::size_t batch_index = 0;
  for (std::size_t begin = 0; begin < n_rows;
       begin += static_cast<std::size_t>(config_.batch_size), ++batch_index) {
    if (batch_index % static_cast<std::size_t>(comm_.size()) !=
        static_cast<std::size_t>(comm_.rank())) {
      continue;
    }
    std::vector<const PackedRow*> rows;
    const std::size_t end = std::min(n_rows, begin + static_cast<std::size_t>(config_.batch_size));
    for (std::size_t i = begin; i < end; ++i) rows.push_back(&eval_rows_[i]);
    const LlamaLoss loss = model_.loss(make_batch(rows));
    sums[0] += loss.sum;
    sums[1] += static_cast<double>(loss.n_tokens);
  }
  comm_.all_reduce_sum(std::span<double>(sums));
  metrics.tokens = static_cast<std::int64_t>(sums[1]);
  metrics.loss = metrics.tokens > 0 ? sums[0] / static_cast<double>(metrics.tokens) : 0.0;
  metrics.perplexity = std::exp(metrics.loss);
  eval_history_.push_back(metrics);
  append_metrics(nlohmann::json{{"type", "eval"},
                                {"step", metrics.step},
                                {"loss", metrics.loss},
                                {"perplexity", metrics.perplexity},
                                {"tokens", metrics.tokens}}
                     .dump());
  if (on_eval) on_eval(metrics);
  return metrics;
}

void Trainer::append_metrics(const std::string& json_line) {
  if (!writes_files()) return;
  std::ofstream out(config_.output_dir / "metrics.jsonl", std::ios::app);
  out << json_line << '\n';
  if (!out) {
    raise<IoError>("[Trainer] cannot append to {}",
                   (config_.output_dir / "metrics.jsonl").string());
  }
}

std::filesystem::path Trainer::save_checkpoint() {
  QLORA_CHECK_ARG(!config_.output_dir.empty(),
                  "[Trainer::save_checkpoint] no output directory is set");
  namespace fs = std::filesystem;
  const std::string name = fmt::format("checkpoint-{}", step_);
  const fs::path final_dir = config_.output_dir / name;
  // Every rank must hold what rank 0 is about to save. The other ranks then wait until the
  // checkpoint is complete. If rank 0 fails while writing they keep waiting, so a
  // multi-process program must end the job on an error (the CLI calls MPI_Abort).
  check_state_agrees("Trainer::save_checkpoint");
  if (!comm_.is_root()) {
    comm_.barrier();
    return final_dir;
  }
  const fs::path temp_dir = config_.output_dir / ("." + name + ".tmp");
  fs::remove_all(temp_dir);
  fs::create_directories(temp_dir);

  // The exact adapter and optimizer state, for resuming.
  SafetensorsWriter params_writer;
  SafetensorsWriter optimizer_writer;
  for (const ParamRef& p : trainable_params()) params_writer.add(p.name, *p.value);
  for (const auto& [param, moments] : optimizer_.moments()) {
    optimizer_writer.add(param + ".exp_avg", moments.m);
    optimizer_writer.add(param + ".exp_avg_sq", moments.v);
  }
  params_writer.write(temp_dir / "adapter_state.safetensors");
  optimizer_writer.write(temp_dir / "optimizer.safetensors");

  // The same adapter in PEFT's format, for use outside qlora.
  PeftAdapter peft;
  for (const LlamaProjectionRef& ref : model_.projections()) {
    if (ref.linear != nullptr && ref.linear->has_adapter(config_.adapter_name)) {
      peft.modules[ref.key] = ref.linear->adapter(config_.adapter_name);
    }
  }
  save_peft_adapter(temp_dir / "adapter", peft);

  const nlohmann::json state = {{"step", step_},
                                {"total_steps", total_steps_},
                                {"epoch", epoch_},
                                {"cursor", cursor_},
                                {"optimizer_steps", optimizer_.step_count()},
                                {"seed", config_.seed},
                                {"data_fingerprint", data_fingerprint_},
                                {"adapter_name", config_.adapter_name},
                                {"world_size", comm_.size()},
                                {"global_batch_rows", global_batch_rows_}};
  write_text_file_atomic(temp_dir / "trainer_state.json", state.dump(2) + "\n");

  fs::remove_all(final_dir);
  fs::rename(temp_dir, final_dir);
  write_text_file_atomic(config_.output_dir / "latest", name + "\n");

  // Keep the newest checkpoints only.
  std::vector<std::pair<std::int64_t, fs::path>> checkpoints;
  for (const auto& entry : fs::directory_iterator(config_.output_dir)) {
    const std::string file = entry.path().filename().string();
    if (entry.is_directory() && file.starts_with("checkpoint-")) {
      try {
        checkpoints.emplace_back(std::stoll(file.substr(11)), entry.path());
      } catch (const std::exception&) {
        // Not one of ours; leave it.
      }
    }
  }
  std::sort(checkpoints.begin(), checkpoints.end());
  const auto keep = static_cast<std::size_t>(std::max(1, config_.keep_checkpoints));
  for (std::size_t i = 0; i + keep < checkpoints.size(); ++i) fs::remove_all(checkpoints[i].second);
  QLORA_LOG_INFO("saved {}", final_dir.string());
  comm_.barrier();
  return final_dir;
}

void Trainer::resume(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  fs::path checkpoint = dir;
  if (fs::exists(dir / "latest")) {
    std::string name = read_text_file(dir / "latest", "Trainer::resume");
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r')) name.pop_back();
    checkpoint = dir / name;
  }
  if (!fs::exists(checkpoint / "trainer_state.json")) {
    raise<IoError>("[Trainer::resume] {} contains no trainer_state.json (hint: pass a run folder "
                   "written with --output, or one of its checkpoint-N folders)",
                   checkpoint.string());
  }
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(read_text_file(checkpoint / "trainer_state.json", "Trainer::resume"));
  } catch (const nlohmann::json::exception& e) {
    raise<FormatError>("[Trainer::resume] {}: invalid JSON: {}",
                       (checkpoint / "trainer_state.json").string(), e.what());
  }
  // Checkpoints from before data parallelism lack these fields, but the fingerprint below
  // still covers their batch settings.
  if (state.contains("global_batch_rows")) {
    const auto saved_rows = state.at("global_batch_rows").get<std::int64_t>();
    const auto saved_ranks = state.value("world_size", std::int64_t{1});
    QLORA_CHECK_ARG(saved_rows == global_batch_rows_,
                    "[Trainer::resume] {} was written by {} ranks taking {} training rows per "
                    "step, but this run has {} ranks taking {} (hint: resume with {} ranks and "
                    "the original batch settings, or choose a batch size so that ranks x "
                    "batch size x gradient accumulation gives {} training rows again)",
                    checkpoint.string(), saved_ranks, saved_rows, comm_.size(),
                    global_batch_rows_, saved_ranks, saved_rows);
    if (saved_ranks != comm_.size()) {
      QLORA_LOG_INFO("resuming a {}-rank checkpoint on {} ranks with the same {} rows per step",
                     saved_ranks, comm_.size(), saved_rows);
    }
  }
  const auto fingerprint = state.at("data_fingerprint").get<std::uint64_t>();
  QLORA_CHECK_ARG(fingerprint == data_fingerprint_,
                  "[Trainer::resume] {} was written for other training data, batch size, "
                  "gradient accumulation or seed (hint: resume with the settings of the "
                  "original run)",
                  checkpoint.string());

  const SafetensorsFile params(checkpoint / "adapter_state.safetensors");
  for (const ParamRef& p : trainable_params()) {
    const RowMatrixF value = params.to_matrix(p.name);
    QLORA_CHECK_ARG(value.rows() == p.value->rows() && value.cols() == p.value->cols(),
                    "[Trainer::resume] {} is [{}, {}] in the checkpoint, [{}, {}] in the model",
                    p.name, value.rows(), value.cols(), p.value->rows(), p.value->cols());
    *p.value = value;
  }
  const SafetensorsFile optimizer(checkpoint / "optimizer.safetensors");
  std::map<std::string, AdamW::Moments> moments;
  for (const ParamRef& p : trainable_params()) {
    if (optimizer.find(p.name + ".exp_avg") == nullptr) continue;
    moments[p.name] = {optimizer.to_matrix(p.name + ".exp_avg"),
                       optimizer.to_matrix(p.name + ".exp_avg_sq")};
  }
  optimizer_.restore(std::move(moments), state.at("optimizer_steps").get<std::int64_t>());

  step_ = state.at("step").get<std::int64_t>();
  epoch_ = state.at("epoch").get<std::int64_t>();
  cursor_ = state.at("cursor").get<std::int64_t>();
  order_ = epoch_order(train_rows_.size(), config_.seed, epoch_);
  // NOTE: every rank reads the checkpoint itself, so on several machines the output folder
  // must be on a shared file system. The check below catches ranks that read different ones.
  check_state_agrees("Trainer::resume");
  if (comm_.is_root()) QLORA_LOG_INFO("resumed from {} at step {}", checkpoint.string(), step_);
}

void Trainer::write_loss_curve() const {
  if (!writes_files() || history_.empty()) return;
  constexpr double kWidth = 720, kHeight = 420, kLeft = 70, kRight = 20, kTop = 30, kBottom = 50;
  double max_loss = 0.0, min_loss = 1e300;
  for (const auto& m : history_) {
    max_loss = std::max(max_loss, m.loss);
    min_loss = std::min(min_loss, m.loss);
  }
  for (const auto& e : eval_history_) {
    max_loss = std::max(max_loss, e.loss);
    min_loss = std::min(min_loss, e.loss);
  }
  if (max_loss <= min_loss) max_loss = min_loss + 1.0;
  const double first_step = 0.0;
  const double last_step = static_cast<double>(std::max<std::int64_t>(1, history_.back().step));
  const auto x_of = [&](double step) {
    return kLeft + (step - first_step) / (last_step - first_step) * (kWidth - kLeft - kRight);
  };
  const auto y_of = [&](double loss) {
    return kTop + (max_loss - loss) / (max_loss - min_loss) * (kHeight - kTop - kBottom);
  };

  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{0}\" height=\"{1}\" "
      "fill=\"white\"/>\n",
      kWidth, kHeight);
  svg += fmt::format(
      "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"black\"/>\n<line x1=\"{0}\" "
      "y1=\"{2}\" x2=\"{3}\" y2=\"{2}\" stroke=\"black\"/>\n",
      kLeft, kTop, kHeight - kBottom, kWidth - kRight);
  for (int i = 0; i <= 4; ++i) {
    const double loss = min_loss + (max_loss - min_loss) * i / 4.0;
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.3f}</text>\n", kLeft - 6,
                       y_of(loss) + 4, loss);
    const double step = first_step + (last_step - first_step) * i / 4.0;
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{:.0f}</text>\n",
                       x_of(step), kHeight - kBottom + 18, step);
  }
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">optimizer step</text>\n",
                     (kWidth + kLeft) / 2, kHeight - 10);
  svg += fmt::format("<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" "
                     "text-anchor=\"middle\">loss (nats per token)</text>\n",
                     kHeight / 2, kHeight / 2);

  std::string train_points;
  for (const auto& m : history_) {
    train_points += fmt::format("{:.1f},{:.1f} ", x_of(static_cast<double>(m.step)), y_of(m.loss));
  }
  svg += fmt::format("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" "
                     "points=\"{}\"/>\n",
                     train_points);
  if (!eval_history_.empty()) {
    std::string eval_points;
    for (const auto& e : eval_history_) {
      const double x = x_of(static_cast<double>(e.step));
      eval_points += fmt::format("{:.1f},{:.1f} ", x, y_of(e.loss));
      svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"#d62728\"/>\n", x,
                         y_of(e.loss));
    }
    svg += fmt::format("<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\" "
                       "points=\"{}\"/>\n",
                       eval_points);
  }
  svg += fmt::format(
      "<text x=\"{0}\" y=\"20\" fill=\"#1f77b4\">training loss</text><text x=\"{1}\" y=\"20\" "
      "fill=\"#d62728\">held-out loss</text>\n</svg>\n",
      kLeft, kLeft + 120);
  write_text_file_atomic(config_.output_dir / "loss_curve.svg", svg);
}

}  // namespace qlora
