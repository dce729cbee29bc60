// Declarations of the per-ISA fp32 GEMM kernels defined in src/kernels/<isa>/gemm.cpp, and the
// table that the public op dispatches through. Internal: call qlora::gemm_f32 instead.
#pragma once

#include <cstdint>

#include "qlora/core/cpu.hpp"
#include "qlora/kernels/gemm_args.hpp"

#define QLORA_DECLARE_GEMM_KERNELS()                                             \
  void gemm_f32(const GemmArgs& args, int n_threads, float* workspace) noexcept; \
  std::int64_t gemm_f32_workspace_floats(const GemmArgs& args, int n_threads) noexcept;

namespace qlora::kernels {

namespace avx2 {
QLORA_DECLARE_GEMM_KERNELS()
}  // namespace avx2

namespace avx512 {
QLORA_DECLARE_GEMM_KERNELS()
}  // namespace avx512

namespace neon {
QLORA_DECLARE_GEMM_KERNELS()
}  // namespace neon

/// The GEMM kernel of one instruction set and its workspace size.
struct GemmTable {
  GemmFn gemm = nullptr;
  GemmWorkspaceFn workspace_floats = nullptr;
};

/// Returns the kernel of `isa`; throws qlora::InvalidArgument when isa_available(isa) is false.
const GemmTable& gemm_table(Isa isa);

}  // namespace qlora::kernels

#undef QLORA_DECLARE_GEMM_KERNELS
