// The NEON (AArch64 Advanced SIMD) fp32 GEMM kernel; the algorithm is in gemm_impl.inc.
#include <arm_neon.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "qlora/detail/gemm_kernels.hpp"

namespace qlora::kernels::neon {

/// The SIMD interface that gemm_impl.inc is written against: an 8 x 12 micro-kernel with 24
/// accumulator registers out of 32.
struct GemmSimd {
  using Reg = float32x4_t;
  static constexpr int kW = 4;
  static constexpr int kMr = 8;
  static constexpr int kNv = 3;

  static Reg zero() { return vdupq_n_f32(0.0f); }
  static Reg set1(float v) { return vdupq_n_f32(v); }
  static Reg load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, Reg v) { vst1q_f32(p, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return vfmaq_f32(c, a, b); }
  static Reg add(Reg a, Reg b) { return vaddq_f32(a, b); }
};

#include "../gemm_impl.inc"

}  // namespace qlora::kernels::neon
