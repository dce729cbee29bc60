// The scalar reference dequant-matmul kernels: the specification that every SIMD variant is
// tested against, and the fallback when QLORA_ISA=scalar or no SIMD variant is available.
//
// Each weight is dequantized as the format defines it (see qlora/quant/quantized_matrix.hpp) and
// products are summed in double, so these kernels are the accurate side of every parity test.
// They are plain loops and make no attempt at speed.
#pragma once

#include <algorithm>
#include <cstdint>

#include "qlora/kernels/weight_view.hpp"
#include "qlora/quant/tables.hpp"

namespace qlora::kernels::ref {

/// Returns the dequantized weight w[n, k] of a matrix stored in format F.
template <KernelFormat F>
inline float dequant_element(const WeightView& w, std::int64_t n, std::int64_t k) noexcept {
  const std::int64_t block = n * (w.K / w.block_size) + k / w.block_size;
  const float scale = block_scale(w, block);
  if constexpr (F == KernelFormat::int8 || F == KernelFormat::int8_sym) {
    const std::uint8_t byte = w.codes[n * w.K + k];
    if constexpr (F == KernelFormat::int8) {
      return scale * static_cast<float>(byte) + w.mins[block];
    } else {
      return scale * static_cast<float>(static_cast<std::int8_t>(byte));
    }
  } else {
    // Byte j of a row contains element 2j in the high nibble and 2j + 1 in the low nibble.
    const std::uint8_t byte = w.codes[n * (w.K / 2) + k / 2];
    const int code = (k % 2 == 0) ? (byte >> 4) : (byte & 0x0f);
    if constexpr (F == KernelFormat::nf4) {
      return scale * kNf4Levels[static_cast<std::size_t>(code)];
    } else if constexpr (F == KernelFormat::int4) {
      return scale * static_cast<float>(code) + w.mins[block];
    } else {
      return scale * static_cast<float>(code - 8);
    }
  }
}

/// Stores `value` into c, or adds it when `accumulate` is set.
inline void store_or_add(float* c, double value, bool accumulate) noexcept {
  *c = accumulate ? static_cast<float>(static_cast<double>(*c) + value)
                  : static_cast<float>(value);
}

/**
 * y[M, N] (+)= x[M, K] * dequant(w)[N, K]^T, summing in double. Output rows are split over
 * threads; each element is one sequential sum, so the result is independent of n_threads.
 */
template <KernelFormat F>
void dequant_matmul_f32(const float* x, std::int64_t M, const WeightView& w, float* y,
                        bool accumulate, int n_threads, float* /*workspace*/) noexcept {
  const std::int64_t N = w.N;
  const std::int64_t K = w.K;
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t m = 0; m < M; ++m) {
      double sum = 0.0;
      for (std::int64_t k = 0; k < K; ++k) {
        sum += static_cast<double>(x[m * K + k]) * static_cast<double>(dequant_element<F>(w, n, k));
      }
      store_or_add(&y[m * N + n], sum, accumulate);
    }
  }
}

/**
 * dx[M, K] (+)= dy[M, N] * dequant(w)[N, K], summing in double over n in order. Columns of dx
 * are split over threads in stripes, so the result is independent of n_threads.
 */
template <KernelFormat F>
void dequant_matmul_backward_f32(const float* dy, std::int64_t M, const WeightView& w, float* dx,
                                 bool accumulate, int n_threads, float* /*workspace*/) noexcept {
  constexpr std::int64_t kStripe = 256;
  const std::int64_t N = w.N;
  const std::int64_t K = w.K;
  const std::int64_t n_stripes = (K + kStripe - 1) / kStripe;
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (std::int64_t stripe = 0; stripe < n_stripes; ++stripe) {
    const std::int64_t k0 = stripe * kStripe;
    const std::int64_t k1 = std::min(K, k0 + kStripe);
    for (std::int64_t m = 0; m < M; ++m) {
      double sums[kStripe] = {};
      for (std::int64_t n = 0; n < N; ++n) {
        const double g = static_cast<double>(dy[m * N + n]);
        for (std::int64_t k = k0; k < k1; ++k) {
          sums[k - k0] += g * static_cast<double>(dequant_element<F>(w, n, k));
        }
      }
      for (std::int64_t k = k0; k < k1; ++k) store_or_add(&dx[m * K + k], sums[k - k0], accumulate);
    }
  }
}

inline void dequant_matmul_nf4_f32(const float* x, std::int64_t M, const WeightView& w, float* y,
                                   bool accumulate, int n_threads, float* workspace) noexcept {
  dequant_matmul_f32<KernelFormat::nf4>(x, M, w, y, accumulate, n_threads, workspace);
}
inline void dequant_matmul_int4_f32(const float* x, std::int64_t M, const WeightView& w, float* y,
                                    bool accumulate, int n_threads, float* workspace) noexcept {
  dequant_matmul_f32<KernelFormat::int4>(x, M, w, y, accumulate, n_threads, workspace);
}
inline void dequant_matmul_int4_sym_f32(const float* x, std::int64_t M, const WeightView& w,
                                        float* y, bool accumulate, int n_threads,
                                        float* workspace) noexcept {
  dequant_matmul_f32<KernelFormat::int4_sym>(x, M, w, y, accumulate, n_threads, workspace);
}
inline void dequant_matmul_int8_f32(const float* x, std::int64_t M, const WeightView& w, float* y,
                                    bool accumulate, int n_threads, float* workspace) noexcept {
  dequant_matmul_f32<KernelFormat::int8>(x, M, w, y, accumulate, n_threads, workspace);
}
inline void dequant_matmul_int8_sym_f32(const float* x, std::int64_t M, const WeightView& w,
                                        float* y, bool accumulate, int n_threads,
                                        float* workspace) noexcept {
  dequant_matmul_f32<KernelFormat::int8_sym>(x, M, w, y, accumulate, n_threads, workspace);
}

inline void dequant_matmul_backward_nf4_f32(const float* dy, std::int64_t M, const WeightView& w,
                                            float* dx, bool accumulate, int n_threads,
                                            float* workspace) noexcept {
  dequant_matmul_backward_f32<KernelFormat::nf4>(dy, M, w, dx, accumulate, n_threads, workspace);
}
inline void dequant_matmul_backward_int4_f32(const float* dy, std::int64_t M, const WeightView& w,
                                             float* dx, bool accumulate, int n_threads,
                                             float* workspace) noexcept {
  dequant_matmul_backward_f32<KernelFormat::int4>(dy, M, w, dx, accumulate, n_threads, workspace);
}
inline void dequant_matmul_backward_int4_sym_f32(const float* dy, std::int64_t M,
                                                 const WeightView& w, float* dx, bool accumulate,
                                                 int n_threads, float* workspace) noexcept {
  dequant_matmul_backward_f32<KernelFormat::int4_sym>(dy, M, w, dx, accumulate, n_threads,
                                                      workspace);
}
inline void dequant_matmul_backward_int8_f32(const float* dy, std::int64_t M, const WeightView& w,
                                             float* dx, bool accumulate, int n_threads,
                                             float* workspace) noexcept {
  dequant_matmul_backward_f32<KernelFormat::int8>(dy, M, w, dx, accumulate, n_threads, workspace);
}
inline void dequant_matmul_backward_int8_sym_f32(const float* dy, std::int64_t M,
                                                 const WeightView& w, float* dx, bool accumulate,
                                                 int n_threads, float* workspace) noexcept {
  dequant_matmul_backward_f32<KernelFormat::int8_sym>(dy, M, w, dx, accumulate, n_threads,
                                                      workspace);
}

}  // namespace qlora::kernels::ref
