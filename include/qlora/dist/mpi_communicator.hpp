// A Communicator over MPI_COMM_WORLD, for `mpirun -np N qlora finetune ...`.
//
// Built only with -DQLORA_WITH_MPI=ON, into the separate library target qlora::mpi, so that
// the qlora library itself never depends on MPI. The header does not include <mpi.h>. The
// collectives are the blocking MPI ones (MPI_Allreduce, MPI_Bcast, MPI_Allgather,
// MPI_Barrier). A failed MPI call raises qlora::Error with MPI's own message, because the
// communicator switches MPI_COMM_WORLD to MPI_ERRORS_RETURN.
//
// Thread use: MPI is initialised at MPI_THREAD_FUNNELED, so only the thread that created the
// communicator may call it. OpenMP threads inside a rank never touch it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qlora/dist/communicator.hpp"

namespace qlora {

class MpiCommunicator final : public Communicator {
 public:
  /// Initialises MPI unless the program already did, and finalizes it on destruction if this
  /// object initialised it. Throws qlora::Error when MPI_Init_thread fails.
  MpiCommunicator();
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string description() const override;

  void all_reduce_sum(std::span<float> values) override;
  void all_reduce_sum(std::span<double> values) override;
  void broadcast(std::span<std::byte> bytes, int root) override;
  std::vector<std::uint64_t> all_gather(std::span<const std::uint64_t> values) override;
  void barrier() override;

  /// Ends every process of the job with `exit_code` (MPI_Abort). For a failure on one rank,
  /// after the error has been printed; the other ranks may be blocked inside a collective.
  [[noreturn]] void abort(int exit_code);

  /// Returns true when an MPI launcher (mpirun, mpiexec, srun) started this process, judged
  /// from the environment variables OMPI_COMM_WORLD_SIZE, PMIX_RANK, PMI_RANK and PMI_SIZE.
  /// NOTE: only Open MPI's mpiexec (4.1, Debian 12) has been tried.
  static bool launched_by_mpi();

 private:
  int rank_ = 0;
  int size_ = 1;
  bool owns_init_ = false;
};

}  // namespace qlora
