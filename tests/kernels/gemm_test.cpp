// Parity of every compiled fp32 GEMM variant with the scalar reference, over awkward shapes,
// all four transpose combinations, alpha, accumulation, row strides and misaligned pointers.
// Also thread-count invariance and argument validation.
#include "qlora/kernels/gemm.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <span>
#include <vector>

#include <fmt/format.h>

#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/detail/gemm_kernels.hpp"
#include "qlora/kernels/ref/gemm.hpp"
#include "support/compare.hpp"

namespace qlora {
namespace {

// Bound on |C - C_ref| relative to |alpha| sum_k |op(A)[m, k] op(B)[k, n]| + |C0[m, n]| for that
// element. Both sides sum K products in float, one with fused and one with separate roundings
// (and the transposed path scales op(B) instead of op(A) by alpha); for K <= 1024 the rounding
// error stays below about K * 2^-24 = 6e-5 in the worst case and near sqrt(K) * 2^-24 in
// practice, while a wrong index or a missed tail gives an error of order 1.
constexpr double kRelTol = 2e-5;
// The reference against the same products summed in double: only its float rounding differs.
constexpr double kRefRelTol = 2e-5;

struct Shape {
  std::int64_t M;
  std::int64_t N;
  std::int64_t K;
};

/// Returns whether the tests run under an emulator (QLORA_TEST_QUICK set), with fewer shapes.
bool quick() { return std::getenv("QLORA_TEST_QUICK") != nullptr; }

std::vector<Shape> parity_shapes() {
  // Sizes of 1, 3 and 17, non-multiples of every micro-tile (6 x 16, 12 x 32, 8 x 12), K across
  // the 256-step packing slice, N below the micro-tile width with M > N (the transposed path),
  // N over one column block (256 for AVX-512), and M of 1 to 4 (the dot-product path when
  // op(B) is transposed) with K tails after whole slices.
  std::vector<Shape> shapes = {
      {1, 1, 1},    {1, 3, 17},   {3, 1, 17},  {17, 17, 17}, {3, 17, 1},    {1, 70, 300},
      {70, 1, 300}, {5, 16, 64},  {40, 7, 33}, {16, 40, 96}, {13, 33, 257}, {25, 50, 513},
      {2, 9, 527},  {4, 33, 600},
  };
  if (!quick()) {
    shapes.push_back({130, 290, 70});
    shapes.push_back({200, 16, 96});
    shapes.push_back({37, 600, 20});
    shapes.push_back({64, 100, 576});
  }
  return shapes;
}

constexpr Transpose kTransposes[] = {Transpose::no, Transpose::yes};

/// A GEMM problem with its own storage: row strides larger than the rows and data starting one
/// float past an aligned address, so no kernel may assume alignment or dense rows.
struct Problem {
  Shape shape;
  Transpose op_a = Transpose::no;
  Transpose op_b = Transpose::no;
  float alpha = 1.0f;
  bool accumulate = false;
  std::int64_t lda = 0;
  std::int64_t ldb = 0;
  std::int64_t ldc = 0;
  std::vector<float> a;
  std::vector<float> b;
  std::vector<float> c0;  ///< C before the call; read only with accumulate

  static constexpr std::int64_t kOffset = 1;
  static constexpr std::int64_t kPad = 3;

  const float* a_data() const { return a.data() + kOffset; }
  const float* b_data() const { return b.data() + kOffset; }

  /// op(A)[m, k] and op(B)[k, n].
  double a_at(std::int64_t m, std::int64_t k) const {
    return op_a == Transpose::yes ? a_data()[k * lda + m] : a_data()[m * lda + k];
  }
  double b_at(std::int64_t k, std::int64_t n) const {
    return op_b == Transpose::yes ? b_data()[n * ldb + k] : b_data()[k * ldb + n];
  }

  /// Runs gemm_f32 with `isa` on a copy of c0 and returns C [M, N] densely.
  std::vector<float> run(Isa isa) const {
    std::vector<float> c = c0;
    detail::gemm_f32(isa, op_a, op_b, shape.M, shape.N, shape.K, alpha, a_data(), lda, b_data(),
                     ldb, accumulate, c.data() + kOffset, ldc);
    return dense_c(c);
  }

  std::vector<float> dense_c(const std::vector<float>& c) const {
    std::vector<float> out(static_cast<std::size_t>(shape.M * shape.N));
    for (std::int64_t m = 0; m < shape.M; ++m) {
      for (std::int64_t n = 0; n < shape.N; ++n) {
        out[static_cast<std::size_t>(m * shape.N + n)] = c[static_cast<std::size_t>(kOffset + m * ldc + n)];
      }
    }
    return out;
  }

  /// Returns the scale of each element's rounding error: |alpha| sum_k |a b| + |C0|.
  std::vector<double> error_scale() const {
    std::vector<double> scale(static_cast<std::size_t>(shape.M * shape.N));
    for (std::int64_t m = 0; m < shape.M; ++m) {
      for (std::int64_t n = 0; n < shape.N; ++n) {
        double sum = 0.0;
        for (std::int64_t k = 0; k < shape.K; ++k) sum += std::abs(a_at(m, k) * b_at(k, n));
        const double c = accumulate ? std::abs(c0[static_cast<std::size_t>(kOffset + m * ldc + n)]) : 0.0;
        scale[static_cast<std::size_t>(m * shape.N + n)] = std::abs(alpha) * sum + c + 1e-30;
      }
    }
    return scale;
  }

  /// Returns alpha * op(A) op(B) (+ C0) summed in double.
  std::vector<double> product_double() const {
    std::vector<double> out(static_cast<std::size_t>(shape.M * shape.N));
    for (std::int64_t m = 0; m < shape.M; ++m) {
      for (std::int64_t n = 0; n < shape.N; ++n) {
        double sum = 0.0;
        for (std::int64_t k = 0; k < shape.K; ++k) sum += a_at(m, k) * b_at(k, n);
        const double c = accumulate ? c0[static_cast<std::size_t>(kOffset + m * ldc + n)] : 0.0;
        out[static_cast<std::size_t>(m * shape.N + n)] = alpha * sum + c;
      }
    }
    return out;
  }
};

Problem make_problem(Shape shape, Transpose op_a, Transpose op_b, float alpha, bool accumulate,
                     std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  Problem p;
  p.shape = shape;
  p.op_a = op_a;
  p.op_b = op_b;
  p.alpha = alpha;
  p.accumulate = accumulate;
  const std::int64_t a_rows = op_a == Transpose::yes ? shape.K : shape.M;
  const std::int64_t a_cols = op_a == Transpose::yes ? shape.M : shape.K;
  const std::int64_t b_rows = op_b == Transpose::yes ? shape.N : shape.K;
  const std::int64_t b_cols = op_b == Transpose::yes ? shape.K : shape.N;
  p.lda = a_cols + Problem::kPad;
  p.ldb = b_cols + Problem::kPad;
  p.ldc = shape.N + Problem::kPad;
  const auto fill = [&](std::vector<float>& v, std::int64_t rows, std::int64_t stride) {
    v.resize(static_cast<std::size_t>(Problem::kOffset + rows * stride));
    for (float& x : v) x = uniform(rng);
  };
  fill(p.a, a_rows, p.lda);
  fill(p.b, b_rows, p.ldb);
  fill(p.c0, shape.M, p.ldc);
  return p;
}

/// Divides each element by its error scale, so that arrays_near's absolute bound is relative.
template <class T>
std::vector<double> scaled(const std::vector<T>& values, const std::vector<double>& scale) {
  std::vector<double> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = static_cast<double>(values[i]) / scale[i];
  return out;
}

std::string describe(const Problem& p, Isa isa) {
  return fmt::format("{} M={} N={} K={} op_a={} op_b={} alpha={} accumulate={}", to_string(isa),
                     p.shape.M, p.shape.N, p.shape.K, p.op_a == Transpose::yes ? "T" : "N",
                     p.op_b == Transpose::yes ? "T" : "N", p.alpha, p.accumulate);
}

TEST(gemm_ref, matches_double_product) {
  std::uint32_t seed = 1;
  for (const Shape& shape : parity_shapes()) {
    for (const Transpose op_a : kTransposes) {
      for (const Transpose op_b : kTransposes) {
        const Problem p = make_problem(shape, op_a, op_b, 0.75f, true, seed++);
        const std::vector<double> scale = p.error_scale();
        EXPECT_TRUE(test::arrays_near(std::span<const double>(scaled(p.run(Isa::scalar), scale)),
                                      std::span<const double>(scaled(p.product_double(), scale)),
                                      kRefRelTol))
            << describe(p, Isa::scalar);
      }
    }
  }
}

TEST(gemm_f32, every_isa_matches_ref) {
  std::uint32_t seed = 100;
  for (const Shape& shape : parity_shapes()) {
    for (const Transpose op_a : kTransposes) {
      for (const Transpose op_b : kTransposes) {
        for (const bool accumulate : {false, true}) {
          const float alpha = accumulate ? -0.5f : 1.0f;
          const Problem p = make_problem(shape, op_a, op_b, alpha, accumulate, seed++);
          const std::vector<double> scale = p.error_scale();
          const std::vector<double> expected = scaled(p.run(Isa::scalar), scale);
          for (const Isa isa : available_isas()) {
            EXPECT_TRUE(test::arrays_near(std::span<const double>(scaled(p.run(isa), scale)),
                                          std::span<const double>(expected), kRelTol))
                << describe(p, isa);
          }
        }
      }
    }
  }
}

TEST(gemm_f32, writes_only_inside_c) {
  // The padding between rows of C must keep its values.
  const Problem p = make_problem({13, 21, 40}, Transpose::no, Transpose::yes, 1.0f, false, 7);
  for (const Isa isa : available_isas()) {
    std::vector<float> c = p.c0;
    detail::gemm_f32(isa, p.op_a, p.op_b, p.shape.M, p.shape.N, p.shape.K, p.alpha, p.a_data(),
                     p.lda, p.b_data(), p.ldb, false, c.data() + Problem::kOffset, p.ldc);
    for (std::int64_t m = 0; m < p.shape.M; ++m) {
      for (std::int64_t j = p.shape.N; j < p.ldc; ++j) {
        const auto index = static_cast<std::size_t>(Problem::kOffset + m * p.ldc + j);
        if (index >= c.size()) continue;
        EXPECT_EQ(c[index], p.c0[index]) << to_string(isa) << " row " << m << " column " << j;
      }
    }
    EXPECT_EQ(c[0], p.c0[0]) << to_string(isa);
  }
}

TEST(gemm_f32, thread_count_invariant) {
  const std::vector<Shape> shapes = {{130, 290, 300}, {200, 16, 96}, {16, 600, 64},
                                     {64, 70, 513},   {1, 600, 300}, {4, 70, 513}};
  std::uint32_t seed = 500;
  for (const Shape& shape : shapes) {
    for (const Transpose op_a : kTransposes) {
      for (const Transpose op_b : kTransposes) {
        const Problem p = make_problem(shape, op_a, op_b, 0.25f, true, seed++);
        for (const Isa isa : available_isas()) {
          set_num_threads(1);
          const std::vector<float> one = p.run(isa);
          set_num_threads(2);
          const std::vector<float> two = p.run(isa);
          set_num_threads(3);
          const std::vector<float> three = p.run(isa);
          set_num_threads(0);
          EXPECT_TRUE(test::arrays_equal(std::span<const float>(two), std::span<const float>(one)))
              << describe(p, isa);
          EXPECT_TRUE(test::arrays_equal(std::span<const float>(three), std::span<const float>(one)))
              << describe(p, isa);
        }
      }
    }
  }
}

TEST(gemm_f32, nested_call_matches_top_level) {
  // Inside a parallel region the op runs on the calling thread; the result must not change.
  const Problem p = make_problem({70, 90, 130}, Transpose::yes, Transpose::no, 1.0f, false, 11);
  const std::vector<float> top = p.run(select_isa());
  std::vector<std::vector<float>> nested(4);
#pragma omp parallel for num_threads(2)
  for (int i = 0; i < 4; ++i) nested[static_cast<std::size_t>(i)] = p.run(select_isa());
  for (const std::vector<float>& result : nested) {
    EXPECT_TRUE(test::arrays_equal(std::span<const float>(result), std::span<const float>(top)));
  }
}

TEST(gemm_f32, zero_depth_zeroes_or_keeps_c) {
  std::vector<float> c(6, 5.0f);
  const float unused = 0.0f;
  gemm_f32(Transpose::no, Transpose::no, 2, 3, 0, 1.0f, &unused, 1, &unused, 3, true, c.data(), 3);
  EXPECT_THAT(c, ::testing::Each(5.0f));
  gemm_f32(Transpose::no, Transpose::no, 2, 3, 0, 1.0f, &unused, 1, &unused, 3, false, c.data(), 3);
  EXPECT_THAT(c, ::testing::Each(0.0f));
}

TEST(gemm_f32, eigen_form_matches_pointer_form) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  RowMatrixF big_a(40, 50);
  RowMatrixF b(30, 20);
  for (float& v : big_a.reshaped()) v = uniform(rng);
  for (float& v : b.reshaped()) v = uniform(rng);
  // a = a block with a row stride: op(a) = a^T [20, 30], op(b) = b [30, 20].
  const auto a = big_a.block(2, 5, 30, 20);
  RowMatrixF c = RowMatrixF::Constant(20, 20, 1.0f);
  gemm_f32(a, Transpose::yes, b, Transpose::no, c, 2.0f, true);

  std::vector<float> expected(400, 1.0f);
  gemm_f32(Transpose::yes, Transpose::no, 20, 20, 30, 2.0f, big_a.data() + 2 * 50 + 5, 50,
           b.data(), 20, true, expected.data(), 20);
  EXPECT_TRUE(test::arrays_equal(std::span<const float>(c.data(), 400),
                                 std::span<const float>(expected)));

  const RowMatrixF eigen = (2.0f * a.transpose() * b).array() + 1.0f;
  EXPECT_TRUE(test::arrays_near(std::span<const float>(c.data(), 400),
                                std::span<const float>(eigen.data(), 400), 1e-4));
}

TEST(gemm_f32, rejects_negative_size) {
  float x = 0.0f;
  EXPECT_THAT([&] { gemm_f32(Transpose::no, Transpose::no, -1, 2, 2, 1.0f, &x, 2, &x, 2, false, &x, 2); },
              ::testing::ThrowsMessage<InvalidArgument>(
                  ::testing::HasSubstr("sizes must not be negative: got M=-1, N=2, K=2")));
}

TEST(gemm_f32, rejects_short_row_stride) {
  std::vector<float> x(64);
  // op(A) = A^T with A stored [K=4, M=3]: its rows have 3 elements, so lda = 2 is too small.
  EXPECT_THAT([&] {
    gemm_f32(Transpose::yes, Transpose::no, 3, 2, 4, 1.0f, x.data(), 2, x.data(), 2, false,
             x.data() + 32, 2);
  },
              ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr(
                  "row stride of A is smaller than its row: got stride 2 for 3 stored columns")));
  EXPECT_THAT([&] {
    gemm_f32(Transpose::no, Transpose::no, 3, 5, 4, 1.0f, x.data(), 4, x.data(), 5, false,
             x.data() + 32, 4);
  },
              ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr(
                  "row stride of C is smaller than its row: got stride 4 for 5 stored columns")));
}

TEST(gemm_f32, rejects_null_pointer) {
  std::vector<float> x(16);
  EXPECT_THAT([&] {
    gemm_f32(Transpose::no, Transpose::no, 2, 2, 2, 1.0f, x.data(), 2, nullptr, 2, false,
             x.data() + 8, 2);
  },
              ::testing::ThrowsMessage<InvalidArgument>(
                  ::testing::HasSubstr("pointer to B is null for a stored [2, 2] matrix")));
}

TEST(gemm_f32, rejects_mismatched_eigen_shapes) {
  const RowMatrixF a = RowMatrixF::Zero(4, 3);
  const RowMatrixF b = RowMatrixF::Zero(4, 5);
  RowMatrixF c(4, 5);
  EXPECT_THAT([&] { gemm_f32(a, Transpose::no, b, Transpose::no, c); },
              ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr(
                  "shapes do not match: got a [4, 3] (transpose no), b [4, 5] (transpose no), "
                  "c [4, 5]")));
  RowMatrixF ct(3, 5);
  EXPECT_NO_THROW(gemm_f32(a, Transpose::yes, b, Transpose::no, ct));
}

TEST(gemm_f32, rejects_unavailable_isa) {
  float x = 0.0f;
  for (const Isa isa : {Isa::avx2, Isa::avx512, Isa::neon}) {
    if (isa_available(isa)) continue;
    EXPECT_THAT([&] { detail::gemm_f32(isa, Transpose::no, Transpose::no, 1, 1, 1, 1.0f, &x, 1, &x, 1, false, &x, 1); },
                ::testing::ThrowsMessage<InvalidArgument>(::testing::HasSubstr("is not available")));
  }
}

}  // namespace
}  // namespace qlora
