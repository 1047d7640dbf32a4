// Framework-free entry points of eqat's CUDA kernels (HOUSE_STYLE.md rule 9): raw device pointers, sizes and a
// stream in, a Status out. The LibTorch adapter (src/quant/cuda_adapter.cpp) validates tensors and calls these;
// nothing here includes LibTorch. Every function only enqueues work on `stream` (no synchronisation, no allocation),
// so all of them may be captured in a CUDA graph.
//
// Weight layout: exactly the GPTQ export layout of src/quant/pack.h (no repacking at load time), for W [N, K]
// quantized with b bits in groups of g input rows:
//   qweight uint32 [⌈K·b/32⌉, N]   per output column n a dense LSB-first bitstream along K: value k sits at bits
//                                [k·b, k·b+b) of the words qweight[:, n]. 32 consecutive k ("a chunk") always
//                                occupy exactly b whole words, so every kernel walks K in chunks of 32 and a
//                                thread reads b words per chunk and column (3-bit values 10 and 21 straddle words,
//                                handled with a funnel shift).
//   qzeros  uint32 [G, ⌈N·b/32⌉]   true zero points (GPTQ v2), packed the same way along N.
//   scales  fp16|bf16|fp32 [G, N]
//   g_idx   implied k / g (no act-order; the adapter checks it and falls back to the reference otherwise).
// Requirements checked here (kBadArgument otherwise): b ∈ {2,3,4}, g % 32 == 0, K % g == 0, N % 4 == 0,
// qweight 16-byte aligned. Dequant: W[n,k] = s[g,n]·(q[k,n] − z[g,n]).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace eqat::kernels {

enum class Status : int { kOk = 0, kBadArgument = 1, kUnsupported = 2, kCudaError = 3 };
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };
const char* status_string(Status s);

struct GptqView {
  const uint32_t* qweight = nullptr;  // [⌈K·b/32⌉, N] (K % 32 == 0 here: whole words)
  const uint32_t* qzeros = nullptr;   // [G, ⌈N·b/32⌉]
  const void* scales = nullptr;       // [G, N] of scale_dtype
  DType scale_dtype = DType::kHalf;
  int64_t K = 0, N = 0, group_size = 0;
  int bits = 0;
};

// Largest M the fused GEMV takes (decode rows); larger M goes through gptq_dequant + GEMM.
constexpr int kGemvMaxRows = 8;

// Fused dequant-GEMV, split-K: ws[m, n] += Σ_k x[m, k]·W[n, k] for m < M ≤ 8. x: [M, K] row-major of x_dtype
// (kHalf, kBFloat16 or kFloat). ws: fp32 [M, N], zeroed by the caller (blocks accumulate with atomicAdd).
Status gptq_gemv(const GptqView& w, const void* x, DType x_dtype, int64_t M, float* ws, cudaStream_t stream);

// out[m, n] = dtype(ws[m, n] + bias[n]); bias may be null, else [N] of `dtype`. out: [M, N] of dtype.
Status gemv_finalize(const float* ws, const void* bias, void* out, DType dtype, int64_t M, int64_t N,
                     cudaStream_t stream);

// Prefill / backward helper: dequantize columns [n0, n1) into out [K, n1−n0] (row-major, leading dim n1−n0) of
// out_dtype, i.e. the slice of Wᵀ that a GEMM x·Wᵀ needs. n0 % 4 == 0.
Status gptq_dequant(const GptqView& w, int64_t n0, int64_t n1, void* out, DType out_dtype, cudaStream_t stream);

// E2E-QP backward w.r.t. scales for columns [n0, n1): gs[g, n] = Σ_{k in group g} (q[k,n] − z[g,n])·P[k, n−n0],
// where P = xᵀ·grad_out restricted to the slice (fp32 [K, n1−n0]). gs: fp32 [G, N] (only the slice is written).
Status gptq_scale_grad(const GptqView& w, const float* P, int64_t n0, int64_t n1, float* gs, cudaStream_t stream);

// Streaming multiprocessor count of the current device (cached; used by the GEMV's split-K heuristic).
int device_sm_count();

}  // namespace eqat::kernels
