#include "qlora/dist/mpi_communicator.hpp"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdlib>

#include <fmt/format.h>

#include "qlora/core/error.hpp"

namespace qlora {
namespace {

// Raises qlora::Error with MPI's text for a failed call.
void check_mpi(int code, const char* op) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, text, &length);
  raise<Error>("[MpiCommunicator] {} failed: {} (hint: see the MPI launcher's output for the rank "
               "that stopped)",
               op, std::string(text, static_cast<std::size_t>(length)));
}

// MPI counts are int, so long buffers go in pieces of at most INT_MAX elements.
template <class T>
void all_reduce_in_chunks(std::span<T> values, MPI_Datatype type) {
  constexpr std::size_t kMaxCount = INT_MAX;
  for (std::size_t begin = 0; begin < values.size(); begin += kMaxCount) {
    const std::size_t count = std::min(kMaxCount, values.size() - begin);
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, values.data() + begin, static_cast<int>(count), type,
                            MPI_SUM, MPI_COMM_WORLD),
              "MPI_Allreduce");
  }
}

}  // namespace

MpiCommunicator::MpiCommunicator() {
  int initialized = 0;
  check_mpi(MPI_Initialized(&initialized), "MPI_Initialized");
  if (initialized == 0) {
    int provided = 0;
    check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided),
              "MPI_Init_thread");
    owns_init_ = true;
  }
  check_mpi(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN),
            "MPI_Comm_set_errhandler");
  check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size");
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_init_ && finalized == 0) MPI_Finalize();
}

std::string MpiCommunicator::description() const {
  return fmt::format("MPI, rank {} of {}", rank_, size_);
}

void MpiCommunicator::all_reduce_sum(std::span<float> values) {
  all_reduce_in_chunks(values, MPI_FLOAT);
}

void MpiCommunicator::all_reduce_sum(std::span<double> values) {
  all_reduce_in_chunks(values, MPI_DOUBLE);
}

void MpiCommunicator::broadcast(std::span<std::byte> bytes, int root) {
  QLORA_CHECK_ARG(root >= 0 && root < size_,
                  "[MpiCommunicator::broadcast] root rank out of range: got {}, expected 0 to {}",
                  root, size_ - 1);
  constexpr std::size_t kMaxCount = INT_MAX;
  for (std::size_t begin = 0; begin < bytes.size(); begin += kMaxCount) {
    const std::size_t count = std::min(kMaxCount, bytes.size() - begin);
    check_mpi(MPI_Bcast(bytes.data() + begin, static_cast<int>(count), MPI_BYTE, root,
                        MPI_COMM_WORLD),
              "MPI_Bcast");
  }
}

std::vector<std::uint64_t> MpiCommunicator::all_gather(std::span<const std::uint64_t> values) {
  QLORA_CHECK_ARG(values.size() <= static_cast<std::size_t>(INT_MAX / std::max(1, size_)),
                  "[MpiCommunicator::all_gather] too many values: got {}, expected at most {} "
                  "per rank",
                  values.size(), INT_MAX / std::max(1, size_));
  std::vector<std::uint64_t> gathered(values.size() * static_cast<std::size_t>(size_));
  check_mpi(MPI_Allgather(values.data(), static_cast<int>(values.size()), MPI_UINT64_T,
                          gathered.data(), static_cast<int>(values.size()), MPI_UINT64_T,
                          MPI_COMM_WORLD),
            "MPI_Allgather");
  return gathered;
}

void MpiCommunicator::barrier() { check_mpi(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier"); }

void MpiCommunicator::abort(int exit_code) {
  MPI_Abort(MPI_COMM_WORLD, exit_code);
  // MPI_Abort is not expected to return. If it does, this still ends the process.
  std::_Exit(exit_code);
}

bool MpiCommunicator::launched_by_mpi() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

}  // namespace qlora
