// The SwiGLU activation of the Llama MLP, act = silu(gate) * up, forward and backward.

#include <cmath>

#include "llama_impl.hpp"
#include "qlora/core/threads.hpp"

namespace qlora::detail {

void swiglu_forward(const RowMatrixF& gate, const RowMatrixF& up, RowMatrixF& act) {
  // gate, up, act [M, intermediate]
  act.resize(gate.rows(), gate.cols());
  const std::int64_t n = gate.size();
  const float* g = gate.data();
  const float* u = up.data();
  float* a = act.data();
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    const float sigmoid = 1.0f / (1.0f + std::exp(-g[i]));
    a[i] = g[i] * sigmoid * u[i];
  }
}

void swiglu_backward(const RowMatrixF& gate, const RowMatrixF& up, const RowMatrixF& d_act,
                     RowMatrixF& d_gate, RowMatrixF& d_up) {
  // gate, up, d_act, d_gate, d_up [M, intermediate]
  d_gate.resize(gate.rows(), gate.cols());
  d_up.resize(gate.rows(), gate.cols());
  const std::int64_t n = gate.size();
  const float* g = gate.data();
  const float* u = up.data();
  const float* da = d_act.data();
  float* dg = d_gate.data();
  float* du = d_up.data();
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    // silu(g) = g s with s = sigmoid(g); silu'(g) = s (1 + g (1 - s)).
    const float sigmoid = 1.0f / (1.0f + std::exp(-g[i]));
    const float silu = g[i] * sigmoid;
    du[i] = da[i] * silu;
    dg[i] = da[i] * u[i] * sigmoid * (1.0f + g[i] * (1.0f - sigmoid));
  }
}

}  // namespace qlora::detail
