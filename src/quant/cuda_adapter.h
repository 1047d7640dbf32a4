// LibTorch adapter for kernels/ (HOUSE_STYLE.md rule 9): validates CUDA tensors, picks the kernel variant and turns
// a bad kernel status into an exception carrying the shapes. Compiled only in build state 3 (EQAT_WITH_CUDA=1);
// qmatmul.cpp is the only caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "quant/pack.h"

namespace eqat::cuda {

// True when the kernels support this weight (bits 2/3/4, g % 32 == 0, N % 4 == 0); callers fall back otherwise.
bool supports(const GptqTensors& w, int bits, int64_t group_size);

// x2d [M, K] CUDA (fp16/bf16/fp32); returns [M, N] in x's dtype. M ≤ 8: fused GEMV; else dequant slices + cuBLAS.
at::Tensor linear(const at::Tensor& x2d, const GptqTensors& w, int bits, int64_t group_size, const at::Tensor& bias);

// Dequantize W to Wᵀ [K, N] of `dtype` on the GPU (tests; prefill uses column slices of this).
at::Tensor dequantize_t(const GptqTensors& w, int bits, int64_t group_size, c10::ScalarType dtype);

// grad_input = go·W ([M, K], go's dtype); grad_scales [G, N] fp32. Either may be skipped.
void backward(const at::Tensor& go2d, const at::Tensor& x2d, const GptqTensors& w, int bits, int64_t group_size,
              at::Tensor* grad_input, at::Tensor* grad_scales);

}  // namespace eqat::cuda
