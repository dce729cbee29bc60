// Trainable low-rank adapters over a frozen quantized linear layer.
//
//   y = x W_q^T + sum over active adapters of  s * (drop(x) A^T) B^T
//
// with W_q the quantized base [N, K] (never modified by training), A [r, K], B [N, r] and
// s = LoraConfig::scaling(). A QA-LoRA adapter (LoraInit::qalora) takes x average-pooled over
// the base's quantization groups instead: A is [r, K / G], and its update folds exactly into
// the base's per-group offsets (see merge.hpp).
//
// A layer holds several named adapters. Any subset can be active at once (their outputs
// add); an adapter can be frozen (it still contributes to y and dx but gets no gradient),
// removed, or swapped in at run time without touching the base.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "qlora/core/matrix.hpp"
#include "qlora/kernels/matmul.hpp"
#include "qlora/lora/lora_config.hpp"
#include "qlora/quant/quantized_matrix.hpp"

namespace qlora {

/// One adapter's weights, gradients and hyper-parameters.
struct LoraAdapter {
  int rank = 0;
  float scaling = 1.0f;
  float dropout = 0.0f;
  /// Group size of QA-LoRA's input pooling; 0 for an ordinary adapter.
  int pool_group_size = 0;
  bool trainable = true;

  RowMatrixF A;   ///< [rank, K], or [rank, K / pool_group_size] with QA-LoRA
  RowMatrixF B;   ///< [N, rank]
  RowMatrixF dA;  ///< gradient of A, accumulated by backward; cleared by zero_grad
  RowMatrixF dB;  ///< gradient of B

  /// Returns the number of input columns A expects: K, or K / pool_group_size.
  std::int64_t adapter_in() const { return A.cols(); }

  /// Returns the dense update s * B * A as an [N, K] matrix (expanded over the pooling
  /// groups and divided by the group size for QA-LoRA). `in_features` is K.
  RowMatrixF delta_weight(std::int64_t in_features) const;

  void zero_grad();
};

/**
 * Creates an adapter for a layer of shape [out_features, in_features] with A and B set by
 * `config.init` (kaiming or gaussian; QA-LoRA takes `pool_group_size`). LoftQ needs the
 * float weights and re-quantizes the base, so it goes through loftq_init instead. The
 * random draws come from `seed` alone, so the same seed gives the same adapter.
 */
LoraAdapter make_lora_adapter(std::int64_t out_features, std::int64_t in_features,
                              const LoraConfig& config, std::uint64_t seed,
                              int pool_group_size = 0);

/// The state that forward keeps for backward: one cache per forward call in flight.
struct LoraLinearCache {
  RowMatrixF x;  ///< the input [M, K]
  struct AdapterCache {
    std::string name;
    RowMatrixF input;  ///< the adapter input: dropped-out x [M, K], or pooled x [M, K / G]
    RowMatrixF mask;   ///< dropout mask scaled by 1 / (1 - p) [M, K]; empty without dropout
    RowMatrixF u;      ///< input * A^T [M, rank]
  };
  std::vector<AdapterCache> adapters;
};

/// Options of one forward call.
struct LoraForwardOptions {
  bool training = false;        ///< applies dropout; needs a cache for backward
  std::uint64_t dropout_seed = 0;  ///< the dropout mask depends on this seed alone
  /// The base product's activation precision when no cache is kept. A forward with a cache
  /// always uses fp32, the product that backward differentiates.
  ActivationPrecision precision = ActivationPrecision::automatic;
};

/// A frozen quantized linear layer with named LoRA adapters.
class QuantLoraLinear {
 public:
  QuantLoraLinear() = default;
  explicit QuantLoraLinear(QuantizedMatrix base);

  const QuantizedMatrix& base() const { return base_; }
  /// Replaces the frozen base, for example with the re-quantized base from LoftQ. Throws
  /// qlora::InvalidArgument when the shape differs from the current base's.
  void set_base(QuantizedMatrix base);

  std::int64_t out_features() const { return base_.rows; }
  std::int64_t in_features() const { return base_.cols; }

  /// Adds (or replaces) the adapter `name` and activates it. Throws qlora::InvalidArgument
  /// when the adapter's shapes do not match this layer.
  LoraAdapter& add_adapter(const std::string& name, LoraAdapter adapter);
  /// Creates an adapter from `config` (see make_lora_adapter) and adds it.
  LoraAdapter& add_adapter(const std::string& name, const LoraConfig& config,
                           std::uint64_t seed);
  void remove_adapter(const std::string& name);
  bool has_adapter(const std::string& name) const;
  LoraAdapter& adapter(const std::string& name);
  const LoraAdapter& adapter(const std::string& name) const;
  std::vector<std::string> adapter_names() const;

  /// Selects the adapters whose outputs are added to the base, in this order. Throws
  /// qlora::InvalidArgument for a name this layer does not hold.
  void set_active_adapters(std::vector<std::string> names);
  const std::vector<std::string>& active_adapters() const { return active_; }
  /// Bypasses every adapter (base only) while true, without changing the active set.
  void set_adapters_disabled(bool disabled) { disabled_ = disabled; }
  bool adapters_disabled() const { return disabled_; }

  /**
   * Computes y [M, N] = x [M, K] W^T + the active adapters' outputs; adds into y when
   * `accumulate` is true. When `cache` is not null it receives what backward needs.
   */
  void forward(ConstRefRowMatrixF x, RefRowMatrixF y, bool accumulate = false,
               LoraLinearCache* cache = nullptr, const LoraForwardOptions& options = {}) const;

  /**
   * Given dy [M, N] for the output of the forward call that filled `cache`, accumulates dA
   * and dB of the trainable active adapters and writes (or, with `accumulate_dx`, adds) the
   * input gradient dx [M, K] through the base and every active adapter. Pass an empty dx
   * (0 x 0) to skip the input gradient, as for the first layer.
   */
  void backward(ConstRefRowMatrixF dy, const LoraLinearCache& cache, RefRowMatrixF dx,
                bool accumulate_dx = false);

  void zero_grad();

 private:
  void check_adapter(const std::string& name, const LoraAdapter& adapter) const;

  QuantizedMatrix base_;
  std::map<std::string, LoraAdapter> adapters_;
  std::vector<std::string> active_;
  bool disabled_ = false;
};

}  // namespace qlora
