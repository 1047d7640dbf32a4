// Float linears whose weights stay in their stored 16-bit dtype on the CPU (LoadOptions::weights_as_stored): a few
// rows of fp32 activations times fp16 or bf16 weight rows, each weight converted exactly to fp32 in registers and
// multiplied in fp32. A decode step streams half the bytes an fp32 copy of the weight would take, and no copy exists.
//   y[m, n] = Σ_k x[m, k] · float(w[n, k])   for m < M, n in [n0, n1); y has row stride ldy.
// Variants: kAvx2 (AVX2+FMA+F16C, 8 lanes; kVnni CPUs take it too) and kScalar (portable C++). cpu_half_gemv_isa()
// is the best the CPU has, or kScalar under EQAT_CPU_KERNEL=scalar. Both sum in fp32, each in its own order, so
// each output is within γ_K·Σ_k |x[m, k]·w[n, k]| of the exact sum (γ_K = K·2⁻²⁴ / (1 − K·2⁻²⁴)), the bound every
// fp32 dot product meets, SGEMM's included.
#pragma once

#include <cstdint>

#include "quant/cpu_qgemv.h"

namespace eqat {

// x: [M, K] fp32 contiguous; w: [N, K] fp16 (bf16 = false) or bf16 bit patterns, rows contiguous; y: row m of the
// result starts at y + m·ldy, and outputs n0..n1−1 are written at y[m·ldy + n]. Single-threaded: callers split n.
void cpu_half_gemv(const float* x, int64_t M, int64_t K, const uint16_t* w, bool bf16, int64_t n0, int64_t n1,
                   float* y, int64_t ldy, CpuIsa isa);
CpuIsa cpu_half_gemv_isa();

}  // namespace eqat
