// CUDA kernels (kernels/ through src/quant/cuda_adapter.cpp) against the fp32 reference dequantize_gptq, on random
// data: every bit width, group size, M = 1…8 (fused GEMV) and prefill M (dequant + cuBLAS, sliced), fp16 / bf16 /
// fp32 activations, fp16 / bf16 scales, K not a multiple of the GEMV's K-range per block, the backward and a
// CUDA-graph capture. Every test skips itself without a CUDA device (label gpu; ctest -L gpu on a GPU machine).
//
// Tolerances. GEMV: fp32 accumulation of exact (q − z) and exactly-converted x, so the fp32 summation bound of
// tests/quant/qmatmul_test.cpp applies: |Δy| ≤ 2·u·(32 + K/32 + 8)·2^b·Σ_k|x_k|·s (u = 2^-24), plus one output
// rounding on each side (2^-10·|y| fp16, 2^-7·|y| bf16). Prefill: W is rounded once to x's dtype (relative 2^-11
// fp16, 2^-8 bf16) and cuBLAS may reduce split-K partials in that dtype (PyTorch's default allows reduced-precision
// reductions), so we allow 4 such roundings of Σ_k|x_k|·|W_nk| on top of the output rounding.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include "quant/cuda_adapter.h"
#include "quant/pack.h"
#include "quant/qmatmul.h"

using namespace eqat;

namespace {

#define SKIP_WITHOUT_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device"

struct Case {
  GptqTensors cpu, dev;
  at::Tensor W;  // [N, K] fp32 reference (CPU)
};

Case make_case(int64_t N, int64_t K, int bits, int64_t g, uint64_t seed, c10::ScalarType sdt = at::kHalf) {
  at::manual_seed(seed);
  at::Tensor q = at::randint(0, 1 << bits, {N, K}, at::kInt);
  at::Tensor z = at::randint(0, 1 << bits, {N, K / g}, at::kInt);
  at::Tensor s = at::rand({N, K / g}) * 0.02 + 0.001;
  Case c;
  c.cpu = pack_gptq(q, z, s, bits, g, sdt);
  c.dev = {c.cpu.qweight.cuda(), c.cpu.qzeros.cuda(), c.cpu.scales.cuda(), c.cpu.g_idx.cuda()};
  c.W = dequantize_gptq(c.cpu, bits);
  return c;
}

double out_rounding(c10::ScalarType t) {
  return t == at::kHalf ? std::ldexp(1.0, -10) : t == at::kBFloat16 ? std::ldexp(1.0, -7) : 0.0;
}
double weight_rounding(c10::ScalarType t) {
  return t == at::kHalf ? std::ldexp(1.0, -11) : t == at::kBFloat16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -24);
}

// x: CPU fp32 values (already representable in the test dtype). Returns the allowed |Δ| per element [M, N].
at::Tensor bound(const at::Tensor& x, const Case& c, int bits, int64_t g, c10::ScalarType dt, bool prefill) {
  const int64_t K = x.size(1);
  at::Tensor gi = at::arange(K, at::kLong).div(g, "floor");
  at::Tensor S = c.cpu.scales.to(at::kFloat).t().index_select(1, gi);
  at::Tensor xa = x.abs();
  at::Tensor b = 2 * std::ldexp(1.0, -24) * (32 + K / 32 + 8) * (1 << bits) * at::matmul(xa, S.t());
  at::Tensor y = at::matmul(x, c.W.t());
  b = b + out_rounding(dt) * y.abs();
  if (prefill) b = b + 4 * weight_rounding(dt) * at::matmul(xa, c.W.abs().t());
  return b + 1e-6;
}

void expect_within(const at::Tensor& got, const at::Tensor& ref, const at::Tensor& bnd, const std::string& what) {
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  at::Tensor err = (got.cpu().to(at::kFloat) - ref).abs();
  at::Tensor excess = err - bnd;
  EXPECT_LE(excess.max().item<float>(), 0.f) << what << ": max err " << err.max().item<float>();
}

}  // namespace

TEST(Kernels, GemvMatchesReference_CUDA) {
  SKIP_WITHOUT_CUDA();
  for (int bits : {2, 3, 4})
    for (int64_t K : {96, 384, 2080})
      for (int64_t g : {32, 64, 128, -1}) {
        const int64_t gs = g < 0 ? K : g;
        if (K % gs) continue;
        for (int64_t N : {32, 44, 96, 160}) {  // 44: zero-point rows end in a partial word (pack.h)
          for (auto sdt : {at::kHalf, at::kBFloat16}) {
            const Case c = make_case(N, K, bits, gs, bits * 7919 + K + gs + N, sdt);
            for (int64_t M : {1, 2, 3, 5, 8})
              for (auto xdt : {at::kHalf, at::kBFloat16, at::kFloat}) {
                at::Tensor x = at::randn({M, K}).to(xdt).to(at::kFloat);  // representable in xdt
                at::Tensor y = quant_linear_forward(x.to(xdt).cuda(), c.dev, bits, gs, {});
                ASSERT_EQ(y.scalar_type(), xdt);
                expect_within(y, at::matmul(x, c.W.t()), bound(x, c, bits, gs, xdt, false),
                              "gemv b" + std::to_string(bits) + " K" + std::to_string(K) + " g" + std::to_string(gs) +
                                  " N" + std::to_string(N) + " M" + std::to_string(M));
              }
          }
        }
      }
}

TEST(Kernels, GemvLlamaShapesAndBias_CUDA) {
  SKIP_WITHOUT_CUDA();
  // 4096×11008 (K = 11008: 344 chunks, not a multiple of the per-block K range) and 4096×4096, with bias.
  for (auto [N, K, bits, g] : {std::tuple<int64_t, int64_t, int, int64_t>{4096, 11008, 2, 64},
                               {4096, 4096, 4, 128},
                               {1024, 11008, 3, 128}}) {
    const Case c = make_case(N, K, bits, g, N + K + bits);
    at::Tensor x = at::randn({1, K}).to(at::kHalf).to(at::kFloat);
    at::Tensor b = at::randn({N}).to(at::kHalf).to(at::kFloat);
    at::Tensor y = quant_linear_forward(x.to(at::kHalf).cuda(), c.dev, bits, g, b.to(at::kHalf).cuda());
    expect_within(y, at::matmul(x, c.W.t()) + b, bound(x, c, bits, g, at::kHalf, false) + 1e-3 * b.abs(),
                  "llama shape " + std::to_string(N) + "x" + std::to_string(K));
  }
}

TEST(Kernels, PrefillMatchesReference_CUDA) {
  SKIP_WITHOUT_CUDA();
  for (int bits : {2, 3, 4})
    for (auto xdt : {at::kHalf, at::kBFloat16, at::kFloat}) {
      const int64_t N = 160 * (bits == 3 ? 1 : 1), K = 384, g = 64;
      const Case c = make_case(N, K, bits, g, 100 + bits);
      for (int64_t M : {9, 17, 100}) {
        at::Tensor x = at::randn({M, K}).to(xdt).to(at::kFloat);
        at::Tensor y = quant_linear_forward(x.to(xdt).cuda(), c.dev, bits, g, {});
        expect_within(y, at::matmul(x, c.W.t()), bound(x, c, bits, g, xdt, true),
                      "prefill b" + std::to_string(bits) + " M" + std::to_string(M));
      }
    }
  // Column-sliced path: 4096×4096 fp16 Wᵀ is 32 MB > the 24 MB slice bound (slices of 3072 + 1024 columns).
  const Case c = make_case(4096, 4096, 4, 128, 5);
  at::Tensor x = at::randn({16, 4096}).to(at::kHalf).to(at::kFloat);
  expect_within(quant_linear_forward(x.to(at::kHalf).cuda(), c.dev, 4, 128, {}), at::matmul(x, c.W.t()),
                bound(x, c, 4, 128, at::kHalf, true), "sliced prefill");
}

TEST(Kernels, DequantIsExactInFp32_CUDA) {
  SKIP_WITHOUT_CUDA();
  for (int bits : {2, 3, 4}) {
    const Case c = make_case(96, 256, bits, 32, 40 + bits, at::kBFloat16);
    at::Tensor wt = cuda::dequantize_t(c.dev, bits, 32, at::kFloat).cpu();  // [K, N]
    EXPECT_TRUE(at::equal(wt, c.W.t().contiguous())) << bits;
  }
}

TEST(Kernels, BackwardMatchesReference_CUDA) {
  SKIP_WITHOUT_CUDA();
  for (int bits : {2, 3, 4}) {
    const int64_t N = 96, K = 256, g = 64, M = 33;
    const Case c = make_case(N, K, bits, g, 60 + bits);
    at::Tensor x = at::randn({M, K}), go = at::randn({M, N});
    QuantLinearGrads ref = quant_linear_backward_reference(go, x, c.cpu, bits, g);
    QuantLinearGrads got = quant_linear_backward(go.cuda(), x.cuda(), c.dev, bits, g);
    // fp32 x, go: cuBLAS fp32 GEMMs (TF32 off by default in LibTorch C++) of depth ≤ max(N, M·g); relative 1e-5 of
    // the magnitude sums bounds them with margin (u·depth ≈ 6e-8·2112 = 1.3e-4 worst case for the scale sums).
    const at::Tensor gx_mag = at::matmul(go.abs(), c.W.abs());
    EXPECT_LE(((got.grad_input.cpu() - ref.grad_input).abs() - 1e-5 * gx_mag - 1e-6).max().item<float>(), 0.f);
    const float mag = ref.grad_scales.abs().max().item<float>();
    EXPECT_LE((got.grad_scales.cpu() - ref.grad_scales).abs().max().item<float>(), 2e-4 * mag * (1 << bits)) << bits;
  }
}

TEST(Kernels, GraphCaptureReplaysTheGemv_CUDA) {
  SKIP_WITHOUT_CUDA();
  const Case c = make_case(512, 1024, 4, 128, 77);
  at::Tensor x = at::randn({1, 1024}).to(at::kHalf).cuda();
  at::Tensor out = at::zeros({1, 512}, x.options());
  auto replay = cuda_graph_capture([&] { out.copy_(quant_linear_forward(x, c.dev, 4, 128, {})); });
  out.zero_();
  replay();
  EXPECT_TRUE(at::equal(out, quant_linear_forward(x, c.dev, 4, 128, {})));
}

TEST(Kernels, UnsupportedFormatsFallBackOnDevice_CUDA) {
  SKIP_WITHOUT_CUDA();
  const Case c = make_case(64, 128, 8, 32, 88);  // 8-bit: no CUDA kernel, reference dequant + GEMM
  at::Tensor x = at::randn({2, 128});
  expect_within(quant_linear_forward(x.cuda(), c.dev, 8, 32, {}), at::matmul(x, c.W.t()),
                bound(x, c, 8, 32, at::kFloat, false), "8-bit fallback");
}
