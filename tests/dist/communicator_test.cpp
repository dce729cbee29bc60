// The single-process communicator, the byte hash, and the data-parallel trainer with ranks
// as threads of one process (ThreadCommunicator), so these run in every build without MPI.
#include "qlora/dist/communicator.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dist/data_parallel_cases.hpp"
#include "support/thread_communicator.hpp"

namespace {

using ::testing::HasSubstr;

TEST(single_process_communicator, collectives_are_identity) {
  qlora::Communicator& comm = qlora::single_process_communicator();
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  EXPECT_TRUE(comm.is_root());

  std::vector<float> floats = {1.5f, -2.0f};
  comm.all_reduce_sum(std::span<float>(floats));
  EXPECT_EQ(floats, (std::vector<float>{1.5f, -2.0f}));
  std::vector<double> doubles = {3.25};
  comm.all_reduce_sum(std::span<double>(doubles));
  EXPECT_EQ(doubles, std::vector<double>{3.25});

  std::int64_t value = 42;
  comm.broadcast_value(value);
  EXPECT_EQ(value, 42);
  const std::vector<std::uint64_t> mine = {7, 9};
  EXPECT_EQ(comm.all_gather(mine), mine);
  comm.barrier();
}

TEST(single_process_communicator, rejects_other_root) {
  std::int64_t value = 1;
  EXPECT_THAT([&] { qlora::single_process_communicator().broadcast_value(value, 1); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("got 1")));
}

TEST(hash_bytes, sees_every_byte_and_length) {
  std::vector<std::byte> bytes(21, std::byte{3});
  const std::uint64_t base = qlora::hash_bytes(bytes);
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    std::vector<std::byte> changed = bytes;
    changed[i] = std::byte{4};
    EXPECT_NE(qlora::hash_bytes(changed), base) << "byte " << i;
  }
  bytes.push_back(std::byte{0});
  EXPECT_NE(qlora::hash_bytes(bytes), base) << "a trailing zero byte changes the hash";
  EXPECT_NE(qlora::hash_bytes({}), qlora::hash_bytes({}, 1)) << "the seed changes the hash";
}

TEST(thread_communicator, sums_in_rank_order) {
  qlora::test::ThreadGroup group(3);
  std::vector<std::vector<double>> results(3);
  group.run([&](int rank) {
    qlora::test::ThreadCommunicator comm(group, rank);
    std::vector<double> values = {static_cast<double>(rank), 1.0};
    comm.all_reduce_sum(std::span<double>(values));
    results[static_cast<std::size_t>(rank)] = values;
    std::int64_t root_value = rank == 2 ? 17 : 0;
    comm.broadcast_value(root_value, 2);
    EXPECT_EQ(root_value, 17) << "rank " << rank;
    const std::uint64_t mine = static_cast<std::uint64_t>(rank) * 10;
    EXPECT_EQ(comm.all_gather(std::span(&mine, 1)), (std::vector<std::uint64_t>{0, 10, 20}));
  });
  for (const auto& r : results) EXPECT_EQ(r, (std::vector<double>{3.0, 3.0}));
}

// Runs `check` on every rank of a 2-thread job.
template <class Check>
void on_two_thread_ranks(Check check) {
  qlora::test::ThreadGroup group(2);
  group.run([&](int rank) {
    qlora::test::ThreadCommunicator comm(group, rank);
    check(comm);
  });
}

TEST(data_parallel_threads, two_ranks_equal_one_process) {
  on_two_thread_ranks(qlora::test::check_ranks_equal_one_process);
}

TEST(data_parallel_threads, loss_normalised_by_all_tokens) {
  on_two_thread_ranks(qlora::test::check_loss_normalised_by_all_tokens);
}

TEST(data_parallel_threads, mismatch_rejected) {
  on_two_thread_ranks(qlora::test::check_mismatch_rejected);
}

TEST(data_parallel_threads, divergence_names_rank) {
  on_two_thread_ranks(qlora::test::check_divergence_names_rank);
}

TEST(data_parallel_threads, checkpoint_and_resplit) {
  on_two_thread_ranks(qlora::test::check_checkpoint_and_resplit);
}

TEST(data_parallel_threads, single_process_unchanged) {
  // With the single-process communicator the trainer takes the same steps as before: the
  // explicit communicator and the default give bit-identical runs.
  qlora::Communicator& single = qlora::single_process_communicator();
  const auto explicit_run = qlora::test::train_tiny(single, 2, 2, 2);
  qlora::LlamaModel model = qlora::test::tiny_model(1);
  qlora::test::disable_dropout(model);
  qlora::TrainerConfig config;
  config.max_steps = 2;
  config.lr = 1e-2f;
  config.seed = 3;
  config.batch_size = 2;
  config.grad_accum = 2;
  qlora::Trainer trainer(model, qlora::test::parallel_rows(), {}, config);
  std::vector<double> losses;
  while (!trainer.done()) losses.push_back(trainer.step().loss);
  EXPECT_EQ(losses, explicit_run.losses);
  EXPECT_EQ(qlora::test::flat_adapter(model), explicit_run.adapter);
}

}  // namespace
