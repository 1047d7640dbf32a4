// GPTQ (Frantar et al.) for one linear, as AutoGPTQ/GPTQModel run it with desc_act=False, static_groups=False:
// H = 2/n Σ xxᵀ over calibration tokens; dead inputs (H_kk = 0) zeroed; H += damp·mean(diag H)·I; columns are
// quantized left to right in lazy blocks of 128, each error propagated through the upper Cholesky factor of H⁻¹;
// a group's (s, z) are computed min–max (range widened to include 0, as GPTQ's quantizer does) from the weights
// as updated by earlier lazy blocks when the group's first column is reached.
#pragma once

#include <ATen/core/Tensor.h>

#include "quant/quantizer.h"

namespace eqat {

// Accumulates H from inputs x [..., K] (rows where `valid` [...] is false are skipped; valid may be undefined).
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t K);
  void add(const at::Tensor& x, const at::Tensor& valid);
  const at::Tensor& H() const { return H_; }
  int64_t samples() const { return n_; }

 private:
  at::Tensor H_;  // [K, K] float64
  int64_t n_ = 0;
};

// W [N, K] -> integers (q, zero, scale) in the layout of quantize_integers.
QuantizedWeight gptq_quantize(const at::Tensor& W, const at::Tensor& H, const QuantSpec& spec, double damp = 0.01,
                              int64_t block_size = 128);

}  // namespace eqat
