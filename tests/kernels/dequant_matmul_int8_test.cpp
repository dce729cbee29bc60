// The int8-activation (q8) forward path: its error against the scalar fp32 reference within the
// stated bound, thread-count invariance, when dequant_matmul takes it, and its errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <vector>

#include <fmt/format.h>

#include "kernels/weights.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/kernels/matmul.hpp"
#include "qlora/quant/tables.hpp"
#include "support/compare.hpp"

namespace qlora {
namespace {

using test::Format;
using test::kFormats;
using test::random_floats;
using test::random_weight;

// Slack for fp32 rounding on top of the analytic bound, relative to sum_k |x_k * w_k| plus the
// magnitudes of the min terms and of the accumulated output (see kRelTol in
// dequant_matmul_test.cpp; the q8 path sums fewer, larger terms).
constexpr double kRoundingRelTol = 2e-5;
// The relative RMS error of the q8 path over all outputs of one shape, ||y - y_ref|| / ||y_ref||,
// on Gaussian activations (rms_error_on_gaussian_data). Measured 0.4 % to 0.7 % for the INT
// formats and 0.8 % for NF4 with AVX2 and AVX-512; a wrong code, scale or offset gives errors of
// order 100 %.
constexpr double kMaxRmsRelError = 0.02;

struct Shape {
  std::int64_t M;
  std::int64_t N;
  std::int64_t K;
  int block_size;
};

std::vector<Shape> int8_shapes(Isa isa) {
  std::vector<Shape> shapes = {
      {1, 1, 64, 64},    {1, 17, 128, 32},  {2, 9, 256, 128}, {3, 33, 192, 64},
      {4, 40, 512, 256}, {5, 7, 96, 32},    {16, 21, 320, 64}, {1, 70, 2048, 64},
      {7, 3, 4096, 4096},
  };
  if (isa == Isa::neon) shapes.push_back({2, 11, 80, 16});
  if (!test::quick()) {
    shapes.push_back({1, 300, 1024, 64});
    shapes.push_back({13, 65, 1536, 128});
  }
  return shapes;
}

/// Lists the available instruction sets that have q8 kernels (all but scalar).
std::vector<Isa> simd_isas() {
  std::vector<Isa> isas;
  for (const Isa isa : available_isas()) {
    if (isa != Isa::scalar) isas.push_back(isa);
  }
  return isas;
}

/// Returns the code value of element k of row n before scale and min, and the block's scale.
struct ElementCode {
  double code;   // NF4: the level in [-1, 1]; INT: the centred code c (u - 8, u - 128 or q)
  double scale;  // NF4: absmax; INT: the step
};

ElementCode element_code(const QuantizedMatrix& w, const std::vector<float>& scales,
                         std::int64_t n, std::int64_t k) {
  const std::int64_t block = n * w.blocks_per_row() + k / w.block_size;
  const double scale = scales[static_cast<std::size_t>(block)];
  if (w.format == QuantFormat::int8) {
    const std::uint8_t byte = w.codes[static_cast<std::size_t>(n * w.cols + k)];
    const int code = w.symmetric ? static_cast<std::int8_t>(byte) : byte - 128;
    return {static_cast<double>(code), scale};
  }
  const std::uint8_t byte = w.codes[static_cast<std::size_t>((n * w.cols + k) / 2)];
  const int nibble = k % 2 == 0 ? byte >> 4 : byte & 0x0f;
  if (w.format == QuantFormat::nf4) {
    return {kNf4Levels[static_cast<std::size_t>(nibble)], scale};
  }
  return {static_cast<double>(nibble - 8), scale};
}

/**
 * The bound on |y_q8 - y_fp32| of one output, as stated at qlora::set_int8_activations: per block
 * b, (max|x_b| / 254) * sum |w_k - m_eff| for the rounding of x, plus for NF4 (absmax / 254) *
 * sum |x_k| for the rounded code book (which also enlarges |w_k - m_eff| by up to absmax / 254).
 * Also returns, in `magnitude`, the sizes that fp32 rounding scales with.
 */
double int8_bound(const QuantizedMatrix& w, const std::vector<float>& scales,
                  const std::vector<float>& mins, const float* x_row, std::int64_t n,
                  double* magnitude) {
  const bool nf4 = w.format == QuantFormat::nf4;
  double bound = 0.0;
  double mag = 1e-30;
  for (std::int64_t b = 0; b < w.blocks_per_row(); ++b) {
    double amax = 0.0;
    double abs_x = 0.0;
    double centred = 0.0;
    double scale = 0.0;
    for (std::int64_t k = b * w.block_size; k < (b + 1) * w.block_size; ++k) {
      const ElementCode e = element_code(w, scales, n, k);
      scale = e.scale;
      amax = std::max(amax, std::abs(static_cast<double>(x_row[k])));
      abs_x += std::abs(x_row[k]);
      centred += std::abs(e.code * e.scale) + (nf4 ? std::abs(e.scale) / 254.0 : 0.0);
      mag += std::abs(x_row[k] * e.code * e.scale);
    }
    bound += amax / 254.0 * centred;
    if (nf4) bound += std::abs(scale) / 254.0 * abs_x;
    if (!mins.empty()) {
      const std::int64_t block = n * w.blocks_per_row() + b;
      const double centre = w.format == QuantFormat::int8 ? 128.0 : 8.0;
      mag += std::abs(mins[static_cast<std::size_t>(block)] + centre * scale) * abs_x;
    }
  }
  *magnitude = mag;
  return bound;
}

/// Decodes the block scales of w, including double-quantized absmax.
std::vector<float> decoded_scales(const QuantizedMatrix& w) {
  if (!w.double_quant) return w.scales;
  std::vector<float> scales(w.absmax_codes.size());
  for (std::size_t b = 0; b < scales.size(); ++b) {
    scales[b] = kDynamicMap[w.absmax_codes[b]] * w.nested_absmax[b / 256] + w.nested_offset;
  }
  return scales;
}

/// Makes activations with an outlier, a zero block and a wide range of magnitudes.
std::vector<float> hard_activations(std::int64_t M, std::int64_t K, std::uint32_t seed) {
  std::vector<float> x = random_floats(static_cast<std::size_t>(M * K), seed);
  x[0] *= 40.0f;
  if (K >= 128) std::fill(x.begin() + 64, x.begin() + 96, 0.0f);
  if (M * K > 200) x[199] = 1e-6f;
  return x;
}

TEST(dequant_matmul_int8, error_within_bound) {
  std::uint32_t seed = 500;
  for (const Isa isa : simd_isas()) {
    for (const Format& format : kFormats) {
      for (const Shape& s : int8_shapes(isa)) {
        const QuantizedMatrix w = random_weight(format, s.N, s.K, s.block_size, ++seed);
        const std::vector<float> scales = decoded_scales(w);
        const std::vector<float> x = hard_activations(s.M, s.K, ++seed);
        const std::vector<float> y0 = random_floats(static_cast<std::size_t>(s.M * s.N), ++seed);

        for (const bool accumulate : {false, true}) {
          std::vector<float> expected = y0;
          detail::dequant_matmul(Isa::scalar, x.data(), s.M, w, expected.data(), accumulate);
          std::vector<float> actual = y0;
          detail::dequant_matmul_int8(isa, x.data(), s.M, w, actual.data(), accumulate);

          for (std::int64_t m = 0; m < s.M; ++m) {
            for (std::int64_t n = 0; n < s.N; ++n) {
              const auto i = static_cast<std::size_t>(m * s.N + n);
              double mag = 0.0;
              const double bound = int8_bound(w, scales, w.mins, x.data() + m * s.K, n, &mag);
              const double slack = kRoundingRelTol * (mag + (accumulate ? std::abs(y0[i]) : 0.0));
              const double diff = std::abs(static_cast<double>(actual[i]) - expected[i]);
              ASSERT_LE(diff, bound + slack)
                  << fmt::format("{} {} M={} N={} K={} block_size={} accumulate={} at [{}, {}]: "
                                 "got {}, expected {}",
                                 to_string(isa), format.name, s.M, s.N, s.K, s.block_size,
                                 accumulate, m, n, actual[i], expected[i]);
            }
          }
        }
      }
    }
  }
}

TEST(dequant_matmul_int8, rms_error_on_gaussian_data) {
  const Shape shapes[] = {{1, 256, 1024, 64}, {4, 128, 2048, 32}, {16, 64, 4096, 128}};
  std::uint32_t seed = 550;
  for (const Isa isa : simd_isas()) {
    for (const Format& format : kFormats) {
      double worst = 0.0;
      for (const Shape& s : shapes) {
        const QuantizedMatrix w = random_weight(format, s.N, s.K, s.block_size, ++seed);
        const std::vector<float> x = random_floats(static_cast<std::size_t>(s.M * s.K), ++seed);
        std::vector<float> expected(static_cast<std::size_t>(s.M * s.N));
        std::vector<float> actual(expected.size());
        detail::dequant_matmul(Isa::scalar, x.data(), s.M, w, expected.data(), false);
        detail::dequant_matmul_int8(isa, x.data(), s.M, w, actual.data(), false);

        double err_sq = 0.0;
        double ref_sq = 0.0;
        for (std::size_t i = 0; i < expected.size(); ++i) {
          const double diff = static_cast<double>(actual[i]) - expected[i];
          err_sq += diff * diff;
          ref_sq += static_cast<double>(expected[i]) * expected[i];
        }
        const double rms = std::sqrt(err_sq / ref_sq);
        worst = std::max(worst, rms);
        EXPECT_LE(rms, kMaxRmsRelError)
            << fmt::format("{} {} M={} N={} K={} block_size={}", to_string(isa), format.name, s.M,
                           s.N, s.K, s.block_size);
      }
      std::printf("int8 activations, %s %s: relative RMS error up to %.4f\n",
                  std::string(to_string(isa)).c_str(), format.name, worst);
    }
  }
}

TEST(dequant_matmul_int8, thread_count_invariant) {
  const std::int64_t N = test::quick() ? 70 : 301;
  const std::int64_t K = test::quick() ? 256 : 1024;
  for (const Isa isa : simd_isas()) {
    for (const Format& format : kFormats) {
      const QuantizedMatrix w = random_weight(format, N, K, 64, 601);
      for (const std::int64_t M : {std::int64_t{1}, std::int64_t{3}, std::int64_t{16}}) {
        const std::vector<float> x = random_floats(static_cast<std::size_t>(M * K), 602);
        std::vector<float> one_thread(static_cast<std::size_t>(M * N));
        std::vector<float> two_threads(one_thread.size());
        set_num_threads(1);
        detail::dequant_matmul_int8(isa, x.data(), M, w, one_thread.data(), false);
        set_num_threads(2);
        detail::dequant_matmul_int8(isa, x.data(), M, w, two_threads.data(), false);
        set_num_threads(0);
        EXPECT_TRUE(test::arrays_equal(std::span<const float>(one_thread),
                                       std::span<const float>(two_threads)))
            << format.name << " " << to_string(isa) << " M=" << M;
      }
    }
  }
}

/// Restores the process-wide int8-activation setting when a test ends.
class Int8Setting {
 public:
  Int8Setting() : saved_(int8_activations()) {}
  ~Int8Setting() { set_int8_activations(saved_); }
  Int8Setting(const Int8Setting&) = delete;
  Int8Setting& operator=(const Int8Setting&) = delete;

 private:
  bool saved_;
};

TEST(dequant_matmul_int8, public_op_takes_path_when_on) {
  const Int8Setting restore;
  const QuantizedMatrix w = random_weight(kFormats[0], 19, 256, 64, 701);
  const std::int64_t max_rows = kInt8ActivationMaxRows;
  const std::vector<float> x = random_floats(static_cast<std::size_t>((max_rows + 1) * 256), 702);
  const Isa isa = select_isa();

  for (const std::int64_t M : {std::int64_t{1}, max_rows, max_rows + 1}) {
    std::vector<float> fp32(static_cast<std::size_t>(M * 19));
    set_int8_activations(false);
    detail::dequant_matmul(isa, x.data(), M, w, fp32.data(), false);
    std::vector<float> off(fp32.size());
    dequant_matmul(x.data(), M, w, off.data(), false);
    EXPECT_TRUE(test::arrays_equal(std::span<const float>(off), std::span<const float>(fp32)))
        << "off, M=" << M;

    set_int8_activations(true);
    EXPECT_TRUE(int8_activations());
    std::vector<float> on(fp32.size());
    dequant_matmul(x.data(), M, w, on.data(), false);
    if (isa == Isa::scalar || M > max_rows) {
      EXPECT_TRUE(test::arrays_equal(std::span<const float>(on), std::span<const float>(fp32)))
          << "on, fp32 expected, M=" << M << " " << to_string(isa);
    } else {
      std::vector<float> int8(fp32.size());
      detail::dequant_matmul_int8(isa, x.data(), M, w, int8.data(), false);
      EXPECT_TRUE(test::arrays_equal(std::span<const float>(on), std::span<const float>(int8)))
          << "on, int8 expected, M=" << M;
      EXPECT_FALSE(test::arrays_equal(std::span<const float>(on), std::span<const float>(fp32)))
          << "the int8 path gave the fp32 result bit for bit, M=" << M;
    }
  }
}

TEST(dequant_matmul_int8, backward_stays_fp32) {
  const Int8Setting restore;
  const QuantizedMatrix w = random_weight(kFormats[2], 23, 128, 32, 711);
  const std::vector<float> dy = random_floats(2 * 23, 712);
  std::vector<float> fp32(2 * 128);
  std::vector<float> on(2 * 128);
  set_int8_activations(false);
  dequant_matmul_backward(dy.data(), 2, w, fp32.data(), false);
  set_int8_activations(true);
  dequant_matmul_backward(dy.data(), 2, w, on.data(), false);
  EXPECT_TRUE(test::arrays_equal(std::span<const float>(on), std::span<const float>(fp32)));
}

TEST(dequant_matmul_int8, unsupported_block_size_uses_fp32) {
  const Int8Setting restore;
  // 40 is not a multiple of 16 or 32; 8192 is above the largest q8 block.
  const QuantizedMatrix w40 = random_weight(kFormats[4], 5, 80, 40, 722);
  const QuantizedMatrix w8192 = random_weight(kFormats[4], 3, 8192, 8192, 723);
  for (const QuantizedMatrix* w : {&w40, &w8192}) {
    const std::vector<float> x = random_floats(static_cast<std::size_t>(w->cols), 724);
    std::vector<float> fp32(static_cast<std::size_t>(w->rows));
    std::vector<float> on(fp32.size());
    set_int8_activations(false);
    dequant_matmul(x.data(), 1, *w, fp32.data(), false);
    set_int8_activations(true);
    dequant_matmul(x.data(), 1, *w, on.data(), false);
    EXPECT_TRUE(test::arrays_equal(std::span<const float>(on), std::span<const float>(fp32)))
        << "block_size=" << w->block_size;
    for (const Isa isa : simd_isas()) {
      EXPECT_THAT([&] { detail::dequant_matmul_int8(isa, x.data(), 1, *w, on.data(), false); },
                  ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr(
                      fmt::format("no int8-activation kernel for this weight: got isa={}, "
                                  "block_size={}",
                                  to_string(isa), w->block_size))));
    }
  }
}

TEST(dequant_matmul_int8, rejects_scalar_isa) {
  const QuantizedMatrix w = random_weight(kFormats[0], 4, 64, 64, 731);
  std::vector<float> x(64);
  std::vector<float> y(4);
  EXPECT_THAT([&] { detail::dequant_matmul_int8(Isa::scalar, x.data(), 1, w, y.data(), false); },
              ::testing::ThrowsMessage<InvalidArgument>(
                  ::testing::HasSubstr("got isa=scalar, block_size=64")));
}

TEST(dequant_matmul_int8, non_finite_input_gives_nan) {
  const QuantizedMatrix w = random_weight(kFormats[3], 6, 128, 64, 741);
  std::vector<float> x = random_floats(2 * 128, 742);
  x[70] = std::numeric_limits<float>::infinity();  // row 0, block 1
  x[128 + 5] = std::numeric_limits<float>::quiet_NaN();  // row 1, block 0
  for (const Isa isa : simd_isas()) {
    std::vector<float> y(2 * 6);
    detail::dequant_matmul_int8(isa, x.data(), 2, w, y.data(), false);
    for (std::size_t i = 0; i < y.size(); ++i) {
      EXPECT_TRUE(std::isnan(y[i])) << to_string(isa) << " output " << i << ": got " << y[i];
    }
  }
}

TEST(dequant_matmul_int8, reports_cpu_features) {
  // Records which q8 variant ran (NEON with or without dotprod, AVX-512 with or without VNNI),
  // so that logs of emulated runs show it.
  std::printf("cpu features: %s\n", to_string(cpu_features()).c_str());
  EXPECT_FALSE(simd_isas().empty());
}

}  // namespace
}  // namespace qlora
