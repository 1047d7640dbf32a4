// bf16 × bf16 → fp32 GEMMs on the CPU, for the hand-written training steps (qat/block_grad.h) on CPUs with bf16 dot
// products (AMX or AVX512-BF16). LibTorch's own bf16 matmul rounds its output to bf16 and would need an fp32 copy of
// each operand converted per call; this one reads operands converted once where they are made and writes fp32.
// The function is oneMKL's cblas_gemm_bf16bf16f32, which the LibTorch CPU wheel carries but does not expose: it is
// looked up in the running process once. Where it is missing (a LibTorch built without oneMKL) or the CPU has no bf16
// dot products, cpu_bf16_gemm_available() is false and callers keep fp32.
// Arithmetic: each product of two bf16 values is exact in fp32 and the sums are fp32, so an output differs from the
// fp32 GEMM of the unrounded operands by the operands' rounding to bf16 (relative 2⁻⁹ each) plus fp32 summation.
#pragma once

#include <ATen/core/Tensor.h>

namespace eqat {

bool cpu_bf16_gemm_available();
// out = a · b: a [M, K] and b [K, N] bf16, each row-major or a transposed view of a row-major matrix (any leading
// dimension); out [M, N] fp32 with unit column stride (a column range of a wider matrix is fine). Runs on the calling
// thread when called inside a parallel region. Requires cpu_bf16_gemm_available().
void mm_bf16_f32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

}  // namespace eqat
