// Quantize a weight matrix to NF4 and multiply activations by it with the dequant-matmul
// kernel, then compare with the fp32 product.
//
//   build/release/examples/example_quantize_matmul
#include <cstdio>

#include <qlora/qlora.hpp>

int main() {
  // A [out, in] = [256, 512] weight, as nn.Linear stores it, and 8 activation rows.
  const qlora::RowMatrixF w = qlora::RowMatrixF::Random(256, 512) * 0.05f;
  const qlora::RowMatrixF x = qlora::RowMatrixF::Random(8, 512);

  // NF4 with blocks of 64 and double-quantized absmaxes, as QLoRA stores its base.
  const qlora::QuantizedMatrix q = qlora::quantize(
      w, {.format = qlora::QuantFormat::nf4, .block_size = 64, .double_quant = true});
  std::printf("NF4: %.3f bits per weight (fp32: 32)\n", qlora::bits_per_weight(q));

  // y [8, 256] = x W^T, on the fastest kernel this CPU runs.
  qlora::RowMatrixF y(8, 256);
  qlora::dequant_matmul(x, q, y, /*accumulate=*/false);

  const qlora::RowMatrixF exact = x * w.transpose();
  const float rel = (y - exact).norm() / exact.norm();
  std::printf("kernel: %s, relative error against fp32 weights: %.4f\n",
              std::string(qlora::to_string(qlora::select_isa())).c_str(), rel);
  return rel < 0.2f ? 0 : 1;
}
