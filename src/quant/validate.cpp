// Consistency checks of QuantizedMatrix, storage accounting and the weight checks shared by
// the quantizers.
#include "qlora/quant/validate.hpp"

#include <cmath>
#include <cstddef>
#include <string_view>

#include "qlora/core/error.hpp"
#include "qlora/quant/nf4.hpp"

namespace qlora {

std::string_view to_string(QuantFormat format) {
  switch (format) {
    case QuantFormat::nf4:
      return "nf4";
    case QuantFormat::int4:
      return "int4";
    case QuantFormat::int8:
      return "int8";
  }
  return "unknown";
}

namespace {

bool is_power_of_two(int x) { return x > 0 && (x & (x - 1)) == 0; }

// Throws unless array `field` of `q` has `expected` elements; `rule` spells out the formula.
void check_size(const QuantizedMatrix& q, const char* field, std::size_t actual,
                std::int64_t expected, const char* rule) {
  if (static_cast<std::int64_t>(actual) == expected) return;
  raise<InvalidArgument>(
      "[validate] {} has the wrong size: got {}, expected {} = {} for {} [{}, {}] with "
      "block_size {} (hint: the matrix was built by hand or read from a damaged file)",
      field, actual, rule, expected, to_string(q.format), q.rows, q.cols, q.block_size);
}

}  // namespace

void validate(const QuantizedMatrix& q) {
  const bool known_format = q.format == QuantFormat::nf4 || q.format == QuantFormat::int4 ||
                            q.format == QuantFormat::int8;
  QLORA_CHECK_ARG(known_format, "[validate] unknown format: got {}, expected nf4, int4 or int8",
                  static_cast<int>(q.format));
  QLORA_CHECK_ARG(q.rows > 0 && q.cols > 0,
                  "[validate] empty matrix: got rows={}, cols={}, expected both > 0", q.rows,
                  q.cols);
  QLORA_CHECK_ARG(q.block_size > 0 && q.cols % q.block_size == 0,
                  "[validate] block_size does not divide cols: got block_size={}, cols={}, "
                  "expected cols % block_size == 0",
                  q.block_size, q.cols);

  const bool is_nf4 = q.format == QuantFormat::nf4;
  const bool is_4bit = q.format != QuantFormat::int8;
  if (is_nf4) {
    QLORA_CHECK_ARG(is_power_of_two(q.block_size) && q.block_size >= kNf4MinBlockSize &&
                        q.block_size <= kNf4MaxBlockSize,
                    "[validate] invalid nf4 block_size: got {}, expected a power of two from "
                    "{} to {}",
                    q.block_size, kNf4MinBlockSize, kNf4MaxBlockSize);
  }
  QLORA_CHECK_ARG(is_nf4 || !q.double_quant,
                  "[validate] double_quant is set on a {} matrix, expected it only on nf4",
                  to_string(q.format));
  QLORA_CHECK_ARG(!is_4bit || q.cols % 2 == 0,
                  "[validate] odd cols for a 4-bit format: got cols={}, expected an even number "
                  "(two codes per byte within a row)",
                  q.cols);

  const std::int64_t n = q.rows * q.cols;
  const std::int64_t n_blocks = q.n_blocks();
  check_size(q, "codes", q.codes.size(), is_4bit ? n / 2 : n,
             is_4bit ? "rows * cols / 2" : "rows * cols");

  if (is_nf4 && q.double_quant) {
    check_size(q, "scales", q.scales.size(), 0, "0 (double quantized)");
    check_size(q, "absmax_codes", q.absmax_codes.size(), n_blocks, "rows * cols / block_size");
    const std::int64_t n_nested = (n_blocks + kNf4NestedBlockSize - 1) / kNf4NestedBlockSize;
    check_size(q, "nested_absmax", q.nested_absmax.size(), n_nested,
               "ceil(rows * cols / block_size / 256)");
  } else {
    check_size(q, "scales", q.scales.size(), n_blocks, "rows * cols / block_size");
    check_size(q, "absmax_codes", q.absmax_codes.size(), 0, "0 (not double quantized)");
    check_size(q, "nested_absmax", q.nested_absmax.size(), 0, "0 (not double quantized)");
  }
  const bool has_mins = !is_nf4 && !q.symmetric;
  check_size(q, "mins", q.mins.size(), has_mins ? n_blocks : 0,
             has_mins ? "rows * cols / block_size" : "0 (no offsets in this format)");
}

double bits_per_weight(const QuantizedMatrix& q) {
  validate(q);
  double bits = 8.0 * static_cast<double>(q.codes.size());
  bits += 32.0 * static_cast<double>(q.scales.size() + q.mins.size() + q.nested_absmax.size());
  bits += 8.0 * static_cast<double>(q.absmax_codes.size());
  if (q.double_quant) bits += 32.0;  // nested_offset
  return bits / (static_cast<double>(q.rows) * static_cast<double>(q.cols));
}

namespace detail {

void check_weights(ConstRefRowMatrixF weights, const char* op) {
  QLORA_CHECK_ARG(weights.rows() > 0 && weights.cols() > 0,
                  "[{}] empty weight matrix: got [{}, {}], expected at least one row and one "
                  "column",
                  op, weights.rows(), weights.cols());
  for (Eigen::Index r = 0; r < weights.rows(); ++r) {
    const float* row = weights.row(r).data();
    for (Eigen::Index c = 0; c < weights.cols(); ++c) {
      if (!std::isfinite(row[c])) {
        raise<InvalidArgument>(
            "[{}] non-finite weight at row {}, column {}: got {}, expected a finite value "
            "(hint: the weights overflowed or were read incorrectly)",
            op, r, c, row[c]);
      }
    }
  }
}

}  // namespace detail
}  // namespace qlora
