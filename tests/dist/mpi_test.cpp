// The data-parallel trainer over MPI: run with `mpiexec -n 2 dist_mpi_tests` (CTest label
// `mpi`). Every rank runs every test; a failure on any rank fails the program.
#include <span>

#include <gtest/gtest.h>

#include "dist/data_parallel_cases.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/dist/mpi_communicator.hpp"

namespace {

qlora::MpiCommunicator* g_comm = nullptr;

TEST(data_parallel_mpi, two_ranks_equal_one_process) {
  qlora::test::check_ranks_equal_one_process(*g_comm);
}

TEST(data_parallel_mpi, loss_normalised_by_all_tokens) {
  qlora::test::check_loss_normalised_by_all_tokens(*g_comm);
}

TEST(data_parallel_mpi, mismatch_rejected) { qlora::test::check_mismatch_rejected(*g_comm); }

TEST(data_parallel_mpi, divergence_names_rank) {
  qlora::test::check_divergence_names_rank(*g_comm);
}

TEST(data_parallel_mpi, checkpoint_and_resplit) {
  qlora::test::check_checkpoint_and_resplit(*g_comm);
}

}  // namespace

int main(int argc, char** argv) {
  qlora::MpiCommunicator comm;
  g_comm = &comm;
  ::testing::InitGoogleTest(&argc, argv);
  // The ranks share the machine's cores; one thread each keeps them from oversubscribing it.
  qlora::set_num_threads(1);
  double failed = RUN_ALL_TESTS() != 0 ? 1.0 : 0.0;
  comm.all_reduce_sum(std::span<double>(&failed, 1));
  return failed > 0.0 ? 1 : 0;
}
