// The view of a quantized weight that the dequant-matmul kernels read, and the kernel
// signature shared by every instruction set.
//
// Kernels assume valid input: the public op in qlora/kernels/matmul.hpp checks shapes and
// array sizes once, decodes double-quantized NF4 absmax into plain fp32 scales, and then
// calls a kernel through a function pointer.
#pragma once

#include <cstdint>

#include "qlora/quant/tables.hpp"

namespace qlora::kernels {

/**
 * A quantized weight [N, K] = [out, in] in the layout of qlora::QuantizedMatrix.
 *
 * - codes:  [N, K / 2] bytes for 4-bit formats (even element in the high nibble), [N, K] bytes
 *           for INT8 (uint8 asymmetric, int8 symmetric).
 * - scales: [N, K / block_size] fp32 (NF4 absmax or INT step).
 * - mins:   [N, K / block_size] fp32 for asymmetric INT formats, nullptr otherwise.
 * - absmax_codes, nested_absmax, nested_offset: double-quantized NF4 absmax, used in place of
 *   scales when absmax_codes is not null (see block_scale).
 */
struct WeightView {
  const std::uint8_t* codes = nullptr;
  const float* scales = nullptr;
  const float* mins = nullptr;
  std::int64_t N = 0;
  std::int64_t K = 0;
  std::int64_t block_size = 0;
  const std::uint8_t* absmax_codes = nullptr;
  const float* nested_absmax = nullptr;
  float nested_offset = 0.0f;
};

/**
 * Returns the scale of flattened block `block`: scales[block], or for double-quantized NF4
 * kDynamicMap[absmax_codes[block]] * nested_absmax[block / 256] + nested_offset. The product
 * is rounded to float before the addition, as in qlora::nf4_absmax, so that no compiler
 * contraction into an FMA changes the result.
 */
inline float block_scale(const WeightView& w, std::int64_t block) noexcept {
  if (w.absmax_codes == nullptr) return w.scales[block];
  float product = kDynamicMap[w.absmax_codes[block]] * w.nested_absmax[block / 256];
  // An empty asm statement that claims to change `product` keeps it in a register: the
  // compiler must round it to float here and cannot fuse it with the addition. A volatile
  // variable does the same through a store and a load on every block.
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(product));
#elif defined(__aarch64__)
  asm("" : "+w"(product));
#else
  volatile float rounded = product;
  product = rounded;
#endif
  return product + w.nested_offset;
}

/// The five stored formats; a kernel name carries the same word (dequant_matmul_int4_sym_f32).
enum class KernelFormat { nf4, int4, int4_sym, int8, int8_sym };

inline constexpr int kKernelFormatCount = 5;

/**
 * A dequant-matmul kernel, the same signature in both directions.
 *
 * Forward:  c[M, N] (+)= a[M, K] * dequant(w)[N, K]^T   (a = x, c = y)
 * Backward: c[M, K] (+)= a[M, N] * dequant(w)[N, K]     (a = dy, c = dx)
 *
 * a and c are dense row-major. `workspace` has room for at least dequant_matmul_workspace_floats(M, w)
 * floats. The kernel runs on `n_threads` OpenMP threads; its result does not depend on that
 * count.
 */
using DequantMatmulFn = void (*)(const float* a, std::int64_t M, const WeightView& w, float* c,
                                 bool accumulate, int n_threads, float* workspace) noexcept;

/// Batches up to this many rows take the matrix-vector path (weights streamed once).
inline constexpr std::int64_t kGemvMaxRows = 4;

/// The matrix-vector backward splits the weight rows into this many fixed chunks.
inline constexpr std::int64_t kBackwardChunks = 16;

/// Returns the workspace size, in floats, that a kernel needs for M rows of activations: the
/// split activations and block sums of the forward, or the partial sums of the backward.
constexpr std::int64_t dequant_matmul_workspace_floats(std::int64_t M, const WeightView& w) {
  if (M > kGemvMaxRows) return 0;
  const std::int64_t n_blocks = w.K / w.block_size;
  const std::int64_t forward = M * (w.K + n_blocks);
  const std::int64_t n_chunks = w.N < kBackwardChunks ? w.N : kBackwardChunks;
  const std::int64_t backward = n_chunks * M * (w.K + n_blocks);
  return forward > backward ? forward : backward;
}

}  // namespace qlora::kernels
