#include "qlora/core/threads.hpp"

#include <atomic>

#include <omp.h>

#include "qlora/core/error.hpp"

namespace qlora {
namespace {

std::atomic<int> g_threads{0};  // 0: OpenMP's default

}  // namespace

void set_num_threads(int n_threads) {
  QLORA_CHECK_ARG(n_threads >= 0,
                  "[set_num_threads] thread count must not be negative: got {} (hint: pass 0 "
                  "for OpenMP's default)",
                  n_threads);
  g_threads.store(n_threads, std::memory_order_relaxed);
}

int num_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
  const int omp_default = omp_get_max_threads();
  return omp_default > 0 ? omp_default : 1;
}

}  // namespace qlora
