// Parity of every compiled dequant-matmul variant with the scalar reference, for every format,
// both directions and awkward shapes; thread-count invariance; argument validation.
#include "qlora/kernels/matmul.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/kernels/ref/dequant_matmul.hpp"
#include "qlora/quant/quantize.hpp"
#include "kernels/weights.hpp"
#include "support/compare.hpp"

namespace qlora {
namespace {

using test::Format;
using test::kFormats;
using test::quick;
using test::random_weight;
using test::dense_weight;
using test::random_floats;
using test::normalized;
using test::forward_magnitude;
using test::backward_magnitude;

// Bound on |y - y_ref| relative to sum_k |x_k * w_k| for that output element. Each variant sums
// in float, in a different order from the double-precision reference; for K <= 1024 the float
// rounding error of such a sum stays below about K * 2^-24 = 6e-5 in the worst case and near
// sqrt(K) * 2^-24 in practice, while a wrong code, scale or index gives an error of order 1.
constexpr double kRelTol = 2e-5;
// The reference against x * dequantize(w) computed in double by the quantizer's own decoder:
// both sum in double, so only the float rounding of each product term differs.
constexpr double kRefRelTol = 1e-6;

struct Shape {
  std::int64_t M;
  std::int64_t N;
  std::int64_t K;
  int block_size;
};

std::vector<Shape> parity_shapes() {
  std::vector<Shape> shapes = {
      {1, 1, 64, 64},    {1, 3, 128, 64},  {1, 17, 96, 32},   {2, 17, 64, 64},
      {3, 5, 96, 48},    {4, 40, 256, 128}, {5, 3, 64, 16},   {7, 17, 128, 32},
      {13, 33, 192, 64}, {16, 64, 256, 64}, {33, 70, 320, 64}, {1, 70, 2048, 64},
      {2, 9, 64, 2},     {9, 31, 40, 8},
  };
  if (!quick()) {
    shapes.push_back({1, 300, 1024, 256});
    shapes.push_back({64, 100, 576, 64});
    shapes.push_back({130, 65, 260, 130});
  }
  return shapes;
}

std::string label(const Format& format, const Shape& s, Isa isa, bool backward) {
  return fmt::format("{} {} {} M={} N={} K={} block_size={}", backward ? "backward" : "forward",
                     format.name, to_string(isa), s.M, s.N, s.K, s.block_size);
}

TEST(dequant_matmul_ref, matches_dequantized_product) {
  const Shape shape{5, 17, 192, 64};
  for (const Format& format : kFormats) {
    const QuantizedMatrix w = random_weight(format, shape.N, shape.K, shape.block_size, 7);
    const RowMatrixF dense = dequantize(w);
    const std::vector<float> x = random_floats(static_cast<std::size_t>(shape.M * shape.K), 8);
    const std::vector<float> dy = random_floats(static_cast<std::size_t>(shape.M * shape.N), 9);

    std::vector<float> y(static_cast<std::size_t>(shape.M * shape.N));
    detail::dequant_matmul(Isa::scalar, x.data(), shape.M, w, y.data(), false);
    std::vector<float> expected(y.size());
    for (std::int64_t m = 0; m < shape.M; ++m) {
      for (std::int64_t n = 0; n < shape.N; ++n) {
        double sum = 0.0;
        for (std::int64_t k = 0; k < shape.K; ++k) {
          sum += static_cast<double>(x[static_cast<std::size_t>(m * shape.K + k)]) * dense(n, k);
        }
        expected[static_cast<std::size_t>(m * shape.N + n)] = static_cast<float>(sum);
      }
    }
    const std::vector<double> mag = forward_magnitude(x, dense, shape.M);
    EXPECT_TRUE(test::arrays_near(std::span<const double>(normalized(y, mag)),
                                  std::span<const double>(normalized(expected, mag)), kRefRelTol))
        << format.name;

    std::vector<float> dx(static_cast<std::size_t>(shape.M * shape.K));
    detail::dequant_matmul_backward(Isa::scalar, dy.data(), shape.M, w, dx.data(), false);
    std::vector<float> expected_dx(dx.size());
    for (std::int64_t m = 0; m < shape.M; ++m) {
      for (std::int64_t k = 0; k < shape.K; ++k) {
        double sum = 0.0;
        for (std::int64_t n = 0; n < shape.N; ++n) {
          sum += static_cast<double>(dy[static_cast<std::size_t>(m * shape.N + n)]) * dense(n, k);
        }
        expected_dx[static_cast<std::size_t>(m * shape.K + k)] = static_cast<float>(sum);
      }
    }
    const std::vector<double> mag_dx = backward_magnitude(dy, dense, shape.M);
    EXPECT_TRUE(test::arrays_near(std::span<const double>(normalized(dx, mag_dx)),
                                  std::span<const double>(normalized(expected_dx, mag_dx)),
                                  kRefRelTol))
        << format.name;
  }
}

/// Runs one direction with `isa` on a misaligned copy of the input, into a misaligned output.
std::vector<float> run(Isa isa, bool backward, const std::vector<float>& a, std::int64_t M,
                       const QuantizedMatrix& w, const std::vector<float>& c0, bool accumulate) {
  std::vector<float> a_buf(a.size() + 1);
  std::copy(a.begin(), a.end(), a_buf.begin() + 1);
  std::vector<float> c_buf(c0.size() + 3);
  std::copy(c0.begin(), c0.end(), c_buf.begin() + 3);
  if (backward) {
    detail::dequant_matmul_backward(isa, a_buf.data() + 1, M, w, c_buf.data() + 3, accumulate);
  } else {
    detail::dequant_matmul(isa, a_buf.data() + 1, M, w, c_buf.data() + 3, accumulate);
  }
  return {c_buf.begin() + 3, c_buf.end()};
}

void check_parity(bool backward) {
  // These bounds hold for the fp32 kernels; dequant_matmul_int8_test.cpp covers int8 activations.
  set_int8_activations(false);
  std::uint32_t seed = 100;
  for (const Format& format : kFormats) {
    for (const Shape& s : parity_shapes()) {
      if (format.format != QuantFormat::int8 && s.block_size % 2 != 0) continue;
      const QuantizedMatrix w = random_weight(format, s.N, s.K, s.block_size, ++seed);
      const RowMatrixF dense = dense_weight(w);
      const std::int64_t in_cols = backward ? s.N : s.K;
      const std::int64_t out_cols = backward ? s.K : s.N;
      const std::vector<float> a = random_floats(static_cast<std::size_t>(s.M * in_cols), ++seed);
      const std::vector<float> c0 = random_floats(static_cast<std::size_t>(s.M * out_cols), ++seed);
      std::vector<double> mag = backward ? backward_magnitude(a, dense, s.M)
                                         : forward_magnitude(a, dense, s.M);
      for (std::size_t i = 0; i < mag.size(); ++i) mag[i] += std::abs(c0[i]);

      for (const bool accumulate : {false, true}) {
        const std::vector<float> expected = run(Isa::scalar, backward, a, s.M, w, c0, accumulate);
        const std::vector<double> expected_n = normalized(expected, mag);
        for (const Isa isa : available_isas()) {
          if (isa == Isa::scalar) continue;
          const std::vector<float> actual = run(isa, backward, a, s.M, w, c0, accumulate);
          EXPECT_TRUE(test::arrays_near(std::span<const double>(normalized(actual, mag)),
                                        std::span<const double>(expected_n), kRelTol))
              << label(format, s, isa, backward) << " accumulate=" << accumulate;
        }
      }
    }
  }
}

TEST(dequant_matmul, forward_matches_ref) { check_parity(false); }

TEST(dequant_matmul, backward_matches_ref) { check_parity(true); }

TEST(dequant_matmul, has_simd_variant) {
  // Every CPU that CI runs on has at least one SIMD variant. A build that silently compiled
  // none would make the parity tests vacuous, so this test fails on it.
  EXPECT_GE(available_isas().size(), 2u) << to_string(cpu_features());
}

TEST(dequant_matmul, double_quant_equals_decoded_absmax) {
  const Format dq = kFormats[1];
  const QuantizedMatrix w = random_weight(dq, 20, 640, 64, 5);
  QuantizedMatrix plain = w;
  plain.double_quant = false;
  plain.scales = nf4_absmax(w);
  plain.absmax_codes.clear();
  plain.nested_absmax.clear();
  const std::vector<float> x = random_floats(3 * 640, 6);
  for (const Isa isa : available_isas()) {
    std::vector<float> y_dq(3 * 20);
    std::vector<float> y_plain(3 * 20);
    detail::dequant_matmul(isa, x.data(), 3, w, y_dq.data(), false);
    detail::dequant_matmul(isa, x.data(), 3, plain, y_plain.data(), false);
    EXPECT_TRUE(test::arrays_equal(std::span<const float>(y_dq), std::span<const float>(y_plain)))
        << to_string(isa);
  }
}

TEST(dequant_matmul, thread_count_invariant) {
  const std::int64_t N = quick() ? 70 : 300;
  const std::int64_t K = quick() ? 256 : 1024;
  for (const Format& format : kFormats) {
    const QuantizedMatrix w = random_weight(format, N, K, 64, 11);
    for (const std::int64_t M : {std::int64_t{1}, std::int64_t{3}, std::int64_t{37}}) {
      for (const bool backward : {false, true}) {
        const std::int64_t in_cols = backward ? N : K;
        const std::int64_t out_cols = backward ? K : N;
        const std::vector<float> a = random_floats(static_cast<std::size_t>(M * in_cols), 12);
        const std::vector<float> c0(static_cast<std::size_t>(M * out_cols), 0.0f);
        for (const Isa isa : available_isas()) {
          set_num_threads(1);
          const std::vector<float> one_thread = run(isa, backward, a, M, w, c0, false);
          set_num_threads(2);
          const std::vector<float> two_threads = run(isa, backward, a, M, w, c0, false);
          set_num_threads(0);
          EXPECT_TRUE(test::arrays_equal(std::span<const float>(one_thread),
                                         std::span<const float>(two_threads)))
              << format.name << " " << to_string(isa) << " M=" << M
              << (backward ? " backward" : " forward");
        }
      }
    }
  }
}

TEST(dequant_matmul, public_op_uses_selected_isa) {
  const QuantizedMatrix w = random_weight(kFormats[0], 9, 128, 64, 21);
  const std::vector<float> x = random_floats(2 * 128, 22);
  std::vector<float> y(2 * 9);
  std::vector<float> expected(2 * 9);
  dequant_matmul(x.data(), 2, w, y.data(), false);
  detail::dequant_matmul(select_isa(), x.data(), 2, w, expected.data(), false);
  EXPECT_TRUE(test::arrays_equal(std::span<const float>(y), std::span<const float>(expected)));
}

TEST(dequant_matmul, eigen_overloads_match_pointer_form) {
  const QuantizedMatrix w = random_weight(kFormats[2], 12, 64, 32, 31);
  const RowMatrixF x = RowMatrixF::Random(6, 64);
  RowMatrixF y(6, 12);
  dequant_matmul(x, w, y, false);
  std::vector<float> expected(6 * 12);
  dequant_matmul(x.data(), 6, w, expected.data(), false);
  EXPECT_TRUE(test::arrays_equal(std::span<const float>(y.data(), 72),
                                 std::span<const float>(expected)));

  const RowMatrixF dy = RowMatrixF::Random(6, 12);
  RowMatrixF dx(6, 64);
  dequant_matmul_backward(dy, w, dx, false);
  std::vector<float> expected_dx(6 * 64);
  dequant_matmul_backward(dy.data(), 6, w, expected_dx.data(), false);
  EXPECT_TRUE(test::arrays_equal(std::span<const float>(dx.data(), 384),
                                 std::span<const float>(expected_dx)));
}

TEST(dequant_matmul, rejects_block_size_not_dividing_in) {
  QuantizedMatrix w = random_weight(kFormats[2], 4, 64, 32, 41);
  w.block_size = 48;
  std::vector<float> x(64);
  std::vector<float> y(4);
  EXPECT_THAT([&] { dequant_matmul(x.data(), 1, w, y.data(), false); },
              ::testing::ThrowsMessage<InvalidArgument>(
                  ::testing::HasSubstr("block size does not divide the input dimension: got "
                                       "in=64, block_size=48")));
}

TEST(dequant_matmul, rejects_wrong_array_sizes) {
  QuantizedMatrix w = random_weight(kFormats[4], 4, 64, 32, 42);
  std::vector<float> x(64);
  std::vector<float> y(4);
  w.mins.pop_back();
  EXPECT_THAT([&] { dequant_matmul(x.data(), 1, w, y.data(), false); },
              ::testing::ThrowsMessage<InvalidArgument>(
                  ::testing::HasSubstr("min array size does not match the shape: got 7")));
  w = random_weight(kFormats[0], 4, 64, 32, 43);
  w.codes.resize(10);
  EXPECT_THAT([&] { dequant_matmul_backward(y.data(), 1, w, x.data(), false); },
              ::testing::ThrowsMessage<InvalidArgument>(
                  ::testing::HasSubstr("code array size does not match the shape: got 10")));
}

TEST(dequant_matmul, rejects_mismatched_eigen_shapes) {
  const QuantizedMatrix w = random_weight(kFormats[0], 8, 64, 64, 44);
  const RowMatrixF x = RowMatrixF::Zero(2, 32);
  RowMatrixF y(2, 8);
  EXPECT_THAT([&] { dequant_matmul(x, w, y, false); },
              ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr(
                  "shapes do not match: got x [2, 32], weight [8, 64], y [2, 8]")));
}

TEST(dequant_matmul, rejects_unavailable_isa) {
  const QuantizedMatrix w = random_weight(kFormats[0], 8, 64, 64, 45);
  std::vector<float> x(64);
  std::vector<float> y(8);
  for (const Isa isa : {Isa::avx2, Isa::avx512, Isa::neon}) {
    if (isa_available(isa)) continue;
    EXPECT_THAT([&] { detail::dequant_matmul(isa, x.data(), 1, w, y.data(), false); },
                ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr("is not available")));
  }
}

}  // namespace
}  // namespace qlora
