#include "quant/qmatmul.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "data/error.h"
#include "quant/cpu_half_gemv.h"
#include "quant/cpu_qgemv.h"
#include "quant/quantizer.h"
#ifdef EQAT_WITH_CUDA
#include "quant/cuda_adapter.h"
#endif

namespace eqat {

namespace {

void check_tensors(const GptqTensors& w, int bits, int64_t group_size, int64_t K_x, const char* what) {
  EQAT_CHECK(w.qweight.defined() && w.qzeros.defined() && w.scales.defined() && w.g_idx.defined(), what,
             ": packed weight has undefined tensors");
  EQAT_CHECK(packable_bits(bits), what, ": bits must be 2, 3, 4 or 8, got ", bits);
  EQAT_CHECK(w.qweight.dim() == 2 && w.qweight.scalar_type() == at::kInt, what, ": qweight must be int32 2-D, got ",
             w.qweight.sizes());
  const int64_t K = K_x, N = w.qweight.size(1);
  EQAT_CHECK(w.qweight.size(0) == packed_words(K, bits), what, ": x has ", K, " features but qweight [",
             w.qweight.size(0), ", ", N, "] does not hold ", K, " rows of ", bits, " bits");
  EQAT_CHECK(group_size > 0, what, ": group size must be positive, got ", group_size);
  const int64_t G = QuantSpec::num_groups(K, group_size);
  EQAT_CHECK(w.qzeros.sizes() == at::IntArrayRef({G, packed_words(N, bits)}) && w.qzeros.scalar_type() == at::kInt,
             what, ": qzeros must be int32 [", G, ", ", packed_words(N, bits), "], got ", w.qzeros.sizes());
  EQAT_CHECK(w.scales.sizes() == at::IntArrayRef({G, N}), what, ": scales must be [", G, ", ", N, "], got ",
             w.scales.sizes());
  EQAT_CHECK(w.g_idx.numel() == K, what, ": g_idx must have ", K, " entries, got ", w.g_idx.numel());
  const auto dev = w.qweight.device();
  EQAT_CHECK(w.qzeros.device() == dev && w.scales.device() == dev && w.g_idx.device() == dev, what,
             ": packed tensors are on different devices");
}

GptqTensors to_cpu(const GptqTensors& w) {
  return {w.qweight.cpu(), w.qzeros.cpu(), w.scales.cpu(), w.g_idx.cpu()};
}

// Rows above which the CPU path dequantizes once and uses BLAS (the decode-style kernel re-decodes the weight for
// every block of 4 rows; past ~64 rows one fp32 dequant + SGEMM is cheaper).
constexpr int64_t kCpuGemmRows = 64;

// Prefill with bf16 operands. On a CPU with native bf16 dot products LibTorch's bf16 GEMM (fp32 accumulation)
// runs at about 3× its SGEMM: M = 624 (a LLaVA prompt), 11008×4096, 2 threads of a Zen 4: 310–395 against 123–138
// GFLOP/s. Like the int8 activations of the decode kernel this is a serving choice: x and Ŵ are each rounded to
// bf16 (2^-9 relative) and y once more. The quantization phases (ExactCpuActivations) and EQAT_CPU_KERNEL=avx2 or
// scalar keep fp32.
bool bf16_prefill() {
  return cpu_kernel_cap() == CpuKernelCap::kNone && !ExactCpuActivations::active() && cpu_has_bf16_dot();
}

// CPU fast path: y2d [M, N], fp32 (bf16 from the bf16 prefill).
at::Tensor cpu_linear(const at::Tensor& x2d, const GptqTensors& w, int bits, int64_t group_size) {
  const int64_t M = x2d.size(0), K = x2d.size(1), N = w.qweight.size(1);
  at::Tensor qw = w.qweight.contiguous(), qz = w.qzeros.contiguous();
  at::Tensor sc = w.scales;
  if (sc.scalar_type() != at::kHalf && sc.scalar_type() != at::kBFloat16) sc = sc.to(at::kHalf);
  sc = sc.contiguous();
  CpuQWeight cw{reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>()),
                reinterpret_cast<const uint32_t*>(qz.data_ptr<int32_t>()),
                reinterpret_cast<const uint16_t*>(sc.data_ptr()),
                sc.scalar_type() == at::kBFloat16,
                K,
                N,
                group_size,
                bits};
  if (M > kCpuGemmRows && bf16_prefill()) {  // prefill: one fast dequant to Wᵀ bf16, then a bf16 GEMM
    at::Tensor wt = at::empty({K, N}, at::kBFloat16);
    cpu_dequant_t_bf16(cw, reinterpret_cast<uint16_t*>(wt.data_ptr()));
    return at::mm(x2d.to(at::kBFloat16), wt);
  }
  at::Tensor xf = x2d.to(at::kFloat).contiguous();
  if (M > kCpuGemmRows) {  // prefill in fp32: one fast dequant to Wᵀ fp32, then SGEMM
    at::Tensor wt = at::empty({K, N}, at::kFloat);
    cpu_dequant_t(cw, wt.data_ptr<float>());
    return at::mm(xf, wt);
  }
  at::Tensor y = at::empty({M, N}, at::kFloat);
  const CpuIsa best = cpu_qgemm_isa();
  const CpuIsa isa = best == CpuIsa::kVnni && ExactCpuActivations::active() ? CpuIsa::kAvx2 : best;
  cpu_qgemm(cw, xf.data_ptr<float>(), M, y.data_ptr<float>(), isa);
  return y;
}


// E2E-QP's CPU training path (quant_linear_train_forward / quant_linear_backward): input rows per chunk. A chunk
// holds whole groups (g ≤ 256) or a whole part of one group (g > 256), so each chunk's step sizes are one slice of
// s. 256 rows keep the two [rows, N] fp32 buffers near L2/L3 (2 × 14 MB for a 13B FFN) and make SGEMMs of depth
// 256.
constexpr int64_t kTrainChunk = 256;

int64_t train_chunk_rows(int64_t group_size) {
  if (group_size <= kTrainChunk) return group_size * (kTrainChunk / group_size);
  int64_t d = kTrainChunk;
  while (group_size % d != 0) d -= 32;  // ends at 32 at the latest: the fast path needs g % 32 == 0
  return d;
}

bool cpu_train_fast_path(const at::Tensor& x, const GptqTensors& w, int64_t group_size) {
  return x.is_cpu() && x.size(-1) == w.g_idx.size(0) && train_cache_applies(w, group_size);
}

// One chunk of the CPU training path: input rows [k0, k0 + rows), qmz = (q − z) of those rows [rows, N] fp32, s
// their step sizes [rows/per, N] fp32 (per = min(g, chunk) rows per step size), a scratch [rows, N] buffer, and
// with a TrainWeightCache its Wᵀ rows, already scaled.
struct TrainChunk {
  int64_t k0, rows, per;
  at::Tensor qmz, s, work, cached_wt;
  // Wᵀ rows of the chunk, s·(q − z): the cache's, or written into `work` (the same product, element by element).
  at::Tensor weight_t() const {
    if (cached_wt.defined()) return cached_wt;
    const int64_t N = qmz.size(1);
    at::Tensor w = work.view({rows / per, per, N});
    at::mul_out(w, qmz.view({rows / per, per, N}), s.unsqueeze(1));
    return work;
  }
};

// Sets up the unpacking of w's integers for the CPU training path (also builds the cache's (q − z)).
CpuQWeight train_qweight(const at::Tensor& qw, const at::Tensor& qz, int bits, int64_t group_size, int64_t K) {
  return CpuQWeight{reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>()),
                    reinterpret_cast<const uint32_t*>(qz.data_ptr<int32_t>()),
                    nullptr,
                    false,
                    K,
                    qw.size(1),
                    group_size,
                    bits};
}

template <typename Fn>
void for_each_train_chunk(const GptqTensors& w, int bits, int64_t group_size, int64_t K, const TrainWeightCache* cache,
                          Fn fn) {
  const int64_t N = w.qweight.size(1), chunk = std::min(train_chunk_rows(group_size), K),
                per = std::min(group_size, chunk);
  at::Tensor work_buf = at::empty({chunk, N}, at::kFloat);
  if (cache) {
    EQAT_ASSERT(cache->qmz.sizes() == at::IntArrayRef({K, N}) && cache->wt.sizes() == at::IntArrayRef({K, N}),
                "TrainWeightCache: shapes do not match the linear");
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const int64_t rows = std::min(chunk, K - k0);
      fn(TrainChunk{k0, rows, per, cache->qmz.narrow(0, k0, rows), at::Tensor(), work_buf.narrow(0, 0, rows),
                    cache->wt.narrow(0, k0, rows)});
    }
    return;
  }
  at::Tensor qw = w.qweight.contiguous(), qz = w.qzeros.contiguous();
  at::Tensor s = w.scales.to(at::kFloat).contiguous();
  const CpuQWeight cw = train_qweight(qw, qz, bits, group_size, K);
  at::Tensor qmz_buf = at::empty({chunk, N}, at::kFloat);
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t rows = std::min(chunk, K - k0);
    at::Tensor qmz = qmz_buf.narrow(0, 0, rows);
    cpu_unpack_t(cw, k0, k0 + rows, qmz.data_ptr<float>());
    fn(TrainChunk{k0, rows, per, qmz, s.narrow(0, k0 / group_size, rows / per), work_buf.narrow(0, 0, rows),
                  at::Tensor()});
  }
}

// gptq_is_sequential costs a device sync on CUDA tensors (at::equal returns a bool), which a decode step under a
// CUDA graph cannot afford; remember the answer per g_idx tensor (its impl, data pointer and version counter).
bool sequential_cached(const GptqTensors& w, int64_t group_size) {
  if (!w.g_idx.is_cuda()) return gptq_is_sequential(w, group_size);
  using Key = std::tuple<const void*, const void*, uint32_t, int64_t>;
  static std::mutex mu;
  static std::unordered_map<const void*, std::pair<Key, bool>> cache;
  const void* impl = w.g_idx.unsafeGetTensorImpl();
  const Key key{impl, w.g_idx.data_ptr(), w.g_idx._version(), group_size};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(impl);
    if (it != cache.end() && it->second.first == key) return it->second.second;
  }
  const bool seq = gptq_is_sequential(w, group_size);
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() > 4096) cache.clear();
  cache[impl] = {key, seq};
  return seq;
}

}  // namespace

namespace {

// float_linear with fp32 activations and fp16/bf16 weights on the CPU (weights kept as stored).
at::Tensor half_weight_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const int64_t K = w.size(-1), N = w.size(0);
  EQAT_CHECK(w.dim() == 2 && x.size(-1) == K, "float_linear: x ", x.sizes(), " against weight ", w.sizes());
  const int64_t M = x.numel() / K;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  const bool grad = c10::GradMode::is_enabled() && (x.requires_grad() || (bias && bias->requires_grad()));
  if (!grad && M <= kHalfWeightRows) {
    const at::Tensor x2 = x.reshape({M, K}).contiguous();
    const at::Tensor wc = w.contiguous();
    at::Tensor y = at::empty({M, N}, x.options());
    const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
    const bool bf16 = w.scalar_type() == at::kBFloat16;
    const CpuIsa isa = cpu_half_gemv_isa();
    // Slices of 64 output rows; below 4 Mi weights (8 MiB) one thread streams the matrix before a second pays off.
    constexpr int64_t kSlice = 64;
    const int64_t slices = (N + kSlice - 1) / kSlice;
    at::parallel_for(0, slices, N * K >= (int64_t{1} << 22) ? 1 : slices, [&](int64_t s0, int64_t s1) {
      cpu_half_gemv(x2.data_ptr<float>(), M, K, wp, bf16, s0 * kSlice, std::min(N, s1 * kSlice), y.data_ptr<float>(),
                    N, isa);
    });
    if (bias) y.add_(*bias);
    return y.view(shape);
  }
  // More rows (prefill, or gradients): the weight converted to fp32, which is exact, and LibTorch's GEMM: the same
  // values and the same call as a float32 load, so the same result. A weight over kHalfWeightSliceBytes in fp32 (a
  // 32000-wide lm_head is 524 MiB at K = 4096) is converted and multiplied in row slices, so no fp32 copy of it
  // exists; MKL may then sum in another order (γ_K above).
  const int64_t rows = std::max<int64_t>(1, kHalfWeightSliceBytes / (K * 4));
  if (N <= rows) return at::linear(x, w.to(at::kFloat), bias);
  std::vector<at::Tensor> parts;
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    parts.push_back(at::linear(x, w.narrow(0, n0, n).to(at::kFloat),
                               bias ? c10::optional<at::Tensor>(bias->narrow(0, n0, n)) : c10::nullopt));
  }
  return at::cat(parts, -1);
}

}  // namespace

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  if (x.is_cpu() && x.scalar_type() == at::kFloat &&
      (w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16))
    return half_weight_linear(x, w, bias);
  const int64_t K = w.size(-1), N = w.size(0);
  // Below 4 Mi weights (16 MiB) one thread streams the matrix before a second one pays off.
  const bool split = x.is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 2 &&
                     w.is_contiguous() && x.size(-1) == K && N * K >= (int64_t{1} << 22) &&
                     at::get_num_threads() > 1 && !at::in_parallel_region() &&
                     !(c10::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad() ||
                                                       (bias && bias->requires_grad())));
  const int64_t M = split ? x.numel() / K : 0;
  if (!split || M < 1 || M > kFewRows) return at::linear(x, w, bias);
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  // Column slices of 256 outputs (1 MiB of fp32 weights at K = 1024, 4 MiB at 4096): whole slices per thread.
  constexpr int64_t kSlice = 256;
  at::parallel_for(0, (N + kSlice - 1) / kSlice, 1, [&](int64_t s0, int64_t s1) {
    const int64_t n0 = s0 * kSlice, n1 = std::min(N, s1 * kSlice);
    at::Tensor part = at::mm(x2, w.narrow(0, n0, n1 - n0).t());  // [M, n1 − n0]
    y.narrow(1, n0, n1 - n0).copy_(part);
  });
  if (bias) y.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

bool quant_cuda_compiled() {
#ifdef EQAT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifndef EQAT_WITH_CUDA
namespace {
[[noreturn]] void no_cuda() {
  EQAT_CHECK(false, "this eqat was built without the CUDA adapter (needs nvcc and a CUDA LibTorch); use --device cpu");
  std::abort();
}
}  // namespace
double cuda_graph_time_us(const std::function<void(int)>&, int, int) { no_cuda(); }
std::function<void()> cuda_graph_capture(const std::function<void()>&) { no_cuda(); }
double cuda_d2d_copy_gbps(int64_t) { no_cuda(); }
void cuda_reset_peak_memory() { no_cuda(); }
int64_t cuda_peak_memory_bytes() { no_cuda(); }
std::string cuda_device_name() { no_cuda(); }
#endif

bool gptq_is_sequential(const GptqTensors& w, int64_t group_size) {
  const int64_t K = w.g_idx.numel();
  at::Tensor expect = at::arange(K, w.g_idx.options().dtype(at::kLong)).div(group_size, "floor");
  return at::equal(w.g_idx.to(at::kLong), expect);
}

at::Tensor quant_linear_forward_reference(const at::Tensor& x, const GptqTensors& w, int bits, int64_t group_size,
                                          const at::Tensor& bias) {
  check_tensors(w, bits, group_size, x.size(-1), "quant_linear_forward_reference");
  at::Tensor W = dequantize_gptq(to_cpu(w), bits);  // [N, K] fp32
  at::Tensor y = at::matmul(x.cpu().to(at::kFloat), W.t());
  if (bias.defined()) y = y + bias.cpu().to(at::kFloat);
  return y.to(x.options());
}

at::Tensor quant_linear_forward(const at::Tensor& x, const GptqTensors& w, int bits, int64_t group_size,
                                const at::Tensor& bias) {
  EQAT_CHECK(x.dim() >= 1, "quant_linear_forward: x must have a feature dimension");
  check_tensors(w, bits, group_size, x.size(-1), "quant_linear_forward");
  EQAT_CHECK(x.device() == w.qweight.device(), "quant_linear_forward: x on ", x.device(), " but weight on ",
             w.qweight.device());
  if (!w.qweight.is_contiguous() || !w.qzeros.is_contiguous() || !w.scales.is_contiguous())  // the fast paths read
    return quant_linear_forward(x, {w.qweight.contiguous(), w.qzeros.contiguous(), w.scales.contiguous(), w.g_idx},
                                bits, group_size, bias.defined() ? bias.contiguous() : bias);  // raw rows
  const int64_t K = x.size(-1), N = w.qweight.size(1);
  EQAT_CHECK(!bias.defined() || bias.numel() == N, "quant_linear_forward: bias has ", bias.numel(),
             " entries, expected ", N);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor x2d = x.reshape({-1, K});
  const bool sequential = sequential_cached(w, group_size);
  if (x.is_cuda()) {
#ifdef EQAT_WITH_CUDA
    if (sequential && cuda::supports(w, bits, group_size))
      return cuda::linear(x2d, w, bits, group_size, bias).view(out_shape);
#endif
    // Fallback on the device: reference dequant (CPU), then a GEMM where x lives.
    at::Tensor W = dequantize_gptq(to_cpu(w), bits).to(x.options());
    at::Tensor y = at::matmul(x2d, W.t());
    if (bias.defined()) y = y + bias.to(y.options());
    return y.view(out_shape);
  }
  EQAT_CHECK(x.is_cpu(), "quant_linear_forward: unsupported device ", x.device());
  at::Tensor y;
  if (sequential && group_size % 32 == 0 && K % group_size == 0 && N % 8 == 0) {
    y = cpu_linear(x2d, w, bits, group_size);
  } else {
    y = at::matmul(x2d.to(at::kFloat), dequantize_gptq(w, bits).t());
  }
  if (bias.defined()) y = y + bias.to(at::kFloat);
  return y.to(x.scalar_type()).view(out_shape);
}


bool train_cache_applies(const GptqTensors& w, int64_t group_size) {
  const int64_t K = w.g_idx.size(0);
  return w.qweight.is_cpu() && group_size % 32 == 0 && K % group_size == 0 && gptq_is_sequential(w, group_size);
}

TrainWeightCache train_cache_build(const GptqTensors& w, int bits, int64_t group_size) {
  const int64_t K = w.g_idx.size(0), N = w.qweight.size(1);
  check_tensors(w, bits, group_size, K, "train_cache_build");
  at::Tensor qw = w.qweight.contiguous(), qz = w.qzeros.contiguous();
  TrainWeightCache c;
  c.qmz = at::empty({K, N}, at::kFloat);
  cpu_unpack_t(train_qweight(qw, qz, bits, group_size, K), 0, K, c.qmz.data_ptr<float>());
  c.wt = train_cache_scaled(c.qmz, w.scales, group_size);
  return c;
}

at::Tensor train_cache_scaled(const at::Tensor& qmz, const at::Tensor& scales, int64_t group_size) {
  c10::NoGradGuard g;
  const int64_t K = qmz.size(0), N = qmz.size(1);
  at::Tensor s = scales.detach().to(at::kFloat).contiguous();
  at::Tensor wt = at::empty({K, N}, at::kFloat);
  at::Tensor w3 = wt.view({K / group_size, group_size, N});
  at::mul_out(w3, qmz.view({K / group_size, group_size, N}), s.unsqueeze(1));
  return wt;
}

at::Tensor quant_linear_train_forward(const at::Tensor& x, const GptqTensors& w, int bits, int64_t group_size,
                                      const TrainWeightCache* cache) {
  EQAT_CHECK(x.dim() >= 1, "quant_linear_train_forward: x must have a feature dimension");
  check_tensors(w, bits, group_size, x.size(-1), "quant_linear_train_forward");
  if (!cpu_train_fast_path(x, w, group_size)) return quant_linear_forward_reference(x, w, bits, group_size, {});
  const int64_t K = x.size(-1), N = w.qweight.size(1);
  at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor y = at::zeros({x2.size(0), N}, at::kFloat);
  for_each_train_chunk(w, bits, group_size, K, cache,
                       [&](const TrainChunk& c) { y.addmm_(x2.narrow(1, c.k0, c.rows), c.weight_t()); });
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return y.to(x.scalar_type()).view(out_shape);
}

QuantLinearGrads quant_linear_backward_reference(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const GptqTensors& w, int bits, int64_t group_size,
                                                 bool need_input_grad, bool need_scale_grad) {
  check_tensors(w, bits, group_size, x.size(-1), "quant_linear_backward_reference");
  const GptqTensors wc = to_cpu(w);
  const int64_t K = x.size(-1), N = w.qweight.size(1), G = QuantSpec::num_groups(K, group_size);
  at::Tensor go = grad_out.cpu().to(at::kFloat).reshape({-1, N});
  at::Tensor x2 = x.cpu().to(at::kFloat).reshape({-1, K});
  QuantLinearGrads r;
  if (need_input_grad) {
    at::Tensor W = dequantize_gptq(wc, bits);  // [N, K]
    r.grad_input = at::matmul(go, W).view(x.sizes()).to(x.options());
  }
  if (need_scale_grad) {
    auto [q, z] = unpack_gptq(wc, bits);  // [N, K], [N, G]
    at::Tensor gi = wc.g_idx.to(at::kLong);
    at::Tensor qmz = q.to(at::kFloat) - z.index_select(1, gi).to(at::kFloat);  // [N, K]
    at::Tensor P = at::matmul(x2.t(), go);                                    // [K, N]
    at::Tensor prod = qmz.t() * P;                                            // [K, N]
    r.grad_scales = at::zeros({G, N}, at::kFloat).index_add_(0, gi, prod).to(w.scales.device());
  }
  return r;
}

QuantLinearGrads quant_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const GptqTensors& w,
                                       int bits, int64_t group_size, bool need_input_grad, bool need_scale_grad,
                                       const TrainWeightCache* cache) {
  check_tensors(w, bits, group_size, x.size(-1), "quant_linear_backward");
  EQAT_CHECK(grad_out.size(-1) == w.qweight.size(1), "quant_linear_backward: grad_out has ", grad_out.size(-1),
             " features, expected ", w.qweight.size(1));
#ifdef EQAT_WITH_CUDA
  if (x.is_cuda() && sequential_cached(w, group_size) && cuda::supports(w, bits, group_size)) {
    const int64_t K = x.size(-1), N = w.qweight.size(1);
    QuantLinearGrads r;
    cuda::backward(grad_out.reshape({-1, N}), x.reshape({-1, K}), w, bits, group_size,
                   need_input_grad ? &r.grad_input : nullptr, need_scale_grad ? &r.grad_scales : nullptr);
    if (r.grad_input.defined()) r.grad_input = r.grad_input.view(x.sizes());
    return r;
  }
#endif
  if (cpu_train_fast_path(x, w, group_size) && grad_out.is_cpu()) {
    const int64_t K = x.size(-1), N = w.qweight.size(1), G = QuantSpec::num_groups(K, group_size);
    at::Tensor go = grad_out.reshape({-1, N}).to(at::kFloat).contiguous();
    at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
    QuantLinearGrads r;
    if (need_input_grad) r.grad_input = at::empty({go.size(0), K}, at::kFloat);
    if (need_scale_grad) r.grad_scales = at::zeros({G, N}, at::kFloat);
    for_each_train_chunk(w, bits, group_size, K, cache, [&](const TrainChunk& c) {
      if (need_input_grad)  // grad_input[:, chunk] = grad_out · W[:, chunk] = grad_out · (Wᵀ rows)ᵀ
        r.grad_input.narrow(1, c.k0, c.rows).copy_(at::mm(go, c.weight_t().t()));
      if (need_scale_grad) {  // Σ over the chunk's rows of each group of (xᵀ·grad_out) ⊙ (q − z)
        at::Tensor p = c.work;
        at::mm_out(p, x2.narrow(1, c.k0, c.rows).t(), go);
        p.mul_(c.qmz);
        r.grad_scales.narrow(0, c.k0 / group_size, c.rows / c.per).add_(p.view({c.rows / c.per, c.per, N}).sum(1));
      }
    });
    if (r.grad_input.defined()) r.grad_input = r.grad_input.view(x.sizes()).to(x.scalar_type());
    return r;
  }
  QuantLinearGrads r =
      quant_linear_backward_reference(grad_out, x, w, bits, group_size, need_input_grad, need_scale_grad);
  if (r.grad_input.defined()) r.grad_input = r.grad_input.to(x.device());
  return r;
}

}  // namespace eqat
