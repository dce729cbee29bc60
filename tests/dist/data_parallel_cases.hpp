// Data-parallel training checks that run on every rank of a job, shared by the thread-rank
// tests (every build) and the MPI tests (label `mpi`). Each function is called by every rank
// with its own communicator. It trains the tiny model and compares the result with one
// process running the same global batch.
#pragma once

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/dist/communicator.hpp"
#include "qlora/train/data.hpp"
#include "qlora/train/trainer.hpp"
#include "support/compare.hpp"
#include "support/tiny_llama.hpp"

namespace qlora::test {

// N ranks with batch b and one process with batch N * b sum the same terms in another order:
// float32 matmuls over fewer rows, then one float32 sum across ranks. Measured on the tiny
// model with 2 ranks: losses and gradient norms within 3e-8 relative, adapter weights within
// 3e-7 absolute after 3 AdamW steps at lr 1e-2. The tolerances leave a factor of 10 or more.
inline constexpr double kRankLossRelTol = 1e-6;
inline constexpr float kRankAdapterAbsTol = 3e-6f;

inline std::vector<PackedRow> parallel_rows() {
  return pack_documents(sample_documents(), 24, kPad);
}

inline void disable_dropout(LlamaModel& model) {
  // Dropout masks are drawn per micro-batch and rank, so they differ between layouts.
  for (const auto& ref : model.projections()) ref.linear->adapter("default").dropout = 0.0f;
}

inline std::vector<float> flat_adapter(LlamaModel& model) {
  std::vector<float> values;
  for (const auto& ref : model.projections()) {
    const LoraAdapter& a = ref.linear->adapter("default");
    values.insert(values.end(), a.A.data(), a.A.data() + a.A.size());
    values.insert(values.end(), a.B.data(), a.B.data() + a.B.size());
  }
  return values;
}

struct ParallelRun {
  std::vector<double> losses;
  std::vector<double> grad_norms;
  std::vector<std::int64_t> tokens;
  std::vector<float> adapter;
  double eval_loss = 0.0;
  std::int64_t eval_tokens = 0;
};

inline ParallelRun train_tiny(Communicator& comm, std::int64_t batch, std::int64_t accum,
                              std::int64_t steps) {
  LlamaModel model = tiny_model(1);
  disable_dropout(model);
  TrainerConfig config;
  config.max_steps = steps;
  config.lr = 1e-2f;
  config.seed = 3;
  config.batch_size = batch;
  config.grad_accum = accum;
  config.communicator = &comm;
  Trainer trainer(model, parallel_rows(), parallel_rows(), config);
  ParallelRun run;
  while (!trainer.done()) {
    const StepMetrics m = trainer.step();
    run.losses.push_back(m.loss);
    run.grad_norms.push_back(m.grad_norm);
    run.tokens.push_back(m.tokens);
  }
  run.adapter = flat_adapter(model);
  const EvalMetrics eval = trainer.evaluate();
  run.eval_loss = eval.loss;
  run.eval_tokens = eval.tokens;
  return run;
}

// N ranks with batch 2 and 2 micro-batches each equal one process with batch 2N.
inline void check_ranks_equal_one_process(Communicator& comm) {
  const ParallelRun parallel = train_tiny(comm, 2, 2, 3);
  const ParallelRun single = train_tiny(single_process_communicator(), 2 * comm.size(), 2, 3);

  ASSERT_EQ(parallel.losses.size(), single.losses.size());
  for (std::size_t s = 0; s < single.losses.size(); ++s) {
    EXPECT_EQ(parallel.tokens[s], single.tokens[s]) << "step " << s + 1;
    EXPECT_NEAR(parallel.losses[s], single.losses[s], kRankLossRelTol * single.losses[s])
        << "step " << s + 1;
    EXPECT_NEAR(parallel.grad_norms[s], single.grad_norms[s],
                kRankLossRelTol * single.grad_norms[s])
        << "step " << s + 1;
  }
  EXPECT_TRUE(arrays_near(std::span<const float>(parallel.adapter),
                          std::span<const float>(single.adapter), kRankAdapterAbsTol));
  EXPECT_EQ(parallel.eval_tokens, single.eval_tokens);
  EXPECT_NEAR(parallel.eval_loss, single.eval_loss, kRankLossRelTol * single.eval_loss);

  // Every rank holds the same adapter, bit for bit.
  const std::uint64_t hash = hash_values<float>(parallel.adapter);
  for (const std::uint64_t other : comm.all_gather(std::span(&hash, 1))) EXPECT_EQ(other, hash);
}

// One row with many trained tokens and one with few: the step's loss is the mean over all
// trained tokens of both ranks, not the mean of the two per-rank means.
inline void check_loss_normalised_by_all_tokens(Communicator& comm) {
  if (comm.size() != 2) GTEST_SKIP() << "needs 2 ranks, got " << comm.size();
  const Tokenizer tokenizer = byte_tokenizer();
  Document dense;
  dense.ids = tokenizer.encode("To be or not to be, that is.", {.add_special = false});
  dense.loss_mask.assign(dense.ids.size(), 1);
  Document sparse = dense;
  sparse.loss_mask.assign(sparse.ids.size(), 0);
  sparse.loss_mask[sparse.ids.size() - 1] = 1;
  sparse.loss_mask[sparse.ids.size() - 2] = 1;
  const std::vector<PackedRow> rows = {pack_documents({dense}, 32, kPad).front(),
                                       pack_documents({sparse}, 32, kPad).front()};
  ASSERT_GT(rows[0].n_targets, 10 * rows[1].n_targets);

  const auto first_step = [&rows](Communicator& c, std::int64_t batch) {
    LlamaModel model = tiny_model(1);
    disable_dropout(model);
    TrainerConfig config;
    config.max_steps = 1;
    config.batch_size = batch;
    config.communicator = &c;
    Trainer trainer(model, rows, {}, config);
    return trainer.step();
  };
  const StepMetrics parallel = first_step(comm, 1);
  const StepMetrics single = first_step(single_process_communicator(), 2);
  EXPECT_EQ(parallel.tokens, rows[0].n_targets + rows[1].n_targets);
  EXPECT_NEAR(parallel.loss, single.loss, kRankLossRelTol * single.loss);

  const LlamaModel model = tiny_model(1);
  const LlamaLoss dense_loss = model.loss(make_batch({&rows[0]}));
  const LlamaLoss sparse_loss = model.loss(make_batch({&rows[1]}));
  const double mean_of_means =
      0.5 * (dense_loss.sum / static_cast<double>(dense_loss.n_tokens) +
             sparse_loss.sum / static_cast<double>(sparse_loss.n_tokens));
  EXPECT_GT(std::abs(mean_of_means - single.loss), 100 * kRankLossRelTol * single.loss)
      << "the rows must have different mean losses for this check to mean anything";
  EXPECT_GT(std::abs(parallel.loss - mean_of_means), 100 * kRankLossRelTol * single.loss)
      << "loss " << parallel.loss << ", mean of per-rank means " << mean_of_means;
}

// A different model or seed on rank 1 stops every rank with one error naming both.
inline void check_mismatch_rejected(Communicator& comm) {
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 or more ranks, got " << comm.size();
  using ::testing::AllOf;
  using ::testing::HasSubstr;
  const int rank = comm.rank();
  TrainerConfig config;
  config.max_steps = 1;
  config.communicator = &comm;

  LlamaModel other_model = tiny_model(rank == 1 ? 2 : 1);
  EXPECT_THAT([&] { Trainer t(other_model, parallel_rows(), {}, config); },
              ::testing::ThrowsMessage<RankMismatch>(
                  AllOf(HasSubstr("model"), HasSubstr("rank 1"), HasSubstr("rank 0"))));

  LlamaModel model = tiny_model(1);
  config.seed = rank == 1 ? 8 : 7;
  EXPECT_THAT([&] { Trainer t(model, parallel_rows(), {}, config); },
              ::testing::ThrowsMessage<RankMismatch>(
                  AllOf(HasSubstr("seed"), HasSubstr("rank 1"))));

  config.seed = 7;
  std::vector<PackedRow> rows = parallel_rows();
  if (rank == 1) rows.pop_back();
  EXPECT_THAT([&] { Trainer t(model, rows, {}, config); },
              ::testing::ThrowsMessage<RankMismatch>(HasSubstr("training data")));
}

// A non-finite loss on rank 1 stops every rank with the same error, which names rank 1.
inline void check_divergence_names_rank(Communicator& comm) {
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 or more ranks, got " << comm.size();
  LlamaModel model = tiny_model(4);
  TrainerConfig config;
  config.max_steps = 2;
  config.communicator = &comm;
  Trainer trainer(model, parallel_rows(), {}, config);
  trainer.step();
  if (comm.rank() == 1) {
    LoraAdapter& adapter = model.projections().front().linear->adapter("default");
    adapter.A(0, 0) = std::numeric_limits<float>::quiet_NaN();
    adapter.B.setConstant(1.0f);
  }
  EXPECT_THAT([&] { trainer.step(); },
              ::testing::ThrowsMessage<TrainingDiverged>(::testing::HasSubstr("on rank 1")));
}

// A 2-rank run with batch 1 saves through rank 0 only, and resumes in one process with batch
// 2 (the same global batch) but not with batch 1.
inline void check_checkpoint_and_resplit(Communicator& comm) {
  if (comm.size() != 2) GTEST_SKIP() << "needs 2 ranks, got " << comm.size();
  // Rank 0's process id names the folder, so that the thread and MPI variants of this test
  // may run at the same time.
  std::int64_t pid = getpid();
  comm.broadcast_value(pid);
  const auto dir = std::filesystem::temp_directory_path() /
                   ("qlora_data_parallel_resume_" + std::to_string(pid));
  if (comm.is_root()) std::filesystem::remove_all(dir);
  comm.barrier();

  TrainerConfig config;
  config.max_steps = 4;
  config.lr = 5e-3f;
  config.seed = 5;
  config.batch_size = 1;
  config.save_every = 2;
  config.keep_checkpoints = 5;
  config.output_dir = dir / "parallel";
  config.communicator = &comm;
  LlamaModel model = tiny_model(4);
  disable_dropout(model);
  Trainer trainer(model, parallel_rows(), {}, config);
  std::vector<double> losses;
  while (!trainer.done()) losses.push_back(trainer.step().loss);
  comm.barrier();

  if (comm.is_root()) {
    std::ifstream metrics(dir / "parallel" / "metrics.jsonl");
    int n_train = 0;
    for (std::string line; std::getline(metrics, line);) {
      if (line.find("\"train\"") != std::string::npos) ++n_train;
    }
    EXPECT_EQ(n_train, 4) << "only rank 0 appends metrics";
    EXPECT_TRUE(std::filesystem::exists(dir / "parallel" / "checkpoint-2" / "trainer_state.json"));

    config.communicator = nullptr;
    config.output_dir = dir / "resplit";
    config.batch_size = 2;
    LlamaModel resumed_model = tiny_model(4);
    disable_dropout(resumed_model);
    Trainer resumed(resumed_model, parallel_rows(), {}, config);
    resumed.resume(dir / "parallel" / "checkpoint-2");
    ASSERT_EQ(resumed.current_step(), 2);
    for (std::size_t s = 2; s < 4; ++s) {
      EXPECT_NEAR(resumed.step().loss, losses[s], kRankLossRelTol * losses[s]) << "step " << s + 1;
    }

    config.batch_size = 1;
    LlamaModel narrow_model = tiny_model(4);
    Trainer narrow(narrow_model, parallel_rows(), {}, config);
    EXPECT_THAT([&] { narrow.resume(dir / "parallel"); },
                ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr("2 ranks")));
    std::filesystem::remove_all(dir);
  }
  comm.barrier();
}

}  // namespace qlora::test
