// mm_bf16_f32 (quant/cpu_bf16_gemm.h) against the fp32 product of the same bf16 values, in every operand layout the
// training steps pass (row-major, transposed views, a column range of a wider output). Skipped on CPUs without bf16
// dot products or a LibTorch without oneMKL's bf16 GEMM.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "quant/cpu_bf16_gemm.h"

using namespace eqat;

// Each product of two bf16 values is exact in fp32, so the only difference from the float64 product of the same
// bf16 values is fp32 summation: at most γ_K·Σ_k |a·b| per output, γ_K = K·2⁻²⁴/(1 − K·2⁻²⁴) (K ≤ 300 here:
// ~1.8e-5). The bound is checked per output against Σ|a||b|. A transposed operand read the wrong way, a wrong
// leading dimension or an output written past its columns gives errors of the order of the values themselves.
TEST(CpuBf16Gemm, EqualsTheFp32ProductOfTheBf16OperandsInEveryLayout) {
  if (!cpu_bf16_gemm_available()) GTEST_SKIP() << "no bf16 GEMM on this CPU or in this LibTorch";
  at::manual_seed(5);
  const int64_t M = 37, K = 300, N = 70;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      SCOPED_TRACE(testing::Message() << "a " << (ta ? "transposed" : "row-major") << ", b "
                                      << (tb ? "transposed" : "row-major"));
      // Stored with padding columns, so the leading dimensions are not the logical widths.
      const std::vector<int64_t> a_size = ta ? std::vector<int64_t>{K, M + 3} : std::vector<int64_t>{M, K + 5};
      const std::vector<int64_t> b_size = tb ? std::vector<int64_t>{N, K + 2} : std::vector<int64_t>{K, N + 7};
      const at::Tensor a_store = at::randn(a_size).to(at::kBFloat16), b_store = at::randn(b_size).to(at::kBFloat16);
      const at::Tensor a = ta ? a_store.narrow(1, 0, M).t() : a_store.narrow(1, 0, K);
      const at::Tensor b = tb ? b_store.narrow(1, 0, K).t() : b_store.narrow(1, 0, N);
      // The output: columns 4 .. 4 + N − 1 of a wider matrix; the columns around them must stay untouched.
      at::Tensor wide = at::full({M, N + 9}, 7.0f);
      at::Tensor out = wide.narrow(1, 4, N);
      mm_bf16_f32(out, a, b);
      const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
      const at::Tensor exact = at::mm(ad, bd), bound = at::mm(ad.abs(), bd.abs());
      const double gamma = K * std::ldexp(1.0, -24) / (1 - K * std::ldexp(1.0, -24));
      EXPECT_TRUE(((out.to(at::kDouble) - exact).abs() <= gamma * bound).all().item<bool>())
          << "max error " << (out.to(at::kDouble) - exact).abs().max().item<double>();
      EXPECT_TRUE(wide.narrow(1, 0, 4).eq(7.0f).all().item<bool>());
      EXPECT_TRUE(wide.narrow(1, 4 + N, 5).eq(7.0f).all().item<bool>());
    }
}
