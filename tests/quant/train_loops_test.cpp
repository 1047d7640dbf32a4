// The training loops' instruction-set variants (quant/train_loops.h) against the scalar one, element by element:
// Ŵ, dL/dW and AdamW's p, m, v must be bit-identical (the same IEEE float operations per element); the group sums
// of the step-size and zero-point gradients may differ only by summation order in double (bound derived below).
// A variant the CPU lacks is skipped.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "quant/quantizer.h"
#include "quant/train_loops.h"

using namespace eqat;

namespace {

std::vector<const TrainLoops*> wide_variants() {
  std::vector<const TrainLoops*> out;
  for (const TrainLoops* l : {avx2_train_loops(), avx512_train_loops()})
    if (l) out.push_back(l);
  return out;
}

// A fake-quant case with every edge the loops branch on: group lengths that are not multiples of 8 or 16 (K = 100 at
// g = 32 ends in a group of 4; per-channel K = 37), u exactly half-way between integers (ties go to even), |u| far
// beyond 2^22 in both directions, scales under the clamp, zero points off the grid and outside [zero_min, qmax].
struct LoopCase {
  at::Tensor W, s, z;
  QuantSpec spec;
};

LoopCase make_loop_case(int bits, int64_t K, int64_t group, int zero_min, uint64_t seed) {
  at::manual_seed(static_cast<int64_t>(seed));
  LoopCase c;
  c.spec = QuantSpec{bits, group, zero_min};
  const int64_t N = 9, G = c.spec.groups_for(K);
  c.W = at::randn({N, K});
  auto [s, z] = minmax_init(c.W, c.spec);
  c.s = (s * (0.6 + at::rand({N, G}))).contiguous();
  c.z = (z + at::rand({N, G}) - 0.5).contiguous();
  c.s[0][0] = 0.5f;  // row 0, group 0: u = W / 0.5 exactly, W set to halves of odd multiples below
  for (int64_t k = 0; k < std::min<int64_t>(K, 12); ++k) c.W[0][k] = 0.25f * static_cast<float>(2 * k - 11);
  c.W[1][3] = 1e6f, c.W[1][4] = -1e6f;  // |u| ≫ 2^22
  c.s[2][G - 1] = 1e-7f;                 // under kScaleMin
  c.z[3][0] = -2.3f;                     // under zero_min
  c.z[4][G - 1] = static_cast<float>(c.spec.qmax()) + 3.6f;
  return c;
}

FakeQuantRows loop_rows_of(const LoopCase& c) {
  return FakeQuantRows{c.W.const_data_ptr<float>(), c.s.const_data_ptr<float>(), c.z.const_data_ptr<float>(),
                       c.W.size(1),  c.spec.group_for(c.W.size(1)), c.s.size(1), static_cast<float>(c.spec.zero_min),
                       static_cast<float>(c.spec.qmax()), static_cast<float>(kScaleMin), static_cast<float>(kScaleMax)};
}

std::vector<LoopCase> loop_cases() {
  std::vector<LoopCase> out;
  uint64_t seed = 1;
  for (int bits : {2, 3, 4, 8})
    for (int zero_min : {0, 1}) {
      out.push_back(make_loop_case(bits, 100, 32, zero_min, seed++));
      out.push_back(make_loop_case(bits, 256, 64, zero_min, seed++));
      out.push_back(make_loop_case(bits, 37, -1, zero_min, seed++));
    }
  return out;
}

}  // namespace

TEST(TrainLoops, FakeQuantIsBitIdenticalToScalarAndToTheComposite) {
  const auto wide = wide_variants();
  if (wide.empty()) GTEST_SKIP() << "no AVX2 / AVX-512F on this CPU";
  for (const LoopCase& c : loop_cases()) {
    const FakeQuantRows r = loop_rows_of(c);
    at::Tensor ref = at::empty_like(c.W);
    scalar_train_loops().fake_quant(r, 0, c.W.size(0), ref.data_ptr<float>());
    ASSERT_TRUE(at::equal(ref, fake_quantize(c.W, c.s, c.z, c.spec))) << c.spec.tag();
    for (const TrainLoops* l : wide) {
      at::Tensor got = at::full_like(c.W, std::numeric_limits<float>::quiet_NaN());
      l->fake_quant(r, 0, 4, got.data_ptr<float>());  // two row ranges, as parallel_for splits them
      l->fake_quant(r, 4, c.W.size(0), got.data_ptr<float>());
      EXPECT_TRUE(at::equal(got, ref)) << l->isa << " " << c.spec.tag() << " K " << c.W.size(1);
    }
  }
}

// Step-size and zero-point gradients: each variant sums the same exact double products (a float times a float fits
// in a double) per group of n terms, in another order. The standard bound for a sum of n terms is (n − 1)·2⁻⁵³·Σ|t|
// per side, so the doubles differ by at most 2n·2⁻⁵³·Σ|t|; rounding each to float adds up to one float ulp of the
// larger. Σ|t| is bounded by Σ|G|·(qmax + |u|) for the step size (|q − z'| ≤ qmax) and Σ|G|·s' for the zero point.
TEST(TrainLoops, FakeQuantBackwardMatchesScalar) {
  const auto wide = wide_variants();
  if (wide.empty()) GTEST_SKIP() << "no AVX2 / AVX-512F on this CPU";
  for (const LoopCase& c : loop_cases()) {
    const FakeQuantRows r = loop_rows_of(c);
    const int64_t N = c.W.size(0), K = c.W.size(1), g = c.spec.group_for(K), G = c.s.size(1);
    const at::Tensor dW = at::randn({N, K});
    at::Tensor ref_g = dW.clone(), ref_s = at::empty_like(c.s), ref_z = at::empty_like(c.z);
    scalar_train_loops().fake_quant_backward(r, 0, N, ref_g.data_ptr<float>(), ref_s.data_ptr<float>(),
                                             ref_z.data_ptr<float>());
    // The bounds' sums per group, in double: pad K to G·g with zeros (they add nothing).
    const at::Tensor s1 = c.s.clamp(kScaleMin, kScaleMax).to(at::kDouble);
    const at::Tensor absG = at::constant_pad_nd(dW.abs().to(at::kDouble), {0, G * g - K}).view({N, G, g});
    const at::Tensor absU = at::constant_pad_nd(c.W.abs().to(at::kDouble), {0, G * g - K}).view({N, G, g}) /
                            s1.unsqueeze(-1);
    const double eps = std::ldexp(1.0, -53);
    const at::Tensor bound_s = 2.0 * g * eps * (absG * (absU + static_cast<double>(c.spec.qmax()))).sum(-1);
    const at::Tensor bound_z = 2.0 * g * eps * absG.sum(-1) * s1;
    for (const TrainLoops* l : wide) {
      at::Tensor got_g = dW.clone(), got_s = at::empty_like(c.s), got_z = at::empty_like(c.z);
      l->fake_quant_backward(r, 0, 5, got_g.data_ptr<float>(), got_s.data_ptr<float>(), got_z.data_ptr<float>());
      l->fake_quant_backward(r, 5, N, got_g.data_ptr<float>(), got_s.data_ptr<float>(), got_z.data_ptr<float>());
      EXPECT_TRUE(at::equal(got_g, ref_g)) << l->isa << " " << c.spec.tag();
      for (auto [got, ref, bound] : {std::tuple{got_s, ref_s, bound_s}, std::tuple{got_z, ref_z, bound_z}}) {
        const at::Tensor ulp = at::nextafter(at::maximum(got.abs(), ref.abs()), at::full_like(ref, INFINITY)) -
                               at::maximum(got.abs(), ref.abs());
        const at::Tensor excess = (got - ref).abs().to(at::kDouble) - bound - ulp.to(at::kDouble);
        EXPECT_LE(excess.max().item<double>(), 0.0) << l->isa << " " << c.spec.tag();
      }
    }
    // The case reaches both sides of the clamp: some weights get no gradient, some zero points do.
    EXPECT_GT((ref_g == 0).logical_and(dW != 0).sum().item<int64_t>(), 0) << c.spec.tag();
    EXPECT_GT((ref_z != 0).sum().item<int64_t>(), 0) << c.spec.tag();
  }
}

TEST(TrainLoops, AdamWIsBitIdenticalToScalar) {
  const auto wide = wide_variants();
  if (wide.empty()) GTEST_SKIP() << "no AVX2 / AVX-512F on this CPU";
  at::manual_seed(7);
  const int64_t n = 1000 + 7;  // not a multiple of 8 or 16
  for (float decay : {1.0f, 1.0f - 1e-3f}) {
    const AdamWStep c{0.9f, 0.999f, 0.1f, 0.001f, decay, std::sqrt(0.002f), 1e-8f, -1e-3f};
    const at::Tensor p0 = at::randn({n}), m0 = at::randn({n}) * 0.1, v0 = at::rand({n}) * 0.01,
                     g = at::randn({n});
    at::Tensor rp = p0.clone(), rm = m0.clone(), rv = v0.clone();
    scalar_train_loops().adamw(rp.data_ptr<float>(), g.const_data_ptr<float>(), rm.data_ptr<float>(),
                               rv.data_ptr<float>(), n, c);
    EXPECT_FALSE(at::equal(rp, p0));
    for (const TrainLoops* l : wide) {
      at::Tensor p = p0.clone(), m = m0.clone(), v = v0.clone();
      const int64_t split = 333;  // two ranges, as parallel_for splits them
      l->adamw(p.data_ptr<float>(), g.const_data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), split, c);
      l->adamw(p.data_ptr<float>() + split, g.const_data_ptr<float>() + split, m.data_ptr<float>() + split,
               v.data_ptr<float>() + split, n - split, c);
      EXPECT_TRUE(at::equal(p, rp) && at::equal(m, rm) && at::equal(v, rv)) << l->isa << " decay " << decay;
    }
  }
}

TEST(TrainLoops, BestIsTheWidestTheCpuHasUnlessCapped) {
  const char* env = std::getenv("EQAT_CPU_KERNEL");
  if (env && *env) GTEST_SKIP() << "EQAT_CPU_KERNEL=" << env << " caps the choice";
  const TrainLoops* want = avx512_train_loops() ? avx512_train_loops()
                           : avx2_train_loops() ? avx2_train_loops()
                                                : &scalar_train_loops();
  EXPECT_EQ(std::string(best_train_loops().isa), want->isa);
}
