#include "qlora/continual/learner.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/core/log.hpp"
#include "qlora/core/random.hpp"
#include "qlora/io/mapped_file.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/lora/peft_io.hpp"
#include "rows_io.hpp"

namespace qlora::continual {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int kStateVersion = 1;

const char* policy_name(AdapterPolicy p) { return p == AdapterPolicy::shared ? "shared" : "per_task"; }
const char* inference_name(Inference i) { return i == Inference::oracle ? "oracle" : "sum_all"; }

std::int64_t count_targets(const std::vector<PackedRow>& rows) {
  std::int64_t n = 0;
  for (const PackedRow& row : rows) n += row.n_targets;
  return n;
}

std::int64_t row_bytes(const std::vector<PackedRow>& rows) {
  std::int64_t n = 0;
  for (const PackedRow& row : rows) n += 3 * static_cast<std::int64_t>(row.tokens.size()) * 4;
  return n;
}

}  // namespace

ContinualLearner::ContinualLearner(LlamaModel& model, ContinualConfig config,
                                   std::filesystem::path run_dir)
    : model_(model), config_(std::move(config)), run_dir_(std::move(run_dir)) {
  config_.lora.validate();
  QLORA_CHECK_ARG(!config_.olora || config_.policy == AdapterPolicy::per_task,
                  "[ContinualLearner] O-LoRA needs one adapter per task (hint: use the per_task "
                  "policy, or drop --olora)");
  QLORA_CHECK_ARG(config_.replay.batch_fraction >= 0.0 && config_.replay.batch_fraction < 1.0,
                  "[ContinualLearner] the replay batch fraction must be in [0, 1): got {}",
                  config_.replay.batch_fraction);
  QLORA_CHECK_ARG(config_.eval_batch_rows > 0,
                  "[ContinualLearner] eval_batch_rows must be positive: got {}",
                  config_.eval_batch_rows);
  for (const LlamaProjectionRef& ref : model_.projections()) {
    QLORA_CHECK_ARG(ref.linear == nullptr || ref.linear->adapter_names().empty(),
                    "[ContinualLearner] the model already holds adapters ({} has '{}'); the "
                    "bank must own every adapter (hint: start from a freshly loaded model)",
                    ref.key, ref.linear->adapter_names().front());
  }
  replay_ = ReplayBuffer(config_.replay.capacity, config_.replay.seed,
                         config_.replay.per_task_quota);
  report_.method = config_.method;
  report_.stages = {"base"};
  report_.nll = {{}};
}

void ContinualLearner::set_control(std::string name, std::vector<PackedRow> eval_rows) {
  QLORA_CHECK_ARG(tasks_.empty() && report_.control.empty(),
                  "[ContinualLearner::set_control] the control set must be set once, before "
                  "the first task");
  QLORA_CHECK_ARG(!name.empty() && !eval_rows.empty(),
                  "[ContinualLearner::set_control] the control set needs a name and rows: got "
                  "'{}' with {} rows",
                  name, eval_rows.size());
  control_rows_ = std::move(eval_rows);
  report_.control = std::move(name);
  report_.control_tokens = count_targets(control_rows_);
  report_.control_nll = {evaluate_with(control_rows_, {}).mean()};
}

std::vector<std::string> ContinualLearner::adapter_names() const {
  std::vector<std::string> names;
  for (const TaskRecord& t : tasks_) {
    if (std::find(names.begin(), names.end(), t.adapter) == names.end()) names.push_back(t.adapter);
  }
  return names;
}

std::vector<std::string> ContinualLearner::adapters_for(std::size_t task) const {
  QLORA_CHECK_ARG(task < tasks_.size(), "[ContinualLearner] task {} does not exist: {} tasks",
                  task, tasks_.size());
  if (config_.inference == Inference::oracle) return tasks_[task].active;
  return adapter_names();
}

void ContinualLearner::activate_task(std::size_t task) {
  model_.set_adapters_disabled(false);
  model_.set_active_adapters(adapters_for(task));
}

void ContinualLearner::activate_all() {
  model_.set_adapters_disabled(false);
  model_.set_active_adapters(adapter_names());
}

LlamaLoss ContinualLearner::evaluate_with(const std::vector<PackedRow>& rows,
                                          const std::vector<std::string>& adapters) {
  model_.set_adapters_disabled(adapters.empty());
  if (!adapters.empty()) model_.set_active_adapters(adapters);
  LlamaLoss total;
  const auto step = static_cast<std::size_t>(config_.eval_batch_rows);
  for (std::size_t begin = 0; begin < rows.size(); begin += step) {
    std::vector<const PackedRow*> batch;
    for (std::size_t i = begin; i < std::min(rows.size(), begin + step); ++i) {
      batch.push_back(&rows[i]);
    }
    const LlamaLoss loss = model_.loss(make_batch(batch));
    total.sum += loss.sum;
    total.n_tokens += loss.n_tokens;
  }
  model_.set_adapters_disabled(false);
  return total;
}

void ContinualLearner::set_trainable(const std::string& adapter, bool trainable) {
  for (const LlamaProjectionRef& ref : model_.projections()) {
    if (ref.linear != nullptr && ref.linear->has_adapter(adapter)) {
      ref.linear->adapter(adapter).trainable = trainable;
    }
  }
}

void ContinualLearner::append_row(const std::string& stage) {
  // Every task seen so far, then the control, under the configured inference mode.
  std::vector<double> row(report_.tasks.size(), kNaN);
  for (std::size_t j = 0; j < tasks_.size(); ++j) {
    row[j] = evaluate_with(eval_rows_[j], adapters_for(j)).mean();
  }
  report_.stages.push_back(stage);
  report_.nll.push_back(std::move(row));
  if (!report_.control.empty()) {
    const std::vector<std::string> adapters =
        config_.inference == Inference::oracle ? tasks_.back().active : adapter_names();
    report_.control_nll.push_back(evaluate_with(control_rows_, adapters).mean());
  }
}

const TaskRecord& ContinualLearner::learn(const ContinualTask& task,
                                          const std::function<void(const StepMetrics&)>& on_step) {
  QLORA_CHECK_ARG(!task.name.empty() && !task.train.empty() && !task.eval.empty(),
                  "[ContinualLearner::learn] a task needs a name, training rows and held-out "
                  "rows: got '{}' with {} and {} rows",
                  task.name, task.train.size(), task.eval.size());
  for (const TaskRecord& t : tasks_) {
    QLORA_CHECK_ARG(t.name != task.name,
                    "[ContinualLearner::learn] task '{}' was learnt already (hint: give the new "
                    "task its own name)",
                    task.name);
  }
  const std::size_t index = tasks_.size();

  // A failure part-way (a diverged loss, say) leaves the report and the set of adapters as they
  // were. A shared adapter keeps the weights of its last step in memory; the saved state is
  // only replaced after a task completes.
  const ForgettingReport report_before = report_;
  const std::vector<std::string> adapters_before = adapter_names();
  TaskRecord record;
  try {
    // The new column: the base model and the model before this stage on the new task.
    report_.tasks.push_back(task.name);
    report_.task_tokens.push_back(count_targets(task.eval));
    for (auto& row : report_.nll) row.push_back(kNaN);
    report_.nll[0][index] = evaluate_with(task.eval, {}).mean();
    if (index > 0) {
      const std::vector<std::string> before =
          config_.inference == Inference::oracle ? tasks_.back().active : adapter_names();
      report_.nll[index][index] = evaluate_with(task.eval, before).mean();
    }

    // The adapter: a new one per task, or the first task's adapter again.
    record.name = task.name;
    record.train_rows = static_cast<std::int64_t>(task.train.size());
    const bool reuse = config_.policy == AdapterPolicy::shared && !tasks_.empty();
    record.adapter = reuse ? tasks_.back().adapter : task.name;
    std::vector<std::string> previous = adapter_names();
    if (!reuse) {
      model_.add_adapter(record.adapter, config_.lora,
                         mix_seed(config_.seed, static_cast<std::uint64_t>(index)));
    }
    for (const std::string& name : previous) set_trainable(name, name == record.adapter);
    set_trainable(record.adapter, true);
    previous.erase(std::remove(previous.begin(), previous.end(), record.adapter), previous.end());
    std::vector<std::string> active = config_.inference == Inference::oracle
                                          ? std::vector<std::string>{record.adapter}
                                          : previous;
    if (config_.inference == Inference::sum_all) active.push_back(record.adapter);
    model_.set_adapters_disabled(false);
    model_.set_active_adapters(active);
    record.active = active;

    // Training, with replayed rows and O-LoRA's penalty when configured.
    TrainerConfig train = config_.train;
    train.adapter_name = record.adapter;
    train.output_dir.clear();
    train.seed = mix_seed(config_.train.seed, static_cast<std::uint64_t>(index));
    train.eval_every = 0;
    train.save_every = 0;
    if (config_.replay.batch_fraction > 0.0 && !replay_.empty()) {
      train.replay_rows = std::clamp<std::int64_t>(
          std::llround(config_.replay.batch_fraction * static_cast<double>(train.batch_size)), 1,
          train.batch_size - 1);
    } else {
      train.replay_rows = 0;
    }
    record.replayed_rows_per_batch = train.replay_rows;
    Trainer trainer(model_, task.train, {}, train);
    if (train.replay_rows > 0) {
      trainer.replay_source = [this, index](std::uint64_t draw) -> const PackedRow& {
        return replay_.draw(mix_seed(static_cast<std::uint64_t>(index), draw));
      };
    }
    if (config_.olora && !previous.empty()) {
      const OloraOptions options = *config_.olora;
      trainer.regularizer = [this, name = record.adapter, previous, options]() {
        return olora_penalty(model_, name, previous, options);
      };
    }
    trainer.on_step = on_step;
    const auto start = Clock::now();
    std::int64_t tokens = 0;
    while (!trainer.done()) {
      const StepMetrics m = trainer.step();
      tokens += m.tokens;
      record.final_loss = m.loss;
    }
    record.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    record.steps = trainer.current_step();
    record.tokens_per_second =
        record.seconds > 0.0 ? static_cast<double>(tokens) / record.seconds : 0.0;
  } catch (...) {
    report_ = report_before;
    for (const std::string& name : adapters_before) set_trainable(name, false);
    if (std::find(adapters_before.begin(), adapters_before.end(), task.name) ==
        adapters_before.end()) {
      model_.remove_adapter(task.name);
    }
    activate_all();
    throw;
  }

  // Freeze, remember the task, feed the buffer, evaluate everything.
  set_trainable(record.adapter, config_.policy == AdapterPolicy::shared);
  tasks_.push_back(record);
  eval_rows_.push_back(task.eval);
  for (const PackedRow& row : task.train) replay_.offer(row, static_cast<int>(index));
  append_row(task.name);
  activate_all();
  if (!run_dir_.empty()) save(run_dir_);
  QLORA_LOG_INFO("continual: learnt task '{}' in {:.1f} s", task.name, record.seconds);
  return tasks_.back();
}

MemoryUsage ContinualLearner::memory_usage() const {
  MemoryUsage usage;
  for (const LlamaProjectionRef& ref : model_.projections()) {
    if (ref.linear == nullptr) continue;
    for (const std::string& name : ref.linear->adapter_names()) {
      const LoraAdapter& a = ref.linear->adapter(name);
      usage.adapters += static_cast<std::int64_t>(a.A.size() + a.B.size()) * 4;
    }
  }
  usage.replay = replay_.stored_tokens() * 3 * 4;
  for (const auto& rows : eval_rows_) usage.held_out += row_bytes(rows);
  usage.held_out += row_bytes(control_rows_);
  return usage;
}

void ContinualLearner::save(const std::filesystem::path& dir) const {
  namespace fs = std::filesystem;
  const fs::path final_dir = dir / "state";
  const fs::path temp_dir = dir / ".state.tmp";
  const fs::path old_dir = dir / ".state.old";
  fs::remove_all(temp_dir);
  fs::create_directories(temp_dir / "adapters");

  for (const std::string& name : adapter_names()) {
    PeftAdapter peft;
    peft.config.r = config_.lora.rank;
    peft.config.lora_alpha = config_.lora.alpha;
    peft.config.use_rslora = config_.lora.use_rslora;
    peft.config.lora_dropout = config_.lora.dropout;
    for (const LlamaProjectionRef& ref : model_.projections()) {
      if (ref.linear != nullptr && ref.linear->has_adapter(name)) {
        peft.modules[ref.key] = ref.linear->adapter(name);
      }
    }
    save_peft_adapter(temp_dir / "adapters" / name, peft);
  }

  SafetensorsWriter held_out;
  for (std::size_t j = 0; j < tasks_.size(); ++j) {
    detail::add_rows(held_out, "task" + std::to_string(j), eval_rows_[j]);
  }
  if (!control_rows_.empty()) detail::add_rows(held_out, "control", control_rows_);
  held_out.write(temp_dir / "held_out.safetensors");
  replay_.save(temp_dir / "replay.safetensors");
  report_.write_json(temp_dir / "report.json");

  nlohmann::json records = nlohmann::json::array();
  for (const TaskRecord& t : tasks_) {
    records.push_back({{"name", t.name},
                       {"adapter", t.adapter},
                       {"active", t.active},
                       {"train_rows", t.train_rows},
                       {"steps", t.steps},
                       {"seconds", t.seconds},
                       {"tokens_per_second", t.tokens_per_second},
                       {"final_loss", t.final_loss},
                       {"replayed_rows_per_batch", t.replayed_rows_per_batch}});
  }
  const nlohmann::json state = {{"version", kStateVersion},
                                {"method", config_.method},
                                {"policy", policy_name(config_.policy)},
                                {"inference", inference_name(config_.inference)},
                                {"lora_rank", config_.lora.rank},
                                {"lora_alpha", config_.lora.alpha},
                                {"seed", config_.seed},
                                {"control", report_.control},
                                {"tasks", records}};
  write_text_file_atomic(temp_dir / "continual.json", state.dump(2) + "\n");

  // Swap in the new state; a crash in between leaves .state.old, which load() accepts.
  fs::remove_all(old_dir);
  if (fs::exists(final_dir)) fs::rename(final_dir, old_dir);
  fs::rename(temp_dir, final_dir);
  fs::remove_all(old_dir);
}

void ContinualLearner::load(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  QLORA_CHECK_ARG(tasks_.empty(), "[ContinualLearner::load] this learner has tasks already");
  fs::path state_dir = dir / "state";
  if (!fs::exists(state_dir / "continual.json") && fs::exists(dir / ".state.old/continual.json")) {
    state_dir = dir / ".state.old";  // an interrupted save
  }
  if (!fs::exists(state_dir / "continual.json")) {
    raise<IoError>("[ContinualLearner::load] {} contains no continual state (hint: pass the run "
                   "folder of an earlier `qlora continual` run)",
                   dir.string());
  }
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(
        read_text_file(state_dir / "continual.json", "ContinualLearner::load"));
    QLORA_CHECK_ARG(state.at("version").get<int>() == kStateVersion,
                    "[ContinualLearner::load] {} has state version {}, expected {}",
                    state_dir.string(), state.at("version").get<int>(), kStateVersion);
    for (const auto& t : state.at("tasks")) {
      TaskRecord r;
      r.name = t.at("name").get<std::string>();
      r.adapter = t.at("adapter").get<std::string>();
      r.active = t.at("active").get<std::vector<std::string>>();
      r.train_rows = t.at("train_rows").get<std::int64_t>();
      r.steps = t.at("steps").get<std::int64_t>();
      r.seconds = t.at("seconds").get<double>();
      r.tokens_per_second = t.at("tokens_per_second").get<double>();
      r.final_loss = t.at("final_loss").get<double>();
      r.replayed_rows_per_batch = t.at("replayed_rows_per_batch").get<std::int64_t>();
      tasks_.push_back(std::move(r));
    }
  } catch (const nlohmann::json::exception& e) {
    tasks_.clear();
    raise<FormatError>("[ContinualLearner::load] {}: invalid continual.json: {}",
                       state_dir.string(), e.what());
  }

  std::map<std::string, std::pair<std::int64_t, std::int64_t>> shapes;
  for (const LlamaProjectionRef& ref : model_.projections()) {
    if (ref.linear != nullptr) shapes[ref.key] = {ref.linear->out_features(), ref.linear->in_features()};
  }
  for (const std::string& name : adapter_names()) {
    const PeftAdapter peft = load_peft_adapter(state_dir / "adapters" / name);
    check_peft_adapter_fits(peft, shapes);
    for (const LlamaProjectionRef& ref : model_.projections()) {
      const auto it = peft.modules.find(ref.key);
      if (ref.linear == nullptr || it == peft.modules.end()) continue;
      LoraAdapter adapter = it->second;
      adapter.trainable = false;
      adapter.dA = RowMatrixF::Zero(adapter.A.rows(), adapter.A.cols());
      adapter.dB = RowMatrixF::Zero(adapter.B.rows(), adapter.B.cols());
      ref.linear->add_adapter(name, std::move(adapter));
    }
  }

  const SafetensorsFile held_out(state_dir / "held_out.safetensors");
  for (std::size_t j = 0; j < tasks_.size(); ++j) {
    eval_rows_.push_back(detail::read_rows(held_out, "task" + std::to_string(j)));
  }
  report_ = ForgettingReport::read_json(state_dir / "report.json");
  if (!report_.control.empty()) control_rows_ = detail::read_rows(held_out, "control");
  replay_ = ReplayBuffer::load(state_dir / "replay.safetensors");
  if (report_.tasks.size() != tasks_.size() || report_.nll.size() != tasks_.size() + 1) {
    raise<FormatError>("[ContinualLearner::load] {}: the report has {} tasks and {} rows for "
                       "{} learnt tasks",
                       state_dir.string(), report_.tasks.size(), report_.nll.size(),
                       tasks_.size());
  }
  report_.method = config_.method;
  activate_all();
}

}  // namespace qlora::continual
