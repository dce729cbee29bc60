// The shared helper that compares two float arrays and, on failure, reports the largest
// difference and where it is.
#pragma once

#include <cmath>
#include <cstddef>
#include <span>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace qlora::test {

/// The largest |actual - expected| and its index; index is npos when a size or NaN mismatches.
struct MaxDiff {
  double value = 0.0;
  std::size_t index = 0;
};

/**
 * Checks |actual[i] - expected[i]| <= abs_tol + rel_tol * |expected[i]| for every i. NaN must
 * match NaN. Reports the first violation's index and the largest difference over the arrays.
 */
template <class T, class U>
::testing::AssertionResult arrays_near(std::span<const T> actual, std::span<const U> expected,
                                       double abs_tol, double rel_tol = 0.0) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << fmt::format("size mismatch: actual {} vs expected {}", actual.size(),
                          expected.size());
  }
  MaxDiff max_diff;
  std::size_t n_bad = 0;
  std::size_t first_bad = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double a = static_cast<double>(actual[i]);
    const double e = static_cast<double>(expected[i]);
    if (std::isnan(a) || std::isnan(e)) {
      if (std::isnan(a) != std::isnan(e)) {
        if (n_bad++ == 0) first_bad = i;
      }
      continue;
    }
    const double diff = (a == e) ? 0.0 : std::abs(a - e);
    if (diff > max_diff.value) max_diff = {diff, i};
    if (diff > abs_tol + rel_tol * std::abs(e)) {
      if (n_bad++ == 0) first_bad = i;
    }
  }
  if (n_bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << fmt::format(
             "{} of {} elements differ; first at [{}]: actual {:.9g} vs expected {:.9g}; max "
             "|diff| {:.3g} at [{}] (abs_tol {:.3g}, rel_tol {:.3g})",
             n_bad, actual.size(), first_bad, static_cast<double>(actual[first_bad]),
             static_cast<double>(expected[first_bad]), max_diff.value, max_diff.index, abs_tol,
             rel_tol);
}

/// Checks that two arrays are equal element by element (bit patterns for integers).
template <class T>
::testing::AssertionResult arrays_equal(std::span<const T> actual, std::span<const T> expected) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << fmt::format("size mismatch: actual {} vs expected {}", actual.size(),
                          expected.size());
  }
  std::size_t n_bad = 0;
  std::size_t first_bad = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    if (!(actual[i] == expected[i])) {
      if (n_bad++ == 0) first_bad = i;
    }
  }
  if (n_bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << fmt::format("{} of {} elements differ; first at [{}]: actual {} vs expected {}",
                        n_bad, actual.size(), first_bad, +actual[first_bad],
                        +expected[first_bad]);
}

}  // namespace qlora::test
