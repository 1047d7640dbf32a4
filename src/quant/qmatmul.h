// Packed (GPTQ-layout) linear: the dispatch that QuantLinear's packed mode calls. CUDA tensors go to eqat's CUDA
// kernels (kernels/, through cuda_adapter.cpp), CPU tensors to the vectorised CPU path (cpu_qgemv.h); anything the
// fast paths do not cover (act-order g_idx, group sizes that are not multiples of 32 or leave a ragged last group,
// 8-bit on CUDA) falls back to
// the reference: dequantize_gptq (fp32) + matmul. The weight layout is the export layout of pack.h, consumed as is:
// no load-time repacking is needed (each kernel reads 32 input rows = `bits` whole words per column at a time).
//
// Shapes: x [..., K] (fp32, fp16 or bf16); W [N, K] given as GptqTensors; bias [N] or undefined; y [..., N] in x's
// dtype. On CUDA: M ≤ 8 rows → fused dequant-GEMV (fp32 accumulation); larger M → the weight is dequantized in
// column slices of at most kDequantSliceBytes to x's dtype and multiplied with cuBLAS (at::matmul).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>

#include "quant/pack.h"

namespace eqat {

at::Tensor quant_linear_forward(const at::Tensor& x, const GptqTensors& w, int bits, int64_t group_size,
                                const at::Tensor& bias);

// The specification: y = x · dequantize_gptq(w)ᵀ + b computed in fp32 (on the CPU), returned in x's dtype/device.
at::Tensor quant_linear_forward_reference(const at::Tensor& x, const GptqTensors& w, int bits, int64_t group_size,
                                          const at::Tensor& bias);

// The training forward (E2E-QP): y = x · Ŵᵀ (no bias) with Ŵ = s·(q − z) and the step sizes exactly as given (fp32
// masters), in x's dtype. On the CPU with a sequential g_idx, g % 32 == 0 and g | K: (q − z) is unpacked kTrainChunk
// input rows at a time, scaled and multiplied with SGEMM into y, so no [N, K] float copy of the weight exists and
// the step sizes are not rounded to fp16 as quant_linear_forward's serving kernels do. Elsewhere: the reference.
// E2E-QP's CPU training cache, for models small enough that the trainer keeps it (TrainWeightCache below): with it,
// the fast path reads each chunk's (q − z) and Ŵᵀ from the cache instead of unpacking and scaling them at every
// call; the chunks, products and sums are the same, so the results are bit for bit those without it.
struct TrainWeightCache;
at::Tensor quant_linear_train_forward(const at::Tensor& x, const GptqTensors& w, int bits, int64_t group_size,
                                      const TrainWeightCache* cache = nullptr);

// Backward of y = x·Wᵀ + b with W[n,k] = s[g,n]·(q[k,n] − z[g,n]) (E2E-QP trains the step sizes s only):
//   grad_input  [..., K] = grad_out · W                          (x's dtype)
//   grad_scales [G, N]   = Σ_{k in g} (q − z)[k, n] · (xᵀ·grad_out)[k, n]   (fp32)
// CUDA tensors use the dequant kernel + cuBLAS and the scale-gradient kernel. CPU tensors under the conditions of
// quant_linear_train_forward's fast path go through the same row chunks: per chunk, (q − z) is unpacked once and
// serves both grad_input (scaled, one SGEMM) and grad_scales ((xᵀ·grad_out)[chunk] ⊙ (q − z), summed per group);
// otherwise the reference formulas.
struct QuantLinearGrads {
  at::Tensor grad_input;   // undefined when not requested
  at::Tensor grad_scales;  // undefined when not requested
};
QuantLinearGrads quant_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const GptqTensors& w,
                                       int bits, int64_t group_size, bool need_input_grad = true,
                                       bool need_scale_grad = true, const TrainWeightCache* cache = nullptr);
QuantLinearGrads quant_linear_backward_reference(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const GptqTensors& w, int bits, int64_t group_size,
                                                 bool need_input_grad = true, bool need_scale_grad = true);

// The training cache of one packed linear: (q − z) [K, N] and Ŵᵀ = s·(q − z) [K, N], fp32, 8 bytes per weight (an
// fp32 copy of the model twice over: only for small models; a 7B's would be 52 GB). Used where
// train_cache_applies (the CPU fast path's conditions on the weight: on the CPU, sequential g_idx, g % 32 == 0,
// g | K; x must be on the CPU too). train_cache_scaled recomputes Ŵᵀ
// for new step sizes [G, N] (once per optimizer step instead of at every call of every micro-batch).
struct TrainWeightCache {
  at::Tensor qmz, wt;
};
bool train_cache_applies(const GptqTensors& w, int64_t group_size);
TrainWeightCache train_cache_build(const GptqTensors& w, int bits, int64_t group_size);
at::Tensor train_cache_scaled(const at::Tensor& qmz, const at::Tensor& scales, int64_t group_size);

// at::linear for float weights, except that on the CPU a product of at most kFewRows rows in fp32 (decode: the
// lm_head, float layers of a model served at batch 1) is split by output columns over LibTorch's threads: MKL runs
// such a GEMV on the calling thread alone. Each output is the same dot product over K, computed by MKL on its
// column slice; autograd is not involved (inference only: falls back to at::linear when gradients are recorded).
// Weights kept in their stored fp16/bf16 (LoadOptions::weights_as_stored) with fp32 x on the CPU: up to
// kHalfWeightRows rows go to cpu_half_gemv (each weight converted in registers, half the bytes of an fp32 weight
// streamed, split by output rows over the threads); more rows multiply the weight converted to fp32 (exact) with
// LibTorch's GEMM, in row slices of at most kHalfWeightSliceBytes, so a large matrix never exists in fp32 whole.
constexpr int64_t kFewRows = 4;
constexpr int64_t kHalfWeightRows = 16;
constexpr int64_t kHalfWeightSliceBytes = int64_t{64} << 20;
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias = c10::nullopt);

// True when g_idx is the plain k / group_size mapping (no act-order), which every fast path assumes.
bool gptq_is_sequential(const GptqTensors& w, int64_t group_size);

// Whether a CUDA adapter was compiled in (build state 3: nvcc + CUDA LibTorch).
bool quant_cuda_compiled();

// CUDA measurement helpers for `eqat bench` (InputError when the CUDA adapter is not compiled in).
// Captures step(0), …, step(iters−1) into one CUDA graph (after one eager warm-up call of each), replays it `reps`
// times and returns the device time per step in µs (CUDA events), so host launch overhead is excluded.
double cuda_graph_time_us(const std::function<void(int)>& step, int iters, int reps);
// A decode loop helper: runs `step` once eagerly (warm-up), captures it into a graph and returns a function that
// replays it on the caller's current stream. The state `step` advances has moved by two runs on return.
std::function<void()> cuda_graph_capture(const std::function<void()>& step);
// Device-to-device copy bandwidth (read + write bytes / time) of a `bytes`-sized buffer, GB/s.
double cuda_d2d_copy_gbps(int64_t bytes);
void cuda_reset_peak_memory();
int64_t cuda_peak_memory_bytes();  // caching allocator's peak allocated bytes since the last reset
std::string cuda_device_name();

}  // namespace eqat
