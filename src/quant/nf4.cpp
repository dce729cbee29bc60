// NF4 quantization and double quantization, step for step as bitsandbytes 0.50.2's reference
// backend does them (see nf4.hpp for the rules). Compiled with -ffp-contract=off so that no
// multiply-add is fused, which would change the float32 results.
#include "qlora/quant/nf4.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>

#include "qlora/core/error.hpp"
#include "qlora/quant/validate.hpp"

namespace qlora {
namespace {

// bitsandbytes clamps an absmax to at least this before taking its reciprocal, so an
// all-zero block quantizes to code 7 (exact zero). The float32 value is subnormal.
constexpr float kMinAbsmax = 1e-38f;

// Midpoints of adjacent kDynamicMap entries, computed in float32 as bitsandbytes does.
constexpr std::array<float, 255> dynamic_map_bounds() {
  std::array<float, 255> bounds{};
  for (std::size_t i = 0; i + 1 < kDynamicMap.size(); ++i) {
    bounds[i] = (kDynamicMap[i] + kDynamicMap[i + 1]) / 2.0f;
  }
  return bounds;
}

constexpr std::array<float, 255> kDynamicMapBounds = dynamic_map_bounds();

// torch.bucketize(s, bounds, right=False): the number of bounds strictly below s.
template <std::size_t N>
int count_bounds_below(const std::array<float, N>& bounds, float s) {
  return static_cast<int>(std::lower_bound(bounds.begin(), bounds.end(), s) - bounds.begin());
}

// The NF4 code of a normalised value s: the number of thresholds strictly below s, found by
// a branch-free binary search over the 15 sorted thresholds.
inline int nf4_code(float s) {
  int code = s > kNf4Thresholds[7] ? 8 : 0;
  code += s > kNf4Thresholds[static_cast<std::size_t>(code + 3)] ? 4 : 0;
  code += s > kNf4Thresholds[static_cast<std::size_t>(code + 1)] ? 2 : 0;
  code += s > kNf4Thresholds[static_cast<std::size_t>(code)] ? 1 : 0;
  return code;
}

// Quantizes one block x [n] (n even) into packed bytes [n / 2] and returns its absmax.
float quantize_block(const float* x, int n, std::uint8_t* packed) {
  float absmax = 0.0f;
  for (int i = 0; i < n; ++i) absmax = std::max(absmax, std::fabs(x[i]));

  const float inv = 1.0f / std::max(absmax, kMinAbsmax);
  for (int i = 0; i < n; i += 2) {
    const float s0 = std::clamp(x[i] * inv, -1.0f, 1.0f);
    const float s1 = std::clamp(x[i + 1] * inv, -1.0f, 1.0f);
    packed[i / 2] = static_cast<std::uint8_t>(nf4_code(s0) << 4 | nf4_code(s1));
  }
  return absmax;
}

bool is_power_of_two(int x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

float nf4_absmax_mean(std::span<const float> absmax) {
  QLORA_CHECK_ARG(!absmax.empty(), "[nf4_absmax_mean] empty absmax array, expected >= 1 value");
  double sum = 0.0;
  for (float a : absmax) sum += static_cast<double>(a);
  return static_cast<float>(sum / static_cast<double>(absmax.size()));
}

Nf4DoubleQuant nf4_double_quantize(std::span<const float> absmax, float offset) {
  QLORA_CHECK_ARG(!absmax.empty(), "[nf4_double_quantize] empty absmax array, expected >= 1");
  const std::size_t n = absmax.size();
  const std::size_t n_nested = (n + kNf4NestedBlockSize - 1) / kNf4NestedBlockSize;

  Nf4DoubleQuant dq;
  dq.nested_offset = offset;
  dq.absmax_codes.resize(n);
  dq.nested_absmax.resize(n_nested);

  std::array<float, kNf4NestedBlockSize> centred{};
  for (std::size_t nb = 0; nb < n_nested; ++nb) {
    const std::size_t begin = nb * kNf4NestedBlockSize;
    const std::size_t len = std::min<std::size_t>(kNf4NestedBlockSize, n - begin);

    float nested_absmax = 0.0f;
    for (std::size_t i = 0; i < len; ++i) {
      centred[i] = absmax[begin + i] - offset;
      nested_absmax = std::max(nested_absmax, std::fabs(centred[i]));
    }

    // bitsandbytes multiplies full blocks by a reciprocal but divides the shorter last block,
    // and stores the shorter block's absmax after clamping it to kMinAbsmax.
    const float denom = std::max(nested_absmax, kMinAbsmax);
    const float inv = 1.0f / denom;
    const bool full = len == static_cast<std::size_t>(kNf4NestedBlockSize);
    dq.nested_absmax[nb] = full ? nested_absmax : denom;
    for (std::size_t i = 0; i < len; ++i) {
      const float scaled = full ? centred[i] * inv : centred[i] / denom;
      const float s = std::clamp(scaled, -1.0f, 1.0f);
      dq.absmax_codes[begin + i] =
          static_cast<std::uint8_t>(count_bounds_below(kDynamicMapBounds, s));
    }
  }
  return dq;
}

QuantizedMatrix nf4_quantize(ConstRefRowMatrixF weights, const QuantConfig& config) {
  const int block_size = config.block_size;
  QLORA_CHECK_ARG(is_power_of_two(block_size) && block_size >= kNf4MinBlockSize &&
                      block_size <= kNf4MaxBlockSize,
                  "[nf4_quantize] invalid block size: got {}, expected a power of two from {} to "
                  "{} (hint: bitsandbytes uses 64)",
                  block_size, kNf4MinBlockSize, kNf4MaxBlockSize);
  detail::check_weights(weights, "nf4_quantize");
  QLORA_CHECK_ARG(weights.cols() % block_size == 0,
                  "[nf4_quantize] block size does not divide the row: got in={}, block_size={}, "
                  "expected in % block_size == 0 (hint: pick a smaller power of two)",
                  weights.cols(), block_size);

  QuantizedMatrix q;
  q.format = QuantFormat::nf4;
  q.rows = weights.rows();
  q.cols = weights.cols();
  q.block_size = block_size;
  q.double_quant = config.double_quant;
  q.codes.resize(static_cast<std::size_t>(q.rows * q.cols / 2));

  std::vector<float> absmax(static_cast<std::size_t>(q.n_blocks()));
  const std::int64_t blocks_per_row = q.blocks_per_row();
  for (std::int64_t r = 0; r < q.rows; ++r) {
    const float* row = weights.row(r).data();
    std::uint8_t* row_codes = q.codes.data() + r * q.cols / 2;
    for (std::int64_t b = 0; b < blocks_per_row; ++b) {
      absmax[static_cast<std::size_t>(r * blocks_per_row + b)] =
          quantize_block(row + b * block_size, block_size, row_codes + b * block_size / 2);
    }
  }

  if (config.double_quant) {
    Nf4DoubleQuant dq = nf4_double_quantize(absmax, nf4_absmax_mean(absmax));
    q.absmax_codes = std::move(dq.absmax_codes);
    q.nested_absmax = std::move(dq.nested_absmax);
    q.nested_offset = dq.nested_offset;
  } else {
    q.scales = std::move(absmax);
  }
  return q;
}

std::vector<float> nf4_absmax(const QuantizedMatrix& q) {
  validate(q);
  QLORA_CHECK_ARG(q.format == QuantFormat::nf4,
                  "[nf4_absmax] not an nf4 matrix: got format {}", to_string(q.format));
  if (!q.double_quant) return q.scales;

  std::vector<float> absmax(q.absmax_codes.size());
  for (std::size_t b = 0; b < absmax.size(); ++b) {
    const float decoded = kDynamicMap[q.absmax_codes[b]] * q.nested_absmax[b / kNf4NestedBlockSize];
    absmax[b] = decoded + q.nested_offset;
  }
  return absmax;
}

namespace detail {
namespace {

// The absmax of block `index` (flattened) of a validated NF4 matrix.
inline float block_absmax(const QuantizedMatrix& q, std::int64_t index) {
  const auto b = static_cast<std::size_t>(index);
  if (!q.double_quant) return q.scales[b];
  const float decoded = kDynamicMap[q.absmax_codes[b]] * q.nested_absmax[b / kNf4NestedBlockSize];
  return decoded + q.nested_offset;
}

}  // namespace

void nf4_dequantize_blocks(const QuantizedMatrix& q, std::int64_t row, std::int64_t block_begin,
                           std::int64_t block_end, float* out) {
  const std::int64_t bs = q.block_size;
  const std::uint8_t* row_codes = q.codes.data() + row * q.cols / 2;
  std::array<float, 16> lut{};
  for (std::int64_t b = block_begin; b < block_end; ++b) {
    const float absmax = block_absmax(q, row * q.blocks_per_row() + b);
    for (std::size_t c = 0; c < lut.size(); ++c) lut[c] = kNf4Levels[c] * absmax;

    const std::uint8_t* bytes = row_codes + b * bs / 2;
    float* dst = out + (b - block_begin) * bs;
    for (std::int64_t j = 0; j < bs / 2; ++j) {
      dst[2 * j] = lut[bytes[j] >> 4];
      dst[2 * j + 1] = lut[bytes[j] & 0x0F];
    }
  }
}

void nf4_dequantize_rows(const QuantizedMatrix& q, std::int64_t row_begin, std::int64_t row_end,
                         float* out) {
  for (std::int64_t r = row_begin; r < row_end; ++r) {
    nf4_dequantize_blocks(q, r, 0, q.blocks_per_row(), out + (r - row_begin) * q.cols);
  }
}

}  // namespace detail
}  // namespace qlora
