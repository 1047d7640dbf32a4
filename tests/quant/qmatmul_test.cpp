// Packed linear on the CPU: the AVX2 and scalar kernels and the dispatch against the fp32 reference
// (dequantize_gptq + matmul), over every bit width, group size, odd M / N / K, activation and scale dtypes; the
// fallbacks (act-order g_idx, groups that are not multiples of 32, large M); the backward against autograd.
//
// Tolerance (fp32 accumulation). Both sides compute y[n] = Σ_k x_k·s_g(k)·(q_k − z_g). The kernels form per chunk
// of 32 rows P = Σ x·q (AVX2: on x pre-scaled by powers of two, exact) and then s·(P − z·Σx), accumulated over the
// K/32 chunks; each partial sum is bounded by 2^b·Σ|x_k| in magnitude, so with u = 2^-24 the standard summation
// bound gives |Δy[n]| ≤ u·(32 + K/32 + 8)·2^b·Σ_k |x_k|·s_g(k),n (the 8 covers the products and the reference's own
// error, which is smaller: γ_K·Σ|x||w| with |w| ≤ 2^b·s). We assert 2× that bound. Outputs in fp16/bf16 add one
// rounding of y on each side: + 2^-10·|y| (fp16) or 2^-7·|y| (bf16).
// The AVX-512 VNNI kernel rounds x to int8 per chunk of 32 (dx = max|x|/127): each x_k moves by at most dx/2, so
// y[n] moves by at most Σ_k dx_chunk(k)/2 · |W[n, k]| (int8_bound), on top of the fp32 bound for the rest.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "data/error.h"
#include "quant/cpu_half_gemv.h"
#include "quant/cpu_qgemv.h"
#include "quant/pack.h"
#include "quant/qmatmul.h"

using namespace eqat;

namespace {

struct Case {
  GptqTensors w;
  at::Tensor W;  // [N, K] fp32 reference weight
};

Case make_case(int64_t N, int64_t K, int bits, int64_t g, uint64_t seed, c10::ScalarType sdt = at::kHalf) {
  at::manual_seed(seed);
  const int64_t G = (K + g - 1) / g;  // a ragged last group when g does not divide K
  at::Tensor q = at::randint(0, 1 << bits, {N, K}, at::kInt);
  at::Tensor z = at::randint(0, 1 << bits, {N, G}, at::kInt);
  at::Tensor s = at::rand({N, G}) * 0.02 + 0.001;
  Case c;
  c.w = pack_gptq(q, z, s, bits, g, sdt);
  c.W = dequantize_gptq(c.w, bits);
  return c;
}

// Derived bound of the header comment, per output element: [M, N].
at::Tensor fp32_bound(const at::Tensor& x, const GptqTensors& w, int bits, int64_t g) {
  const int64_t K = x.size(-1);
  at::Tensor gi = at::arange(K, at::kLong).div(g, "floor");
  at::Tensor S = w.scales.to(at::kFloat).t().index_select(1, gi);  // [N, K]
  const double u = std::ldexp(1.0, -24);
  return 2 * u * (32 + K / 32 + 8) * (1 << bits) * at::matmul(x.to(at::kFloat).abs(), S.t());
}

// Σ_k dx(k)/2 · |W[n, k]| per output [M, N]: the int8 rounding of x in the VNNI kernel (header comment).
at::Tensor int8_bound(const at::Tensor& x, const at::Tensor& W) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor amax = std::get<0>(x.to(at::kFloat).abs().view({M, K / 32, 32}).max(-1, true));  // [M, K/32, 1]
  at::Tensor half_step = (amax / 127.0 / 2.0).expand({M, K / 32, 32}).reshape({M, K});
  return at::matmul(half_step, W.abs().t());
}

// The bound for one kernel: fp32, plus the int8 rounding of x for the VNNI kernel.
at::Tensor kernel_bound(const at::Tensor& x, const GptqTensors& w, const at::Tensor& W, int bits, int64_t g,
                        CpuIsa isa) {
  at::Tensor b = fp32_bound(x, w, bits, g);
  return isa == CpuIsa::kVnni ? b + int8_bound(x, W) : b;
}

void expect_close(const at::Tensor& got, const at::Tensor& ref, const at::Tensor& bound, const std::string& what) {
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  at::Tensor err = (got.to(at::kFloat) - ref.to(at::kFloat)).abs();
  at::Tensor excess = err - bound;
  EXPECT_LE(excess.max().item<float>(), 0.f) << what << ": max err " << err.max().item<float>() << ", bound at argmax "
                                             << bound.flatten()[excess.argmax()].item<float>();
}

double out_rounding(c10::ScalarType t) {
  return t == at::kHalf ? std::ldexp(1.0, -10) : t == at::kBFloat16 ? std::ldexp(1.0, -7) : 0.0;
}

void run_kernel(const Case& c, const at::Tensor& x, int bits, int64_t g, CpuIsa isa, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = c.w.qweight.size(1);
  y = at::empty({M, N}, at::kFloat);
  CpuQWeight cw{reinterpret_cast<const uint32_t*>(c.w.qweight.data_ptr<int32_t>()),
                reinterpret_cast<const uint32_t*>(c.w.qzeros.data_ptr<int32_t>()),
                reinterpret_cast<const uint16_t*>(c.w.scales.data_ptr()),
                c.w.scales.scalar_type() == at::kBFloat16,
                K,
                N,
                g,
                bits};
  cpu_qgemm(cw, x.data_ptr<float>(), M, y.data_ptr<float>(), isa);
}

}  // namespace

TEST(QMatmul, KernelsMatchReferenceOverBitsGroupsAndShapes) {
  std::vector<CpuIsa> isas{CpuIsa::kScalar};
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kVnni})
    if (cpu_isa_supported(isa)) isas.push_back(isa);
  int checked = 0;
  for (int bits : {2, 3, 4, 8})
    for (int64_t K : {96, 384})
      for (int64_t g : {32, 64, 128, -1}) {
        const int64_t gs = g < 0 ? K : g;
        if (K % gs != 0) continue;
        // 40·3 bits: zero-point rows end in a partial word; 96 and 128: whole VNNI tiles (96: a last task of 32
        // columns); 40 and 136 take the AVX2 kernel under kVnni.
        for (int64_t N : {40, 96, 128, 136}) {
          const Case c = make_case(N, K, bits, gs, bits * 1000 + K + gs + N);
          for (int64_t M : {1, 2, 3, 5, 8, 11}) {
            at::Tensor x = at::randn({M, K});
            at::Tensor ref = at::matmul(x, c.W.t());
            for (CpuIsa isa : isas) {
              at::Tensor y;
              run_kernel(c, x, bits, gs, isa, y);
              expect_close(y, ref, kernel_bound(x, c.w, c.W, bits, gs, isa),
                           std::string(cpu_isa_name(isa)) + " b" + std::to_string(bits) + " K" + std::to_string(K) +
                               " g" + std::to_string(gs) + " N" + std::to_string(N) + " M" + std::to_string(M));
              ++checked;
            }
          }
        }
      }
  EXPECT_GT(checked, 200);
}

TEST(QMatmul, AvxAndScalarAgreeClosely) {
  if (!cpu_isa_supported(CpuIsa::kAvx2)) GTEST_SKIP() << "no AVX2 on this CPU";
  const Case c = make_case(256, 1024, 3, 128, 7);
  at::Tensor x = at::randn({4, 1024});
  at::Tensor ya, ys;
  run_kernel(c, x, 3, 128, CpuIsa::kAvx2, ya);
  run_kernel(c, x, 3, 128, CpuIsa::kScalar, ys);
  expect_close(ya, ys, fp32_bound(x, c.w, 3, 128), "avx2 vs scalar");
}

// eqat's files are compiled with OpenMP (CMake target eqat_openmp, PUBLIC through eqat_data, so this file has the
// same flags as src/): without it LibTorch's header-only at::parallel_for runs the whole range on the calling
// thread, and the packed GEMV, the fused fake quantizer and AdamW ran on one core whatever --threads said. The split
// over columns must not change a single bit.
TEST(QMatmul, KernelsSplitColumnsOverLibTorchThreads) {
  const int saved = at::get_num_threads();
  at::set_num_threads(2);
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  EXPECT_EQ(ids.size(), 2u) << "at::parallel_for ran on one thread: eqat is built without OpenMP";
  const Case c = make_case(512, 512, 2, 64, 21);
  const at::Tensor x = at::randn({3, 512});
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kVnni}) {
    if (!cpu_isa_supported(isa)) continue;
    at::Tensor y1, y2;
    at::set_num_threads(1);
    run_kernel(c, x, 2, 64, isa, y1);
    at::set_num_threads(2);
    run_kernel(c, x, 2, 64, isa, y2);
    EXPECT_TRUE(at::equal(y1, y2)) << cpu_isa_name(isa);
  }
  at::set_num_threads(saved);
}

// float_linear splits a few-row fp32 product over threads by columns. Each output is one dot product over K on
// both sides, computed by MKL in possibly different orders: |Δy| ≤ 2·γ_K·Σ_k |x_k·w_k| with γ_K ≈ K·u (u = 2^-24),
// asserted with a further factor 2.
TEST(QMatmul, FloatLinearSplitsFewRowsOverThreads) {
  const int saved = at::get_num_threads();
  at::set_num_threads(2);
  at::manual_seed(5);
  const int64_t N = 4100, K = 1088;  // N·K ≥ 4 Mi: the split applies; N is not a multiple of the 256-column slice
  const at::Tensor w = at::randn({N, K}), b = at::randn({N});
  const double u = std::ldexp(1.0, -24);
  for (const auto& shape : std::vector<std::vector<int64_t>>{{1, K}, {3, K}, {1, 2, K}, {5, K}}) {
    const at::Tensor x = at::randn(shape);
    const at::Tensor got = float_linear(x, w, b), ref = at::linear(x, w, b);
    ASSERT_EQ(got.sizes(), ref.sizes());
    const at::Tensor bound = 4 * K * u * (at::matmul(x.abs(), w.abs().t()) + b.abs());
    EXPECT_LE((got - ref).abs().sub(bound).max().item<float>(), 0.f) << x.sizes();
  }
  // Recorded gradients keep at::linear (and its autograd).
  const at::Tensor xg = at::randn({1, K}).set_requires_grad(true);
  const at::Tensor yg = float_linear(xg, w);
  EXPECT_TRUE(yg.requires_grad());
  EXPECT_TRUE(at::equal(yg, at::linear(xg, w)));
  at::set_num_threads(saved);
}

// Weights kept as stored (fp16 / bf16) with fp32 activations. The reference is at::linear on the weight converted to
// fp32, which is exact, so both sides compute the same fp32 dot products. Up to kHalfWeightRows rows, cpu_half_gemv
// sums in its own order: each side is within γ_K·Σ_k |x_k·w_k| of the exact value (γ_K ≈ K·u, u = 2^-24), so
// |Δy| ≤ 2·γ_K·(Σ|x·w| + |b|), asserted with a further factor 2. Above it the product is the converted weight's
// at::linear itself: bit-identical while the fp32 weight fits one slice (kHalfWeightSliceBytes), within the same
// bound when it is multiplied in row slices.
TEST(QMatmul, FloatLinearTakesHalfWeightsAsStored) {
  const int saved = at::get_num_threads();
  at::set_num_threads(2);
  at::manual_seed(6);
  const double u = std::ldexp(1.0, -24);
  // K: 16-wide body, an 8-wide step and a scalar tail (1091 = 68·16 + 3), and K < 8 (all tail); N: not a multiple
  // of the 64-row slice; N·K ≥ 4 Mi in the first case, so the rows are split over both threads.
  for (const auto& [N, K] : std::vector<std::pair<int64_t, int64_t>>{{4100, 1091}, {70, 1032}, {9, 5}})
    for (const auto dt : {at::kHalf, at::kBFloat16}) {
      const at::Tensor w = at::randn({N, K}).to(dt), b = at::randn({N});
      const at::Tensor wf = w.to(at::kFloat);
      for (const auto& shape : std::vector<std::vector<int64_t>>{
               {1, K}, {2, K}, {3, K}, {4, K}, {5, K}, {1, 7, K}, {16, K}, {17, K}, {2, 20, K}}) {
        const at::Tensor x = at::randn(shape);
        const at::Tensor got = float_linear(x, w, b), ref = at::linear(x, wf, b);
        ASSERT_EQ(got.sizes(), ref.sizes());
        ASSERT_EQ(got.scalar_type(), at::kFloat);
        const int64_t M = x.numel() / K;
        if (M > kHalfWeightRows) {
          EXPECT_TRUE(at::equal(got, ref)) << x.sizes() << " " << dt;
          continue;
        }
        const at::Tensor bound = 4 * K * u * (at::matmul(x.abs(), wf.abs().t()) + b.abs());
        EXPECT_LE((got - ref).abs().sub(bound).max().item<float>(), 0.f) << x.sizes() << " " << dt;
        // Both kernel variants, on rows [3, N − 2) only: the others are left as they were.
        for (const CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2}) {
          if (!cpu_isa_supported(isa) || N < 6) continue;
          const at::Tensor x2 = x.reshape({M, K}).contiguous(), wc = w.contiguous();
          at::Tensor y = at::full({M, N}, 7.f);
          cpu_half_gemv(x2.data_ptr<float>(), M, K, reinterpret_cast<const uint16_t*>(wc.data_ptr()),
                        dt == at::kBFloat16, 3, N - 2, y.data_ptr<float>(), N, isa);
          const at::Tensor r = at::matmul(x2, wf.t());
          const at::Tensor bk = 4 * K * u * at::matmul(x2.abs(), wf.abs().t());
          EXPECT_LE((y - r).abs().sub(bk).narrow(1, 3, N - 5).max().item<float>(), 0.f) << cpu_isa_name(isa);
          EXPECT_TRUE((y.narrow(1, 0, 3) == 7.f).all().item<bool>()) << cpu_isa_name(isa);
          EXPECT_TRUE((y.narrow(1, N - 2, 2) == 7.f).all().item<bool>()) << cpu_isa_name(isa);
        }
      }
    }
  // A weight larger than one slice in fp32 (64 MiB: 16400 rows at K = 1024) goes through in row slices.
  {
    const int64_t N = 16500, K = 1024;
    const at::Tensor w = at::randn({N, K}).to(at::kHalf), x = at::randn({2, 9, K});
    const at::Tensor wf = w.to(at::kFloat);
    const at::Tensor got = float_linear(x, w), ref = at::linear(x, wf);
    const at::Tensor bound = 4 * K * u * at::matmul(x.abs(), wf.abs().t());
    EXPECT_LE((got - ref).abs().sub(bound).max().item<float>(), 0.f);
  }
  // Recorded gradients: the converted weight's at::linear, with its autograd.
  const at::Tensor w = at::randn({40, 24}).to(at::kHalf);
  const at::Tensor xg = at::randn({1, 24}).set_requires_grad(true);
  const at::Tensor yg = float_linear(xg, w);
  ASSERT_TRUE(yg.requires_grad());
  EXPECT_TRUE(at::equal(yg, at::linear(xg, w.to(at::kFloat))));
  yg.sum().backward();
  EXPECT_TRUE(at::allclose(xg.grad(), w.to(at::kFloat).sum(0).unsqueeze(0)));
  at::set_num_threads(saved);
}

// Serving takes the int8-activation kernel where the CPU has it; the quantization phases (ExactCpuActivations) get
// the fp32 one, bit for bit.
TEST(QMatmul, QuantizationPhasesKeepFp32Activations) {
  if (cpu_qgemm_isa() != CpuIsa::kVnni) GTEST_SKIP() << "the default kernel is not AVX-512 VNNI here";
  const Case c = make_case(96, 256, 4, 64, 13);
  const at::Tensor x = at::randn({3, 256});
  at::Tensor yv, ya;
  run_kernel(c, x, 4, 64, CpuIsa::kVnni, yv);
  run_kernel(c, x, 4, 64, CpuIsa::kAvx2, ya);
  ASSERT_FALSE(at::equal(yv, ya));  // int8 activations do change the result
  EXPECT_TRUE(at::equal(quant_linear_forward(x, c.w, 4, 64, {}), yv));
  {
    const ExactCpuActivations exact;
    EXPECT_TRUE(ExactCpuActivations::active());
    EXPECT_TRUE(at::equal(quant_linear_forward(x, c.w, 4, 64, {}), ya));
  }
  EXPECT_FALSE(ExactCpuActivations::active());
  // A non-finite activation gives NaN in every output, as in fp32 (no NaN is cast to int8).
  at::Tensor xn = x.clone();
  xn[1][7] = std::numeric_limits<float>::quiet_NaN();
  run_kernel(c, xn, 4, 64, CpuIsa::kVnni, yv);
  EXPECT_TRUE(at::isnan(yv[1]).all().item<bool>());
  EXPECT_FALSE(at::isnan(yv[0]).any().item<bool>());
}

TEST(QMatmul, DispatchHandlesDtypesBiasAndLeadingDims) {
  for (auto sdt : {at::kHalf, at::kBFloat16})
    for (auto xdt : {at::kFloat, at::kHalf, at::kBFloat16})
      for (int bits : {2, 3, 4}) {
        const int64_t N = 96, K = 256, g = 64;
        const Case c = make_case(N, K, bits, g, 11 + bits, sdt);
        at::Tensor x = at::randn({2, 3, K}).to(xdt);
        at::Tensor bias = at::randn({N}).to(xdt);
        at::Tensor y = quant_linear_forward(x, c.w, bits, g, bias);
        ASSERT_EQ(y.sizes(), at::IntArrayRef({2, 3, N}));
        ASSERT_EQ(y.scalar_type(), xdt);
        at::Tensor ref = at::matmul(x.to(at::kFloat), c.W.t()) + bias.to(at::kFloat);
        at::Tensor bound = fp32_bound(x.reshape({-1, K}), c.w, bits, g).view({2, 3, N}) +
                           out_rounding(xdt) * ref.abs() + 1e-6;
        const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat);
        expect_close(y, ref, bound + kernel_bound(x2, c.w, c.W, bits, g, cpu_qgemm_isa()).view({2, 3, N}), "dispatch");
        // The reference entry point agrees with the fp32 bound.
        expect_close(quant_linear_forward_reference(x, c.w, bits, g, bias), ref, bound, "reference");
      }
}

TEST(QMatmul, FallbacksActOrderSmallGroupsAndLargeM) {
  const int64_t N = 64, K = 128;
  // act-order: a permuted g_idx takes the reference path and still matches dequantize_gptq.
  Case c = make_case(N, K, 4, 32, 3);
  at::Tensor perm = at::randperm(K, at::kLong);
  c.w.g_idx = c.w.g_idx.index_select(0, perm).contiguous();
  EXPECT_FALSE(gptq_is_sequential(c.w, 32));
  at::Tensor W = dequantize_gptq(c.w, 4);
  at::Tensor x = at::randn({3, K});
  expect_close(quant_linear_forward(x, c.w, 4, 32, {}), at::matmul(x, W.t()), fp32_bound(x, c.w, 4, 32), "act-order");
  // group 16 (not a multiple of the 32-row chunk): reference path.
  const Case c16 = make_case(N, K, 2, 16, 4);
  expect_close(quant_linear_forward(x, c16.w, 2, 16, {}), at::matmul(x, c16.W.t()), fp32_bound(x, c16.w, 2, 16), "g16");
  // N = 44 at 3 bits: zero-point rows end in a partial word and N % 8 != 0: reference path.
  const Case c44 = make_case(44, K, 3, 32, 6);
  expect_close(quant_linear_forward(x, c44.w, 3, 32, {}), at::matmul(x, c44.W.t()), fp32_bound(x, c44.w, 3, 32), "N44");
  // K = 172 in groups of 64 (stories260K's FFN): a ragged last group of 44 rows, G = 3: reference path, forward
  // and backward, and the same g_idx = k / g that GPTQModel writes for such layers.
  const Case cr = make_case(N, 172, 4, 64, 7);
  EXPECT_EQ(cr.w.scales.size(0), 3);
  EXPECT_TRUE(gptq_is_sequential(cr.w, 64));
  EXPECT_EQ(cr.w.g_idx[171].item<int>(), 2);
  at::Tensor xr = at::randn({3, 172});
  expect_close(quant_linear_forward(xr, cr.w, 4, 64, {}), at::matmul(xr, cr.W.t()), fp32_bound(xr, cr.w, 4, 64),
               "ragged");
  // large M: dequantize + SGEMM (exact activations; the serving default may take bf16: PrefillTakesBf16...).
  const Case cl = make_case(N, K, 3, 64, 5);
  at::Tensor xl = at::randn({100, K});
  const ExactCpuActivations exact;
  expect_close(quant_linear_forward(xl, cl.w, 3, 64, {}), at::matmul(xl, cl.W.t()), fp32_bound(xl, cl.w, 3, 64),
               "large M");
}

// Prefill (M > 64 rows) on a CPU with native bf16 dot products: Wᵀ dequantized to bf16 and a bf16 GEMM. Bound, per
// output: x and Ŵ are each rounded to bf16 (relative u_b = 2^-9), so each product moves by ≤ (2u_b + u_b²)·|x||Ŵ|;
// the GEMM accumulates in fp32 (γ_K ≈ K·2^-24 of Σ|x||Ŵ|), and y is rounded to bf16 once (u_b·|y|). Asserted with
// a further factor 2. Under ExactCpuActivations the same call is the fp32 dequant + SGEMM, bit for bit.
TEST(QMatmul, PrefillTakesBf16WhereTheCpuHasIt) {
  if (!cpu_has_bf16_dot()) GTEST_SKIP() << "no native bf16 dot products on this CPU";
  const double ub = std::ldexp(1.0, -9), u = std::ldexp(1.0, -24);
  for (int bits : {2, 3, 4}) {
    const int64_t N = 96, K = 512, g = bits == 3 ? 128 : 64, M = 130;
    const Case c = make_case(N, K, bits, g, 40 + bits);
    for (auto xdt : {at::kFloat, at::kBFloat16}) {
      const at::Tensor x = at::randn({M, K}).to(xdt);
      const at::Tensor y = quant_linear_forward(x, c.w, bits, g, {});
      ASSERT_EQ(y.scalar_type(), xdt);
      const at::Tensor x64 = x.to(at::kDouble), W64 = c.W.to(at::kDouble);
      const at::Tensor ref = at::matmul(x64, W64.t()), abs_dot = at::matmul(x64.abs(), W64.abs().t());
      const at::Tensor bound = 2 * ((2 * ub + ub * ub + (K + 2) * u) * abs_dot + ub * ref.abs());
      EXPECT_LE(((y.to(at::kDouble) - ref).abs() - bound).max().item<double>(), 0.0) << bits;
      if (xdt != at::kFloat) continue;
      // bf16 was taken: the fp32 path's result is not reproduced; under ExactCpuActivations it is, bit for bit.
      const at::Tensor y32 = at::mm(x, c.W.t().contiguous());
      EXPECT_FALSE(at::equal(y, y32)) << bits;
      const ExactCpuActivations exact;
      EXPECT_TRUE(at::equal(quant_linear_forward(x, c.w, bits, g, {}), y32)) << bits;
    }
  }
}

TEST(QMatmul, BadInputsAreInputErrors) {
  const Case c = make_case(64, 128, 4, 32, 9);
  EXPECT_THROW(quant_linear_forward(at::randn({1, 96}), c.w, 4, 32, {}), InputError);          // wrong K
  EXPECT_THROW(quant_linear_forward(at::randn({1, 128}), c.w, 4, 64, {}), InputError);         // wrong group size
  EXPECT_THROW(quant_linear_forward(at::randn({1, 128}), c.w, 4, 32, at::randn({3})), InputError);  // bias size
}

// Backward: against autograd through the float formula W = s·(q − z) in fp64.
TEST(QMatmul, BackwardMatchesAutograd) {
  for (int bits : {2, 3, 4, 5}) {
    // bits 5 stands for the ragged case: 4 bits, K = 172 in groups of 64 (the last group has 44 rows).
    const bool ragged = bits == 5;
    if (ragged) bits = 4;
    const int64_t N = 64, K = ragged ? 172 : 128, g = ragged ? 64 : 32, M = 5;
    const Case c = make_case(N, K, bits, g, 20 + bits);
    auto [q, z] = unpack_gptq(c.w, bits);
    at::Tensor gi = at::arange(K, at::kLong).div(g, "floor");
    at::Tensor s = c.w.scales.to(at::kDouble).t().contiguous().set_requires_grad(true);  // [N, G]
    at::Tensor x = at::randn({M, K}, at::kDouble).set_requires_grad(true);
    at::Tensor W = s.index_select(1, gi) * (q.to(at::kDouble) - z.index_select(1, gi).to(at::kDouble));
    at::Tensor y = at::matmul(x, W.t());
    at::Tensor go = at::randn({M, N}, at::kDouble);
    y.backward(go);
    QuantLinearGrads r = quant_linear_backward(go.to(at::kFloat), x.detach().to(at::kFloat), c.w, bits, g);
    // fp32 GEMMs of depth ≤ max(M·g, N) with |terms| ≤ 2^b·s·|x|·|go|: relative 1e-5 of the magnitude sum is ≥ 10×
    // the γ bound (u·depth ≈ 6e-8·128).
    at::Tensor gx_mag = at::matmul(go.abs(), W.abs()).to(at::kFloat);
    EXPECT_LE(((r.grad_input - x.grad().to(at::kFloat)).abs() - 1e-5 * gx_mag - 1e-7).max().item<float>(), 0.f);
    at::Tensor gs_ref = s.grad().t().to(at::kFloat);  // [G, N]
    ASSERT_EQ(r.grad_scales.sizes(), gs_ref.sizes());
    const float mag = gs_ref.abs().max().item<float>();
    EXPECT_LE((r.grad_scales - gs_ref).abs().max().item<float>(), 1e-5 * mag * (1 << bits)) << bits << ragged;
  }
}

namespace {
struct TrainLayout {
  int bits;
  int64_t K, g;
};
const TrainLayout kTrainLayouts[] = {{2, 640, 64}, {3, 576, 96}, {4, 1024, 512}, {4, 320, 320}};

// A packed [N, K] weight of layout l with fp32 master step sizes off the fp16 grid (seeded by `seed`).
GptqTensors train_case(const TrainLayout& l, int64_t N, uint64_t seed) {
  GptqTensors w = make_case(N, l.K, l.bits, l.g, seed + l.bits).w;
  at::manual_seed(seed + 10);
  w.scales = (at::rand({l.K / l.g, N}) * 0.02 + 0.001).to(at::kFloat);
  return w;
}
}  // namespace

// E2E-QP's CPU training path (chunks of (q − z), fp32 master step sizes) against fp64 on the same weights, over
// chunk layouts: several chunks with a short last one (g 64, K 640: chunks of 256), groups that do not divide 256
// (g 96: chunks of 192), a chunk inside a group (g 512: chunks of 256), per-channel (g = K = 320: chunks of 160).
// The step sizes are fp32 values off the fp16 grid, so rounding them to fp16 (as the serving kernels do) moves y by
// up to 2^-11 relative and fails the bounds. Bounds (u = 2^-24, fp32 dot products of depth d: γ_d ≤ (d + 2)·u of
// the sum of |terms|): y and grad_input are dot products over K (in chunks added to the result: depth ≤ K + K/32)
// of exactly formed |x|·|Ŵ| or |go|·|Ŵ| terms (Ŵ = (q − z)·s: one rounding, covered by the + 2); grad_scales sums
// over the g rows of a group (plus one add per chunk) products of exact (q − z) with P = xᵀ·go, itself of depth M.
TEST(QMatmul, TrainingPathUsesFp32StepSizesAndMatchesFp64) {
  for (const TrainLayout& l : kTrainLayouts) {
    const int64_t N = 48, M = 7, G = l.K / l.g;
    const GptqTensors w = train_case(l, N, 40);
    ASSERT_FALSE(at::equal(w.scales, w.scales.to(at::kHalf).to(at::kFloat)));
    auto [q, z] = unpack_gptq(w, l.bits);
    at::Tensor gi = at::arange(l.K, at::kLong).div(l.g, "floor");
    at::Tensor qmz = q.to(at::kDouble) - z.index_select(1, gi).to(at::kDouble);          // [N, K]
    at::Tensor W = qmz * w.scales.to(at::kDouble).t().index_select(1, gi);              // [N, K] fp64
    at::Tensor x = at::randn({M, l.K}), go = at::randn({M, N});
    const at::Tensor x64 = x.to(at::kDouble), go64 = go.to(at::kDouble);
    const double u = std::ldexp(1.0, -24), depth = static_cast<double>(l.K + l.K / 32 + 2);

    at::Tensor y = quant_linear_train_forward(x, w, l.bits, l.g);
    at::Tensor y_err = (y.to(at::kDouble) - at::matmul(x64, W.t())).abs();
    EXPECT_LE((y_err - depth * u * at::matmul(x64.abs(), W.abs().t())).max().item<double>(), 0.0) << l.g;

    QuantLinearGrads r = quant_linear_backward(go, x, w, l.bits, l.g);
    at::Tensor gx_err = (r.grad_input.to(at::kDouble) - at::matmul(go64, W)).abs();
    EXPECT_LE((gx_err - depth * u * at::matmul(go64.abs(), W.abs())).max().item<double>(), 0.0) << l.g;
    at::Tensor P = at::matmul(x64.t(), go64);                                            // [K, N]
    at::Tensor gs = at::zeros({G, N}, at::kDouble).index_add_(0, gi, qmz.t() * P);     // [G, N]
    at::Tensor gs_mag = at::zeros({G, N}, at::kDouble).index_add_(0, gi, qmz.t().abs() *
                                                                         at::matmul(x64.abs().t(), go64.abs()));
    const double gs_depth = static_cast<double>(M + l.g + l.K / 32 + 2);
    ASSERT_EQ(r.grad_scales.sizes(), gs.sizes());
    EXPECT_LE(((r.grad_scales.to(at::kDouble) - gs).abs() - gs_depth * u * gs_mag).max().item<double>(), 0.0) << l.g;

    // bf16 activations in, bf16 out: the same computation, one rounding of the result (2^-8 relative).
    at::Tensor yb = quant_linear_train_forward(x.to(at::kBFloat16), w, l.bits, l.g);
    EXPECT_EQ(yb.scalar_type(), at::kBFloat16);
    at::Tensor yb_ref = at::matmul(x.to(at::kBFloat16).to(at::kDouble), W.t());
    EXPECT_LE(((yb.to(at::kDouble) - yb_ref).abs() - std::ldexp(1.0, -8) * yb_ref.abs() -
               depth * u * at::matmul(x64.abs(), W.abs().t()) * 2).max().item<double>(), 0.0) << l.g;
  }
}

// The training cache (E2E-QP on small models) reads the same chunks' (q − z) and Ŵᵀ that the uncached path forms at
// every call, and forms Ŵᵀ with the same elementwise product: y, grad_input and grad_scales must be equal bit for
// bit, over the chunk layouts above. Fresh step sizes give a Ŵᵀ of their own (train_cache_scaled).
TEST(QMatmul, TrainingCacheGivesTheUncachedResultsBitForBit) {
  for (const TrainLayout& l : kTrainLayouts) {
    const int64_t N = 48, M = 9;
    GptqTensors w = train_case(l, N, 60);
    const at::Tensor x = at::randn({M, l.K}), go = at::randn({M, N});
    ASSERT_TRUE(train_cache_applies(w, l.g)) << l.g;
    TrainWeightCache cache = train_cache_build(w, l.bits, l.g);
    for (int round = 0; round < 2; ++round) {
      EXPECT_TRUE(at::equal(quant_linear_train_forward(x, w, l.bits, l.g, &cache),
                            quant_linear_train_forward(x, w, l.bits, l.g)))
          << l.g << " round " << round;
      const QuantLinearGrads a = quant_linear_backward(go, x, w, l.bits, l.g, true, true, &cache);
      const QuantLinearGrads b = quant_linear_backward(go, x, w, l.bits, l.g, true, true);
      EXPECT_TRUE(at::equal(a.grad_input, b.grad_input)) << l.g << " round " << round;
      EXPECT_TRUE(at::equal(a.grad_scales, b.grad_scales)) << l.g << " round " << round;
      w.scales = w.scales * 1.5 + 1e-4;  // new step sizes: the cache's Ŵᵀ is rebuilt from its (q − z)
      cache.wt = train_cache_scaled(cache.qmz, w.scales, l.g);
    }
  }
}

TEST(QMatmul, CpuDequantIsBitExact) {
  for (int bits : {2, 3, 4, 8}) {
    const Case c = make_case(40, 192, bits, 64, 30 + bits, bits == 3 ? at::kBFloat16 : at::kHalf);
    at::Tensor wt = at::empty({192, 40}, at::kFloat);
    CpuQWeight cw{reinterpret_cast<const uint32_t*>(c.w.qweight.data_ptr<int32_t>()),
                  reinterpret_cast<const uint32_t*>(c.w.qzeros.data_ptr<int32_t>()),
                  reinterpret_cast<const uint16_t*>(c.w.scales.data_ptr()),
                  c.w.scales.scalar_type() == at::kBFloat16,
                  192,
                  40,
                  64,
                  bits};
    cpu_dequant_t(cw, wt.data_ptr<float>());
    EXPECT_TRUE(at::equal(wt, c.W.t().contiguous())) << bits;
    // The bf16 variant is the fp32 one rounded to nearest even, as at::to rounds.
    at::Tensor wb = at::empty({192, 40}, at::kBFloat16);
    cpu_dequant_t_bf16(cw, reinterpret_cast<uint16_t*>(wb.data_ptr()));
    EXPECT_TRUE(at::equal(wb, wt.to(at::kBFloat16))) << bits;
  }
}
