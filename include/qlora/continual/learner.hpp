// Learning task after task on a frozen quantized base: an adapter bank, replay, O-LoRA and the
// forgetting report, driven one task at a time.
//
//   qlora::continual::ContinualConfig config;
//   config.train.max_steps = 200;
//   config.replay = {.capacity = 256, .batch_fraction = 0.25};
//   qlora::continual::ContinualLearner learner(model, config, "runs/my-device");
//   learner.set_control("wisdom", control_rows);
//   learner.learn({"poems", poem_train_rows, poem_eval_rows});
//   learner.learn({"jokes", joke_train_rows, joke_eval_rows});   // evaluates both, saves
//   fmt::print("{}", learner.report().table());
//
// Adapter policies: `per_task` gives each task a new adapter named after it and freezes it when
// the task ends. `shared` keeps training the first task's adapter (sequential LoRA, the naive
// baseline). Inference modes: `sum_all` adds every adapter of the bank (training too runs with
// the frozen adapters active, as in O-LoRA). `oracle` trains each task's adapter alone and
// serves each task with it, so a finished task's numbers never change.
// TaskRecord::active names the adapters that were active while a task was trained. With the
// task id known, that set serves the task without forgetting under either mode.
//
// learn() first evaluates the new task on the base model and on the model before training,
// for the gain and plasticity. It then trains the task, freezes its adapter and offers its
// training windows to the replay buffer. Last, it evaluates every task so far and the control
// set and, with a run folder, saves the whole state there. A learner built on the same model and folder with load()
// continues exactly: the same seed and thread count give the same report.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "qlora/continual/olora.hpp"
#include "qlora/continual/replay.hpp"
#include "qlora/continual/report.hpp"
#include "qlora/lora/lora_config.hpp"
#include "qlora/model/llama.hpp"
#include "qlora/train/trainer.hpp"

namespace qlora::continual {

enum class AdapterPolicy { shared, per_task };
enum class Inference { sum_all, oracle };

struct ContinualConfig {
  std::string method = "continual";  ///< label of the report
  LoraConfig lora;                    ///< every task adapter's settings
  /// The per-task training settings; output_dir, adapter_name and replay_rows are set by the
  /// learner, and the seed is mixed with the task's index.
  TrainerConfig train;
  AdapterPolicy policy = AdapterPolicy::per_task;
  Inference inference = Inference::sum_all;
  std::optional<OloraOptions> olora;  ///< needs the per_task policy
  ReplayOptions replay;
  std::uint64_t seed = 0;
  std::int64_t eval_batch_rows = 8;
};

/// One task's data: packed training and held-out rows (see qlora::pack_documents).
struct ContinualTask {
  std::string name;
  std::vector<PackedRow> train;
  std::vector<PackedRow> eval;
};

/// The bank's record of a finished task.
struct TaskRecord {
  std::string name;
  std::string adapter;   ///< the adapter trained on this task
  /// The adapters active while the task was trained (the earlier ones frozen): the set that
  /// serves this task when its id is known at inference.
  std::vector<std::string> active;
  std::int64_t train_rows = 0;
  std::int64_t steps = 0;
  double seconds = 0.0;  ///< wall time of training, evaluation excluded
  double tokens_per_second = 0.0;
  double final_loss = 0.0;
  std::int64_t replayed_rows_per_batch = 0;
};

/// Bytes held by the learner, for the report.
struct MemoryUsage {
  std::int64_t adapters = 0;  ///< fp32 A and B of every adapter in the bank
  std::int64_t replay = 0;    ///< token ids, targets and segment ids held by the buffer
  std::int64_t held_out = 0;  ///< the stored held-out rows of every task and the control
};

class ContinualLearner {
 public:
  /**
   * Prepares a run on `model` (which must hold no adapter yet). With a non-empty `run_dir`
   * the state is saved there after every task. Throws qlora::InvalidArgument for settings
   * that cannot work together (O-LoRA with the shared policy, a replay fraction outside
   * [0, 1), a model with adapters already).
   */
  ContinualLearner(LlamaModel& model, ContinualConfig config, std::filesystem::path run_dir = {});

  /// Sets the never-trained held-out set whose drift the report tracks. Call it before the
  /// first task; later calls throw qlora::InvalidArgument.
  void set_control(std::string name, std::vector<PackedRow> eval_rows);

  /// Trains one task and updates the report (see the file comment). Throws
  /// qlora::InvalidArgument for an empty or duplicate name or empty row sets. When training
  /// fails, the report and the bank's adapters are restored (a shared adapter keeps its partly
  /// trained weights until load() reads the saved state back) and the error is rethrown.
  const TaskRecord& learn(const ContinualTask& task,
                          const std::function<void(const StepMetrics&)>& on_step = {});

  /// Mean NLL per token of `rows` with exactly `adapters` active (empty: the base model).
  /// Restores the inference set afterwards.
  LlamaLoss evaluate_with(const std::vector<PackedRow>& rows,
                          const std::vector<std::string>& adapters);

  /// The adapters that serve task `task` under the configured inference mode: every adapter
  /// with sum_all, TaskRecord::active with oracle.
  std::vector<std::string> adapters_for(std::size_t task) const;
  /// Activates task `task`'s adapters (oracle: its own; sum_all: all) on the model.
  void activate_task(std::size_t task);
  /// Activates every adapter of the bank (summed).
  void activate_all();

  const ForgettingReport& report() const { return report_; }
  const std::vector<TaskRecord>& tasks() const { return tasks_; }
  /// Every adapter of the bank, in the order they were added.
  std::vector<std::string> adapter_names() const;
  /// The held-out rows of task `task`, as stored by the bank.
  const std::vector<PackedRow>& held_out(std::size_t task) const { return eval_rows_.at(task); }
  ReplayBuffer& replay() { return replay_; }
  const ContinualConfig& config() const { return config_; }
  MemoryUsage memory_usage() const;

  /**
   * Writes the bank (one PEFT folder per adapter), the replay buffer, the held-out rows, the
   * task list and the report into `dir`/state, replacing the previous state only once the new
   * one is complete.
   */
  void save(const std::filesystem::path& dir) const;

  /**
   * Restores a state written by save() into this learner, whose model must hold no adapter
   * and whose report must be empty. The configuration given to the constructor applies to the
   * tasks learnt from now on, so one saved stage can branch into several methods. The replay
   * buffer's capacity, seed and quota setting come from the file. Throws
   * qlora::IoError or qlora::FormatError for a missing or damaged state, and
   * qlora::InvalidArgument when the adapters do not fit the model.
   */
  void load(const std::filesystem::path& dir);

 private:
  void set_trainable(const std::string& adapter, bool trainable);
  void append_row(const std::string& stage);

  LlamaModel& model_;
  ContinualConfig config_;
  std::filesystem::path run_dir_;
  std::vector<TaskRecord> tasks_;
  std::vector<std::vector<PackedRow>> eval_rows_;
  std::vector<PackedRow> control_rows_;
  ReplayBuffer replay_;
  ForgettingReport report_;
};

}  // namespace qlora::continual
