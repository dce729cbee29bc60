// The training loop for LoRA adapters on a LlamaModel: micro-batches, gradient accumulation,
// AdamW with a schedule and clipping, evaluation, checkpoints that resume bit for bit, and
// metrics.
//
// A C++ application drives it step by step:
//
//   qlora::Trainer trainer(model, train_rows, eval_rows, config);
//   while (!trainer.done()) {
//     const qlora::StepMetrics m = trainer.step();
//     if (m.step % 10 == 0) fmt::print("step {} loss {:.3f}\n", m.step, m.loss);
//   }
//   trainer.save_checkpoint();
//
// Determinism: the row order of each epoch, the dropout masks and the initial adapter follow
// from the seed alone, and a checkpoint stores the adapter, the optimizer moments, the step
// and the data position, so a resumed run reproduces the losses of an uninterrupted one bit
// for bit at the same thread count.
//
// Data parallelism: with TrainerConfig::communicator set to a job of N ranks (MpiCommunicator,
// for `mpirun -np N`), each rank builds the same model and Trainer. Each step takes N *
// batch_size * grad_accum rows, and rank r trains on its own disjoint share. The adapter
// gradients are summed once per step, and the loss is normalised by the trained tokens of all
// ranks. So N ranks with batch b take the steps of one process with batch N * b, up to float
// summation order and dropout masks. Only rank 0 writes metrics, checkpoints and the loss curve.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/dist/communicator.hpp"
#include "qlora/lora/lora_config.hpp"
#include "qlora/model/llama.hpp"
#include "qlora/train/data.hpp"
#include "qlora/train/optimizer.hpp"

namespace qlora {

struct TrainerConfig {
  std::int64_t batch_size = 4;   ///< rows per micro-batch on each rank
  std::int64_t grad_accum = 1;   ///< micro-batches per optimizer step
  std::int64_t max_steps = 0;    ///< optimizer steps; 0 means `epochs` passes over the data
  double epochs = 1.0;
  float lr = 2e-4f;
  LrSchedule schedule = LrSchedule::constant;
  std::int64_t warmup_steps = 0;
  AdamWConfig adamw;
  float max_grad_norm = 1.0f;  ///< clip the global gradient norm; 0 disables clipping
  std::int64_t eval_every = 0;  ///< evaluate every N steps (and at the end); 0: only at the end
  std::int64_t save_every = 0;  ///< checkpoint every N steps (and at the end); 0: only at the end
  std::int64_t eval_max_rows = 0;  ///< evaluate on at most this many held-out rows; 0: all
  int keep_checkpoints = 2;        ///< older checkpoint-N folders are deleted
  std::filesystem::path output_dir;  ///< checkpoints and metrics.jsonl; empty writes nothing
  std::uint64_t seed = 0;
  bool gradient_checkpointing = false;
  std::string adapter_name = "default";
  /// Rows of every micro-batch taken from Trainer::replay_source instead of the training set
  /// (experience replay); must be smaller than batch_size. 0 disables replay.
  std::int64_t replay_rows = 0;
  /// The ranks of a data-parallel job; null means a single process. It must outlive the
  /// Trainer, and every rank must construct its Trainer and call step(), evaluate(),
  /// save_checkpoint() and resume() in the same order.
  Communicator* communicator = nullptr;
  /// A hash of the model file, compared across ranks at start-up together with hashes of the
  /// quantized projections, the initial adapter, the settings, the seed and the data.
  std::uint64_t model_fingerprint = 0;
};

/// Metrics of one optimizer step.
struct StepMetrics {
  std::int64_t step = 0;        ///< 1-based number of the step just taken
  double loss = 0.0;            ///< mean loss over the step's trained tokens
  double lr = 0.0;
  double grad_norm = 0.0;       ///< before clipping
  double regularizer = 0.0;     ///< value of Trainer::regularizer, not included in `loss`
  std::int64_t tokens = 0;      ///< trained (target) tokens in the step, over all ranks
  double tokens_per_second = 0.0;  ///< all input tokens of the step per second of wall time
  double seconds = 0.0;
};

struct EvalMetrics {
  std::int64_t step = 0;
  double loss = 0.0;  ///< mean negative log-likelihood per token
  double perplexity = 0.0;
  std::int64_t tokens = 0;  ///< over all ranks
};

/// Thrown when the loss or the gradient norm is NaN or infinite; the last good checkpoint
/// on disk is left as it was.
class TrainingDiverged : public Error {
 public:
  using Error::Error;
};

class Trainer {
 public:
  /**
   * Prepares training of the adapter `config.adapter_name`, which must already be on the
   * model (LlamaModel::add_adapter or LoftQ). Throws qlora::InvalidArgument for an empty
   * training set, a model without that adapter, or invalid settings.
   */
  Trainer(LlamaModel& model, std::vector<PackedRow> train_rows, std::vector<PackedRow> eval_rows,
          TrainerConfig config);

  /// The total number of optimizer steps of this run.
  std::int64_t total_steps() const { return total_steps_; }
  std::int64_t current_step() const { return step_; }
  bool done() const { return step_ >= total_steps_; }

  /// Takes one optimizer step over grad_accum micro-batches. Evaluates and saves when the
  /// step is a multiple of eval_every or save_every. Throws TrainingDiverged on a non-finite
  /// loss or gradient.
  StepMetrics step();

  /// Evaluates the loss on the held-out rows (at most eval_max_rows of them). With N ranks
  /// each rank evaluates every N-th batch and the sums are reduced.
  EvalMetrics evaluate();

  /// Writes checkpoint-<step> in output_dir atomically (adapter, optimizer state, trainer
  /// state) and records it in output_dir/latest. Returns its path. With N ranks, rank 0
  /// writes and the others wait for it. Before that, every rank checks that the adapters of
  /// all ranks are still identical and throws RankMismatch if not.
  std::filesystem::path save_checkpoint();

  /// Restores the adapter, optimizer and data position from a checkpoint folder, or from
  /// output_dir/latest when `dir` is a run folder. Throws qlora::InvalidArgument when the
  /// checkpoint was written with different data or batch settings, or with a different
  /// global batch (ranks * batch_size * grad_accum). A different number of ranks with the
  /// same global batch re-splits the data position exactly.
  void resume(const std::filesystem::path& dir);

  /// Called after every step and every evaluation, for progress display.
  std::function<void(const StepMetrics&)> on_step;
  std::function<void(const EvalMetrics&)> on_eval;

  /**
   * An optional penalty on the adapters, such as O-LoRA's orthogonality term. It is called once
   * per optimizer step, after the gradients of every micro-batch are summed and before
   * clipping. It adds its gradient to the trainable adapters' dA and dB and returns its value.
   * Calling it once per step (not once per micro-batch) keeps its weight independent of
   * gradient accumulation.
   */
  std::function<double()> regularizer;

  /**
   * Supplies replayed rows when config.replay_rows > 0: the last replay_rows rows of every
   * micro-batch are replay_source(draw), where `draw` numbers the row within the whole run
   * (step, micro-batch, rank and slot), so a resumed run replays the same rows. The returned
   * row must stay valid until the step ends.
   */
  std::function<const PackedRow&(std::uint64_t draw)> replay_source;

  /// Every logged step and evaluation so far, for plots and reports.
  const std::vector<StepMetrics>& step_history() const { return history_; }
  const std::vector<EvalMetrics>& eval_history() const { return eval_history_; }

  /// Writes loss_curve.svg (training loss and evaluation loss against step) to output_dir.
  void write_loss_curve() const;

 private:
  std::vector<ParamRef> trainable_params();
  const PackedRow& next_row();
  // Throws RankMismatch on every rank unless all ranks hold the same model, settings, seed
  // and data.
  void check_ranks_agree();
  // Sums the gradients of `params` over all ranks, through one flat buffer.
  void all_reduce_grads(const std::vector<ParamRef>& params);
  // Throws RankMismatch on every rank unless all ranks hold the same adapter, optimizer step
  // count and data position.
  void check_state_agrees(const char* op);
  std::uint64_t training_state_hash();
  bool writes_files() const { return comm_.is_root() && !config_.output_dir.empty(); }
  void append_metrics(const std::string& json_line);

  LlamaModel& model_;
  std::vector<PackedRow> train_rows_;
  std::vector<PackedRow> eval_rows_;
  TrainerConfig config_;
  Communicator& comm_;
  AdamW optimizer_;
  std::int64_t total_steps_ = 0;
  std::int64_t step_ = 0;
  // Data position: the epoch, its row permutation and the next index into it.
  std::int64_t epoch_ = 0;
  std::int64_t cursor_ = 0;
  std::vector<std::int64_t> order_;
  std::uint64_t data_fingerprint_ = 0;
  std::int64_t global_batch_rows_ = 0;  ///< training-set rows per step over all ranks
  std::vector<float> grad_buffer_;
  std::vector<StepMetrics> history_;
  std::vector<EvalMetrics> eval_history_;
};

}  // namespace qlora
