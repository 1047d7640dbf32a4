#include "quant/pack.h"

#include <ATen/ATen.h>

#include "data/error.h"
#include "quant/quantizer.h"

namespace eqat {

bool packable_bits(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

void check_packable(int64_t N, int64_t K, int bits, int64_t group_size, const std::string& what) {
  EQAT_CHECK(packable_bits(bits), what, ": bits must be 2, 3, 4 or 8 for packing, got ", bits);
  EQAT_CHECK(group_size > 0, what, ": group size must be positive, got ", group_size);
  EQAT_CHECK(N > 0 && K > 0, what, ": empty weight ", N, "x", K);
}

int64_t packed_words(int64_t rows, int bits) { return (rows * bits + 31) / 32; }

at::Tensor pack_rows(const at::Tensor& values, int bits) {
  EQAT_ASSERT(values.dim() == 2 && packable_bits(bits), "pack_rows: values must be 2-D, bits 2/3/4/8");
  const int64_t R = values.size(0), C = values.size(1);
  at::Tensor v = values.to(at::kLong).contiguous();
  at::Tensor out = at::zeros({packed_words(R, bits), C}, at::kInt);  // a partial last word is zero-filled
  const int64_t* src = v.data_ptr<int64_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t bit = r * bits, word = bit / 32, off = bit % 32;
    for (int64_t c = 0; c < C; ++c) {
      const uint32_t x = static_cast<uint32_t>(src[r * C + c]) & mask;
      dst[word * C + c] |= x << off;
      if (off + bits > 32) dst[(word + 1) * C + c] |= x >> (32 - off);  // straddles (3-bit only)
    }
  }
  return out;
}

at::Tensor unpack_rows(const at::Tensor& packed, int bits, int64_t rows) {
  EQAT_ASSERT(packed.dim() == 2 && packable_bits(bits), "unpack_rows: packed must be 2-D, bits 2/3/4/8");
  EQAT_ASSERT(packed.size(0) == packed_words(rows, bits), "unpack_rows: ", packed.size(0), " words do not hold ",
              rows, " rows of ", bits, " bits");
  const int64_t C = packed.size(1);
  at::Tensor p = packed.to(at::kInt).contiguous();
  at::Tensor out = at::empty({rows, C}, at::kInt);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>());
  int32_t* dst = out.data_ptr<int32_t>();
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t bit = r * bits, word = bit / 32, off = bit % 32;
    for (int64_t c = 0; c < C; ++c) {
      uint32_t x = src[word * C + c] >> off;
      if (off + bits > 32) x |= src[(word + 1) * C + c] << (32 - off);
      dst[r * C + c] = static_cast<int32_t>(x & mask);
    }
  }
  return out;
}

GptqTensors pack_gptq(const at::Tensor& q, const at::Tensor& zeros, const at::Tensor& scales, int bits,
                      int64_t group_size, c10::ScalarType scale_dtype) {
  EQAT_ASSERT(q.dim() == 2, "q must be [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  check_packable(N, K, bits, group_size, "pack");
  const int64_t G = QuantSpec::num_groups(K, group_size);
  EQAT_ASSERT(zeros.sizes() == at::IntArrayRef({N, G}) && scales.sizes() == at::IntArrayRef({N, G}),
              "zeros/scales must be [N, G] = [", N, ", ", G, "]");
  const int64_t qmax = (1 << bits) - 1;
  auto check_range = [&](const at::Tensor& t, const char* what) {
    at::Tensor tl = t.to(at::kLong);
    EQAT_CHECK(!t.is_floating_point() || at::equal(t, t.round()), "pack: ", what, " are not integers");
    EQAT_CHECK(tl.min().item<int64_t>() >= 0 && tl.max().item<int64_t>() <= qmax, "pack: ", what,
               " outside [0, ", qmax, "] for ", bits, "-bit (min ", tl.min().item<int64_t>(), ", max ",
               tl.max().item<int64_t>(), ")");
  };
  check_range(q, "weight integers");
  check_range(zeros, "zero points");
  GptqTensors t;
  t.qweight = pack_rows(q.t(), bits);      // [K·b/32, N]
  t.qzeros = pack_rows(zeros, bits).t().contiguous();  // [G, N·b/32]
  t.scales = scales.t().contiguous().to(scale_dtype);  // [G, N]
  t.g_idx = at::arange(K, at::kLong).div(group_size, "floor").to(at::kInt);
  return t;
}

std::pair<at::Tensor, at::Tensor> unpack_gptq(const GptqTensors& t, int bits) {
  const int64_t N = t.scales.size(1), K = t.g_idx.size(0);
  at::Tensor q = unpack_rows(t.qweight, bits, K).t().contiguous();                 // [N, K]
  at::Tensor z = unpack_rows(t.qzeros.t().contiguous(), bits, N).contiguous();      // [N, G]
  return {q, z};
}

at::Tensor dequantize_gptq(const GptqTensors& t, int bits) {
  auto [q, z] = unpack_gptq(t, bits);  // [N, K], [N, G]
  at::Tensor gi = t.g_idx.to(at::kLong);
  at::Tensor zk = z.index_select(1, gi).to(at::kFloat);                    // [N, K]
  at::Tensor sk = t.scales.t().to(at::kFloat).index_select(1, gi);          // [N, K]
  return (q.to(at::kFloat) - zk) * sk;
}

namespace {
// [1, words]: a 1 in the lowest bit of each of the N fields (pack_rows' layout), per 32-bit word.
at::Tensor ones_in_every_field(int bits, int64_t N) { return pack_rows(at::ones({N, 1}, at::kInt), bits).t(); }

// (a + sign·b) mod 2^32 per word, on int32 tensors holding uint32 words.
at::Tensor add_words(const at::Tensor& a, const at::Tensor& b, int sign) {
  at::Tensor sum = a.to(at::kLong).bitwise_and(0xFFFFFFFFLL) + sign * b.to(at::kLong).bitwise_and(0xFFFFFFFFLL);
  sum = sum.bitwise_and(0xFFFFFFFFLL);
  return at::where(sum >= (int64_t{1} << 31), sum - (int64_t{1} << 32), sum).to(at::kInt);
}
}  // namespace

at::Tensor qzeros_v2_to_v1(const at::Tensor& qzeros_v2, int bits, int64_t N, const std::string& what) {
  at::Tensor z = unpack_rows(qzeros_v2.t().contiguous(), bits, N);  // [N, G]
  EQAT_CHECK(z.min().item<int>() >= 1, what, ": a zero point of 0 cannot be stored in GPTQ v1 (it stores zero − 1); ",
             "use --format gptq-v2 (the default)");
  return add_words(qzeros_v2, ones_in_every_field(bits, N), -1).contiguous();
}

at::Tensor qzeros_v1_to_v2(const at::Tensor& qzeros_v1, int bits, int64_t N) {
  return add_words(qzeros_v1, ones_in_every_field(bits, N), +1).contiguous();
}

}  // namespace eqat
