// decode_attention_cpu against LibTorch's SDPA: GQA, strided cache views, bool and additive masks, several rows, and
// the inputs it must leave to SDPA.
//
// Tolerance. Both sides compute s_t = scale·q·k_t, p = softmax(s) and o = Σ_t p_t·v_t in fp32 in different orders.
// Per score, the dot product over D terms errs by at most γ_D·scale·Σ_d |q_d·k_td| =: E_t (γ_n ≈ n·u, u = 2^-24).
// A perturbation δ of the scores moves log p_t by at most 2·max|δ|, so |Δp_t| ≤ p_t·(2·max_t E_t + 8u) (the 8u:
// exp, the sum and the division of the softmax itself), and the weighted sum adds γ_S·Σ_t p_t·|v_t|:
//   |Δo_j| ≤ (2·max_t E_t + 8u + γ_S)·Σ_t p_t·|v_tj|.
// Each side carries its own error, so we assert twice that bound (plus 2× for slack in γ).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "llm/decode_attention.h"

using namespace eqat;

namespace {

void expect_matches_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                         const char* what) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  ASSERT_TRUE(decode_attention_applies(q, k, v, mask)) << what;
  const bool gqa = k.size(1) != q.size(1);
  const c10::optional<at::Tensor> m = mask.defined() ? c10::optional<at::Tensor>(mask) : c10::nullopt;
  const at::Tensor ref = at::scaled_dot_product_attention(q, k, v, m, 0.0, false, scale, gqa);
  const at::Tensor got = decode_attention_cpu(q, k, v, mask, scale);
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  // The bound of the header comment, from float64 copies of the operands.
  const int64_t H = q.size(1), Hkv = k.size(1), S = k.size(2), D = q.size(3);
  const double u = std::ldexp(1.0, -24);
  const at::Tensor kd = k.to(at::kDouble).repeat_interleave(H / Hkv, 1), vd = v.to(at::kDouble).repeat_interleave(H / Hkv, 1);
  const at::Tensor qd = q.to(at::kDouble);
  const at::Tensor E = at::matmul(qd.abs(), kd.abs().transpose(-1, -2)) * (D * u * scale);  // [B, H, 1, S]
  at::Tensor s = at::matmul(qd, kd.transpose(-1, -2)) * scale;
  if (mask.defined())
    s = mask.scalar_type() == at::kBool
            ? s.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity())
            : s + mask.to(at::kDouble);
  const at::Tensor p = at::softmax(s, -1);
  const at::Tensor mass = at::matmul(p, vd.abs());                                            // [B, H, 1, D]
  const at::Tensor factor = 2 * std::get<0>(E.max(-1, true)) + 8 * u + S * u;                  // [B, H, 1, 1]
  const at::Tensor bound = 4 * factor * mass;
  const at::Tensor excess = (got.to(at::kDouble) - ref.to(at::kDouble)).abs() - bound;
  EXPECT_LE(excess.max().item<double>(), 0.0) << what;
}

}  // namespace

TEST(DecodeAttention, MatchesSdpaOverShapesMasksAndCacheViews) {
  at::manual_seed(3);
  c10::NoGradGuard no_grad;
  // LLaVA-1.5-7B's heads (32 × 128, no GQA) over a static cache read up to 300 of 512 slots; Mistral-like GQA
  // (8 query heads per kv head, D 64); two rows with their own masks.
  {
    const at::Tensor cache_k = at::randn({1, 32, 512, 128}), cache_v = at::randn({1, 32, 512, 128});
    const at::Tensor q = at::randn({1, 32, 1, 128});
    const at::Tensor k = cache_k.narrow(2, 0, 300), v = cache_v.narrow(2, 0, 300);  // strided views
    expect_matches_sdpa(q, k, v, {}, "7B heads, no mask");
    at::Tensor add = at::zeros({1, 300});
    add.narrow(1, 200, 100).fill_(-std::numeric_limits<float>::infinity());
    expect_matches_sdpa(q, k, v, add, "additive mask [1, S]");
  }
  {
    const at::Tensor q = at::randn({2, 16, 1, 64}) * 3, k = at::randn({2, 2, 77, 64}), v = at::randn({2, 2, 77, 64});
    at::Tensor valid = at::rand({2, 1, 1, 77}) > 0.3;
    valid.select(3, 76).fill_(true);  // each row attends to at least its own position
    expect_matches_sdpa(q, k, v, valid, "GQA, per-row bool mask");
  }
  // One and several threads give the same bits (heads are split, each computed alone).
  const at::Tensor q = at::randn({1, 8, 1, 32}), k = at::randn({1, 8, 40, 32}), v = at::randn({1, 8, 40, 32});
  const int saved = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = decode_attention_cpu(q, k, v, {}, 0.25);
  at::set_num_threads(2);
  EXPECT_TRUE(at::equal(one, decode_attention_cpu(q, k, v, {}, 0.25)));
  at::set_num_threads(saved);
}

TEST(DecodeAttention, LeavesEverythingElseToSdpa) {
  const at::Tensor q = at::randn({1, 4, 1, 32}), k = at::randn({1, 4, 9, 32}), v = at::randn({1, 4, 9, 32});
  EXPECT_TRUE(decode_attention_applies(q, k, v, {}));
  EXPECT_FALSE(decode_attention_applies(at::randn({1, 4, 2, 32}), k, v, {}));                // two query positions
  EXPECT_FALSE(decode_attention_applies(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), {}));
  EXPECT_FALSE(decode_attention_applies(q, k, v, at::ones({1, 4, 1, 9}, at::kBool)));        // per-head mask
  EXPECT_FALSE(decode_attention_applies(at::randn({1, 4, 1, 24}), at::randn({1, 4, 9, 24}), at::randn({1, 4, 9, 24}),
                                        {}));                                                // D not a multiple of 16
  EXPECT_FALSE(decode_attention_applies(q, at::randn({1, 3, 9, 32}), at::randn({1, 3, 9, 32}), {}));  // 4 % 3 ≠ 0
  const at::Tensor qg = q.clone().set_requires_grad(true);
  EXPECT_FALSE(decode_attention_applies(qg, k, v, {}));  // autograd keeps SDPA
  // The dispatcher: prefill (T > 1, causal) goes to SDPA and equals it bit for bit.
  const at::Tensor qp = at::randn({1, 4, 9, 32});
  EXPECT_TRUE(at::equal(attention(qp, k, v, {}, 0.3, true),
                        at::scaled_dot_product_attention(qp, k, v, {}, 0.0, true, 0.3, false)));
}
