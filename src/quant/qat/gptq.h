// GPTQ (Frantar et al.) for one linear, as AutoGPTQ/GPTQModel run it with desc_act=False, static_groups=False:
// H = 2/n Σ xxᵀ over calibration tokens; dead inputs (H_kk = 0) zeroed; H += damp·mean(diag H)·I; columns are
// quantized left to right in lazy blocks of 128, each error propagated through the upper Cholesky factor of H⁻¹;
// a group's (s, z) are computed min–max (range widened to include 0, as GPTQ's quantizer does) from the weights
// as updated by earlier lazy blocks when the group's first column is reached.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>

#include "quant/quantizer.h"

namespace eqat {

// Accumulates H = 2/n Σ xxᵀ from inputs x [..., K] (rows where `valid` [...] is false are skipped; valid may be
// undefined), in float64. Small inputs (a Block-AP batch of two short samples is ~70 rows) are staged until a few
// hundred rows are in hand, then added in one update; each update computes only H's lower triangle, in P panels of
// rows ((P + 1)/(2P) of the full product's flops: 5/8 at K = 256, 9/16 from K = 512 up), and H() mirrors it. The
// running mean GPTQ's add_batch keeps (H rescaled at every batch) becomes one scaling at the end: the same H up to
// float64 summation order.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t K);
  void add(const at::Tensor& x, const at::Tensor& valid);
  // Adds another accumulator's rows: H becomes the mean over both sets of rows (other's H stays what it was).
  void merge(HessianAccumulator& other);
  at::Tensor H();                          // [K, K] float64, symmetric
  at::Tensor take();                       // H(), leaving this accumulator empty (its storage goes with it)
  int64_t samples() const { return n_; }  // rows added so far

 private:
  void flush();                     // adds the staged rows to sum_
  void accumulate(const at::Tensor& rows);
  int64_t K_;
  at::Tensor sum_;                  // [K, K] float64: Σ xxᵀ on and below the diagonal panels
  at::Tensor stage_;                // [capacity, K] float64, allocated on first use
  int64_t staged_ = 0, n_ = 0;
};

// What GPTQ needs of H: U, the upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), after each dead input
// (H_kk = 0) got H_kk = 1; and the dead inputs, whose weights are zeroed. One factor serves every linear that reads
// the same input (q/k/v, gate/up).
//
// Column order. "natural": left to right. "gar": group-aware reordering (GAR, Gafni et al. 2025; GPTQModel's default
// act_group_aware): within each group of `group` columns, the columns by descending H_kk; the groups by descending
// largest H_kk; a ragged last group stays last, in its own order. GPTQ then quantizes the most sensitive inputs first
// while each group keeps its columns, so the export's g_idx stays k / g (every kernel's layout) and only the
// integers, s and z change. U, dead and the work inside gptq_quantize are in that order; the results are returned
// in the natural one.
struct GptqFactor {
  at::Tensor U;     // [K, K] float64, upper triangular, in `perm` order
  at::Tensor dead;  // [K] bool, in `perm` order
  at::Tensor perm;  // [K] int64: position i holds input column perm[i]; undefined for the natural order
  int64_t group = 0;  // the group size `perm` keeps together
};
// Consumes H: its storage is reused for the factorization (pass HessianAccumulator::take(), or a clone to keep H).
// order "gar" needs `group` (the quantizer's group size for this K, K itself per-channel).
GptqFactor gptq_factor(at::Tensor H, double damp = 0.01, const std::string& order = "natural", int64_t group = 0);
// GAR's permutation for diag(H) [K] and groups of g columns (the order above).
at::Tensor gar_permutation(const at::Tensor& diag, int64_t g);

// W [N, K] -> integers (q, zero, scale) in the layout of quantize_integers. With `unrounded`, also each column as it
// was just before its rounding ([N, K] float64: W with the error compensation of all earlier columns).
QuantizedWeight gptq_quantize(const at::Tensor& W, const GptqFactor& f, const QuantSpec& spec, int64_t block_size = 128,
                              at::Tensor* unrounded = nullptr);
// The same from H itself (factored from a copy).
QuantizedWeight gptq_quantize(const at::Tensor& W, const at::Tensor& H, const QuantSpec& spec, double damp = 0.01,
                              int64_t block_size = 128, at::Tensor* unrounded = nullptr);

// Block-AP's start from GPTQ's unrounded weights (--init gptq-unrounded), [N, K] fp32: s·(q − z) + r with r GPTQ's
// rounding residual (unrounded − s·(q − z)) cut to ±0.45·s, except beyond the grid's ends (q = 0 with r < 0, q = qmax
// with r > 0), where it is kept. Fake quantization with GPTQ's s and z rounds it back to exactly q, but the weights
// sit where GPTQ's compensation put them, not on grid points, so s and z get a real gradient.
at::Tensor gptq_unrounded_start(const QuantizedWeight& qw, const at::Tensor& unrounded, const QuantSpec& spec);

}  // namespace eqat
