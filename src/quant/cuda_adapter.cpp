#include "quant/cuda_adapter.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "data/error.h"
#include "eqat_kernels.h"
#include "quant/qmatmul.h"

namespace eqat::cuda {

namespace {

namespace k = ::eqat::kernels;

// Prefill/backward scratch bound: dequantized column slices of at most this many bytes (about half of an H100's
// 50 MB L2, so the slice the dequant kernel writes is still in L2 when cuBLAS reads it).
constexpr int64_t kDequantSliceBytes = 24LL << 20;
// fp32 xᵀ·grad_out slices for the scale gradient.
constexpr int64_t kGradSliceBytes = 64LL << 20;

k::DType to_kdtype(c10::ScalarType t, const char* what) {
  switch (t) {
    case at::kHalf: return k::DType::kHalf;
    case at::kBFloat16: return k::DType::kBFloat16;
    case at::kFloat: return k::DType::kFloat;
    default: EQAT_CHECK(false, what, ": dtype ", t, " is not fp16, bf16 or fp32");
  }
  return k::DType::kFloat;
}

struct View {
  k::GptqView v;
  at::Tensor qweight, qzeros, scales;  // keep contiguous copies alive
};

View make_view(const GptqTensors& w, int bits, int64_t group_size) {
  View r;
  r.qweight = w.qweight.contiguous();
  r.qzeros = w.qzeros.contiguous();
  r.scales = w.scales.contiguous();
  r.v.qweight = reinterpret_cast<const uint32_t*>(r.qweight.data_ptr<int32_t>());
  r.v.qzeros = reinterpret_cast<const uint32_t*>(r.qzeros.data_ptr<int32_t>());
  r.v.scales = r.scales.data_ptr();
  r.v.scale_dtype = to_kdtype(r.scales.scalar_type(), "scales");
  r.v.N = r.qweight.size(1);
  r.v.K = w.g_idx.numel();  // qweight has ⌈K·b/32⌉ rows (pack.h)
  r.v.group_size = group_size;
  r.v.bits = bits;
  return r;
}

void check_status(k::Status s, const char* kernel, const View& w, int64_t M) {
  EQAT_ASSERT(s == k::Status::kOk, kernel, " failed: ", k::status_string(s), " (", w.v.bits, "-bit, K ", w.v.K,
              ", N ", w.v.N, ", group ", w.v.group_size, ", M ", M, ")");
}

int64_t slice_cols(int64_t K, int64_t N, int64_t elt, int64_t bytes) {
  int64_t cols = std::max<int64_t>(128, bytes / (K * elt));
  cols = cols / 128 * 128;
  return std::min(cols, N);
}

}  // namespace

bool supports(const GptqTensors& w, int bits, int64_t group_size) {
  const int64_t N = w.qweight.size(1), K = w.g_idx.numel();
  return (bits == 2 || bits == 3 || bits == 4) && group_size % 32 == 0 && K % group_size == 0 && N % 4 == 0 &&
         (w.scales.scalar_type() == at::kHalf || w.scales.scalar_type() == at::kBFloat16 ||
          w.scales.scalar_type() == at::kFloat);
}

at::Tensor dequantize_t(const GptqTensors& w, int bits, int64_t group_size, c10::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(w.qweight.device());
  View v = make_view(w, bits, group_size);
  at::Tensor out = at::empty({v.v.K, v.v.N}, w.qweight.options().dtype(dtype));
  check_status(k::gptq_dequant(v.v, 0, v.v.N, out.data_ptr(), to_kdtype(dtype, "dequantize"),
                               at::cuda::getCurrentCUDAStream()),
               "gptq_dequant", v, 0);
  return out;
}

at::Tensor linear(const at::Tensor& x2d, const GptqTensors& w, int bits, int64_t group_size, const at::Tensor& bias) {
  const c10::cuda::CUDAGuard guard(x2d.device());
  View v = make_view(w, bits, group_size);
  at::Tensor x = x2d.contiguous();
  const k::DType xd = to_kdtype(x.scalar_type(), "x");
  const int64_t M = x.size(0), K = v.v.K, N = v.v.N;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor b = bias.defined() ? bias.to(x.options()).contiguous() : at::Tensor();
  if (M == 0) return at::empty({0, N}, x.options());
  if (M <= k::kGemvMaxRows) {
    at::Tensor ws = at::zeros({M, N}, x.options().dtype(at::kFloat));
    check_status(k::gptq_gemv(v.v, x.data_ptr(), xd, M, ws.data_ptr<float>(), stream), "gptq_gemv", v, M);
    at::Tensor y = at::empty({M, N}, x.options());
    check_status(k::gemv_finalize(ws.data_ptr<float>(), b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), xd, M, N,
                                  stream),
                 "gemv_finalize", v, M);
    return y;
  }
  // Prefill: dequantize column slices of Wᵀ to x's dtype and let cuBLAS multiply.
  const int64_t cols = slice_cols(K, N, x.element_size(), kDequantSliceBytes);
  at::Tensor wt = at::empty({K, cols}, x.options());
  if (cols == N) {
    check_status(k::gptq_dequant(v.v, 0, N, wt.data_ptr(), xd, stream), "gptq_dequant", v, M);
    return b.defined() ? at::addmm(b, x, wt) : at::mm(x, wt);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += cols) {
    const int64_t n1 = std::min(N, n0 + cols);
    at::Tensor ws = wt.narrow(1, 0, n1 - n0);
    if (n1 - n0 != cols) ws = at::empty({K, n1 - n0}, x.options());
    check_status(k::gptq_dequant(v.v, n0, n1, ws.data_ptr(), xd, stream), "gptq_dequant", v, M);
    at::Tensor ys = y.narrow(1, n0, n1 - n0);
    if (b.defined()) {
      ys.copy_(at::addmm(b.narrow(0, n0, n1 - n0), x, ws.contiguous()));
    } else {
      ys.copy_(at::mm(x, ws.contiguous()));
    }
  }
  return y;
}

void backward(const at::Tensor& go2d, const at::Tensor& x2d, const GptqTensors& w, int bits, int64_t group_size,
              at::Tensor* grad_input, at::Tensor* grad_scales) {
  const c10::cuda::CUDAGuard guard(x2d.device());
  View v = make_view(w, bits, group_size);
  const int64_t K = v.v.K, N = v.v.N, G = K / group_size;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (grad_input) {
    // grad_x = go · W = Σ over column slices of go[:, slice] · Wᵀ[:, slice]ᵀ, in go's dtype (fp32 accumulate in cuBLAS).
    at::Tensor go = go2d.contiguous();
    const k::DType gd = to_kdtype(go.scalar_type(), "grad_out");
    const int64_t cols = slice_cols(K, N, go.element_size(), kDequantSliceBytes);
    at::Tensor gx = at::zeros({go.size(0), K}, go.options());
    for (int64_t n0 = 0; n0 < N; n0 += cols) {
      const int64_t n1 = std::min(N, n0 + cols);
      at::Tensor wt = at::empty({K, n1 - n0}, go.options());
      check_status(k::gptq_dequant(v.v, n0, n1, wt.data_ptr(), gd, stream), "gptq_dequant", v, go.size(0));
      gx.addmm_(go.narrow(1, n0, n1 - n0), wt.t());
    }
    *grad_input = gx.to(x2d.scalar_type());
  }
  if (grad_scales) {
    at::Tensor gs = at::empty({G, N}, x2d.options().dtype(at::kFloat));
    at::Tensor xt = x2d.to(at::kFloat).t();  // [K, M]
    at::Tensor go = go2d.to(at::kFloat);
    const int64_t cols = slice_cols(K, N, 4, kGradSliceBytes);
    for (int64_t n0 = 0; n0 < N; n0 += cols) {
      const int64_t n1 = std::min(N, n0 + cols);
      at::Tensor P = at::mm(xt, go.narrow(1, n0, n1 - n0)).contiguous();  // [K, n1−n0] fp32
      check_status(k::gptq_scale_grad(v.v, P.data_ptr<float>(), n0, n1, gs.data_ptr<float>(), stream),
                   "gptq_scale_grad", v, go2d.size(0));
    }
    *grad_scales = gs;
  }
}

}  // namespace eqat::cuda

namespace eqat {

double cuda_graph_time_us(const std::function<void(int)>& step, int iters, int reps) {
  EQAT_CHECK(at::cuda::is_available(), "no CUDA device");
  // Warm up eagerly on a side stream (graph capture must not run on the legacy default stream).
  at::cuda::CUDAStream stream = at::cuda::getStreamFromPool();
  at::cuda::CUDAStreamGuard sg(stream);
  for (int i = 0; i < iters; ++i) step(i);
  stream.synchronize();
  at::cuda::CUDAGraph graph;
  graph.capture_begin();
  for (int i = 0; i < iters; ++i) step(i);
  graph.capture_end();
  graph.replay();  // warm
  at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
  start.record(stream);
  for (int r = 0; r < reps; ++r) graph.replay();
  stop.record(stream);
  stop.synchronize();
  return static_cast<double>(start.elapsed_time(stop)) * 1e3 / (static_cast<double>(iters) * reps);
}

std::function<void()> cuda_graph_capture(const std::function<void()>& step) {
  EQAT_CHECK(at::cuda::is_available(), "no CUDA device");
  // Captured on a side stream (capture is refused on the legacy default stream), which first waits for all work
  // already queued. Replays run on the caller's current stream (CUDAGraph::replay launches there), so they are
  // ordered with the caller's copies before and after them; a side-stream replay would race with them, the pool's
  // streams being non-blocking.
  at::cuda::CUDAStream stream = at::cuda::getStreamFromPool();
  auto graph = std::make_shared<at::cuda::CUDAGraph>();
  at::cuda::device_synchronize();
  {
    at::cuda::CUDAStreamGuard sg(stream);
    step();  // warm-up: allocations and lazy cuBLAS initialisation happen outside the capture
    stream.synchronize();
    graph->capture_begin();
    step();
    graph->capture_end();
  }
  return [graph] { graph->replay(); };
}

double cuda_d2d_copy_gbps(int64_t bytes) {
  EQAT_CHECK(at::cuda::is_available(), "no CUDA device");
  at::Tensor a = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
  at::Tensor b = at::empty_like(a);
  a.fill_(1);
  b.copy_(a);
  at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
  const int reps = 20;
  start.record(stream);
  for (int r = 0; r < reps; ++r) (r % 2 ? a : b).copy_(r % 2 ? b : a);
  stop.record(stream);
  stop.synchronize();
  const double s = start.elapsed_time(stop) * 1e-3 / reps;
  return 2.0 * static_cast<double>(bytes) / s * 1e-9;
}

void cuda_reset_peak_memory() {
  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
}

int64_t cuda_peak_memory_bytes() {
  auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  return st.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
}

std::string cuda_device_name() {
  if (!at::cuda::is_available()) return "none";
  return at::cuda::getCurrentDeviceProperties()->name;
}

}  // namespace eqat
