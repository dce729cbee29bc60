#include "qlora/kernels/gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/detail/gemm_kernels.hpp"
#include "qlora/kernels/ref/gemm.hpp"

namespace qlora {
namespace kernels {
namespace {

const GemmTable kRefTable{&ref::gemm_f32, &ref::gemm_f32_workspace_floats};
#ifdef QLORA_HAVE_AVX2
const GemmTable kAvx2Table{&avx2::gemm_f32, &avx2::gemm_f32_workspace_floats};
#endif
#ifdef QLORA_HAVE_AVX512
const GemmTable kAvx512Table{&avx512::gemm_f32, &avx512::gemm_f32_workspace_floats};
#endif
#ifdef QLORA_HAVE_NEON
const GemmTable kNeonTable{&neon::gemm_f32, &neon::gemm_f32_workspace_floats};
#endif

}  // namespace

const GemmTable& gemm_table(Isa isa) {
  if (!isa_available(isa)) {
    raise<InvalidArgument>(
        "[gemm_f32] instruction set {} is not available: this build and CPU support {} "
        "(hint: pick one of those)",
        to_string(isa), to_string(cpu_features()));
  }
  switch (isa) {
#ifdef QLORA_HAVE_AVX2
    case Isa::avx2:
      return kAvx2Table;
#endif
#ifdef QLORA_HAVE_AVX512
    case Isa::avx512:
      return kAvx512Table;
#endif
#ifdef QLORA_HAVE_NEON
    case Isa::neon:
      return kNeonTable;
#endif
    default:
      return kRefTable;
  }
}

}  // namespace kernels

namespace {

std::string_view to_string(Transpose op) { return op == Transpose::yes ? "yes" : "no"; }

/// Checks that a matrix stored [rows, stride] can hold `cols` columns; `name` is A, B or C.
void check_operand(std::string_view name, const float* data, std::int64_t rows,
                   std::int64_t cols, std::int64_t stride) {
  QLORA_CHECK_ARG(stride >= std::max<std::int64_t>(cols, 1),
                  "[gemm_f32] row stride of {} is smaller than its row: got stride {} for {} "
                  "stored columns, expected at least max(columns, 1) (hint: pass the row "
                  "length of the stored matrix, not of its transpose)",
                  name, stride, cols);
  QLORA_CHECK_ARG(data != nullptr || rows == 0 || cols == 0,
                  "[gemm_f32] pointer to {} is null for a stored [{}, {}] matrix (hint: pass "
                  "the matrix data)",
                  name, rows, cols);
}

/**
 * Per-thread packing buffers that persist between calls, so that the many small products of a
 * training step do not allocate and fault in fresh pages each time. One buffer per calling
 * thread: calls from inside an OpenMP region each use their own.
 */
float* thread_workspace(std::int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<std::int64_t>(buffer.size()) < floats) {
    buffer.resize(static_cast<std::size_t>(floats));
  }
  return buffer.data();
}

void run(Isa isa, Transpose op_a, Transpose op_b, std::int64_t M, std::int64_t N, std::int64_t K,
         float alpha, const float* A, std::int64_t lda, const float* B, std::int64_t ldb,
         bool accumulate, float* C, std::int64_t ldc) {
  QLORA_CHECK_ARG(M >= 0 && N >= 0 && K >= 0,
                  "[gemm_f32] sizes must not be negative: got M={}, N={}, K={}", M, N, K);
  const bool ta = op_a == Transpose::yes;
  const bool tb = op_b == Transpose::yes;
  check_operand("A", A, ta ? K : M, ta ? M : K, lda);
  check_operand("B", B, tb ? N : K, tb ? K : N, ldb);
  check_operand("C", C, M, N, ldc);
  const kernels::GemmTable& table = kernels::gemm_table(isa);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      for (std::int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    }
    return;
  }

  kernels::GemmArgs args;
  args.trans_a = ta;
  args.trans_b = tb;
  args.M = M;
  args.N = N;
  args.K = K;
  args.alpha = alpha;
  args.a = A;
  args.lda = lda;
  args.b = B;
  args.ldb = ldb;
  args.c = C;
  args.ldc = ldc;
  args.accumulate = accumulate;

  // Nested calls (attention runs one product per head inside its own parallel loop) use the
  // calling thread only.
  const int n_threads = omp_in_parallel() ? 1 : num_threads();
  float* workspace = thread_workspace(table.workspace_floats(args, n_threads));
  table.gemm(args, n_threads, workspace);
}

Isa default_isa() {
  static const Isa isa = select_isa();
  return isa;
}

}  // namespace

void gemm_f32(Transpose op_a, Transpose op_b, std::int64_t M, std::int64_t N, std::int64_t K,
              float alpha, const float* A, std::int64_t lda, const float* B, std::int64_t ldb,
              bool accumulate, float* C, std::int64_t ldc) {
  run(default_isa(), op_a, op_b, M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc);
}

void gemm_f32(ConstRefRowMatrixF a, Transpose op_a, ConstRefRowMatrixF b, Transpose op_b,
              RefRowMatrixF c, float alpha, bool accumulate) {
  const std::int64_t M = op_a == Transpose::yes ? a.cols() : a.rows();
  const std::int64_t K = op_a == Transpose::yes ? a.rows() : a.cols();
  const std::int64_t b_rows = op_b == Transpose::yes ? b.cols() : b.rows();
  const std::int64_t N = op_b == Transpose::yes ? b.rows() : b.cols();
  QLORA_CHECK_ARG(b_rows == K && c.rows() == M && c.cols() == N,
                  "[gemm_f32] shapes do not match: got a [{}, {}] (transpose {}), b [{}, {}] "
                  "(transpose {}), c [{}, {}], expected op(a) [M, K], op(b) [K, N], c [M, N]",
                  a.rows(), a.cols(), to_string(op_a), b.rows(), b.cols(), to_string(op_b),
                  c.rows(), c.cols());
  // An empty Eigen matrix may report a row stride of 0, which the pointer form rejects.
  const auto stride = [](std::int64_t outer, std::int64_t cols) {
    return std::max<std::int64_t>({outer, cols, 1});
  };
  gemm_f32(op_a, op_b, M, N, K, alpha, a.data(), stride(a.outerStride(), a.cols()), b.data(),
           stride(b.outerStride(), b.cols()), accumulate, c.data(),
           stride(c.outerStride(), c.cols()));
}

namespace detail {

void gemm_f32(Isa isa, Transpose op_a, Transpose op_b, std::int64_t M, std::int64_t N,
              std::int64_t K, float alpha, const float* A, std::int64_t lda, const float* B,
              std::int64_t ldb, bool accumulate, float* C, std::int64_t ldc) {
  run(isa, op_a, op_b, M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc);
}

}  // namespace detail
}  // namespace qlora
