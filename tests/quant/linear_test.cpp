// QuantLinear's packed mode when step sizes train (E2E-QP) on the CPU: an autograd function that reads the packed
// integers at every call. Its forward and gradients must equal autograd through Ŵ = (q − z)·s, and it must keep no
// float copy of the weight between calls.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "quant/linear.h"
#include "quant/pack.h"

using namespace eqat;

TEST(QuantLinear, PackedTrainingMatchesAutogradThroughTheDequantizedWeight) {
  at::manual_seed(5);
  const int64_t K = 172, N = 64, M = 6;  // a ragged last group (172 = 2·64 + 44)
  QuantLinear lin(K, N, /*bias=*/true);
  lin->weight.set_data(at::randn({N, K}) * 0.05);
  lin->bias.set_data(at::randn({N}));
  lin->to_fake_quant(QuantSpec{4, 64});
  lin->to_packed(at::kFloat);
  lin->scales.set_requires_grad(true);

  at::Tensor x = at::randn({M, K}).set_requires_grad(true), r = at::randn({M, N});
  at::Tensor y = lin->forward(x);
  (y * r).sum().backward();

  // Reference in fp64: Ŵ = s[g(k), n]·(q − z) with autograd on s.
  auto [q, z] = unpack_gptq(lin->packed(), 4);
  at::Tensor gi = lin->g_idx.to(at::kLong);
  at::Tensor s = lin->scales.detach().to(at::kDouble).clone().set_requires_grad(true);  // [G, N]
  at::Tensor xr = x.detach().to(at::kDouble).set_requires_grad(true);
  at::Tensor W = s.t().index_select(1, gi) * (q.to(at::kDouble) - z.index_select(1, gi).to(at::kDouble));
  at::Tensor yr = at::matmul(xr, W.t()) + lin->bias.detach().to(at::kDouble);
  (yr * r.to(at::kDouble)).sum().backward();
  // fp32 sums of ≤ max(K, M·64) terms of magnitude ≤ 15·s·|x|: relative 1e-5 is well above their rounding (≲ 1e-6).
  EXPECT_TRUE(at::allclose(y.to(at::kDouble), yr, 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(x.grad().to(at::kDouble), xr.grad(), 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(lin->scales.grad().to(at::kDouble), s.grad(), 1e-5, 1e-4));
  EXPECT_EQ(lin->scales.grad().sizes(), at::IntArrayRef({3, N}));

}
