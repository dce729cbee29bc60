// CPU feature detection and the choice of kernel instruction set.
//
// Features are read once per process (cpuid and xgetbv on x86-64, getauxval on aarch64). An
// x86 feature counts as present only when the operating system also saves its registers, so
// AVX-512 reported by cpuid but disabled by the kernel is reported as absent.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace qlora {

/// Instruction-set features that qlora's kernels use.
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512vnni = false;
  bool neon = false;
  bool dotprod = false;
};

/// Returns the features of the CPU this process runs on, detected on first call.
const CpuFeatures& cpu_features();

/// Formats the present features as a space-separated list, for example "avx2 fma f16c".
std::string to_string(const CpuFeatures& features);

/// The kernel variants. Each SIMD variant needs the features listed by isa_requirements.
enum class Isa { scalar, avx2, avx512, neon };

std::string_view to_string(Isa isa);

/// Parses "scalar", "avx2", "avx512" or "neon"; throws qlora::InvalidArgument otherwise.
Isa parse_isa(std::string_view name);

/// Returns whether this build contains `isa` and this CPU can run it.
bool isa_available(Isa isa);

/// Returns the variants that isa_available accepts, slowest first; scalar is always there.
std::vector<Isa> available_isas();

/**
 * Returns the variant the kernels should use.
 *
 * The environment variable QLORA_ISA forces a variant; otherwise the fastest available one
 * is chosen. Throws qlora::InvalidArgument when QLORA_ISA names an unknown or unavailable
 * variant, listing the variants that are available.
 */
Isa select_isa();

}  // namespace qlora
