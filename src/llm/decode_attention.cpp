#include "llm/decode_attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <limits>

#include "data/error.h"

namespace eqat {

namespace {

// One dot product of length D (a multiple of 16) in 16 independent lanes, summed at the end: the compiler keeps the
// lanes in vector registers without reassociating a single sum. Compiled for AVX-512F, AVX2+FMA and baseline x86-64,
// chosen at load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define EQAT_ATTN_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define EQAT_ATTN_CLONES
#endif

EQAT_ATTN_CLONES void scores_row(const float* q, const float* k, int64_t k_stride, int64_t S, int64_t D, float scale,
                                 const float* bias, float* out) {
  for (int64_t t = 0; t < S; ++t) {
    const float* kt = k + t * k_stride;
    float lane[16] = {};
    for (int64_t d = 0; d < D; d += 16)
      for (int l = 0; l < 16; ++l) lane[l] += q[d + l] * kt[d + l];
    float s = 0.f;
    for (int l = 0; l < 16; ++l) s += lane[l];
    out[t] = s * scale + (bias ? bias[t] : 0.f);
  }
}

// out[0, D) = Σ_t p[t]·V[t]; D ≤ 256 (kMaxHeadDim) accumulators on the stack.
constexpr int64_t kMaxHeadDim = 256;
EQAT_ATTN_CLONES void weighted_rows(const float* p, const float* v, int64_t v_stride, int64_t S, int64_t D,
                                    float* out) {
  float acc[kMaxHeadDim] = {};
  for (int64_t t = 0; t < S; ++t) {
    const float pt = p[t];
    const float* vt = v + t * v_stride;
    for (int64_t d = 0; d < D; ++d) acc[d] += pt * vt[d];
  }
  for (int64_t d = 0; d < D; ++d) out[d] = acc[d];
}

// The mask as an additive fp32 bias [B, S] (0 or −inf for a bool mask), or undefined.
at::Tensor mask_bias(const at::Tensor& mask, int64_t B, int64_t S) {
  if (!mask.defined()) return {};
  const at::Tensor m = mask.expand({B, 1, 1, S}).reshape({B, S});
  if (m.scalar_type() == at::kBool)
    return at::zeros({B, S}, at::kFloat).masked_fill_(m.logical_not(), -std::numeric_limits<float>::infinity());
  return m.to(at::kFloat).contiguous();
}

}  // namespace

bool decode_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  if (!q.is_cpu() || !k.is_cpu() || !v.is_cpu() || q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  if (q.scalar_type() != at::kFloat || k.scalar_type() != at::kFloat || v.scalar_type() != at::kFloat) return false;
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  if (q.size(2) != 1 || D % 16 != 0 || D > kMaxHeadDim || Hkv < 1 || H % Hkv != 0 || S < 1) return false;
  if (k.size(0) != B || v.size(0) != B || v.size(1) != Hkv || v.size(2) != S || k.size(3) != D || v.size(3) != D)
    return false;
  if (k.stride(3) != 1 || v.stride(3) != 1) return false;
  if (mask.defined()) {
    if (mask.dim() > 4 || mask.size(-1) != S) return false;
    // No per-head or per-query variation: [B or 1, 1, 1, S] after broadcasting.
    for (int64_t d = 0; d < mask.dim() - 1; ++d) {
      const int64_t axis = 4 - mask.dim() + d;  // its place in [B, 1, 1, S]
      if (mask.size(d) != 1 && !(axis == 0 && mask.size(d) == B)) return false;
    }
    if (mask.scalar_type() != at::kBool && mask.scalar_type() != at::kFloat) return false;
  }
  return !(c10::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad()));
}

at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& mask, double scale) {
  EQAT_ASSERT(decode_attention_applies(q_in, k, v, mask), "decode_attention_cpu: unsupported inputs");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t group = H / Hkv;
  const at::Tensor q = q_in.reshape({B, H, D}).contiguous();
  const at::Tensor bias = mask_bias(mask, B, S);
  at::Tensor scores = at::empty({B, H, S}, at::kFloat);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* sp = scores.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, hk = (i % H) / group;
      scores_row(qp + i * D, kp + b * k.stride(0) + hk * k.stride(1), k.stride(2), S, D, fscale,
                 bp ? bp + b * S : nullptr, sp + i * S);
    }
  });
  const at::Tensor p = at::softmax(scores, -1);  // [B, H, S]
  const float* pp = p.data_ptr<float>();
  at::Tensor out = at::empty({B, H, 1, D}, at::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, hk = (i % H) / group;
      weighted_rows(pp + i * S, vp + b * v.stride(0) + hk * v.stride(1), v.stride(2), S, D, op + i * D);
    }
  });
  return out;
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     double scale, bool is_causal) {
  if (!is_causal && decode_attention_applies(q, k, v, mask)) return decode_attention_cpu(q, k, v, mask, scale);
  const bool gqa = k.size(1) != q.size(1);
  if (mask.defined()) return at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale, gqa);
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, is_causal, scale, gqa);
}

}  // namespace eqat
