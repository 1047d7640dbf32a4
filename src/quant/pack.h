// GPTQ packed-weight layout (the export format and what the kernels consume; KERNELS.md §3.1).
// For a linear W [N=out, K=in] quantized with b bits in groups of g input columns (G = ⌈K/g⌉ groups, the last one
// ragged when g does not divide K, as GPTQModel writes such layers):
//   qweight int32 [⌈K·b/32⌉, N]  input rows packed into a dense LSB-first bitstream per output column: value k of
//                              column n occupies bits [k·b, k·b+b) of the stream made of words qweight[:, n].
//                              For b = 2/4/8 that is 32/b whole values per word; for b = 3 it is GPTQ's dense
//                              3-bit packing (32 values in 3 words, values 10 and 21 straddle word boundaries).
//   qzeros  int32 [G, ⌈N·b/32⌉]  zero points, packed the same way along N per group row.
//   scales  fp16  [G, N]       step sizes.
//   g_idx   int32 [K]          group of each input row (k / g; no act-order).
// Dequant: W[n, k] = scales[g_idx[k], n] · (q[k, n] − Z[g_idx[k], n]), where Z is the stored zero in
// checkpoint_format "gptq_v2" (true zero points, eqat's format) and stored + 1 in legacy "gptq" (v1).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>

namespace eqat {

struct GptqTensors {
  at::Tensor qweight;  // int32 [K·b/32, N]
  at::Tensor qzeros;   // int32 [G, N·b/32]
  at::Tensor scales;   // [G, N] (fp16 in checkpoints; any float dtype in memory)
  at::Tensor g_idx;    // int32 [K]
};

// True when `bits` has a packed layout (2, 3, 4, 8).
bool packable_bits(int bits);

// Words needed for `rows` values of `bits`: ceil(rows·b/32). Dimensions that are not whole words (e.g. stories260K's
// 172-wide FFN) get a zero-filled partial last word, as EfficientQAT's ceil(K/(32/b)) rows do.
int64_t packed_words(int64_t rows, int bits);

// Checks that a [N, K] weight can be packed with `bits`/`group_size` (g > 0; a g that does not divide K leaves a
// ragged last group of K − (G−1)·g rows, G = ⌈K/g⌉, exactly as GPTQ's g_idx = k / g describes it).
// InputError naming `what` (e.g. the module name) otherwise.
void check_packable(int64_t N, int64_t K, int bits, int64_t group_size, const std::string& what);

// q: integers [N, K] in [0, 2^b−1]; zeros: [N, G] integers in [0, 2^b−1] (true zero points); scales: [N, G].
// Integers outside their range are an InputError (never silently wrapped). Scales are stored as `scale_dtype`.
GptqTensors pack_gptq(const at::Tensor& q, const at::Tensor& zeros, const at::Tensor& scales, int bits,
                      int64_t group_size, c10::ScalarType scale_dtype = c10::ScalarType::Half);

// Inverse of pack_gptq: (q [N, K] int32, zeros [N, G] int32). Bit-exact round trip.
std::pair<at::Tensor, at::Tensor> unpack_gptq(const GptqTensors& t, int bits);

// Reference dequantization (the CPU serving path's spec): W [N, K] float32.
at::Tensor dequantize_gptq(const GptqTensors& t, int bits);

// Dense LSB-first bit packing along dim 0 of an int tensor [R, C] -> int32 [R·b/32, C], and back.
at::Tensor pack_rows(const at::Tensor& values, int bits);
at::Tensor unpack_rows(const at::Tensor& packed, int bits, int64_t rows);

// v2 <-> v1 zero conversion on packed qzeros [G, words]. v1 is defined word by word, as GPTQModel converts it: each
// packed 32-bit word minus the word that holds a 1 in every field (mod 2^32). A zero point of 0 therefore borrows from
// the field above it, and a 3-bit field that straddles two words borrows only within its low word; v1→v2 adds the
// same word back, the exact inverse. v2→v1 still requires every Z ≥ 1 (InputError naming `what`): then at 2, 4 and
// 8 bits no field borrows and readers that decode field by field (Z = field + 1) agree with word-level ones; at 3
// bits the two fields per 96-bit group that straddle words lose their borrow when their low bits are 0, so
// field-by-field readers disagree there whatever the writer does — eqat follows GPTQModel's word-level rule.
// N = out_features (the number of fields; a partial last word holds padding).
at::Tensor qzeros_v2_to_v1(const at::Tensor& qzeros_v2, int bits, int64_t N, const std::string& what);
at::Tensor qzeros_v1_to_v2(const at::Tensor& qzeros_v1, int bits, int64_t N);

}  // namespace eqat
