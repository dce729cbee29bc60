// See eigen_native.hpp. Compiled with -march=native and hidden visibility (benchmarks/CMakeLists.txt).
#include "eigen_native.hpp"

#include <Eigen/Core>

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>;
using Map = Eigen::Map<RowMatrix>;

}  // namespace

extern "C" {

[[gnu::visibility("default")]] void qlora_bench_eigen_native_sgemm(
    bool transpose_a, bool transpose_b, std::int64_t M, std::int64_t N, std::int64_t K,
    const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c,
    int n_threads) {
  Eigen::setNbThreads(n_threads);
  const ConstMap a_map(a, transpose_a ? K : M, transpose_a ? M : K, Eigen::OuterStride<>(lda));
  const ConstMap b_map(b, transpose_b ? N : K, transpose_b ? K : N, Eigen::OuterStride<>(ldb));
  Map c_map(c, M, N);
  if (transpose_a && transpose_b) {
    c_map.noalias() = a_map.transpose() * b_map.transpose();
  } else if (transpose_a) {
    c_map.noalias() = a_map.transpose() * b_map;
  } else if (transpose_b) {
    c_map.noalias() = a_map * b_map.transpose();
  } else {
    c_map.noalias() = a_map * b_map;
  }
}

[[gnu::visibility("default")]] const char* qlora_bench_eigen_native_simd() {
  return Eigen::SimdInstructionSetsInUse();
}

}  // extern "C"
