// Attention for the decoder's forward: at::scaled_dot_product_attention, except one decode step on the CPU in fp32
// (one query position per row), which goes to decode_attention_cpu. That step is a pair of GEMVs per head over the
// whole KV cache, memory-bound; LibTorch's CPU SDPA runs it through its flash-attention tiles with a small SGEMM per
// tile, and on a LLaVA-1.5-7B-shaped decode step with 640 cached positions it took about 40 % of a W2g64 layer
// (`eqat bench decode`). Here each (row, head) streams its K and V rows once:
//   s[t] = scale·q·K[t] (+ mask bias[t]),  p = softmax(s),  out = Σ_t p[t]·V[t]
// parallel over rows × heads; GQA maps query head h to kv head h / (H/Hkv) (HF repeat_kv order).
// Legend: B rows, H query heads, Hkv kv heads, S keys, D head_dim.
#pragma once

#include <ATen/core/Tensor.h>

namespace eqat {

// q [B, H, T, D], k/v [B, Hkv, S, D] (any strides with a unit last one), mask undefined, bool (true: attend) or an
// additive float, broadcastable to [B, 1, T, S]. Returns [B, H, T, D]; `scale` multiplies q·k.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     double scale, bool is_causal);

// Whether decode_attention_cpu takes these inputs (CPU, fp32, T = 1, mask without per-head or per-query
// variation, H a multiple of Hkv).
bool decode_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask);
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                                double scale);

}  // namespace eqat
