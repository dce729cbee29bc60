#include "qlora/io/ggml_types.hpp"

#include <array>
#include <cstring>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"

// This file is compiled with -ffp-contract=off (src/CMakeLists.txt): a fused multiply-add
// would round `d * q + m` once instead of twice and break bit equality with gguf-py.

namespace qlora {
namespace {

constexpr std::int64_t kQk = 32;    // elements per block of the Q4_0 .. Q8_0 family
constexpr std::int64_t kQkK = 256;  // elements per super-block of the K-quants

// Block structs as in ggml-common.h. Every field is a byte array, so the structs have
// alignment 1 and can be read at any address; fp16 fields are little-endian byte pairs.
struct BlockQ4_0 {
  std::uint8_t d[2];
  std::uint8_t qs[kQk / 2];
};
struct BlockQ4_1 {
  std::uint8_t d[2];
  std::uint8_t m[2];
  std::uint8_t qs[kQk / 2];
};
struct BlockQ5_0 {
  std::uint8_t d[2];
  std::uint8_t qh[4];
  std::uint8_t qs[kQk / 2];
};
struct BlockQ5_1 {
  std::uint8_t d[2];
  std::uint8_t m[2];
  std::uint8_t qh[4];
  std::uint8_t qs[kQk / 2];
};
struct BlockQ8_0 {
  std::uint8_t d[2];
  std::uint8_t qs[kQk];  // int8 two's complement
};
struct BlockQ4_K {
  std::uint8_t d[2];
  std::uint8_t dmin[2];
  std::uint8_t scales[12];
  std::uint8_t qs[kQkK / 2];
};
struct BlockQ5_K {
  std::uint8_t d[2];
  std::uint8_t dmin[2];
  std::uint8_t scales[12];
  std::uint8_t qh[kQkK / 8];
  std::uint8_t qs[kQkK / 2];
};
struct BlockQ6_K {
  std::uint8_t ql[kQkK / 2];
  std::uint8_t qh[kQkK / 4];
  std::uint8_t scales[kQkK / 16];  // int8 two's complement
  std::uint8_t d[2];               // last, unlike Q4_K and Q5_K
};
static_assert(sizeof(BlockQ4_0) == 18 && alignof(BlockQ4_0) == 1);
static_assert(sizeof(BlockQ4_1) == 20 && alignof(BlockQ4_1) == 1);
static_assert(sizeof(BlockQ5_0) == 22 && alignof(BlockQ5_0) == 1);
static_assert(sizeof(BlockQ5_1) == 24 && alignof(BlockQ5_1) == 1);
static_assert(sizeof(BlockQ8_0) == 34 && alignof(BlockQ8_0) == 1);
static_assert(sizeof(BlockQ4_K) == 144 && alignof(BlockQ4_K) == 1);
static_assert(sizeof(BlockQ5_K) == 176 && alignof(BlockQ5_K) == 1);
static_assert(sizeof(BlockQ6_K) == 210 && alignof(BlockQ6_K) == 1);

constexpr GgmlTypeTraits kUnknownTraits{"unknown", 0, 0, false};

// Indexed by type id; a zero block size marks a retired or unused id. Sizes from ggml.h and
// ggml-common.h, cross-checked with gguf-py 0.19's GGML_QUANT_SIZES.
constexpr std::array<GgmlTypeTraits, 42> kTraits = {{
    {"F32", 1, 4, true},        // 0
    {"F16", 1, 2, true},        // 1
    {"Q4_0", 32, 18, true},     // 2
    {"Q4_1", 32, 20, true},     // 3
    kUnknownTraits,             // 4: retired Q4_2
    kUnknownTraits,             // 5: retired Q4_3
    {"Q5_0", 32, 22, true},     // 6
    {"Q5_1", 32, 24, true},     // 7
    {"Q8_0", 32, 34, true},     // 8
    {"Q8_1", 32, 36, false},    // 9
    {"Q2_K", 256, 84, false},   // 10
    {"Q3_K", 256, 110, false},  // 11
    {"Q4_K", 256, 144, true},   // 12
    {"Q5_K", 256, 176, true},   // 13
    {"Q6_K", 256, 210, true},   // 14
    {"Q8_K", 256, 292, false},  // 15
    {"IQ2_XXS", 256, 66, false},
    {"IQ2_XS", 256, 74, false},
    {"IQ3_XXS", 256, 98, false},
    {"IQ1_S", 256, 50, false},
    {"IQ4_NL", 32, 18, false},  // 20
    {"IQ3_S", 256, 110, false},
    {"IQ2_S", 256, 82, false},
    {"IQ4_XS", 256, 136, false},
    {"I8", 1, 1, false},        // 24
    {"I16", 1, 2, false},
    {"I32", 1, 4, false},
    {"I64", 1, 8, false},
    {"F64", 1, 8, false},       // 28
    {"IQ1_M", 256, 56, false},
    {"BF16", 1, 2, true},       // 30
    kUnknownTraits,             // 31: retired Q4_0_4_4
    kUnknownTraits,             // 32: retired Q4_0_4_8
    kUnknownTraits,             // 33: retired Q4_0_8_8
    {"TQ1_0", 256, 54, false},  // 34
    {"TQ2_0", 256, 66, false},  // 35
    kUnknownTraits,             // 36: retired IQ4_NL_4_4
    kUnknownTraits,             // 37: retired IQ4_NL_4_8
    kUnknownTraits,             // 38: retired IQ4_NL_8_8
    {"MXFP4", 32, 17, false},   // 39
    {"NVFP4", 64, 36, false},   // 40
    {"Q1_0", 128, 18, false},   // 41
}};

float load_fp16(const std::uint8_t* bytes) noexcept {
  return fp16_to_fp32(static_cast<std::uint16_t>(bytes[0] | (bytes[1] << 8)));
}

// Q4_0 and Q4_1: byte j holds element j in the low nibble and element j + 16 in the high one.
//     qs[j]:  [ 7 6 5 4 | 3 2 1 0 ]
//              elem j+16   elem j
void dequantize_q4_0(const BlockQ4_0* blocks, float* y, std::int64_t n_blocks) noexcept {
  for (std::int64_t b = 0; b < n_blocks; ++b, y += kQk) {
    const BlockQ4_0& block = blocks[b];
    const float d = load_fp16(block.d);
    for (int j = 0; j < kQk / 2; ++j) {
      y[j] = d * static_cast<float>((block.qs[j] & 0x0f) - 8);
      y[j + kQk / 2] = d * static_cast<float>((block.qs[j] >> 4) - 8);
    }
  }
}

void dequantize_q4_1(const BlockQ4_1* blocks, float* y, std::int64_t n_blocks) noexcept {
  for (std::int64_t b = 0; b < n_blocks; ++b, y += kQk) {
    const BlockQ4_1& block = blocks[b];
    const float d = load_fp16(block.d);
    const float m = load_fp16(block.m);
    for (int j = 0; j < kQk / 2; ++j) {
      y[j] = d * static_cast<float>(block.qs[j] & 0x0f) + m;
      y[j + kQk / 2] = d * static_cast<float>(block.qs[j] >> 4) + m;
    }
  }
}

// Q5_0 and Q5_1: the nibbles as in Q4_0; bit i of the little-endian u32 `qh` is the fifth bit
// of element i (i = 0..31).
std::uint32_t load_u32(const std::uint8_t* bytes) noexcept {
  return static_cast<std::uint32_t>(bytes[0]) | (static_cast<std::uint32_t>(bytes[1]) << 8) |
         (static_cast<std::uint32_t>(bytes[2]) << 16) |
         (static_cast<std::uint32_t>(bytes[3]) << 24);
}

void dequantize_q5_0(const BlockQ5_0* blocks, float* y, std::int64_t n_blocks) noexcept {
  for (std::int64_t b = 0; b < n_blocks; ++b, y += kQk) {
    const BlockQ5_0& block = blocks[b];
    const float d = load_fp16(block.d);
    const std::uint32_t qh = load_u32(block.qh);
    for (int j = 0; j < kQk / 2; ++j) {
      const auto high_lo = static_cast<int>(((qh >> j) & 1u) << 4);
      const auto high_hi = static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      y[j] = d * static_cast<float>(((block.qs[j] & 0x0f) | high_lo) - 16);
      y[j + kQk / 2] = d * static_cast<float>(((block.qs[j] >> 4) | high_hi) - 16);
    }
  }
}

void dequantize_q5_1(const BlockQ5_1* blocks, float* y, std::int64_t n_blocks) noexcept {
  for (std::int64_t b = 0; b < n_blocks; ++b, y += kQk) {
    const BlockQ5_1& block = blocks[b];
    const float d = load_fp16(block.d);
    const float m = load_fp16(block.m);
    const std::uint32_t qh = load_u32(block.qh);
    for (int j = 0; j < kQk / 2; ++j) {
      const auto high_lo = static_cast<int>(((qh >> j) & 1u) << 4);
      const auto high_hi = static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
      y[j] = d * static_cast<float>((block.qs[j] & 0x0f) | high_lo) + m;
      y[j + kQk / 2] = d * static_cast<float>((block.qs[j] >> 4) | high_hi) + m;
    }
  }
}

void dequantize_q8_0(const BlockQ8_0* blocks, float* y, std::int64_t n_blocks) noexcept {
  for (std::int64_t b = 0; b < n_blocks; ++b, y += kQk) {
    const BlockQ8_0& block = blocks[b];
    const float d = load_fp16(block.d);
    for (int j = 0; j < kQk; ++j) {
      y[j] = static_cast<float>(static_cast<std::int8_t>(block.qs[j])) * d;
    }
  }
}

// The eight 6-bit scales and eight 6-bit mins of Q4_K and Q5_K, packed in 12 bytes:
//   j < 4:  scale = scales[j] & 63,  min = scales[j + 4] & 63
//   j >= 4: scale = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4,
//           min   = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4
void unpack_k_scales(const std::uint8_t* scales, std::uint8_t* sc, std::uint8_t* mn) noexcept {
  for (int j = 0; j < 4; ++j) {
    sc[j] = scales[j] & 63;
    mn[j] = scales[j + 4] & 63;
  }
  for (int j = 4; j < 8; ++j) {
    sc[j] = static_cast<std::uint8_t>((scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4));
    mn[j] = static_cast<std::uint8_t>((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
  }
}

// Q4_K: 8 sub-blocks of 32. The 128 bytes of qs are four 32-byte chunks; chunk c holds
// sub-block 2c in its low nibbles and sub-block 2c + 1 in its high nibbles:
//     qs[32c + l]:  [ 7 6 5 4 | 3 2 1 0 ]
//                   elem 64c+32+l  elem 64c+l
// y = (d * sc[s]) * q - (dmin * mn[s]).
void dequantize_q4_k(const BlockQ4_K* blocks, float* y, std::int64_t n_blocks) noexcept {
  for (std::int64_t b = 0; b < n_blocks; ++b, y += kQkK) {
    const BlockQ4_K& block = blocks[b];
    const float d = load_fp16(block.d);
    const float dmin = load_fp16(block.dmin);
    std::uint8_t sc[8];
    std::uint8_t mn[8];
    unpack_k_scales(block.scales, sc, mn);
    for (int c = 0; c < 4; ++c) {
      const float d_lo = d * static_cast<float>(sc[2 * c]);
      const float m_lo = dmin * static_cast<float>(mn[2 * c]);
      const float d_hi = d * static_cast<float>(sc[2 * c + 1]);
      const float m_hi = dmin * static_cast<float>(mn[2 * c + 1]);
      const std::uint8_t* qs = block.qs + 32 * c;
      float* out = y + 64 * c;
      for (int l = 0; l < 32; ++l) {
        out[l] = d_lo * static_cast<float>(qs[l] & 0x0f) - m_lo;
        out[l + 32] = d_hi * static_cast<float>(qs[l] >> 4) - m_hi;
      }
    }
  }
}

// Q5_K: the nibbles and scales of Q4_K, plus a fifth bit per element: bit s of qh[l] belongs
// to element l of sub-block s (element 32s + l of the super-block), s = 0..7, l = 0..31.
// Checked against ggml's dequantize_row_q5_K (ggml-quants.c), which walks qh with a mask
// that doubles per sub-block, and against gguf-py 0.19's Q5_K.dequantize_blocks.
void dequantize_q5_k(const BlockQ5_K* blocks, float* y, std::int64_t n_blocks) noexcept {
  for (std::int64_t b = 0; b < n_blocks; ++b, y += kQkK) {
    const BlockQ5_K& block = blocks[b];
    const float d = load_fp16(block.d);
    const float dmin = load_fp16(block.dmin);
    std::uint8_t sc[8];
    std::uint8_t mn[8];
    unpack_k_scales(block.scales, sc, mn);
    for (int c = 0; c < 4; ++c) {
      const float d_lo = d * static_cast<float>(sc[2 * c]);
      const float m_lo = dmin * static_cast<float>(mn[2 * c]);
      const float d_hi = d * static_cast<float>(sc[2 * c + 1]);
      const float m_hi = dmin * static_cast<float>(mn[2 * c + 1]);
      const std::uint8_t* qs = block.qs + 32 * c;
      float* out = y + 64 * c;
      for (int l = 0; l < 32; ++l) {
        const int high_lo = ((block.qh[l] >> (2 * c)) & 1) << 4;
        const int high_hi = ((block.qh[l] >> (2 * c + 1)) & 1) << 4;
        out[l] = d_lo * static_cast<float>((qs[l] & 0x0f) | high_lo) - m_lo;
        out[l + 32] = d_hi * static_cast<float>((qs[l] >> 4) | high_hi) - m_hi;
      }
    }
  }
}

// Q6_K: 16 sub-blocks of 16 with int8 scales, in two halves of 128 elements. In half h, for
// l = 0..31, ql[64h + l] and ql[64h + l + 32] give the low 4 bits and the four 2-bit fields of
// qh[32h + l] the high 2 bits of elements 128h + l + {0, 32, 64, 96}:
//     qh[32h + l]:  [ 7 6 | 5 4 | 3 2 | 1 0 ]
//                   +96   +64   +32   +0
// y = (d * scales[s]) * (q - 32) with s = element / 16.
void dequantize_q6_k(const BlockQ6_K* blocks, float* y, std::int64_t n_blocks) noexcept {
  for (std::int64_t b = 0; b < n_blocks; ++b, y += kQkK) {
    const BlockQ6_K& block = blocks[b];
    const float d = load_fp16(block.d);
    float scale[16];
    for (int s = 0; s < 16; ++s) {
      scale[s] = d * static_cast<float>(static_cast<std::int8_t>(block.scales[s]));
    }
    for (int h = 0; h < 2; ++h) {
      const std::uint8_t* ql = block.ql + 64 * h;
      const std::uint8_t* qh = block.qh + 32 * h;
      float* out = y + 128 * h;
      const float* sc = scale + 8 * h;
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = sc[is] * static_cast<float>(q1);
        out[l + 32] = sc[is + 2] * static_cast<float>(q2);
        out[l + 64] = sc[is + 4] * static_cast<float>(q3);
        out[l + 96] = sc[is + 6] * static_cast<float>(q4);
      }
    }
  }
}

template <class Block>
const Block* as_blocks(const std::byte* src) noexcept {
  return reinterpret_cast<const Block*>(src);
}

}  // namespace

std::optional<GgmlTypeTraits> ggml_type_traits(std::uint32_t id) noexcept {
  if (id >= kTraits.size() || kTraits[id].block_size == 0) return std::nullopt;
  return kTraits[id];
}

GgmlTypeTraits ggml_type_traits(GgmlType type) {
  const auto traits = ggml_type_traits(static_cast<std::uint32_t>(type));
  if (!traits) {
    raise<InvalidArgument>("[ggml_type_traits] unknown ggml type: got id {}, expected one of "
                           "the GgmlType enumerators",
                           static_cast<std::uint32_t>(type));
  }
  return *traits;
}

std::string_view to_string(GgmlType type) noexcept {
  const auto traits = ggml_type_traits(static_cast<std::uint32_t>(type));
  return traits ? traits->name : kUnknownTraits.name;
}

void dequantize_ggml(GgmlType type, const std::byte* src, float* dst, std::int64_t n) noexcept {
  switch (type) {
    case GgmlType::f32:
      std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
      return;
    case GgmlType::f16:
      for (std::int64_t i = 0; i < n; ++i) {
        std::uint16_t bits;
        std::memcpy(&bits, src + 2 * i, sizeof bits);
        dst[i] = fp16_to_fp32(bits);
      }
      return;
    case GgmlType::bf16:
      for (std::int64_t i = 0; i < n; ++i) {
        std::uint16_t bits;
        std::memcpy(&bits, src + 2 * i, sizeof bits);
        dst[i] = bf16_to_fp32(bits);
      }
      return;
    case GgmlType::q4_0:
      return dequantize_q4_0(as_blocks<BlockQ4_0>(src), dst, n / kQk);
    case GgmlType::q4_1:
      return dequantize_q4_1(as_blocks<BlockQ4_1>(src), dst, n / kQk);
    case GgmlType::q5_0:
      return dequantize_q5_0(as_blocks<BlockQ5_0>(src), dst, n / kQk);
    case GgmlType::q5_1:
      return dequantize_q5_1(as_blocks<BlockQ5_1>(src), dst, n / kQk);
    case GgmlType::q8_0:
      return dequantize_q8_0(as_blocks<BlockQ8_0>(src), dst, n / kQk);
    case GgmlType::q4_k:
      return dequantize_q4_k(as_blocks<BlockQ4_K>(src), dst, n / kQkK);
    case GgmlType::q5_k:
      return dequantize_q5_k(as_blocks<BlockQ5_K>(src), dst, n / kQkK);
    case GgmlType::q6_k:
      return dequantize_q6_k(as_blocks<BlockQ6_K>(src), dst, n / kQkK);
    default:
      // Callers check can_dequantize first; an unsupported type leaves dst untouched.
      return;
  }
}

}  // namespace qlora
