// EfficientQAT's quantizer (EFFICIENTQAT.md §1): asymmetric, unsigned, per-group along the input dimension.
//   groups: contiguous runs of g input columns of one output row; W [N, K] -> G = ⌈K/g⌉ groups per row. When g
//   does not divide K the last group is ragged (K − (G−1)·g columns), as GPTQ's g_idx = k / g defines it.
//   init (min–max, in the weight's own dtype): s = clamp((max−min)/(2^b−1), 1e-4, 1e4), z = round(clamp(−min/s, ±1e4))
//   fake quant (Block-AP):  s' = ste_clamp(s, 1e-4, 1e4); z' = ste_clamp(ste_round(z), zero_min, qmax)
//                           q = clamp(ste_round(W/s') + z', 0, qmax)   (a real clamp: zero gradient outside)
//                           Ŵ = (q − z')·s'
// Legend: N out_features, K in_features, g group size, G = ⌈K/g⌉.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace eqat {

struct QuantSpec {
  int bits = 4;
  int64_t group_size = 128;  // -1: per channel (one group per output row)
  // Smallest zero point: 0, or 1 for GPTQ v1 checkpoints (they store zero − 1 in `bits` bits, so a zero point of 0
  // cannot be written). Every clamp of z below uses [zero_min, qmax].
  int zero_min = 0;
  int64_t qmax() const { return (int64_t{1} << bits) - 1; }
  // The concrete group length for in_features K.
  int64_t group_for(int64_t K) const { return group_size < 0 ? K : group_size; }
  // Groups per row for in_features K: ⌈K/g⌉ (the last one ragged when g does not divide K).
  int64_t groups_for(int64_t K) const { return num_groups(K, group_for(K)); }
  static int64_t num_groups(int64_t K, int64_t g) { return (K + g - 1) / g; }
  std::string tag() const;  // e.g. "w4g128", "w2g-1", "w2g64z1" (zero_min 1)
};

constexpr double kScaleMin = 1e-4, kScaleMax = 1e4;

// Min–max initialisation. W [N, K] (any float dtype; arithmetic in that dtype, as the reference does in fp16).
// Returns (s, z) each [N, G] in W's dtype; z is rounded but NOT clamped to [0, qmax] (the forward clamps it).
std::pair<at::Tensor, at::Tensor> minmax_init(const at::Tensor& W, const QuantSpec& spec);

// Clip search: for each group the range [a·min, a·max] (min ≤ 0 ≤ max), a in `steps` values from 1 down to
// `min_ratio`, whose round-to-nearest integers give the smallest squared weight error (the first, a = 1, wins ties).
// Returns (s, z) [N, G] in W's dtype, z rounded and clamped to [zero_min, qmax].
std::pair<at::Tensor, at::Tensor> mse_clip_init(const at::Tensor& W, const QuantSpec& spec, int steps = 20,
                                                double min_ratio = 0.5);

// Differentiable fake quantization (STE rules above). W [N, K], s/z [N, G] -> Ŵ [N, K].
at::Tensor fake_quantize(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec);

// The fake quantizer fused into one pass over W for fp32 CPU tensors (Block-AP on the CPU: the composite above
// allocates about a dozen [N, K] temporaries per call and keeps several of them for its backward, 2.4 GB for a 7B
// block). applies(): W [N, K] and s, z [N, ⌈K/g⌉], all fp32, contiguous, on the CPU.
bool fused_fake_quant_applies(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z);
// Ŵ, bit-identical to fake_quantize (the same float operations in the same order).
at::Tensor fake_quantize_fused(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec);
// The same Ŵ written into `out` (fp32, contiguous, W's shape: e.g. rows of a stacked q/k/v weight).
void fake_quantize_fused_into(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec,
                              const at::Tensor& out);
// The STE gradients of Ŵ = fake_quantize(W, s, z) from dL/dŴ (G [N, K] fp32, overwritten with dL/dW), with
// u = W/s', in = [0 ≤ round(u) + z' ≤ qmax]:
//   dL/dW = G·in;  dL/ds = Σ_group G·((q − z') − in·u);  dL/dz = Σ_group −G·s'·(1 − in)   (sums in double)
struct FakeQuantGrads {
  at::Tensor w, s, z;
};
FakeQuantGrads fake_quantize_backward_fused(at::Tensor G, const at::Tensor& W, const at::Tensor& s,
                                            const at::Tensor& z, const QuantSpec& spec);
// Both for several linears at once, in one parallel region over their weights laid end to end (split by elements,
// each row whole), with the same results: Block-AP's step on the default model had seven regions of 65 536-131 072
// weights each way, a barrier each. `t`: Ŵ's destination for the forward, dL/dŴ (becoming dL/dW) for the backward.
struct FakeQuantJob {
  at::Tensor W, s, z;
  QuantSpec spec;
  at::Tensor t;
};
void fake_quantize_fused_into(const std::vector<FakeQuantJob>& jobs);
std::vector<FakeQuantGrads> fake_quantize_backward_fused(const std::vector<FakeQuantJob>& jobs);

// The integers the fake quantizer produces, for packing: q [N, K] int32 in [0, qmax], zero [N, G] int32 in
// [0, qmax] (clamped — the reference's packer does not clamp, pitfall P6), scale [N, G] (clamped to its range).
struct QuantizedWeight {
  at::Tensor q, zero, scale;
};
QuantizedWeight quantize_integers(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec);

// Ŵ from integers: (q − zero)·scale, [N, K] float32.
at::Tensor dequantize_integers(const QuantizedWeight& qw, int64_t group_size);

}  // namespace eqat
