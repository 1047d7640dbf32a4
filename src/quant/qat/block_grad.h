// Training on the CPU without autograd: the forward and backward of one Llama decoder block (HF order, llm/llama.h)
// written out by hand in fp32, for the data-parallel steps of small blocks (optim.h): Block-AP's whole step
// (block_grad_cpu) and E2E-QP's layers (block_forward_cpu, block_backward_cpu; e2e_qp.cpp).
//
// Why: on the default model a block's GEMMs are [~35, 256] × [256, 512] per sample. Run through LibTorch's autograd,
// one sample per thread, they were about 40 % of a Block-AP iteration; the rest was op dispatch, graph bookkeeping,
// allocation, and the thread with the shorter sample waiting for the other (models/SOURCES.md). Here the batch's
// samples are packed into one [N, C] matrix of their positions (each cut after its last needed one), and each stage
// is shared evenly by the threads: a GEMM by its output columns (or two independent GEMMs, one per thread), the
// row-wise stages by rows, attention by (sample, key head). q/k/v and gate/up run as one GEMM each on stacked Ŵ.
//
// The loss and gradients are those of the autograd path up to fp32 summation order (tests: BlockGrad.*,
// E2eQp.TheStepByHandHasAutogradsGradients). Legend: B batch, L positions, N packed positions, C hidden, H query
// heads, Hkv key heads, D head dim, F intermediate.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "data/config.h"

namespace eqat {

// The block's weights as the step uses them, all fp32 contiguous on the CPU.
struct BlockGradWeights {
  at::Tensor qkv;      // [H·D + 2·Hkv·D, C]: Ŵ of q_proj, k_proj, v_proj stacked by rows
  at::Tensor o;        // [C, H·D]
  at::Tensor gate_up;  // [2F, C]: gate_proj's Ŵ, then up_proj's
  at::Tensor down;     // [C, F]
  at::Tensor norm_in, norm_post;  // [C]
  // The block's GEMMs on bf16 operands with fp32 products and sums (cpu_bf16_gemm.h; the caller checks that it is
  // available): each weight and each GEMM input is rounded to bf16 once, where it is made; everything else (norms,
  // attention, SiLU, the residual stream, the GEMMs' outputs) stays fp32.
  bool bf16_gemms = false;
};

// Which stacked weight above each of block_linears' seven linears (q, k, v, o, gate, up, down) is part of: 0 qkv,
// 1 o, 2 gate_up, 3 down. Within a stack the linears follow in that order.
inline constexpr int kLinearStack[7] = {0, 0, 0, 1, 2, 2, 3};
// Where linear k starts in its stack: the sum of width(j) over the linears j before it in the same stack (their
// rows of Ŵ, or their columns of Ŵᵀ).
template <class Width>
int64_t stack_offset(size_t k, const Width& width) {
  int64_t off = 0;
  for (size_t j = k; j-- > 0 && kLinearStack[j] == kLinearStack[k];) off += width(j);
  return off;
}

// loss and dL/d of each weight above (same shapes; the stacked gradients split by rows like the weights).
struct BlockGrads {
  double loss = 0;
  at::Tensor qkv, o, gate_up, down, norm_in, norm_post;
};

// Whether block_grad_cpu computes this model's blocks: Llama blocks without biases (the only activation loaded is
// SiLU), query heads a multiple of the key heads.
bool block_grad_cpu_applies(const LlamaConfig& cfg);

// The pieces, for E2E-QP's step (e2e_qp.cpp). A batch's samples as rows of one matrix: sample b's first len[b]
// positions are rows [off[b], off[b] + len[b]).
//
// out: the rows whose block output is wanted, increasing; empty for all of them. E2E-QP's last layer needs its
// output only where the loss reads it (the answer positions: about 10 % of a default-model micro-batch's rows),
// and every other row serves only as a key and value. So with `out` given, q/k/v are computed for all rows, but
// attention, o_proj, the MLP and their backward only for those rows: the block's output and dL/d(output) are
// [out.size(), C], and dL/dx is still [rows, C].
//
// prefix: the positions that every sample begins with bit for bit (a chat template's system prompt: about a quarter of
// a default-model sample), computed once. With prefix S > 0, segment 0 holds positions 0..S−1, and segment b + 1
// sample b's positions S..len[b]−1; every segment attends to segment 0's rows as well as its own, and those rows'
// gradients are the sums over the samples, as if each sample had its own copy. Without, segment b is sample b.
struct PackedRows {
  std::vector<int64_t> off, len;  // per segment
  int64_t rows = 0;
  std::vector<int64_t> out;
  int64_t prefix = 0;
  // The position of segment b's first row in its sample.
  int64_t start(size_t b) const { return prefix > 0 && b > 0 ? prefix : 0; }
};
// Samples of these lengths (each ≥ prefix, or 0 for a sample that computes nothing) as segments.
PackedRows pack_rows(const std::vector<int64_t>& lengths, int64_t prefix = 0);
// The largest S ≤ cap such that positions 0..S−1 are the same bytes in every sample with lengths[b] > 0, in each of
// `rows_of` ([B, L, ...] CPU tensors, contiguous: the inputs, and whatever else a position's result depends on);
// 0 when fewer than two samples compute anything (sharing saves nothing).
int64_t shared_prefix(const std::vector<at::Tensor>& rows_of, const std::vector<int64_t>& lengths, int64_t cap);
// What the backward reads, saved by the forward.
struct BlockTape {
  at::Tensor xh1, r1, h1, qkv, attn, x2, r2, h2, gu, sig, mid;
  std::vector<at::Tensor> probs;  // [the segment's output rows, start + len] per (segment, query head)
  // The GEMMs' operands: the forward's inputs h1, attn, h2, mid (the backward's weight gradients read them again), xh1
  // (Block-AP's dL/dŴqkv) and the four weights; bf16 copies with BlockGradWeights::bf16_gemms, else the fp32 tensors
  // themselves.
  at::Tensor xh1_g, h1_g, attn_g, h2_g, mid_g, qkv_g, o_g, gate_up_g, down_g;
};
// The bytes of a BlockTape for samples of these lengths (all rows output, no shared prefix: an upper bound with one),
// with fp32 GEMMs (bf16_gemms adds 2·(3C + Cq + F) bytes per row and the four weights in bf16).
int64_t block_tape_bytes(const LlamaConfig& cfg, const std::vector<int64_t>& lengths);
// x [rows, C] fp32 -> the block's output [rows, C] (or [out.size(), C], see PackedRows::out); fills `tape` when
// given. The weights may be transposed views (E2E-QP's Ŵᵀ caches); cos, sin [L, D] with L ≥ the longest sample.
at::Tensor block_forward_cpu(const LlamaConfig& cfg, const BlockGradWeights& w, const PackedRows& pk,
                             const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, BlockTape* tape);
// From dL/d(output) (the forward's output shape, the same `pk`): dL/dŴᵀ of each stacked weight ([C, H·D + 2·Hkv·D],
// [H·D, C], [C, 2F], [F, C]: the layout of the packed linears' (q − z), so that dL/ds sums them per group) and, when
// asked, dL/dx [rows, C]. The norms' weights are constants here.
struct BlockGradsT {
  at::Tensor qkv, o, gate_up, down, dx;
};
BlockGradsT block_backward_cpu(const LlamaConfig& cfg, const BlockGradWeights& w, const PackedRows& pk,
                               const BlockTape& tape, const at::Tensor& dout, const at::Tensor& cos,
                               const at::Tensor& sin, bool want_dx);

// x, y [B, L, C] (any float dtype), valid [B, L] bool: the loss positions (a sample's positions after its last valid
// one are not computed; the ones before it are, as keys; the positions that all samples begin with, inputs and
// targets alike, are computed once: PackedRows::prefix). cos, sin [L, D] fp32 (RotaryEmbedding::cos_sin at
// positions 0..L−1). Attention is causal, within cfg.sliding_window when set. Threads: LibTorch's intra-op ones.
BlockGrads block_grad_cpu(const LlamaConfig& cfg, const BlockGradWeights& w, const at::Tensor& x, const at::Tensor& y,
                          const at::Tensor& valid, const at::Tensor& cos, const at::Tensor& sin, double denom);

}  // namespace eqat
