// Group-wise INT4 / INT8 quantization (rules in int_quant.hpp). Compiled with
// -ffp-contract=off so that scale * u + min is a multiply then an add, never a fused FMA.
#include "qlora/quant/int_quant.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/quant/validate.hpp"

namespace qlora {
namespace {

// Round half to even for |x| < 2^22, the range of every quotient here (at most qmax or qpos
// plus rounding). Adding 1.5 * 2^23 moves x to where the float32 spacing is 1, so the add
// itself rounds to nearest even, and subtracting the constant back is exact. It gives the
// same result as std::nearbyint in the default rounding mode without a libm call.
inline float round_half_even(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
}

int qmax_of(QuantFormat format) { return format == QuantFormat::int4 ? 15 : 255; }
int qpos_of(QuantFormat format) { return format == QuantFormat::int4 ? 7 : 127; }

}  // namespace

AffineParams int_quantize_group_affine(std::span<const float> x, int qmax, std::uint8_t* u) {
  float lo = x[0];
  float hi = x[0];
  for (float v : x) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const float range = hi - lo;
  if (!std::isfinite(range)) {
    raise<InvalidArgument>(
        "[int_quantize] group range overflows float32: got min={}, max={}, expected max - min "
        "to be finite (hint: use the symmetric variant or rescale the weights)",
        lo, hi);
  }

  const float scale = range / static_cast<float>(qmax);
  if (scale == 0.0f) {
    std::fill(u, u + x.size(), std::uint8_t{0});
    return {0.0f, lo};
  }
  const float qmax_f = static_cast<float>(qmax);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float level = round_half_even((x[i] - lo) / scale);
    u[i] = static_cast<std::uint8_t>(std::clamp(level, 0.0f, qmax_f));
  }
  return {scale, lo};
}

float int_quantize_group_symmetric(std::span<const float> x, int qpos, std::int8_t* q) {
  float absmax = 0.0f;
  for (float v : x) absmax = std::max(absmax, std::fabs(v));

  const float scale = absmax / static_cast<float>(qpos);
  if (scale == 0.0f) {
    std::fill(q, q + x.size(), std::int8_t{0});
    return 0.0f;
  }
  const float qpos_f = static_cast<float>(qpos);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float level = round_half_even(x[i] / scale);
    q[i] = static_cast<std::int8_t>(std::clamp(level, -qpos_f, qpos_f));
  }
  return scale;
}

QuantizedMatrix int_quantize(ConstRefRowMatrixF weights, const QuantConfig& config) {
  const QuantFormat format = config.format;
  QLORA_CHECK_ARG(format == QuantFormat::int4 || format == QuantFormat::int8,
                  "[int_quantize] unsupported format: got {}, expected int4 or int8 (4 or 8 "
                  "bits)",
                  to_string(format));
  detail::check_weights(weights, "int_quantize");
  const std::int64_t cols = weights.cols();
  QLORA_CHECK_ARG(config.block_size >= 0,
                  "[int_quantize] negative group size: got {}, expected a divisor of in={} or 0 "
                  "for one group per row",
                  config.block_size, cols);
  const std::int64_t group = config.block_size == 0 ? cols : config.block_size;
  QLORA_CHECK_ARG(cols % group == 0,
                  "[int_quantize] group size does not divide the row: got in={}, group_size={}, "
                  "expected in % group_size == 0 (hint: 32, 64 and 128 are the usual sizes, 0 "
                  "means one group per row)",
                  cols, group);
  const bool is_4bit = format == QuantFormat::int4;
  QLORA_CHECK_ARG(!is_4bit || cols % 2 == 0,
                  "[int_quantize] odd row length for int4: got in={}, expected an even number "
                  "(two codes per byte within a row)",
                  cols);

  QuantizedMatrix q;
  q.format = format;
  q.rows = weights.rows();
  q.cols = cols;
  q.block_size = static_cast<int>(group);
  q.symmetric = config.symmetric;
  q.codes.resize(static_cast<std::size_t>(is_4bit ? q.rows * cols / 2 : q.rows * cols));
  q.scales.resize(static_cast<std::size_t>(q.n_blocks()));
  if (!q.symmetric) q.mins.resize(q.scales.size());

  // Unpacked codes of one row: u for affine, q + 8 (INT4) or q (INT8) for symmetric.
  std::vector<std::uint8_t> row_u(static_cast<std::size_t>(cols));
  const std::int64_t blocks_per_row = q.blocks_per_row();
  for (std::int64_t r = 0; r < q.rows; ++r) {
    const float* row = weights.row(r).data();
    for (std::int64_t b = 0; b < blocks_per_row; ++b) {
      const std::span<const float> x(row + b * group, static_cast<std::size_t>(group));
      std::uint8_t* u = row_u.data() + b * group;
      const auto index = static_cast<std::size_t>(r * blocks_per_row + b);
      if (q.symmetric) {
        auto* signed_codes = reinterpret_cast<std::int8_t*>(u);
        q.scales[index] = int_quantize_group_symmetric(x, qpos_of(format), signed_codes);
        if (is_4bit) {
          for (std::int64_t i = 0; i < group; ++i) {
            u[i] = static_cast<std::uint8_t>(signed_codes[i] + 8);
          }
        }
      } else {
        const AffineParams params = int_quantize_group_affine(x, qmax_of(format), u);
        q.scales[index] = params.scale;
        q.mins[index] = params.min;
      }
    }

    if (is_4bit) {
      std::uint8_t* packed = q.codes.data() + r * cols / 2;
      const std::uint8_t* u = row_u.data();
      for (std::int64_t j = 0; j < cols / 2; ++j) {
        packed[j] = static_cast<std::uint8_t>(u[2 * j] << 4 | u[2 * j + 1]);
      }
    } else {
      std::copy(row_u.begin(), row_u.end(), q.codes.data() + r * cols);
    }
  }
  return q;
}

namespace detail {

void int_dequantize_blocks(const QuantizedMatrix& q, std::int64_t row, std::int64_t block_begin,
                           std::int64_t block_end, float* out) {
  const std::int64_t bs = q.block_size;
  const bool is_4bit = q.format == QuantFormat::int4;
  for (std::int64_t b = block_begin; b < block_end; ++b) {
    const auto index = static_cast<std::size_t>(row * q.blocks_per_row() + b);
    const float scale = q.scales[index];
    const float lo = q.symmetric ? 0.0f : q.mins[index];
    float* dst = out + (b - block_begin) * bs;
    const std::int64_t first = row * q.cols + b * bs;  // flat index of the block's element 0

    if (is_4bit) {
      // Symmetric INT4 stores q + 8, so the table folds the offset of 8 into each level.
      float lut[16];
      for (int c = 0; c < 16; ++c) {
        lut[c] = q.symmetric ? scale * static_cast<float>(c - 8)
                             : scale * static_cast<float>(c) + lo;
      }
      const std::uint8_t* codes = q.codes.data();
      if (first % 2 == 0 && bs % 2 == 0) {
        // The block starts on a byte boundary: decode whole bytes.
        for (std::int64_t j = 0; j < bs / 2; ++j) {
          const std::uint8_t byte = codes[first / 2 + j];
          dst[2 * j] = lut[byte >> 4];
          dst[2 * j + 1] = lut[byte & 0x0F];
        }
      } else {
        for (std::int64_t i = 0; i < bs; ++i) {
          const std::int64_t k = first + i;
          const std::uint8_t byte = codes[k / 2];
          dst[i] = lut[(k % 2 == 0) ? (byte >> 4) : (byte & 0x0F)];
        }
      }
    } else if (q.symmetric) {
      const auto* codes = reinterpret_cast<const std::int8_t*>(q.codes.data()) + first;
      for (std::int64_t i = 0; i < bs; ++i) dst[i] = scale * static_cast<float>(codes[i]);
    } else {
      const std::uint8_t* codes = q.codes.data() + first;
      for (std::int64_t i = 0; i < bs; ++i) dst[i] = scale * static_cast<float>(codes[i]) + lo;
    }
  }
}

void int_dequantize_rows(const QuantizedMatrix& q, std::int64_t row_begin, std::int64_t row_end,
                         float* out) {
  for (std::int64_t r = row_begin; r < row_end; ++r) {
    int_dequantize_blocks(q, r, 0, q.blocks_per_row(), out + (r - row_begin) * q.cols);
  }
}

}  // namespace detail
}  // namespace qlora
