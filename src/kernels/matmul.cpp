#include "qlora/kernels/matmul.hpp"

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <string_view>
#include <vector>

#include "dequant_matmul_q8.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/detail/dequant_matmul_kernels.hpp"
#include "qlora/kernels/ref/dequant_matmul.hpp"

namespace qlora {
namespace kernels {
namespace {

#define QLORA_DEQUANT_MATMUL_TABLE(ns)                                                      \
  DequantMatmulTable {                                                                      \
    {&ns::dequant_matmul_nf4_f32, &ns::dequant_matmul_int4_f32,                             \
     &ns::dequant_matmul_int4_sym_f32, &ns::dequant_matmul_int8_f32,                        \
     &ns::dequant_matmul_int8_sym_f32},                                                     \
    {                                                                                       \
      &ns::dequant_matmul_backward_nf4_f32, &ns::dequant_matmul_backward_int4_f32,          \
          &ns::dequant_matmul_backward_int4_sym_f32, &ns::dequant_matmul_backward_int8_f32, \
          &ns::dequant_matmul_backward_int8_sym_f32                                         \
    }                                                                                       \
  }

const DequantMatmulTable kRefTable = QLORA_DEQUANT_MATMUL_TABLE(ref);
#ifdef QLORA_HAVE_AVX2
const DequantMatmulTable kAvx2Table = QLORA_DEQUANT_MATMUL_TABLE(avx2);
#endif
#ifdef QLORA_HAVE_AVX512
const DequantMatmulTable kAvx512Table = QLORA_DEQUANT_MATMUL_TABLE(avx512);
#endif
#ifdef QLORA_HAVE_NEON
const DequantMatmulTable kNeonTable = QLORA_DEQUANT_MATMUL_TABLE(neon);
#endif

#undef QLORA_DEQUANT_MATMUL_TABLE

}  // namespace

const DequantMatmulTable& dequant_matmul_table(Isa isa) {
  if (!isa_available(isa)) {
    raise<InvalidArgument>(
        "[dequant_matmul] instruction set {} is not available: this build and CPU support {} "
        "(hint: pick one of those)",
        to_string(isa), to_string(cpu_features()));
  }
  switch (isa) {
#ifdef QLORA_HAVE_AVX2
    case Isa::avx2:
      return kAvx2Table;
#endif
#ifdef QLORA_HAVE_AVX512
    case Isa::avx512:
      return kAvx512Table;
#endif
#ifdef QLORA_HAVE_NEON
    case Isa::neon:
      return kNeonTable;
#endif
    default:
      return kRefTable;
  }
}

/// Returns the q8 kernels for `isa`, or nullptr for scalar. AVX-512 without VNNI gets the AVX2
/// q8 kernels, and NEON the dotprod variant when the CPU has it.
const DequantMatmulQ8Table* q8_table(Isa isa) {
  switch (isa) {
#ifdef QLORA_HAVE_AVX2
    case Isa::avx2:
      return &avx2::kQ8Table;
#endif
#ifdef QLORA_HAVE_AVX512
    case Isa::avx512:
      if (cpu_features().avx512vnni) return &avx512::kQ8Table;
#ifdef QLORA_HAVE_AVX2
      return &avx2::kQ8Table;
#else
      return nullptr;
#endif
#endif
#ifdef QLORA_HAVE_NEON
    case Isa::neon:
      return cpu_features().dotprod ? &neon::kQ8DotprodTable : &neon::kQ8Table;
#endif
    default:
      return nullptr;
  }
}

/// Returns the weights per step of the q8 kernels of `isa`; the block size must be a multiple.
std::int64_t q8_step(Isa isa) { return isa == Isa::neon ? 16 : 32; }

}  // namespace kernels

namespace {

using kernels::KernelFormat;
using kernels::WeightView;

std::string_view format_name(const QuantizedMatrix& w) {
  switch (w.format) {
    case QuantFormat::nf4:
      return w.double_quant ? "nf4 (double quantized)" : "nf4";
    case QuantFormat::int4:
      return w.symmetric ? "int4 symmetric" : "int4 asymmetric";
    case QuantFormat::int8:
      return w.symmetric ? "int8 symmetric" : "int8 asymmetric";
  }
  return "unknown";
}

/// Checks that `w` is a consistent [rows, cols] matrix of its format; `op` names the caller.
void check_weight(std::string_view op, const QuantizedMatrix& w) {
  QLORA_CHECK_ARG(w.format == QuantFormat::nf4 || w.format == QuantFormat::int4 ||
                      w.format == QuantFormat::int8,
                  "[{}] unknown weight format: got {}, expected nf4, int4 or int8", op,
                  static_cast<int>(w.format));
  QLORA_CHECK_ARG(w.rows > 0 && w.cols > 0,
                  "[{}] weight shape must be positive: got [{}, {}] (hint: quantize a non-empty "
                  "matrix)",
                  op, w.rows, w.cols);
  QLORA_CHECK_ARG(w.block_size > 0 && w.cols % w.block_size == 0,
                  "[{}] block size does not divide the input dimension: got in={}, "
                  "block_size={}, expected in % block_size == 0 (hint: pick a block size that "
                  "divides in, such as 32 or 64)",
                  op, w.cols, w.block_size);
  const bool four_bit = w.format != QuantFormat::int8;
  QLORA_CHECK_ARG(!four_bit || w.block_size % 2 == 0,
                  "[{}] 4-bit blocks must have an even size: got block_size={} for {} (hint: "
                  "use 32, 64 or 128)",
                  op, w.block_size, format_name(w));

  const std::int64_t n_blocks = w.n_blocks();
  const std::int64_t code_bytes = four_bit ? w.rows * w.cols / 2 : w.rows * w.cols;
  QLORA_CHECK_ARG(static_cast<std::int64_t>(w.codes.size()) == code_bytes,
                  "[{}] code array size does not match the shape: got {} bytes for a [{}, {}] "
                  "{} matrix, expected {}",
                  op, w.codes.size(), w.rows, w.cols, format_name(w), code_bytes);
  if (w.format == QuantFormat::nf4 && w.double_quant) {
    const std::int64_t n_nested = (n_blocks + 255) / 256;
    QLORA_CHECK_ARG(static_cast<std::int64_t>(w.absmax_codes.size()) == n_blocks &&
                        static_cast<std::int64_t>(w.nested_absmax.size()) == n_nested,
                    "[{}] double-quantized absmax arrays do not match the shape: got {} codes "
                    "and {} nested absmax, expected {} and {}",
                    op, w.absmax_codes.size(), w.nested_absmax.size(), n_blocks, n_nested);
  } else {
    QLORA_CHECK_ARG(static_cast<std::int64_t>(w.scales.size()) == n_blocks,
                    "[{}] scale array size does not match the shape: got {}, expected {} "
                    "(rows * cols / block_size) for {}",
                    op, w.scales.size(), n_blocks, format_name(w));
  }
  if (w.format != QuantFormat::nf4 && !w.symmetric) {
    QLORA_CHECK_ARG(static_cast<std::int64_t>(w.mins.size()) == n_blocks,
                    "[{}] min array size does not match the shape: got {}, expected {} for {}",
                    op, w.mins.size(), n_blocks, format_name(w));
  }
}

KernelFormat kernel_format(const QuantizedMatrix& w) {
  switch (w.format) {
    case QuantFormat::nf4:
      return KernelFormat::nf4;
    case QuantFormat::int4:
      return w.symmetric ? KernelFormat::int4_sym : KernelFormat::int4;
    case QuantFormat::int8:
      return w.symmetric ? KernelFormat::int8_sym : KernelFormat::int8;
  }
  return KernelFormat::nf4;
}

/// Returns whether `isa` has q8 kernels for the block size of `w`.
bool q8_supported(Isa isa, const QuantizedMatrix& w) {
  return kernels::q8_table(isa) != nullptr && w.block_size % kernels::q8_step(isa) == 0 &&
         w.block_size <= kernels::kQ8MaxBlockSize;
}

// The int8-activation setting: -1 until QLORA_INT8_ACT is read, then 0 (off) or 1 (on).
std::atomic<int> g_int8_activations{-1};

/// Reads QLORA_INT8_ACT: unset or "1" is on, "0" is off. Only calls that allow it
/// (ActivationPrecision::automatic, up to kInt8ActivationMaxRows rows) ever use int8.
bool int8_activations_from_env() {
  const char* value = std::getenv("QLORA_INT8_ACT");
  if (value == nullptr) return true;
  const std::string_view text(value);
  QLORA_CHECK_ARG(text == "0" || text == "1",
                  "[dequant_matmul] invalid QLORA_INT8_ACT: got '{}', expected 0 or 1 (hint: 0 "
                  "keeps fp32 activations everywhere, 1 or unset allows int8 activations for "
                  "small inference batches)",
                  text);
  return text == "1";
}

enum class Direction { forward, backward };

/// The kernel path of one call.
enum class Path { automatic, fp32, int8 };

WeightView make_view(const QuantizedMatrix& w) {
  // Kernels decode double-quantized absmax per block (block_scale), so it is never expanded.
  WeightView view;
  view.codes = w.codes.data();
  view.scales = w.scales.empty() ? nullptr : w.scales.data();
  if (w.format == QuantFormat::nf4 && w.double_quant) {
    view.absmax_codes = w.absmax_codes.data();
    view.nested_absmax = w.nested_absmax.data();
    view.nested_offset = w.nested_offset;
  }
  view.mins = w.mins.empty() ? nullptr : w.mins.data();
  view.N = w.rows;
  view.K = w.cols;
  view.block_size = w.block_size;
  return view;
}

void run(Isa isa, Direction direction, const float* a, std::int64_t M, const QuantizedMatrix& w,
         float* c, bool accumulate, Path path = Path::automatic) {
  const std::string_view op =
      direction == Direction::forward ? "dequant_matmul" : "dequant_matmul_backward";
  check_weight(op, w);
  QLORA_CHECK_ARG(M >= 0, "[{}] row count must not be negative: got M={}", op, M);
  if (path == Path::int8) {
    QLORA_CHECK_ARG(q8_supported(isa, w),
                    "[dequant_matmul_int8] no int8-activation kernel for this weight: got "
                    "isa={}, block_size={}, expected a SIMD instruction set and a block size "
                    "that is a multiple of {} and at most {} (hint: use dequant_matmul)",
                    to_string(isa), w.block_size, kernels::q8_step(isa),
                    kernels::kQ8MaxBlockSize);
  }
  if (M == 0) return;
  QLORA_CHECK_ARG(a != nullptr && c != nullptr,
                  "[{}] input or output pointer is null with M={} rows (hint: pass the "
                  "activation and output buffers)",
                  op, M);
  const kernels::DequantMatmulTable& table = kernels::dequant_matmul_table(isa);
  const WeightView view = make_view(w);
  const auto index = static_cast<std::size_t>(kernel_format(w));

  const bool use_q8 =
      direction == Direction::forward &&
      (path == Path::int8 ||
       (path == Path::automatic && M <= kInt8ActivationMaxRows && int8_activations() &&
        q8_supported(isa, w)));
  if (use_q8) {
    const std::int64_t bytes = kernels::dequant_matmul_q8_workspace_bytes(M, view);
    const std::unique_ptr<std::byte[]> workspace(new std::byte[static_cast<std::size_t>(bytes)]);
    kernels::q8_table(isa)->forward[index](a, M, view, c, accumulate, num_threads(),
                                           workspace.get());
    return;
  }

  // Kernels initialize what they use, so the workspace is left uninitialized.
  const std::int64_t workspace_floats = kernels::dequant_matmul_workspace_floats(M, view);
  const std::unique_ptr<float[]> workspace(
      workspace_floats > 0 ? new float[static_cast<std::size_t>(workspace_floats)] : nullptr);
  const kernels::DequantMatmulFn kernel =
      direction == Direction::forward ? table.forward[index] : table.backward[index];
  kernel(a, M, view, c, accumulate, num_threads(), workspace.get());
}

Isa default_isa() {
  static const Isa isa = select_isa();
  return isa;
}

void check_dense(std::string_view op, std::string_view name, std::int64_t outer_stride,
                 std::int64_t cols) {
  QLORA_CHECK_ARG(outer_stride == cols,
                  "[{}] {} must be a dense row-major matrix: got row stride {} for {} columns "
                  "(hint: pass a contiguous matrix or a block of whole rows)",
                  op, name, outer_stride, cols);
}

}  // namespace

void set_int8_activations(bool enabled) { g_int8_activations.store(enabled ? 1 : 0); }

bool int8_activations() {
  int state = g_int8_activations.load();
  if (state < 0) {
    const int from_env = int8_activations_from_env() ? 1 : 0;
    // A concurrent set_int8_activations call wins over the environment.
    int expected = -1;
    g_int8_activations.compare_exchange_strong(expected, from_env);
    state = g_int8_activations.load();
  }
  return state == 1;
}

void dequant_matmul(const float* x, std::int64_t M, const QuantizedMatrix& w, float* y,
                    bool accumulate, ActivationPrecision precision) {
  run(default_isa(), Direction::forward, x, M, w, y, accumulate,
      precision == ActivationPrecision::fp32 ? Path::fp32 : Path::automatic);
}

void dequant_matmul_backward(const float* dy, std::int64_t M, const QuantizedMatrix& w, float* dx,
                             bool accumulate) {
  run(default_isa(), Direction::backward, dy, M, w, dx, accumulate);
}

void dequant_matmul(ConstRefRowMatrixF x, const QuantizedMatrix& w, RefRowMatrixF y,
                    bool accumulate, ActivationPrecision precision) {
  QLORA_CHECK_ARG(x.cols() == w.cols && y.rows() == x.rows() && y.cols() == w.rows,
                  "[dequant_matmul] shapes do not match: got x [{}, {}], weight [{}, {}], y "
                  "[{}, {}], expected x [M, in], weight [out, in], y [M, out]",
                  x.rows(), x.cols(), w.rows, w.cols, y.rows(), y.cols());
  check_dense("dequant_matmul", "x", x.outerStride(), x.cols());
  check_dense("dequant_matmul", "y", y.outerStride(), y.cols());
  dequant_matmul(x.data(), x.rows(), w, y.data(), accumulate, precision);
}

void dequant_matmul_backward(ConstRefRowMatrixF dy, const QuantizedMatrix& w, RefRowMatrixF dx,
                             bool accumulate) {
  QLORA_CHECK_ARG(dy.cols() == w.rows && dx.rows() == dy.rows() && dx.cols() == w.cols,
                  "[dequant_matmul_backward] shapes do not match: got dy [{}, {}], weight [{}, "
                  "{}], dx [{}, {}], expected dy [M, out], weight [out, in], dx [M, in]",
                  dy.rows(), dy.cols(), w.rows, w.cols, dx.rows(), dx.cols());
  check_dense("dequant_matmul_backward", "dy", dy.outerStride(), dy.cols());
  check_dense("dequant_matmul_backward", "dx", dx.outerStride(), dx.cols());
  dequant_matmul_backward(dy.data(), dy.rows(), w, dx.data(), accumulate);
}

namespace detail {

void dequant_matmul(Isa isa, const float* x, std::int64_t M, const QuantizedMatrix& w, float* y,
                    bool accumulate) {
  run(isa, Direction::forward, x, M, w, y, accumulate);
}

void dequant_matmul_int8(Isa isa, const float* x, std::int64_t M, const QuantizedMatrix& w,
                         float* y, bool accumulate) {
  run(isa, Direction::forward, x, M, w, y, accumulate, Path::int8);
}

void dequant_matmul_backward(Isa isa, const float* dy, std::int64_t M, const QuantizedMatrix& w,
                             float* dx, bool accumulate) {
  run(isa, Direction::backward, dy, M, w, dx, accumulate);
}

}  // namespace detail
}  // namespace qlora
