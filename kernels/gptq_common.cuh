// Device helpers shared by the GPTQ kernels (see eqat_kernels.h for the layout). Internal to kernels/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "eqat_kernels.h"

namespace eqat::kernels::detail {

constexpr int kChunk = 32;  // k values per chunk = `bits` whole words of one column

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Value `kk` (0..31) of a chunk held in words w[0..BITS-1]. All indices are compile-time after unrolling, so this
// is one shift (or funnel shift for the 3-bit straddlers) and one mask.
template <int BITS>
__device__ __forceinline__ uint32_t chunk_value(const uint32_t* w, int kk) {
  const int bit = kk * BITS, i = bit >> 5, off = bit & 31;
  uint32_t v;
  if (off + BITS > 32) {
    v = __funnelshift_r(w[i], w[i + 1], off);
  } else {
    v = w[i] >> off;
  }
  return v & ((1u << BITS) - 1u);
}

// q − z as an exact fp32 without an int->float conversion instruction: OR the integer into the mantissa of 2^23
// (0x4B000000), then subtract 2^23 + z (exact: both operands are integers < 2^24).
__device__ __forceinline__ float q_minus_z(uint32_t q, float z_plus_magic) {
  return __uint_as_float(0x4B000000u | q) - z_plus_magic;
}

// Zero point of column n from a packed qzeros row (LSB-first bitstream along N).
template <int BITS>
__device__ __forceinline__ uint32_t zero_at(const uint32_t* __restrict__ zrow, int64_t n) {
  const int64_t bit = n * BITS, i = bit >> 5;
  const int off = static_cast<int>(bit & 31);
  uint32_t v = __ldg(zrow + i) >> off;
  if (off + BITS > 32) v |= __ldg(zrow + i + 1) << (32 - off);
  return v & ((1u << BITS) - 1u);
}

__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }

__device__ __forceinline__ float load_scale(const void* scales, DType dt, int64_t idx) {
  if (dt == DType::kHalf) return __half2float(static_cast<const __half*>(scales)[idx]);
  if (dt == DType::kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(scales)[idx]);
  return static_cast<const float*>(scales)[idx];  // fp32 step sizes while E2E-QP trains them
}

inline Status check_view(const GptqView& w) {
  if (w.bits != 2 && w.bits != 3 && w.bits != 4) return Status::kUnsupported;
  if (!w.qweight || !w.qzeros || !w.scales || w.K <= 0 || w.N <= 0 || w.group_size <= 0) return Status::kBadArgument;
  if (w.group_size % kChunk != 0 || w.K % w.group_size != 0 || w.N % 4 != 0) return Status::kBadArgument;
  if (reinterpret_cast<uintptr_t>(w.qweight) % 16 != 0) return Status::kBadArgument;
    return Status::kOk;
}

inline Status last_status() { return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError; }

// Launches the GEMV for one bit width (defined in gptq_gemv_w<B>.cu).
template <int BITS>
Status launch_gemv(const GptqView& w, const void* x, DType x_dtype, int64_t M, float* ws, cudaStream_t stream);

}  // namespace eqat::kernels::detail
