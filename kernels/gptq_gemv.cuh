// Fused dequant-GEMV for decode (M = 1…8 activation rows), GPTQ layout read as exported (eqat_kernels.h).
//
// Work decomposition (split-K):
//   block  = 256 threads = 8 warps; blockIdx.x picks a tile of 128 output columns (32 lanes × 4 adjacent columns,
//            so a warp's weight load of one word row is 512 contiguous bytes: one uint4 per lane, fully coalesced),
//            blockIdx.y a range of `kb` chunks of 32 input rows.
//   warp w of the block handles chunks w, w+8, … of that range; per chunk each lane loads `BITS` uint4 (the chunk's
//            BITS words for its 4 columns) with a streaming (evict-first) load — weights are read once, while x
//            and the scales stay cached.
//   x      the block's slice of x [M, kb·32] is converted to fp32 into shared memory once; every lane of a warp
//          reads the same element (broadcast, no bank conflicts).
//   math   per weight: one shift/mask (compile-time positions), one OR + FSUB to get q − z exactly in fp32
//          (magic-number conversion, no I2F), then one FFMA per row m. Chunk partials are scaled by s[g, n] once
//          per chunk (g % 32 == 0, so a chunk never straddles groups) and accumulated in fp32.
//   output the 8 warps' partials are summed in shared memory and added to the fp32 workspace with atomicAdd;
//          gemv_finalize converts (and adds the bias). Accumulation is fp32 throughout.
// Template parameters: BITS ∈ {2,3,4}; MT ∈ {1,2,4,8} = rows the registers are sized for (M ≤ MT at run time);
// X = activation type (__half, __nv_bfloat16, float). Instantiated per bit width in gptq_gemv_w<BITS>.cu.
#pragma once

#include <algorithm>

#include "gptq_common.cuh"

namespace eqat::kernels::detail {

constexpr int kGemvThreads = 256, kGemvWarps = kGemvThreads / 32, kGemvCols = 128;

// Chunks per block the shared-memory x slice is sized for: xs (MT·kb·32 floats) and the reduction buffer
// (8·MT·128 floats) share one static buffer of at most 48 KB.
template <int MT>
constexpr int gemv_kb_max() { return MT >= 8 ? 16 : 64; }
template <int MT>
constexpr int gemv_smem_floats() {
  return std::max(MT * gemv_kb_max<MT>() * kChunk, kGemvWarps * MT * kGemvCols);
}

struct GemvArgs {
  const uint32_t* __restrict__ qweight;
  const uint32_t* __restrict__ qzeros;
  const void* scales;
  DType scale_dtype;
  const void* x;
  float* ws;
  int64_t M, K, N, group_size, kb;  // kb = chunks per block
};

template <int BITS, int MT, typename X>
__global__ void __launch_bounds__(kGemvThreads) gptq_gemv_kernel(GemvArgs a) {
  __shared__ float smem[gemv_smem_floats<MT>()];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n_tile = static_cast<int64_t>(blockIdx.x) * kGemvCols;
  const int64_t n = n_tile + lane * 4;  // this lane's first column
  const int64_t chunks = a.K / kChunk;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * a.kb;
  const int64_t c_end = min(c_begin + a.kb, chunks);
  const int kspan = static_cast<int>((c_end - c_begin) * kChunk);
  const X* x = static_cast<const X*>(a.x);

  // x slice -> fp32 shared memory, xs[m][kk], rows m >= M zero-filled.
  float* xs = smem;
  for (int i = threadIdx.x; i < MT * kspan; i += kGemvThreads) {
    const int m = i / kspan, kk = i - m * kspan;
    xs[m * kspan + kk] = m < a.M ? load_float(x + m * a.K + c_begin * kChunk + kk) : 0.f;
  }
  __syncthreads();

  float acc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[m][j] = 0.f;

  const int64_t zwords = (a.N * BITS + 31) / 32;
  if (n < a.N) {
    for (int64_t c = c_begin + warp; c < c_end; c += kGemvWarps) {
      // The chunk's BITS words for columns n..n+3.
      uint32_t w[4][BITS];
#pragma unroll
      for (int i = 0; i < BITS; ++i) {
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(a.qweight + (c * BITS + i) * a.N + n));
        w[0][i] = v.x; w[1][i] = v.y; w[2][i] = v.z; w[3][i] = v.w;
      }
      const int64_t g = c * kChunk / a.group_size;
      float zm[4], s[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        zm[j] = 8388608.f + static_cast<float>(zero_at<BITS>(a.qzeros + g * zwords, n + j));
        s[j] = load_scale(a.scales, a.scale_dtype, g * a.N + n + j);
      }
      float part[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[m][j] = 0.f;
      const float* xc = xs + (c - c_begin) * kChunk;
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) {
        float d[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) d[j] = q_minus_z(chunk_value<BITS>(w[j], kk), zm[j]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float xv = xc[m * kspan + kk];
#pragma unroll
          for (int j = 0; j < 4; ++j) part[m][j] = fmaf(xv, d[j], part[m][j]);
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[m][j] = fmaf(s[j], part[m][j], acc[m][j]);
    }
  }

  // Block reduction over the 8 warps, then one atomicAdd per (m, column).
  __syncthreads();  // xs is no longer read; reuse smem as red[warp][m][col]
  float* red = smem;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[(warp * MT + m) * kGemvCols + lane * 4 + j] = acc[m][j];
  __syncthreads();
  for (int i = threadIdx.x; i < MT * kGemvCols; i += kGemvThreads) {
    const int m = i / kGemvCols, col = i - m * kGemvCols;
    if (m >= a.M || n_tile + col >= a.N) continue;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < kGemvWarps; ++wi) sum += red[(wi * MT + m) * kGemvCols + col];
    atomicAdd(a.ws + m * a.N + n_tile + col, sum);
  }
}

template <int BITS, int MT, typename X>
Status launch_gemv_mt(const GptqView& w, const void* x, int64_t M, float* ws, cudaStream_t stream) {
  const int64_t chunks = w.K / kChunk, col_tiles = ceil_div(w.N, kGemvCols);
  // Aim for ~4 blocks per SM (2048 threads resident) but give each warp ≥ 2 chunks where K allows, so the
  // reduction + atomics stay small next to the weight stream. (Tuning constant: to be revisited on an H100.)
  const int64_t target_blocks = 4LL * device_sm_count();
  int64_t splits = std::max<int64_t>(1, ceil_div(target_blocks, col_tiles));
  int64_t kb = std::max<int64_t>(ceil_div(chunks, splits), std::min<int64_t>(chunks, 2 * kGemvWarps));
  kb = std::min<int64_t>(kb, gemv_kb_max<MT>());
  splits = ceil_div(chunks, kb);
  if (splits > 65535) return Status::kUnsupported;
  GemvArgs a{w.qweight, w.qzeros, w.scales, w.scale_dtype, x, ws, M, w.K, w.N, w.group_size, kb};
  gptq_gemv_kernel<BITS, MT, X><<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits)),
                                   kGemvThreads, 0, stream>>>(a);
  return last_status();
}

template <int BITS, typename X>
Status launch_gemv_x(const GptqView& w, const void* x, int64_t M, float* ws, cudaStream_t stream) {
  if (M <= 1) return launch_gemv_mt<BITS, 1, X>(w, x, M, ws, stream);
  if (M <= 2) return launch_gemv_mt<BITS, 2, X>(w, x, M, ws, stream);
  if (M <= 4) return launch_gemv_mt<BITS, 4, X>(w, x, M, ws, stream);
  return launch_gemv_mt<BITS, 8, X>(w, x, M, ws, stream);
}

template <int BITS>
Status launch_gemv(const GptqView& w, const void* x, DType x_dtype, int64_t M, float* ws, cudaStream_t stream) {
  switch (x_dtype) {
    case DType::kHalf: return launch_gemv_x<BITS, __half>(w, x, M, ws, stream);
    case DType::kBFloat16: return launch_gemv_x<BITS, __nv_bfloat16>(w, x, M, ws, stream);
    case DType::kFloat: return launch_gemv_x<BITS, float>(w, x, M, ws, stream);
  }
  return Status::kBadArgument;
}

}  // namespace eqat::kernels::detail
