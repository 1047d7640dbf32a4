// GPTQ packing: bit-exact round trips, the documented 3-bit word layout, range checks, v1/v2 zero conversion.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "data/error.h"
#include "quant/pack.h"

using namespace eqat;

namespace {
at::Tensor rand_ints(int64_t r, int64_t c, int bits, uint64_t seed) {
  at::manual_seed(seed);
  return at::randint(0, 1 << bits, {r, c}, at::kInt);
}
}  // namespace

TEST(Pack, RoundTripIsBitExactForEveryWidth) {
  for (int bits : {2, 3, 4, 8}) {
    const int64_t N = 96, K = 128, g = 32, G = K / g;
    at::Tensor q = rand_ints(N, K, bits, bits), z = rand_ints(N, G, bits, 100 + bits);
    at::Tensor s = at::rand({N, G}) + 0.01;
    GptqTensors t = pack_gptq(q, z, s, bits, g);
    EXPECT_EQ(t.qweight.sizes(), at::IntArrayRef({K * bits / 32, N}));
    EXPECT_EQ(t.qzeros.sizes(), at::IntArrayRef({G, N * bits / 32}));
    EXPECT_EQ(t.scales.scalar_type(), at::kHalf);
    auto [q2, z2] = unpack_gptq(t, bits);
    EXPECT_TRUE(at::equal(q2, q)) << bits;
    EXPECT_TRUE(at::equal(z2, z)) << bits;
    // Dequant formula: W[n,k] = s[n,k/g]·(q[n,k] − z[n,k/g]) with fp16-rounded scales.
    at::Tensor gi = at::arange(K, at::kLong).div(g, "floor");
    at::Tensor ref = (q.to(at::kFloat) - z.index_select(1, gi).to(at::kFloat)) *
                     s.to(at::kHalf).to(at::kFloat).index_select(1, gi);
    EXPECT_TRUE(at::equal(dequantize_gptq(t, bits), ref)) << bits;
  }
}

TEST(Pack, FourBitNibblesAreLsbFirst) {
  at::Tensor q = at::arange(8, at::kInt).view({1, 8}).repeat({32, 1});  // column n = values 0..7 along K
  GptqTensors t = pack_gptq(q, at::zeros({32, 1}, at::kInt), at::ones({32, 1}), 4, 8);
  EXPECT_EQ(static_cast<uint32_t>(t.qweight[0][0].item<int32_t>()), 0x76543210u);
}

TEST(Pack, ThreeBitUsesGptqDenseLayout) {
  // 32 values of 3 bits in 3 words: value 10 straddles words 0/1 (low 2 bits at bits 30-31 of word 0, top bit at
  // bit 0 of word 1); value 21 straddles words 1/2 (low bit at bit 31 of word 1, top 2 bits at bits 0-1 of word 2).
  at::Tensor col = at::zeros({32, 1}, at::kInt);
  col[10][0] = 0b101;
  col[21][0] = 0b011;
  at::Tensor q = col.t().repeat({32, 1});  // [N=32, K=32]
  GptqTensors t = pack_gptq(q, at::zeros({32, 1}, at::kInt), at::ones({32, 1}), 3, 32);
  ASSERT_EQ(t.qweight.size(0), 3);
  auto w = [&](int i) { return static_cast<uint32_t>(t.qweight[i][0].item<int32_t>()); };
  EXPECT_EQ(w(0), 0b01u << 30);
  EXPECT_EQ(w(1), (1u << 0) | (1u << 31));
  EXPECT_EQ(w(2), 0b01u);
}

TEST(Pack, OutOfRangeIntegersAreRejected) {
  at::Tensor q = at::full({32, 32}, 4, at::kInt);  // 4 does not fit in 2 bits
  EXPECT_THROW(pack_gptq(q, at::zeros({32, 1}, at::kInt), at::ones({32, 1}), 2, 32), InputError);
  EXPECT_THROW(pack_gptq(at::zeros({32, 32}, at::kInt), at::full({32, 1}, -1, at::kInt), at::ones({32, 1}), 2, 32),
               InputError);
  EXPECT_THROW(check_packable(32, 100, 4, 0, "layer"), InputError);  // no group size
  EXPECT_NO_THROW(check_packable(20, 172, 3, 172, "layer"));  // partial words are padded
}

TEST(Pack, ZeroPointFormatConversion) {
  const int bits = 2;
  at::Tensor z = at::randint(1, 4, {64, 2}, at::kInt);
  GptqTensors t = pack_gptq(at::zeros({64, 64}, at::kInt), z, at::ones({64, 2}), bits, 32);
  at::Tensor v1 = qzeros_v2_to_v1(t.qzeros, bits, 64, "layer");
  EXPECT_TRUE(at::equal(qzeros_v1_to_v2(v1, bits, 64), t.qzeros));
  // Symmetric-style zero 2 stores 1 in every 2-bit field of v1: 0x55555555.
  GptqTensors sym = pack_gptq(at::zeros({64, 64}, at::kInt), at::full({64, 2}, 2, at::kInt), at::ones({64, 2}), 2, 32);
  EXPECT_EQ(static_cast<uint32_t>(qzeros_v2_to_v1(sym.qzeros, 2, 64, "x")[0][0].item<int32_t>()), 0x55555555u);
  at::Tensor z0 = z.clone();
  z0[3][1] = 0;
  GptqTensors t0 = pack_gptq(at::zeros({64, 64}, at::kInt), z0, at::ones({64, 2}), bits, 32);
  EXPECT_THROW(qzeros_v2_to_v1(t0.qzeros, bits, 64, "layer"), InputError);
}

// GPTQModel writes v1 as "packed v2 word − a 1 in every field" per 32-bit word, so a zero point of 0 borrows from
// the next field; reading must add the word back rather than add 1 to each field on its own.
TEST(Pack, GptqV1ZeroPointsAreWordLevel) {
  // 4-bit, 8 fields in one word: z = [0, 5, 1, 0, 0, 15, 2, 3] (LSB first).
  const std::vector<int> zs = {0, 5, 1, 0, 0, 15, 2, 3};
  at::Tensor z = at::tensor(zs, at::kInt).view({8, 1});
  at::Tensor v2 = pack_rows(z, 4).t().contiguous();  // [G = 1, 1 word]
  const uint32_t w2 = static_cast<uint32_t>(v2[0][0].item<int32_t>());
  EXPECT_EQ(w2, 0x32F00150u);
  const uint32_t w1 = w2 - 0x11111111u;  // GPTQModel's conversion: one integer subtraction (here 0x21DEF03F)
  at::Tensor v1 = at::tensor({static_cast<int32_t>(w1)}, at::kInt).view({1, 1});
  EXPECT_TRUE(at::equal(qzeros_v1_to_v2(v1, 4, 8), v2));
  // Field by field (z = field + 1 mod 16) the borrows show: field 1 would read 4, not 5.
  EXPECT_EQ((unpack_rows(v1.t().contiguous(), 4, 8)[1][0].item<int>() + 1) % 16, 4);
  // 3-bit: fields straddle words (field 10 spans bits 30-32). A zero at a straddling field and at the last field.
  at::Tensor z3 = at::randint(0, 8, {32, 3}, at::kInt);
  z3[10][0] = 0;
  z3[10][1] = 4;
  z3[21][2] = 0;
  z3[31][0] = 0;
  at::Tensor v2_3 = pack_rows(z3, 3).t().contiguous();  // [3, 3 words]
  at::Tensor words = at::tensor(std::vector<int64_t>{0x49249249, 0x92492492, 0x24924924}).view({1, 3});  // LSBs
  at::Tensor v1_3 = (v2_3.to(at::kLong).bitwise_and(0xFFFFFFFFLL) - words).remainder(int64_t{1} << 32);
  v1_3 = at::where(v1_3 >= (int64_t{1} << 31), v1_3 - (int64_t{1} << 32), v1_3).to(at::kInt);
  EXPECT_TRUE(at::equal(qzeros_v1_to_v2(v1_3, 3, 32), v2_3));
  // Writing v1 (every zero >= 1) is the same word subtraction, and round-trips.
  for (int bits : {2, 3, 4, 8}) {
    at::Tensor zz = at::randint(1, 1 << bits, {64, 4}, at::kInt);
    at::Tensor w = pack_rows(zz, bits).t().contiguous();
    at::Tensor back = qzeros_v1_to_v2(qzeros_v2_to_v1(w, bits, 64, "layer"), bits, 64);
    EXPECT_TRUE(at::equal(back, w)) << bits;
    if (bits != 3)  // fields never straddle words: with no zero of 0 nothing borrows, so each field reads Z − 1
      EXPECT_TRUE(at::equal(unpack_rows(qzeros_v2_to_v1(w, bits, 64, "layer").t().contiguous(), bits, 64), zz - 1))
          << bits;
  }
}

TEST(Pack, DimensionsThatAreNotWholeWordsArePadded) {
  // stories260K's FFN is 172 wide: 172·3 bits = 16.1 words -> 17 words, the tail zero-filled.
  for (int bits : {2, 3, 4}) {
    const int64_t N = 172, K = 172;
    at::Tensor q = rand_ints(N, K, bits, 7), z = rand_ints(N, 1, bits, 8);
    GptqTensors t = pack_gptq(q, z, at::rand({N, 1}) + 0.1, bits, K);
    EXPECT_EQ(t.qweight.size(0), packed_words(K, bits));
    EXPECT_EQ(t.qzeros.size(1), packed_words(N, bits));
    auto [q2, z2] = unpack_gptq(t, bits);
    EXPECT_TRUE(at::equal(q2, q));
    EXPECT_TRUE(at::equal(z2, z));
  }
}

// A group size that does not divide K leaves a ragged last group: G = ⌈K/g⌉ rows of scales and zero points, g_idx =
// k / g (what GPTQModel writes for such layers), and the integers round-trip exactly.
TEST(Pack, RaggedLastGroupRoundTrips) {
  at::manual_seed(11);
  const int64_t N = 24, K = 100, g = 32, G = 4;  // groups of 32, 32, 32 and 4 rows
  for (int bits : {2, 3, 4, 8}) {
    at::Tensor q = at::randint(0, 1 << bits, {N, K}, at::kInt);
    at::Tensor z = at::randint(0, 1 << bits, {N, G}, at::kInt);
    at::Tensor s = at::rand({N, G}) + 0.5;
    const GptqTensors t = pack_gptq(q, z, s, bits, g);
    EXPECT_EQ(t.scales.sizes(), at::IntArrayRef({G, N}));
    EXPECT_EQ(t.qzeros.size(0), G);
    EXPECT_TRUE(at::equal(t.g_idx.to(at::kLong), at::arange(K, at::kLong).div(g, "floor")));
    auto [q2, z2] = unpack_gptq(t, bits);
    EXPECT_TRUE(at::equal(q2, q)) << bits;
    EXPECT_TRUE(at::equal(z2, z)) << bits;
    // The last group's four rows use the fourth scale and zero point.
    at::Tensor W = dequantize_gptq(t, bits);
    at::Tensor expect = (q.narrow(1, 96, 4) - z.narrow(1, 3, 1)).to(at::kFloat) * s.narrow(1, 3, 1).to(at::kHalf).to(at::kFloat);
    EXPECT_TRUE(at::equal(W.narrow(1, 96, 4), expect)) << bits;
  }
}
