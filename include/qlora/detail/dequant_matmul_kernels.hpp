// Declarations of the per-ISA dequant-matmul kernels defined in src/kernels/<isa>/, and the
// table that the public op dispatches through. Internal: call qlora::dequant_matmul instead.
#pragma once

#include <array>

#include "qlora/core/cpu.hpp"
#include "qlora/kernels/weight_view.hpp"

#define QLORA_DECLARE_DEQUANT_MATMUL_KERNELS()                                                 \
  void dequant_matmul_nf4_f32(const float*, std::int64_t, const WeightView&, float*, bool, int, \
                              float*) noexcept;                                                 \
  void dequant_matmul_int4_f32(const float*, std::int64_t, const WeightView&, float*, bool,     \
                               int, float*) noexcept;                                           \
  void dequant_matmul_int4_sym_f32(const float*, std::int64_t, const WeightView&, float*, bool, \
                                   int, float*) noexcept;                                       \
  void dequant_matmul_int8_f32(const float*, std::int64_t, const WeightView&, float*, bool,     \
                               int, float*) noexcept;                                           \
  void dequant_matmul_int8_sym_f32(const float*, std::int64_t, const WeightView&, float*, bool, \
                                   int, float*) noexcept;                                       \
  void dequant_matmul_backward_nf4_f32(const float*, std::int64_t, const WeightView&, float*,   \
                                       bool, int, float*) noexcept;                             \
  void dequant_matmul_backward_int4_f32(const float*, std::int64_t, const WeightView&, float*,  \
                                        bool, int, float*) noexcept;                            \
  void dequant_matmul_backward_int4_sym_f32(const float*, std::int64_t, const WeightView&,      \
                                            float*, bool, int, float*) noexcept;                \
  void dequant_matmul_backward_int8_f32(const float*, std::int64_t, const WeightView&, float*,  \
                                        bool, int, float*) noexcept;                            \
  void dequant_matmul_backward_int8_sym_f32(const float*, std::int64_t, const WeightView&,      \
                                            float*, bool, int, float*) noexcept;

namespace qlora::kernels {

namespace avx2 {
QLORA_DECLARE_DEQUANT_MATMUL_KERNELS()
}  // namespace avx2

namespace avx512 {
QLORA_DECLARE_DEQUANT_MATMUL_KERNELS()
}  // namespace avx512

namespace neon {
QLORA_DECLARE_DEQUANT_MATMUL_KERNELS()
}  // namespace neon

/// The kernels of one instruction set, indexed by KernelFormat.
struct DequantMatmulTable {
  std::array<DequantMatmulFn, kKernelFormatCount> forward{};
  std::array<DequantMatmulFn, kKernelFormatCount> backward{};
};

/// Returns the kernels of `isa`; throws qlora::InvalidArgument when isa_available(isa) is false.
const DequantMatmulTable& dequant_matmul_table(Isa isa);

}  // namespace qlora::kernels

#undef QLORA_DECLARE_DEQUANT_MATMUL_KERNELS
