// Eigen's fp32 GEMM compiled for the build machine's own instruction set (-march=native), as the
// fairest Eigen reference for the kernels, which pick AVX2 or AVX-512 at run time.
//
// It lives in its own shared library with hidden symbols. So the Eigen templates instantiated
// there with AVX-512 flags cannot replace, or be replaced by, the baseline x86-64 instantiations
// of libqlora and the benchmark programs, as they could if both were linked into one program.
// Benchmarks only: a binary built with it runs on the machine that built it, or one like it.
#pragma once

#include <cstdint>

extern "C" {

/**
 * Computes c[M, N] = op(a) * op(b), all row-major, where op transposes when the flag is set:
 * a is [M, K] with row stride lda ([K, M] when transposed), b is [K, N] with row stride ldb
 * ([N, K] when transposed), c has row stride N. Runs on n_threads OpenMP threads.
 */
void qlora_bench_eigen_native_sgemm(bool transpose_a, bool transpose_b, std::int64_t M,
                                    std::int64_t N, std::int64_t K, const float* a,
                                    std::int64_t lda, const float* b, std::int64_t ldb, float* c,
                                    int n_threads);

/// The SIMD instruction sets that this Eigen build uses, as Eigen names them ("AVX512, FMA, ...").
const char* qlora_bench_eigen_native_simd();

}  // extern "C"
