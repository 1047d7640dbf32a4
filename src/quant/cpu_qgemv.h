// Vectorised CPU quantized GEMV/GEMM on the GPTQ layout (pack.h), the CPU serving path of the packed linear:
//   y[M, N] (fp32) = x[M, K] (fp32) · Wᵀ,  W[n, k] = s[k/g, n]·(q[k, n] − z[k/g, n])
// Requirements: bits ∈ {2, 3, 4, 8}, g % 32 == 0, sequential g_idx (the caller checks; qmatmul.cpp falls back to
// the reference otherwise). Two implementations with identical arithmetic up to fp32 summation order:
//   kAvx2   AVX2+FMA+F16C (x86-64, chosen at run time when the CPU has them): 8 output columns per vector; per 32
//           input rows ("chunk", = `bits` whole words per column) a field of each word is isolated with one AND
//           (kept at its bit position; x is pre-scaled by 2^-position, which is exact) or a shift for the top and
//           3-bit straddling fields, converted to fp32 and FMA'd into a chunk partial Σx·q; per chunk the partial
//           becomes s·(Σx·q − z·Σx) in an fp32 accumulator. No dequantized weight is ever written.
//   kVnni   AVX-512 VNNI with int8 activations (llama.cpp's scheme for its CPU dot products): x is quantized per
//           chunk of 32 values, dx = max|x|/127, xi = round(x/dx); each packed word is split into bytes with a
//           shift and an AND, and vpdpbusd sums 4 byte products per lane in int32, 64 weights per instruction; per
//           chunk, s·(dx·Σq·xi − z·dx·Σxi) goes into the fp32 accumulator. It covers 2-, 4- and 8-bit weights with
//           N % 32 == 0 (3-bit and other widths take kAvx2). Not exact: |y − y_fp32| ≤ Σ_chunks dx/2 · Σ|Ŵ| over the
//           chunk, per output (the rounding of x), plus fp32 summation.
//   kScalar portable C++ of the fp32 scheme (the fallback, also forced with EQAT_CPU_KERNEL=scalar).
// EQAT_CPU_KERNEL=avx2 keeps decode in exact fp32 activations on a VNNI CPU (and prefill in fp32 where it would be bf16:
// qmatmul.cpp).
// Threads: at::parallel_for over column tiles (at::get_num_threads()).
#pragma once

#include <cstdint>

namespace eqat {

enum class CpuIsa { kScalar, kAvx2, kVnni, kCount };

// EQAT_CPU_KERNEL's cap on eqat's CPU kernels (the packed GEMV here, the training loops of train_loops.h), read once:
// "scalar", "avx2", or no cap (unset or any other value).
enum class CpuKernelCap { kNone, kAvx2, kScalar };
CpuKernelCap cpu_kernel_cap();

// The implementation cpu_qgemm uses: the best the CPU supports (kVnni, kAvx2, kScalar), or EQAT_CPU_KERNEL's
// choice ("avx2", "scalar").
CpuIsa cpu_qgemm_isa();
bool cpu_isa_supported(CpuIsa isa);
const char* cpu_isa_name(CpuIsa isa);

// While one of these lives on a thread, the packed linears that thread runs take fp32 activations (kVnni gives way
// to kAvx2): the quantization phases (Block-AP's quantized stream, E2E-QP's training forward) compute with the
// weights exactly as quantized; int8 activations are a serving choice.
class ExactCpuActivations {
 public:
  ExactCpuActivations();
  ~ExactCpuActivations();
  ExactCpuActivations(const ExactCpuActivations&) = delete;
  ExactCpuActivations& operator=(const ExactCpuActivations&) = delete;
  static bool active();
};

struct CpuQWeight {
  const uint32_t* qweight;  // [K·b/32, N]
  const uint32_t* qzeros;   // [G, ⌈N·b/32⌉]
  const uint16_t* scales;   // [G, N] fp16 or bf16 bit patterns
  bool scales_bf16;
  int64_t K, N, group_size;
  int bits;
};

// y: [M, N] fp32, overwritten. x: [M, K] fp32 contiguous.
void cpu_qgemm(const CpuQWeight& w, const float* x, int64_t M, float* y, CpuIsa isa);

// Prefill on the CPU: Wᵀ [K, N] fp32 (row k = input row k), bit-identical to dequantize_gptq(w).t(): (q − z)·s with
// q − z exact. Written so the compiler vectorises over N; parallel over chunks.
void cpu_dequant_t(const CpuQWeight& w, float* out);
// The same Wᵀ as bf16 bit patterns: each fp32 value of cpu_dequant_t rounded to nearest even (= at::to(kBFloat16)).
void cpu_dequant_t_bf16(const CpuQWeight& w, uint16_t* out);

// Whether the CPU has native bf16 dot products (AVX512_BF16, with the AVX-512 VNNI set): LibTorch's bf16 GEMM then
// runs at several times its SGEMM; without them bf16 GEMMs are emulated and no faster than fp32.
bool cpu_has_bf16_dot();

// (q − z) of input rows [k0, k1) as fp32 [k1 − k0, N], exact (small integers), without the step sizes (w.scales is
// not read and may be null): E2E-QP's CPU training path multiplies in its fp32 master step sizes itself and needs
// (q − z) alone for their gradient. k0 and k1 are multiples of 32 (k1 may be K).
void cpu_unpack_t(const CpuQWeight& w, int64_t k0, int64_t k1, float* out);

}  // namespace eqat
