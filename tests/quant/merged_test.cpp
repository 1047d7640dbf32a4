// MergedPackedLinear (serving: a layer's q/k/v or gate/up as one packed linear): the merged forward gives each
// part's output, the parts keep computing what they did as views of the merged tensors, and parts that cannot
// merge are left alone. Parts loaded from a checkpoint's mapping give its pages back once merged.
//
// Tolerance: both sides compute the same sums in fp32, but the CPU kernel's blocking over columns (and threads) may
// order them differently. Each side is within the bound derived in qmatmul_test.cpp of the exact value,
// u·(32 + K/32 + 8)·2^b·Σ_k |x_k|·s_g(k),n with u = 2^-24, so they differ by at most twice that.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "data/safetensors.h"
#include "quant/linear.h"
#include "test_util.h"

using namespace eqat;

namespace {

QuantLinear packed_linear(int64_t K, int64_t N, int bits, int64_t g, bool bias, uint64_t seed) {
  at::manual_seed(seed);
  QuantLinear l(K, N, bias);
  l->set_float_weight(at::randn({N, K}) / 8);
  if (bias) l->bias.set_data(at::randn({N}));
  l->to_fake_quant(QuantSpec{bits, g});
  l->to_packed(at::kHalf);
  return l;
}

std::vector<QuantLinear> parts(int bits, bool bias) {
  // GQA-like widths; at 3 bits 24 columns are 72 bits, so the parts' zero points are not whole words.
  return {packed_linear(128, 40, bits, 32, bias, 1), packed_linear(128, 24, bits, 32, bias, 2),
          packed_linear(128, 24, bits, 32, bias, 3)};
}

at::Tensor two_sided_bound(const at::Tensor& x, const QuantLinear& l) {
  const int64_t K = x.size(-1), g = l->spec().group_for(K);
  at::Tensor S = l->scales.to(at::kFloat).t().index_select(1, at::arange(K, at::kLong).div(g, "floor"));  // [N, K]
  return 2 * std::ldexp(1.0, -24) * (32 + K / 32 + 8) * (1 << l->spec().bits) * at::matmul(x.abs(), S.t());
}

bool within(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bound) {
  return ((a - b).abs() - bound).max().item<float>() <= 0.f;
}

TEST(MergedPackedLinear, GivesEachPartsOutput) {
  c10::NoGradGuard ng;
  for (int bits : {2, 3, 4})
    for (bool bias : {false, true})
      for (int64_t M : {1, 5}) {
        auto p = parts(bits, bias);
        const at::Tensor x = at::randn({M, 128});
        std::vector<at::Tensor> before, bound;
        for (auto& l : p) before.push_back(l->forward(x)), bound.push_back(two_sided_bound(x, l));
        MergedPackedLinear m = MergedPackedLinear::merge(p);
        ASSERT_TRUE(m.defined());
        const std::vector<at::Tensor> y = m.forward(x);
        ASSERT_EQ(y.size(), 3u);
        for (size_t i = 0; i < 3; ++i) {
          EXPECT_TRUE(within(y[i], before[i], bound[i])) << "bits " << bits << " bias " << bias << " M " << M << " part " << i;
          // The part is now a view of the merged columns and still computes the same (same kernel, same columns).
          EXPECT_TRUE(at::equal(p[i]->forward(x), before[i])) << "part " << i << " after the merge";
          EXPECT_EQ(p[i]->qweight.data_ptr<int32_t>(), p[0]->qweight.data_ptr<int32_t>() + (i ? (i == 1 ? 40 : 64) : 0));
        }
      }
}

// Serving a loaded export: the parts' integers alias the checkpoint's mapping, and merging reads them all. Their
// pages must leave the process afterwards (a mapping's pages otherwise stay in RSS for as long as the shard's
// other tensors keep it alive: every merged weight held twice, 15.1 GiB for a 7.4 GB 13B export), unless some
// other tensor still aliases those bytes. Counted with the page table's present bits (/proc/self/pagemap).
TEST(MergedPackedLinear, DropsTheMappedPagesOfItsParts) {
  c10::NoGradGuard ng;
  eqat_test::TempDir dir;
  const std::string path = dir.str("parts.safetensors");
  const int64_t K = 1024;
  std::vector<QuantLinear> src{packed_linear(K, 512, 4, 128, false, 1), packed_linear(K, 256, 4, 128, false, 2),
                               packed_linear(K, 256, 4, 128, false, 3)};  // qweight 256 / 128 / 128 KiB
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (size_t i = 0; i < src.size(); ++i)
    for (const auto& [n, t] : std::vector<std::pair<std::string, at::Tensor>>{{"qweight", src[i]->qweight},
                                                                               {"qzeros", src[i]->qzeros},
                                                                               {"scales", src[i]->scales},
                                                                               {"g_idx", src[i]->g_idx}})
      tensors.emplace_back(std::to_string(i) + "." + n, t);
  write_safetensors(path, tensors);
  auto f = SafetensorsFile::open(path);
  std::vector<QuantLinear> p;
  for (size_t i = 0; i < src.size(); ++i) {
    const std::string k = std::to_string(i) + ".";
    p.emplace_back(K, src[i]->out_features(), false);
    p.back()->set_packed({f->get(k + "qweight"), f->get(k + "qzeros"), f->get(k + "scales"), f->get(k + "g_idx")},
                         src[i]->spec());
  }
  const at::Tensor x = at::randn({3, K});
  std::vector<at::Tensor> before;
  std::vector<const void*> mapped;  // each part's integers in the mapping, and their size
  std::vector<size_t> mapped_bytes;
  for (auto& l : p) {
    before.push_back(l->forward(x));
    mapped.push_back(l->qweight.const_data_ptr()), mapped_bytes.push_back(l->qweight.nbytes());
  }
  const auto [present, pages] = eqat_test::present_pages(mapped[0], mapped_bytes[0]);
  if (present < 0) GTEST_SKIP() << "no /proc/self/pagemap";
  ASSERT_GT(pages, 32);
  ASSERT_EQ(present, pages) << "the forward read every page of part 0's integers";
  const at::Tensor held = p[2]->qweight.narrow(1, 0, 8);  // someone else still aliases part 2's bytes
  const at::Tensor held_value = held.clone();
  ASSERT_TRUE(MergedPackedLinear::merge(p).defined());
  for (size_t i = 0; i < 2; ++i)
    EXPECT_EQ(eqat_test::present_pages(mapped[i], mapped_bytes[i]).first, 0) << "part " << i;
  const auto [kept, kept_pages] = eqat_test::present_pages(mapped[2], mapped_bytes[2]);
  EXPECT_EQ(kept, kept_pages) << "part 2's pages are still aliased and must stay";
  EXPECT_TRUE(at::equal(held, held_value));
  for (size_t i = 0; i < p.size(); ++i) EXPECT_TRUE(at::equal(p[i]->forward(x), before[i])) << "part " << i;
}

TEST(MergedPackedLinear, LeavesPartsThatCannotMergeAlone) {
  c10::NoGradGuard ng;
  const at::Tensor x = at::randn({2, 128});
  {
    std::vector<QuantLinear> p{packed_linear(128, 40, 4, 32, false, 1), packed_linear(128, 24, 3, 32, false, 2)};
    const at::Tensor before = p[1]->forward(x);
    const void* qw = p[1]->qweight.data_ptr();
    EXPECT_FALSE(MergedPackedLinear::merge(p).defined()) << "different bit widths";
    EXPECT_EQ(p[1]->qweight.data_ptr(), qw);
    EXPECT_TRUE(at::equal(p[1]->forward(x), before));
  }
  {
    std::vector<QuantLinear> p{packed_linear(128, 40, 4, 32, false, 1), packed_linear(128, 24, 4, 64, false, 2)};
    EXPECT_FALSE(MergedPackedLinear::merge(p).defined()) << "different group sizes";
  }
  {
    std::vector<QuantLinear> p{packed_linear(128, 40, 4, 32, true, 1), packed_linear(128, 24, 4, 32, false, 2)};
    EXPECT_FALSE(MergedPackedLinear::merge(p).defined()) << "one part has a bias";
  }
  {
    QuantLinear f(128, 24, false);
    f->set_float_weight(at::randn({24, 128}));
    std::vector<QuantLinear> p{packed_linear(128, 40, 4, 32, false, 1), f};
    EXPECT_FALSE(MergedPackedLinear::merge(p).defined()) << "a float part";
  }
  EXPECT_FALSE(MergedPackedLinear::merge({packed_linear(128, 40, 4, 32, false, 1)}).defined()) << "a single part";
}

}  // namespace
