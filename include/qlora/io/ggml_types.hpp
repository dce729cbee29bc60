// The ggml tensor types that GGUF files store, their block geometry, and the scalar
// dequantizers for the types that real checkpoints use.
//
// Supported for dequantization: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
// The other types that ggml defines are known by id, name and block geometry (so a file that
// holds them still opens and its sizes are checked), but dequantizing them throws
// qlora::NotImplemented. Block layouts follow ggml's `ggml-common.h` and `ggml-quants.c`; the
// dequantizers round exactly like gguf-py 0.19 (`gguf/quants.py`): every product and sum is
// one fp32 operation, with no fused multiply-add, so the results are bit-identical.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace qlora {

/// A ggml tensor type; the values are the on-disk ids of GGUF's tensor info.
enum class GgmlType : std::uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q8_1 = 9,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  q8_k = 15,
  iq2_xxs = 16,
  iq2_xs = 17,
  iq3_xxs = 18,
  iq1_s = 19,
  iq4_nl = 20,
  iq3_s = 21,
  iq2_s = 22,
  iq4_xs = 23,
  i8 = 24,
  i16 = 25,
  i32 = 26,
  i64 = 27,
  f64 = 28,
  iq1_m = 29,
  bf16 = 30,
  tq1_0 = 34,
  tq2_0 = 35,
  mxfp4 = 39,
  nvfp4 = 40,
  q1_0 = 41,
};

/// Elements per block and bytes per block of a ggml type.
struct GgmlTypeTraits {
  std::string_view name;     // upper case, as ggml and gguf-py print it ("Q4_K")
  std::int64_t block_size;   // elements per block
  std::int64_t type_size;    // bytes per block
  bool can_dequantize;       // whether qlora dequantizes this type
};

/// Returns the traits of the type with on-disk id `id`, or nullopt for an unknown or retired id.
std::optional<GgmlTypeTraits> ggml_type_traits(std::uint32_t id) noexcept;

/// Returns the traits of `type`, which must be one of the enumerators.
GgmlTypeTraits ggml_type_traits(GgmlType type);

/// Returns the upper-case name of `type` ("Q4_K"), or "unknown" for a value outside the enum.
std::string_view to_string(GgmlType type) noexcept;

/**
 * Dequantizes `n` elements of type `type` from `src` into `dst`.
 *
 * `src` [n / block_size blocks of type_size bytes], `dst` [n]. Preconditions (checked by the
 * callers, not here): `type` can be dequantized and `n` is a multiple of its block size.
 * `src` needs no alignment.
 */
void dequantize_ggml(GgmlType type, const std::byte* src, float* dst, std::int64_t n) noexcept;

}  // namespace qlora
