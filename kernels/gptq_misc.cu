// Entry points of eqat_kernels.h other than the GEMV instantiations: dispatch, finalize, the prefill dequant and
// the E2E-QP scale-gradient kernel. Layout: see eqat_kernels.h.
//
// gptq_dequant_kernel: one thread per (chunk of 32 rows, column): reads the chunk's BITS words of its column
//   (coalesced across the warp's consecutive columns), writes 32 dequantized values down the column of the
//   [K, ncols] output (each row write coalesced). Used for prefill (M > 8): the adapter dequantizes column slices
//   small enough to stay in L2 and hands each to cuBLAS, so the scratch is bounded.
// gptq_scale_grad_kernel: one thread per (group, column): Σ over the group's chunks of (q − z)·P, fp32.
#include <mutex>
#include <vector>

#include "gptq_common.cuh"

namespace eqat::kernels {

const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kBadArgument: return "bad argument (layout/size/alignment requirements of eqat_kernels.h)";
    case Status::kUnsupported: return "unsupported (bit width or size)";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

int device_sm_count() {
  static std::mutex mu;
  static std::vector<int> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= static_cast<int>(cache.size())) cache.resize(dev + 1, 0);
  if (cache[dev] == 0) {
    int sms = 0;
    cache[dev] = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && sms > 0 ? sms
                                                                                                            : 132;
  }
  return cache[dev];
}

Status gptq_gemv(const GptqView& w, const void* x, DType x_dtype, int64_t M, float* ws, cudaStream_t stream) {
  if (Status s = detail::check_view(w); s != Status::kOk) return s;
  if (!x || !ws || M < 1 || M > kGemvMaxRows) return Status::kBadArgument;
  switch (w.bits) {
#ifndef EQAT_FAST_BUILD
    case 2: return detail::launch_gemv<2>(w, x, x_dtype, M, ws, stream);
    case 3: return detail::launch_gemv<3>(w, x, x_dtype, M, ws, stream);
#endif
    case 4: return detail::launch_gemv<4>(w, x, x_dtype, M, ws, stream);
  }
  return Status::kUnsupported;
}

namespace detail {
namespace {

template <typename X>
__global__ void finalize_kernel(const float* __restrict__ ws, const X* __restrict__ bias, X* __restrict__ out,
                                int64_t M, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  float v = ws[i];
  if (bias) v += load_float(bias + i % N);
  store_float(out + i, v);
}

template <typename X>
Status launch_finalize(const float* ws, const void* bias, void* out, int64_t M, int64_t N, cudaStream_t stream) {
  const int64_t total = M * N;
  finalize_kernel<X><<<static_cast<unsigned>(ceil_div(total, 256)), 256, 0, stream>>>(
      ws, static_cast<const X*>(bias), static_cast<X*>(out), M, N);
  return last_status();
}

template <int BITS, typename X>
__global__ void dequant_kernel(const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                               const void* scales, DType sdt, int64_t K, int64_t N, int64_t group_size, int64_t n0,
                               int64_t ncols, X* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = blockIdx.y;  // chunk
  if (col >= ncols) return;
  const int64_t n = n0 + col, g = c * kChunk / group_size;
  uint32_t w[BITS];
#pragma unroll
  for (int i = 0; i < BITS; ++i) w[i] = __ldg(qweight + (c * BITS + i) * N + n);
  const float zm = 8388608.f + static_cast<float>(zero_at<BITS>(qzeros + g * ((N * BITS + 31) / 32), n));
  const float s = load_scale(scales, sdt, g * N + n);
  X* o = out + c * kChunk * ncols + col;
#pragma unroll
  for (int kk = 0; kk < kChunk; ++kk) store_float(o + kk * ncols, s * q_minus_z(chunk_value<BITS>(w, kk), zm));
}

template <int BITS>
__global__ void scale_grad_kernel(const uint32_t* __restrict__ qweight, const uint32_t* __restrict__ qzeros,
                                  const float* __restrict__ P, int64_t K, int64_t N, int64_t group_size, int64_t n0,
                                  int64_t ncols, float* __restrict__ gs) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = blockIdx.y;
  if (col >= ncols) return;
  const int64_t n = n0 + col;
  const float zm = 8388608.f + static_cast<float>(zero_at<BITS>(qzeros + g * ((N * BITS + 31) / 32), n));
  float acc = 0.f;
  for (int64_t c = g * group_size / kChunk; c < (g + 1) * group_size / kChunk; ++c) {
    uint32_t w[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = __ldg(qweight + (c * BITS + i) * N + n);
    const float* p = P + c * kChunk * ncols + col;
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) acc = fmaf(q_minus_z(chunk_value<BITS>(w, kk), zm), p[kk * ncols], acc);
  }
  gs[g * N + n] = acc;
}

template <int BITS>
Status launch_dequant_bits(const GptqView& w, int64_t n0, int64_t ncols, void* out, DType dt, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>(ceil_div(ncols, 128)), static_cast<unsigned>(w.K / kChunk));
  switch (dt) {
    case DType::kHalf:
      dequant_kernel<BITS, __half><<<grid, 128, 0, st>>>(w.qweight, w.qzeros, w.scales, w.scale_dtype, w.K, w.N,
                                                        w.group_size, n0, ncols, static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      dequant_kernel<BITS, __nv_bfloat16><<<grid, 128, 0, st>>>(w.qweight, w.qzeros, w.scales, w.scale_dtype, w.K,
                                                               w.N, w.group_size, n0, ncols,
                                                               static_cast<__nv_bfloat16*>(out));
      break;
    case DType::kFloat:
      dequant_kernel<BITS, float><<<grid, 128, 0, st>>>(w.qweight, w.qzeros, w.scales, w.scale_dtype, w.K, w.N,
                                                       w.group_size, n0, ncols, static_cast<float*>(out));
      break;
    default: return Status::kBadArgument;
  }
  return last_status();
}

template <int BITS>
Status launch_scale_grad_bits(const GptqView& w, const float* P, int64_t n0, int64_t ncols, float* gs,
                              cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>(ceil_div(ncols, 128)), static_cast<unsigned>(w.K / w.group_size));
  scale_grad_kernel<BITS><<<grid, 128, 0, st>>>(w.qweight, w.qzeros, P, w.K, w.N, w.group_size, n0, ncols, gs);
  return last_status();
}

}  // namespace
}  // namespace detail

Status gemv_finalize(const float* ws, const void* bias, void* out, DType dtype, int64_t M, int64_t N,
                     cudaStream_t stream) {
  if (!ws || !out || M < 1 || N < 1) return Status::kBadArgument;
  switch (dtype) {
    case DType::kHalf: return detail::launch_finalize<__half>(ws, bias, out, M, N, stream);
    case DType::kBFloat16: return detail::launch_finalize<__nv_bfloat16>(ws, bias, out, M, N, stream);
    case DType::kFloat: return detail::launch_finalize<float>(ws, bias, out, M, N, stream);
  }
  return Status::kBadArgument;
}

Status gptq_dequant(const GptqView& w, int64_t n0, int64_t n1, void* out, DType out_dtype, cudaStream_t stream) {
  if (Status s = detail::check_view(w); s != Status::kOk) return s;
  if (!out || n0 < 0 || n1 > w.N || n0 >= n1 || w.K / detail::kChunk > 65535) return Status::kBadArgument;
  switch (w.bits) {
    case 2: return detail::launch_dequant_bits<2>(w, n0, n1 - n0, out, out_dtype, stream);
    case 3: return detail::launch_dequant_bits<3>(w, n0, n1 - n0, out, out_dtype, stream);
    case 4: return detail::launch_dequant_bits<4>(w, n0, n1 - n0, out, out_dtype, stream);
  }
  return Status::kUnsupported;
}

Status gptq_scale_grad(const GptqView& w, const float* P, int64_t n0, int64_t n1, float* gs, cudaStream_t stream) {
  if (Status s = detail::check_view(w); s != Status::kOk) return s;
  if (!P || !gs || n0 < 0 || n1 > w.N || n0 >= n1 || w.K / w.group_size > 65535) return Status::kBadArgument;
  switch (w.bits) {
    case 2: return detail::launch_scale_grad_bits<2>(w, P, n0, n1 - n0, gs, stream);
    case 3: return detail::launch_scale_grad_bits<3>(w, P, n0, n1 - n0, gs, stream);
    case 4: return detail::launch_scale_grad_bits<4>(w, P, n0, n1 - n0, gs, stream);
  }
  return Status::kUnsupported;
}

}  // namespace eqat::kernels
