#include "qlora/core/cpu.hpp"

#include <cstdlib>
#include <string>

#include "qlora/core/error.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define QLORA_ARCH_X86_64 1
#elif defined(__aarch64__)
#include <sys/auxv.h>
#define QLORA_ARCH_AARCH64 1
#endif

namespace qlora {
namespace {

#if defined(QLORA_ARCH_X86_64)
// Reads the extended control register that says which register states the OS saves.
unsigned long long read_xcr0() {
  unsigned int eax = 0;
  unsigned int edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return f;
  const bool osxsave = (ecx & bit_OSXSAVE) != 0;
  const bool has_fma = (ecx & bit_FMA) != 0;
  const bool has_f16c = (ecx & bit_F16C) != 0;
  const bool has_avx = (ecx & bit_AVX) != 0;
  if (!osxsave || !has_avx) return f;

  // XMM and YMM state (bits 1, 2) for AVX; opmask, upper ZMM and high ZMM (bits 5-7) for AVX-512.
  const unsigned long long xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;
  if (!os_avx) return f;

  f.fma = has_fma;
  f.f16c = has_f16c;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return f;
  f.avx2 = (ebx & bit_AVX2) != 0;
  if (os_avx512) {
    f.avx512f = (ebx & bit_AVX512F) != 0;
    f.avx512bw = (ebx & bit_AVX512BW) != 0;
    f.avx512vl = (ebx & bit_AVX512VL) != 0;
    f.avx512vnni = (ecx & bit_AVX512VNNI) != 0;
  }
  return f;
}
#elif defined(QLORA_ARCH_AARCH64)
CpuFeatures detect() {
  CpuFeatures f;
  f.neon = true;  // Advanced SIMD is mandatory on AArch64.
#ifdef HWCAP_ASIMDDP
  f.dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
  return f;
}
#else
CpuFeatures detect() { return {}; }
#endif

// Which variants this build compiled in; the CMake build defines these per ISA folder.
bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::scalar:
      return true;
    case Isa::avx2:
#ifdef QLORA_HAVE_AVX2
      return true;
#else
      return false;
#endif
    case Isa::avx512:
#ifdef QLORA_HAVE_AVX512
      return true;
#else
      return false;
#endif
    case Isa::neon:
#ifdef QLORA_HAVE_NEON
      return true;
#else
      return false;
#endif
  }
  return false;
}

std::string list_isas(const std::vector<Isa>& isas) {
  std::string out;
  for (Isa isa : isas) {
    if (!out.empty()) out += ", ";
    out += to_string(isa);
  }
  return out;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::string to_string(const CpuFeatures& features) {
  std::string out;
  const auto add = [&out](bool present, const char* name) {
    if (!present) return;
    if (!out.empty()) out += ' ';
    out += name;
  };
  add(features.avx2, "avx2");
  add(features.fma, "fma");
  add(features.f16c, "f16c");
  add(features.avx512f, "avx512f");
  add(features.avx512bw, "avx512bw");
  add(features.avx512vl, "avx512vl");
  add(features.avx512vnni, "avx512vnni");
  add(features.neon, "neon");
  add(features.dotprod, "dotprod");
  return out.empty() ? std::string("none") : out;
}

std::string_view to_string(Isa isa) {
  switch (isa) {
    case Isa::scalar:
      return "scalar";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::neon:
      return "neon";
  }
  return "unknown";
}

Isa parse_isa(std::string_view name) {
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::neon}) {
    if (name == to_string(isa)) return isa;
  }
  raise<InvalidArgument>(
      "[parse_isa] unknown instruction set: got '{}', expected one of scalar, avx2, avx512, "
      "neon",
      name);
}

bool isa_available(Isa isa) {
  if (!isa_compiled(isa)) return false;
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::scalar:
      return true;
    case Isa::avx2:
      return f.avx2 && f.fma && f.f16c;
    case Isa::avx512:
      return f.avx512f && f.avx512bw && f.avx512vl && f.fma && f.f16c;
    case Isa::neon:
      return f.neon;
  }
  return false;
}

std::vector<Isa> available_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::scalar, Isa::neon, Isa::avx2, Isa::avx512}) {
    if (isa_available(isa)) isas.push_back(isa);
  }
  return isas;
}

Isa select_isa() {
  const std::vector<Isa> isas = available_isas();
  const char* forced = std::getenv("QLORA_ISA");
  if (forced == nullptr || *forced == '\0') return isas.back();

  const Isa isa = parse_isa(forced);
  if (!isa_available(isa)) {
    raise<InvalidArgument>(
        "[select_isa] QLORA_ISA={} is not available here: this build and CPU support {} (CPU "
        "features: {}) (hint: unset QLORA_ISA or pick one of those)",
        forced, list_isas(isas), to_string(cpu_features()));
  }
  return isa;
}

}  // namespace qlora
