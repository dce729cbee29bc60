// Random quantized weights and dense references for the dequant-matmul tests: the six stored
// formats, a dense decoder independent of the kernels, and error magnitudes per output.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <span>
#include <vector>

#include "qlora/core/matrix.hpp"
#include "qlora/kernels/ref/dequant_matmul.hpp"
#include "qlora/quant/quantized_matrix.hpp"
#include "qlora/quant/tables.hpp"

namespace qlora::test {

struct Format {
  QuantFormat format;
  bool symmetric;
  bool double_quant;
  const char* name;
};

inline constexpr Format kFormats[] = {
    {QuantFormat::nf4, false, false, "nf4"},
    {QuantFormat::nf4, false, true, "nf4_dq"},
    {QuantFormat::int4, false, false, "int4"},
    {QuantFormat::int4, true, false, "int4_sym"},
    {QuantFormat::int8, false, false, "int8"},
    {QuantFormat::int8, true, false, "int8_sym"},
};

/// Returns whether the tests run under an emulator (QLORA_TEST_QUICK set), with fewer shapes.
inline bool quick() { return std::getenv("QLORA_TEST_QUICK") != nullptr; }

/// Builds a [N, K] matrix of `format` with random codes, scales and mins.
inline QuantizedMatrix random_weight(const Format& format, std::int64_t N, std::int64_t K,
                              int block_size, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> scale_dist(0.5f, 1.5f);
  std::uniform_real_distribution<float> min_dist(-8.0f, 0.0f);
  QuantizedMatrix w;
  w.format = format.format;
  w.rows = N;
  w.cols = K;
  w.block_size = block_size;
  w.symmetric = format.symmetric;
  w.double_quant = format.double_quant;
  const bool four_bit = format.format != QuantFormat::int8;
  w.codes.resize(static_cast<std::size_t>(four_bit ? N * K / 2 : N * K));
  for (auto& byte : w.codes) {
    int value = static_cast<int>(rng() % 256);
    if (format.format == QuantFormat::int4 && format.symmetric) {
      // u = q + 8 with q in [-7, 7]: both nibbles in [1, 15].
      value = static_cast<int>((1 + rng() % 15) << 4 | (1 + rng() % 15));
    } else if (format.format == QuantFormat::int8 && format.symmetric) {
      value = static_cast<std::uint8_t>(static_cast<std::int8_t>(static_cast<int>(rng() % 255) - 127));
    }
    byte = static_cast<std::uint8_t>(value);
  }
  const auto n_blocks = static_cast<std::size_t>(w.n_blocks());
  if (format.double_quant) {
    w.absmax_codes.resize(n_blocks);
    for (auto& code : w.absmax_codes) code = static_cast<std::uint8_t>(rng() % 256);
    w.nested_absmax.resize((n_blocks + 255) / 256);
    for (auto& v : w.nested_absmax) v = scale_dist(rng);
    w.nested_offset = 0.7f;
  } else {
    w.scales.resize(n_blocks);
    const float step = format.format == QuantFormat::nf4 ? 1.0f : 0.1f;
    for (auto& v : w.scales) v = step * scale_dist(rng);
  }
  if (format.format != QuantFormat::nf4 && !format.symmetric) {
    w.mins.resize(n_blocks);
    for (auto& v : w.mins) v = min_dist(rng) * 0.1f;
  }
  return w;
}

/// Dequantizes w with the reference kernels' element decoder; unlike qlora::dequantize this
/// accepts every block size that the kernels accept (NF4 blocks of 48, for example).
inline RowMatrixF dense_weight(const QuantizedMatrix& w) {
  std::vector<float> scales = w.scales;
  if (w.double_quant) {
    scales.resize(w.absmax_codes.size());
    for (std::size_t b = 0; b < scales.size(); ++b) {
      scales[b] = kDynamicMap[w.absmax_codes[b]] * w.nested_absmax[b / 256] + w.nested_offset;
    }
  }

  kernels::WeightView view;
  view.codes = w.codes.data();
  view.scales = scales.data();
  // Decoded here with the table, independently of the kernels' block_scale.
  view.mins = w.mins.empty() ? nullptr : w.mins.data();
  view.N = w.rows;
  view.K = w.cols;
  view.block_size = w.block_size;

  RowMatrixF dense(w.rows, w.cols);
  for (std::int64_t n = 0; n < w.rows; ++n) {
    for (std::int64_t k = 0; k < w.cols; ++k) {
      switch (w.format) {
        case QuantFormat::nf4:
          dense(n, k) = kernels::ref::dequant_element<kernels::KernelFormat::nf4>(view, n, k);
          break;
        case QuantFormat::int4:
          dense(n, k) = w.symmetric
                            ? kernels::ref::dequant_element<kernels::KernelFormat::int4_sym>(view, n, k)
                            : kernels::ref::dequant_element<kernels::KernelFormat::int4>(view, n, k);
          break;
        case QuantFormat::int8:
          dense(n, k) = w.symmetric
                            ? kernels::ref::dequant_element<kernels::KernelFormat::int8_sym>(view, n, k)
                            : kernels::ref::dequant_element<kernels::KernelFormat::int8>(view, n, k);
          break;
      }
    }
  }
  return dense;
}

inline std::vector<float> random_floats(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

/// Returns out[i] / scale[i], so that a relative bound becomes an absolute one.
inline std::vector<double> normalized(std::span<const float> values, std::span<const double> scale) {
  std::vector<double> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = values[i] / scale[i];
  return out;
}

/// The magnitude sum_k |a[m, k] * w[n, k]| of each forward output, w dense [N, K].
inline std::vector<double> forward_magnitude(std::span<const float> x, const RowMatrixF& w,
                                      std::int64_t M) {
  std::vector<double> mag(static_cast<std::size_t>(M * w.rows()), 0.0);
  for (std::int64_t m = 0; m < M; ++m) {
    for (std::int64_t n = 0; n < w.rows(); ++n) {
      double sum = 1e-30;
      for (std::int64_t k = 0; k < w.cols(); ++k) {
        sum += std::abs(static_cast<double>(x[static_cast<std::size_t>(m * w.cols() + k)]) * w(n, k));
      }
      mag[static_cast<std::size_t>(m * w.rows() + n)] = sum;
    }
  }
  return mag;
}

/// The magnitude sum_n |dy[m, n] * w[n, k]| of each backward output.
inline std::vector<double> backward_magnitude(std::span<const float> dy, const RowMatrixF& w,
                                       std::int64_t M) {
  std::vector<double> mag(static_cast<std::size_t>(M * w.cols()), 1e-30);
  for (std::int64_t m = 0; m < M; ++m) {
    for (std::int64_t n = 0; n < w.rows(); ++n) {
      const double g = dy[static_cast<std::size_t>(m * w.rows() + n)];
      for (std::int64_t k = 0; k < w.cols(); ++k) {
        mag[static_cast<std::size_t>(m * w.cols() + k)] += std::abs(g * w(n, k));
      }
    }
  }
  return mag;
}

}  // namespace qlora::test
