// The int8-activation forward kernels (weight format x int8 activations, "q8") that
// qlora::dequant_matmul uses for small batches, and their dispatch tables. Internal to
// src/kernels: each src/kernels/<isa>/dequant_matmul.cpp defines its table, matmul.cpp picks one.
//
// A q8 kernel quantizes each block of x (the weight's block along K) to int8 with one fp32 scale,
// xs = max|x| / 127, computes exact integer dot products of the block with the weight codes, and
// applies the weight scale, xs and the weight min in fp32. Backward products never use it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "qlora/core/cpu.hpp"
#include "qlora/kernels/weight_view.hpp"

namespace qlora::kernels {

/**
 * A q8 forward kernel: y[M, N] (+)= x[M, K] * dequant(w)[N, K]^T with x quantized to int8 per
 * weight block. `workspace` has room for dequant_matmul_q8_workspace_bytes(M, w) bytes. The
 * result does not depend on n_threads.
 */
using DequantMatmulQ8Fn = void (*)(const float* x, std::int64_t M, const WeightView& w, float* y,
                                   bool accumulate, int n_threads,
                                   std::byte* workspace) noexcept;

/// The q8 kernels of one instruction set, indexed by KernelFormat.
struct DequantMatmulQ8Table {
  std::array<DequantMatmulQ8Fn, kKernelFormatCount> forward{};
};

/// The largest block size of the q8 kernels: int32 block sums of up to 4096 products of at most
/// 255 * 127 stay far below 2^31.
inline constexpr std::int64_t kQ8MaxBlockSize = 4096;

/// Returns the size in bytes of the q8 workspace: int8 activations [M, K] and, per (row, block),
/// the fp32 scale, the fp32 sum of x and the int32 start value of the accumulator.
constexpr std::int64_t dequant_matmul_q8_workspace_bytes(std::int64_t M, const WeightView& w) {
  const std::int64_t n_blocks = w.K / w.block_size;
  const std::int64_t codes = (M * w.K + 63) / 64 * 64;
  return codes + M * n_blocks * 12;
}

namespace avx2 {
/// Weights of 32 elements per step (vpmaddubsw, vpmaddwd).
extern const DequantMatmulQ8Table kQ8Table;
}  // namespace avx2

namespace avx512 {
/// Weights of 32 elements per step (vpdpbusd on 256-bit registers, AVX-512 VNNI + VL).
extern const DequantMatmulQ8Table kQ8Table;
}  // namespace avx512

namespace neon {
/// Weights of 16 elements per step: plain NEON (smull, sadalp) and dotprod (sdot).
extern const DequantMatmulQ8Table kQ8Table;
extern const DequantMatmulQ8Table kQ8DotprodTable;
}  // namespace neon

}  // namespace qlora::kernels
