#include "qlora/lora/lora_linear.hpp"

#include <cmath>
#include <utility>

#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"
#include "qlora/kernels/gemm.hpp"
#include "qlora/kernels/matmul.hpp"

namespace qlora {
namespace {

// Derives the seed of one adapter's dropout mask from the call's seed and the adapter name,
// so that two adapters never share a mask.
std::uint64_t adapter_seed(std::uint64_t seed, const std::string& name) {
  std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a over the name
  for (char c : name) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return mix_seed(seed, h);
}

// Average-pools x [M, K] over groups of `g` columns: out [M, K / g].
RowMatrixF pool_groups(const RowMatrixF& x, int g) {
  const std::int64_t n_groups = x.cols() / g;
  RowMatrixF out(x.rows(), n_groups);
  const float inv_g = 1.0f / static_cast<float>(g);
  for (std::int64_t m = 0; m < x.rows(); ++m) {
    for (std::int64_t k = 0; k < n_groups; ++k) {
      out(m, k) = x.row(m).segment(k * g, g).sum() * inv_g;
    }
  }
  return out;
}

}  // namespace

RowMatrixF LoraAdapter::delta_weight(std::int64_t in_features) const {
  RowMatrixF ba = (B * A) * scaling;  // [N, adapter_in]
  if (pool_group_size == 0) return ba;

  // The pooled input averages g columns, so each of them gets 1/g of the group's weight.
  const int g = pool_group_size;
  RowMatrixF delta(B.rows(), in_features);
  const float inv_g = 1.0f / static_cast<float>(g);
  for (std::int64_t j = 0; j < delta.rows(); ++j) {
    for (std::int64_t k = 0; k < ba.cols(); ++k) {
      delta.row(j).segment(k * g, g).setConstant(ba(j, k) * inv_g);
    }
  }
  return delta;
}

void LoraAdapter::zero_grad() {
  dA.setZero(A.rows(), A.cols());
  dB.setZero(B.rows(), B.cols());
}

LoraAdapter make_lora_adapter(std::int64_t out_features, std::int64_t in_features,
                              const LoraConfig& config, std::uint64_t seed,
                              int pool_group_size) {
  config.validate();
  QLORA_CHECK_ARG(out_features > 0 && in_features > 0,
                  "[make_lora_adapter] layer shape must be positive: got [{}, {}]",
                  out_features, in_features);
  QLORA_CHECK_ARG(config.rank <= std::min(out_features, in_features),
                  "[make_lora_adapter] rank {} exceeds the layer's smaller dimension: layer is "
                  "[{}, {}] (hint: use a rank of at most {})",
                  config.rank, out_features, in_features, std::min(out_features, in_features));

  LoraAdapter adapter;
  adapter.rank = config.rank;
  adapter.scaling = config.scaling();
  adapter.dropout = config.dropout;

  std::int64_t adapter_in = in_features;
  if (config.init == LoraInit::qalora) {
    QLORA_CHECK_ARG(pool_group_size > 0 && in_features % pool_group_size == 0,
                    "[make_lora_adapter] QA-LoRA needs the base's group size dividing in: got "
                    "in={}, group={} (hint: QA-LoRA needs an INT4 or INT8 group-wise base)",
                    in_features, pool_group_size);
    adapter.pool_group_size = pool_group_size;
    adapter_in = in_features / pool_group_size;
  }
  QLORA_CHECK_ARG(config.init != LoraInit::loftq,
                  "[make_lora_adapter] LoftQ needs the float weights (hint: call loftq_init)");

  Rng rng(seed);
  adapter.A.resize(config.rank, adapter_in);
  switch (config.init) {
    case LoraInit::kaiming: {
      // PyTorch's kaiming_uniform_(a = sqrt(5)) on an [r, in] weight has bound 1 / sqrt(in).
      const float bound = 1.0f / std::sqrt(static_cast<float>(adapter_in));
      for (float& v : adapter.A.reshaped()) v = rng.uniform(-bound, bound);
      break;
    }
    case LoraInit::gaussian: {
      const double std_dev = 1.0 / static_cast<double>(config.rank);
      for (float& v : adapter.A.reshaped()) v = static_cast<float>(rng.normal() * std_dev);
      break;
    }
    case LoraInit::qalora: {
      // Xavier-uniform, as the QA-LoRA reference code initialises its pooled A.
      const float bound =
          std::sqrt(6.0f / static_cast<float>(adapter_in + config.rank));
      for (float& v : adapter.A.reshaped()) v = rng.uniform(-bound, bound);
      break;
    }
    case LoraInit::loftq:
      break;
  }
  adapter.B.setZero(out_features, config.rank);
  adapter.zero_grad();
  return adapter;
}

QuantLoraLinear::QuantLoraLinear(QuantizedMatrix base) : base_(std::move(base)) {}

void QuantLoraLinear::set_base(QuantizedMatrix base) {
  QLORA_CHECK_ARG(base.rows == base_.rows && base.cols == base_.cols,
                  "[QuantLoraLinear::set_base] shape changed: got [{}, {}], expected [{}, {}]",
                  base.rows, base.cols, base_.rows, base_.cols);
  base_ = std::move(base);
}

void QuantLoraLinear::check_adapter(const std::string& name, const LoraAdapter& a) const {
  const std::int64_t expected_in =
      a.pool_group_size > 0 ? in_features() / a.pool_group_size : in_features();
  QLORA_CHECK_ARG(a.rank > 0 && a.A.rows() == a.rank && a.B.cols() == a.rank &&
                      a.A.cols() == expected_in && a.B.rows() == out_features(),
                  "[QuantLoraLinear] adapter '{}' does not fit the layer: got A [{}, {}] and B "
                  "[{}, {}] with rank {}, expected A [{}, {}] and B [{}, {}]",
                  name, a.A.rows(), a.A.cols(), a.B.rows(), a.B.cols(), a.rank, a.rank,
                  expected_in, out_features(), a.rank);
  if (a.pool_group_size > 0) {
    QLORA_CHECK_ARG(in_features() % a.pool_group_size == 0,
                    "[QuantLoraLinear] adapter '{}' pools groups of {} that do not divide in={}",
                    name, a.pool_group_size, in_features());
  }
}

LoraAdapter& QuantLoraLinear::add_adapter(const std::string& name, LoraAdapter adapter) {
  QLORA_CHECK_ARG(!name.empty(), "[QuantLoraLinear::add_adapter] adapter name is empty");
  check_adapter(name, adapter);
  if (adapter.dA.rows() != adapter.A.rows() || adapter.dA.cols() != adapter.A.cols() ||
      adapter.dB.rows() != adapter.B.rows() || adapter.dB.cols() != adapter.B.cols()) {
    adapter.zero_grad();
  }
  LoraAdapter& stored = adapters_[name] = std::move(adapter);
  if (std::find(active_.begin(), active_.end(), name) == active_.end()) active_.push_back(name);
  return stored;
}

LoraAdapter& QuantLoraLinear::add_adapter(const std::string& name, const LoraConfig& config,
                                          std::uint64_t seed) {
  const int group = base_.format == QuantFormat::nf4 ? 0 : base_.block_size;
  QLORA_CHECK_ARG(config.init != LoraInit::qalora || base_.format != QuantFormat::nf4,
                  "[QuantLoraLinear::add_adapter] QA-LoRA needs a group-wise INT4 or INT8 "
                  "base: got {} (hint: quantize the base with --quant int4)",
                  to_string(base_.format));
  return add_adapter(name, make_lora_adapter(out_features(), in_features(), config, seed,
                                             config.init == LoraInit::qalora ? group : 0));
}

void QuantLoraLinear::remove_adapter(const std::string& name) {
  if (adapters_.erase(name) == 0) {
    raise<InvalidArgument>("[QuantLoraLinear::remove_adapter] no adapter named '{}'", name);
  }
  std::erase(active_, name);
}

bool QuantLoraLinear::has_adapter(const std::string& name) const {
  return adapters_.contains(name);
}

LoraAdapter& QuantLoraLinear::adapter(const std::string& name) {
  const auto it = adapters_.find(name);
  if (it == adapters_.end()) {
    raise<InvalidArgument>("[QuantLoraLinear::adapter] no adapter named '{}'", name);
  }
  return it->second;
}

const LoraAdapter& QuantLoraLinear::adapter(const std::string& name) const {
  return const_cast<QuantLoraLinear*>(this)->adapter(name);
}

std::vector<std::string> QuantLoraLinear::adapter_names() const {
  std::vector<std::string> names;
  for (const auto& [name, unused] : adapters_) names.push_back(name);
  return names;
}

void QuantLoraLinear::set_active_adapters(std::vector<std::string> names) {
  for (const std::string& name : names) {
    QLORA_CHECK_ARG(adapters_.contains(name),
                    "[QuantLoraLinear::set_active_adapters] no adapter named '{}'", name);
  }
  active_ = std::move(names);
}

void QuantLoraLinear::forward(ConstRefRowMatrixF x, RefRowMatrixF y, bool accumulate,
                              LoraLinearCache* cache, const LoraForwardOptions& options) const {
  const std::int64_t M = x.rows();
  QLORA_CHECK_ARG(x.cols() == in_features() && y.rows() == M && y.cols() == out_features(),
                  "[QuantLoraLinear::forward] shape mismatch: got x [{}, {}] and y [{}, {}], "
                  "expected x [M, {}] and y [M, {}]",
                  x.rows(), x.cols(), y.rows(), y.cols(), in_features(), out_features());
  QLORA_CHECK_ARG(!options.training || cache != nullptr,
                  "[QuantLoraLinear::forward] training needs a cache for backward");

  // The kernels take contiguous row-major buffers; Ref may carry an outer stride.
  const RowMatrixF x_dense = x;
  RowMatrixF y_dense(M, out_features());
  if (accumulate) y_dense = y;
  // A forward that keeps a cache is followed by backward, which differentiates the fp32
  // product. Without a cache it is inference, where small batches may use int8 activations.
  dequant_matmul(x_dense.data(), M, base_, y_dense.data(), accumulate,
                 cache != nullptr ? ActivationPrecision::fp32 : options.precision);

  if (cache != nullptr) {
    cache->x = x_dense;
    cache->adapters.clear();
  }
  if (!disabled_) {
    for (const std::string& name : active_) {
      const LoraAdapter& a = adapters_.at(name);
      LoraLinearCache::AdapterCache entry;
      entry.name = name;

      // The adapter input: dropout (training only) then QA-LoRA's pooling.
      RowMatrixF input = x_dense;
      if (options.training && a.dropout > 0.0f) {
        Rng rng(adapter_seed(options.dropout_seed, name));
        const float keep_scale = 1.0f / (1.0f - a.dropout);
        entry.mask.resize(M, in_features());
        for (float& v : entry.mask.reshaped()) v = rng.uniform() < a.dropout ? 0.0f : keep_scale;
        input = input.cwiseProduct(entry.mask);
      }
      if (a.pool_group_size > 0) input = pool_groups(input, a.pool_group_size);

      RowMatrixF u(M, a.rank);  // [M, r] = input A^T
      gemm_f32(input, Transpose::no, a.A, Transpose::yes, u);
      gemm_f32(u, Transpose::no, a.B, Transpose::yes, y_dense, a.scaling, true);
      if (cache != nullptr) {
        entry.input = std::move(input);
        entry.u = std::move(u);
        cache->adapters.push_back(std::move(entry));
      }
    }
  }
  y = y_dense;
}

void QuantLoraLinear::backward(ConstRefRowMatrixF dy, const LoraLinearCache& cache,
                               RefRowMatrixF dx, bool accumulate_dx) {
  const std::int64_t M = cache.x.rows();
  QLORA_CHECK_ARG(dy.rows() == M && dy.cols() == out_features(),
                  "[QuantLoraLinear::backward] dy shape mismatch: got [{}, {}], expected [{}, {}]",
                  dy.rows(), dy.cols(), M, out_features());
  const bool want_dx = dx.size() > 0;
  if (want_dx) {
    QLORA_CHECK_ARG(dx.rows() == M && dx.cols() == in_features(),
                    "[QuantLoraLinear::backward] dx shape mismatch: got [{}, {}], expected "
                    "[{}, {}] (hint: pass a 0 x 0 matrix to skip the input gradient)",
                    dx.rows(), dx.cols(), M, in_features());
  }

  const RowMatrixF dy_dense = dy;
  RowMatrixF dx_dense;
  if (want_dx) {
    dx_dense.resize(M, in_features());
    if (accumulate_dx) dx_dense = dx;
    dequant_matmul_backward(dy_dense.data(), M, base_, dx_dense.data(), accumulate_dx);
  }

  for (const LoraLinearCache::AdapterCache& entry : cache.adapters) {
    LoraAdapter& a = adapter(entry.name);
    // du = s * dy B: the gradient at the adapter's rank-r bottleneck.
    RowMatrixF du(M, a.rank);
    gemm_f32(dy_dense, Transpose::no, a.B, Transpose::no, du, a.scaling);
    if (a.trainable) {
      gemm_f32(dy_dense, Transpose::yes, entry.u, Transpose::no, a.dB, a.scaling, true);  // [N, r]
      gemm_f32(du, Transpose::yes, entry.input, Transpose::no, a.dA, 1.0f, true);  // [r, in']
    }
    if (!want_dx) continue;

    // The gradient of the adapter input; without pooling or dropout it adds straight into dx.
    if (a.pool_group_size == 0 && entry.mask.size() == 0) {
      gemm_f32(du, Transpose::no, a.A, Transpose::no, dx_dense, 1.0f, true);
      continue;
    }
    RowMatrixF d_input(M, a.A.cols());  // [M, in']
    gemm_f32(du, Transpose::no, a.A, Transpose::no, d_input);
    if (a.pool_group_size > 0) {
      // Undo the average pooling: each of the g inputs gets 1/g of its group's gradient.
      const int g = a.pool_group_size;
      const float inv_g = 1.0f / static_cast<float>(g);
      RowMatrixF expanded(M, in_features());
      for (std::int64_t m = 0; m < M; ++m) {
        for (std::int64_t k = 0; k < d_input.cols(); ++k) {
          expanded.row(m).segment(k * g, g).setConstant(d_input(m, k) * inv_g);
        }
      }
      d_input = std::move(expanded);
    }
    if (entry.mask.size() > 0) d_input = d_input.cwiseProduct(entry.mask);
    dx_dense += d_input;
  }
  if (want_dx) dx = dx_dense;
}

void QuantLoraLinear::zero_grad() {
  for (auto& [name, a] : adapters_) a.zero_grad();
}

}  // namespace qlora
