// eqat bench decode: a LLaVA-1.5-7B-shaped decoder (Vicuna-7B = Llama-2-7B: 32 layers, d 4096, 32 heads × 128,
// SwiGLU 11008, vocab 32000) with random weights, batch 1: prefill of 576 image + 64 text tokens (random
// embeddings stand in for the projected image features), then greedy decode of 128 tokens. Formats: the float
// baseline (fp16 on CUDA, fp32 on CPU) and packed W4g128 / W3g128 / W2g64 through quant_linear_forward; q/k/v and
// gate/up are stored fused (12288×4096 and 22016×4096), as a serving engine (and eqat's own serving path,
// MergedPackedLinear) does; --unfused keeps them as five separate linears, to measure what the fusion buys. The
// lm_head and embeddings stay in the float dtype. Float linears (the baseline's, the lm_head) and attention go
// through the functions eqat's decoder uses: float_linear (qmatmul.h) and attention (llm/decode_attention.h).
//
// Static shapes so a decode step can be captured in a CUDA graph: a fixed KV cache of prompt + new tokens, the
// position and the current token live in device tensors, the step writes K/V with index_copy_ and attends over the
// whole cache with a mask built from the position (keys past it masked out).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <ctime>
#include <fstream>
#include <iostream>
#include <limits>
#include <vector>

#include "args.h"
#include "bench_args.h"
#include "data/error.h"
#include "llm/decode_attention.h"
#include "quant/pack.h"
#include "quant/qmatmul.h"

namespace eqat {

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

constexpr int64_t kDim = 4096, kHeads = 32, kHeadDim = 128, kInter = 11008, kVocab = 32000;

struct Lin {
  at::Tensor dense;  // [N, K] float baseline
  GptqTensors packed;
  int bits = 0;
  int64_t group = 0;
  at::Tensor operator()(const at::Tensor& x) const {
    return bits == 0 ? float_linear(x, dense) : quant_linear_forward(x, packed, bits, group, at::Tensor());
  }
  int64_t bytes() const {
    return bits == 0 ? dense.nbytes() : packed.qweight.nbytes() + packed.qzeros.nbytes() + packed.scales.nbytes();
  }
};

Lin make_lin(int64_t N, int64_t K, int bits, int64_t g, const at::TensorOptions& opt) {
  Lin l;
  l.bits = bits;
  l.group = g;
  if (bits == 0) {
    l.dense = (at::randn({N, K}, opt.dtype(at::kFloat)) / std::sqrt(static_cast<double>(K))).to(opt.dtype());
    return l;
  }
  // Random words are a valid packing of uniformly random integers and zero points (no pack_gptq pass over 10^8
  // values); scales so that (q − z)·s has about unit variance × 1/√K and outputs stay O(1) through the residual.
  const auto io = opt.dtype(at::kInt);
  constexpr int32_t lo = std::numeric_limits<int32_t>::min(), hi = std::numeric_limits<int32_t>::max();
  l.packed.qweight = at::randint(lo, hi, {K * bits / 32, N}, io);
  l.packed.qzeros = at::randint(lo, hi, {K / g, N * bits / 32}, io);
  l.packed.scales = ((at::rand({K / g, N}, opt.dtype(at::kFloat)) + 0.5) * (2.0 / (1 << bits)) /
                     std::sqrt(static_cast<double>(K)))
                        .to(at::kHalf);
  l.packed.g_idx = at::arange(K, opt.dtype(at::kLong)).div(g, "floor").to(at::kInt);
  return l;
}

struct Layer {
  at::Tensor ln1, ln2;  // [d]
  Lin qkv, o, gate_up, down;
  std::vector<Lin> split;  // --unfused: q, k, v, gate, up as separate linears (qkv and gate_up then unused)
};

struct Model {
  std::vector<Layer> layers;
  at::Tensor embed, norm, lm_head;  // [V, d], [d], [V, d]
  at::Tensor k_cache, v_cache;      // [L, H, T_max, D]
  at::Tensor cos, sin;              // [T_max, D/2]
  int64_t t_max = 0;
  int64_t weight_bytes = 0;  // decoder linears (all layers) + lm_head
};

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w) {
  at::Tensor xf = x.to(at::kFloat);
  return (xf * at::rsqrt(xf.pow(2).mean(-1, true) + 1e-5)).to(x.scalar_type()) * w;
}

// x [T, H, D] rotated by the angles of positions pos [T] (HF rotate_half convention).
at::Tensor rope(const at::Tensor& x, const Model& m, const at::Tensor& pos) {
  at::Tensor c = m.cos.index_select(0, pos).unsqueeze(1), s = m.sin.index_select(0, pos).unsqueeze(1);
  at::Tensor x1 = x.narrow(-1, 0, kHeadDim / 2), x2 = x.narrow(-1, kHeadDim / 2, kHeadDim / 2);
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

// h [T, d] at positions pos [T] (device, int64); mask [T, T_max] additive. Returns the new hidden state.
at::Tensor forward_layer(const Model& m, int64_t li, const at::Tensor& h, const at::Tensor& pos,
                         const at::Tensor& mask) {
  const Layer& L = m.layers[li];
  const int64_t T = h.size(0);
  const at::Tensor x = rms_norm(h, L.ln1);
  at::Tensor q, k, v;
  if (L.split.empty()) {
    const at::Tensor qkv = L.qkv(x);  // [T, 3d]
    q = qkv.narrow(1, 0, kDim), k = qkv.narrow(1, kDim, kDim), v = qkv.narrow(1, 2 * kDim, kDim);
  } else {
    q = L.split[0](x), k = L.split[1](x), v = L.split[2](x);
  }
  q = rope(q.view({T, kHeads, kHeadDim}), m, pos);
  k = rope(k.view({T, kHeads, kHeadDim}), m, pos);
  v = v.view({T, kHeads, kHeadDim});
  at::Tensor kc = m.k_cache[li], vc = m.v_cache[li];  // [H, T_max, D]
  kc.index_copy_(1, pos, k.transpose(0, 1));
  vc.index_copy_(1, pos, v.transpose(0, 1));
  at::Tensor att = attention(q.transpose(0, 1).unsqueeze(0), kc.unsqueeze(0), vc.unsqueeze(0), mask.to(q.scalar_type()),
                             1.0 / std::sqrt(static_cast<double>(kHeadDim)), false);  // [1, H, T, D] (eqat's decoder's)
  at::Tensor h2 = h + L.o(att.squeeze(0).transpose(0, 1).reshape({T, kDim}));
  const at::Tensor x2 = rms_norm(h2, L.ln2);
  if (!L.split.empty()) return h2 + L.down(at::silu(L.split[3](x2)) * L.split[4](x2));
  const at::Tensor gu = L.gate_up(x2);  // [T, 2·inter]
  return h2 + L.down(at::silu(gu.narrow(1, 0, kInter)) * gu.narrow(1, kInter, kInter));
}

at::Tensor causal_mask(const at::Tensor& pos, int64_t t_max) {
  at::Tensor keys = at::arange(t_max, pos.options());
  at::Tensor allowed = keys.unsqueeze(0) <= pos.unsqueeze(1);  // [T, T_max]
  return at::zeros(allowed.sizes(), pos.options().dtype(at::kFloat))
      .masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
}

Model build(int64_t n_layers, int bits, int64_t g, int64_t t_max, const at::TensorOptions& opt, bool unfused) {
  Model m;
  m.t_max = t_max;
  for (int64_t i = 0; i < n_layers; ++i) {
    Layer L;
    L.ln1 = at::ones({kDim}, opt);
    L.ln2 = at::ones({kDim}, opt);
    if (unfused) {
      for (int64_t n : {kDim, kDim, kDim, kInter, kInter}) L.split.push_back(make_lin(n, kDim, bits, g, opt));
      for (const Lin& l : L.split) m.weight_bytes += l.bytes();
    } else {
      L.qkv = make_lin(3 * kDim, kDim, bits, g, opt);
      L.gate_up = make_lin(2 * kInter, kDim, bits, g, opt);
      m.weight_bytes += L.qkv.bytes() + L.gate_up.bytes();
    }
    L.o = make_lin(kDim, kDim, bits, g, opt);
    L.down = make_lin(kDim, kInter, bits, g, opt);
    m.weight_bytes += L.o.bytes() + L.down.bytes();
    m.layers.push_back(std::move(L));
  }
  m.embed = at::randn({kVocab, kDim}, opt.dtype(at::kFloat)).mul_(0.02).to(opt.dtype());
  m.norm = at::ones({kDim}, opt);
  m.lm_head = (at::randn({kVocab, kDim}, opt.dtype(at::kFloat)) / std::sqrt(static_cast<double>(kDim))).to(opt.dtype());
  m.weight_bytes += m.lm_head.nbytes();
  m.k_cache = at::zeros({n_layers, kHeads, t_max, kHeadDim}, opt);
  m.v_cache = at::zeros_like(m.k_cache);
  at::Tensor inv = at::pow(10000.0, -at::arange(0, kHeadDim, 2, at::kDouble) / kHeadDim);
  at::Tensor ang = at::outer(at::arange(t_max, at::kDouble), inv);
  m.cos = ang.cos().to(opt);
  m.sin = ang.sin().to(opt);
  return m;
}

}  // namespace

std::string now_utc();  // cmd_bench.cpp

int bench_decode(const ParsedArgs& a) {
  const bool cuda = a.str("device") == "cuda";
  EQAT_CHECK(cuda || a.str("device") == "cpu", "--device: expected cpu or cuda, got '", a.str("device"), "'");
  EQAT_CHECK(!cuda || quant_cuda_compiled(), "--device cuda: this eqat was built without the CUDA adapter");
  const int64_t n_layers = a.i64("layers", 1, 32);
  // The static KV cache holds prompt + new tokens: up to LLaVA-1.5-7B's context of 4096 positions.
  const int64_t prompt = a.i64("prompt", 1, 4096), new_tokens = a.i64("new-tokens", 1, 4095);
  EQAT_CHECK(new_tokens >= 1 && new_tokens <= 4096 - prompt, "--new-tokens must be in [1, ", 4096 - prompt,
             "] (prompt + new tokens <= the 4096-position context), got ", new_tokens);
  const bool use_graph = cuda && !a.flag("no-graph");
  const bool unfused = a.flag("unfused");
  const at::TensorOptions opt = at::TensorOptions().dtype(cuda ? at::kHalf : at::kFloat)
                                    .device(cuda ? at::Device(at::kCUDA) : at::Device(at::kCPU));
  const int64_t t_max = prompt + new_tokens;
  const bool text = !a.flag("json");

  // Format list: the float baseline, then --formats.
  std::vector<std::tuple<std::string, int, int64_t>> formats{{cuda ? "fp16" : "fp32", 0, 0}};
  {
    std::stringstream ss(a.str("formats"));
    std::string item;
    while (std::getline(ss, item, ',')) {
      const BenchFormat f = bench_format("--formats", item);
      // Every linear of the 7B shape has K in {4096, 11008}: the group must divide both.
      EQAT_CHECK(4096 % f.group == 0 && 11008 % f.group == 0, "--formats: group ", f.group, " in '", item,
                 "' must divide 4096 and 11008 (32, 64 or 128)");
      formats.emplace_back(f.name, f.bits, f.group);
    }
  }
  json out;
  out["benchmark"] = "decode";
  out["date"] = now_utc();
  if (cuda) {
    out["device"] = cuda_device_name();
  } else {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("model name", 0) == 0) {
        out["device"] = line.substr(line.find(':') + 2);
        break;
      }
    out["threads"] = at::get_num_threads();
  }
  out["device_kind"] = cuda ? "cuda" : "cpu";
  out["model"] = "LLaVA-1.5-7B-shaped decoder, random weights, batch 1";
  out["layers_measured"] = n_layers;
  out["prompt_tokens"] = prompt;
  out["new_tokens"] = new_tokens;
  out["cuda_graph"] = use_graph;
  out["fused_qkv_gate_up"] = !unfused;
  // The roofline's yardstick: copy bandwidth (read + write bytes / time) of a buffer far larger than the caches,
  // measured in this run with the threads the decode uses (CPU: ATen's parallel copy_, best of 5). On the CPU it is
  // measured again after each format's decode and the best of all samples is the yardstick: a shared VM's bandwidth
  // drifts within a run, and one early sample taken at a slow moment put the fp32 GEMV above 100 % of it.
  double copy_gbps = 0;
  json copy_samples = json::array();
  auto measure_copy = [&] {
    at::Tensor src = at::rand({64, 1 << 20}), dst = at::empty_like(src);  // 256 MiB each
    dst.copy_(src);
    double best = 1e30;
    for (int i = 0; i < 5; ++i) {
      const auto tc = Clock::now();
      dst.copy_(src);
      best = std::min(best, std::chrono::duration<double>(Clock::now() - tc).count());
    }
    const double gbps = 2.0 * static_cast<double>(src.nbytes()) / best * 1e-9;
    copy_samples.push_back(gbps);
    copy_gbps = std::max(copy_gbps, gbps);
  };
  if (cuda) {
    copy_gbps = cuda_d2d_copy_gbps(1LL << 30);
  } else {
    measure_copy();
  }
  auto sync = [&] {
    if (cuda) (void)at::zeros({1}, opt).cpu();  // a device→host copy waits for the stream
  };
  json rows = json::array();
  for (const auto& [name, bits, g] : formats) {
    at::manual_seed(1);
    if (cuda) cuda_reset_peak_memory();
    Model m = build(n_layers, bits, g, t_max, opt, unfused);
    sync();
    // Prefill: random "image + text" embeddings [prompt, d].
    at::Tensor h0 = at::randn({prompt, kDim}, opt.dtype(at::kFloat)).to(opt.dtype());
    at::Tensor pos_p = at::arange(prompt, opt.dtype(at::kLong));
    at::Tensor mask_p = causal_mask(pos_p, t_max);
    // Timings split into the decoder layers and the head (final norm + lm_head + argmax), so a CPU run with fewer
    // layers can be scaled honestly: t(32 layers) = t_layers·32/L + t_head.
    double head_ms_acc = 0;
    auto timed_head = [&](const at::Tensor& h_last) {
      const auto th = Clock::now();
      at::Tensor t = float_linear(rms_norm(h_last, m.norm), m.lm_head).argmax(-1);  // [1]
      if (!cuda) head_ms_acc += std::chrono::duration<double, std::milli>(Clock::now() - th).count();
      return t;
    };
    auto prefill = [&] {
      at::Tensor h = h0;
      for (int64_t l = 0; l < n_layers; ++l) h = forward_layer(m, l, h, pos_p, mask_p);
      return timed_head(h.narrow(0, prompt - 1, 1));
    };
    (void)prefill();  // warm-up (cuBLAS handles, allocator)
    sync();
    head_ms_acc = 0;
    auto t0 = Clock::now();
    at::Tensor next = prefill();
    sync();
    const double prefill_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    const double prefill_head_ms = head_ms_acc;

    // Decode: static-shape step reading token and position from device tensors.
    at::Tensor tok = next.clone();                               // [1] int64
    at::Tensor pos = at::full({1}, prompt, opt.dtype(at::kLong));  // [1]
    auto step = [&] {
      at::Tensor h = m.embed.index_select(0, tok);  // [1, d]
      at::Tensor mask = causal_mask(pos, t_max);
      for (int64_t l = 0; l < n_layers; ++l) h = forward_layer(m, l, h, pos, mask);
      tok.copy_(timed_head(h));
      pos.add_(1);
    };
    std::function<void()> run_step = step;
    if (use_graph) {
      run_step = cuda_graph_capture(step);  // runs the step twice (warm-up + capture): positions prompt, prompt+1
      pos.fill_(prompt);
    }
    run_step();  // warm
    pos.fill_(prompt);
    sync();
    head_ms_acc = 0;
    t0 = Clock::now();
    for (int64_t i = 0; i < new_tokens; ++i) run_step();
    sync();
    const double decode_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const double tok_s = static_cast<double>(new_tokens) / decode_s;
    const double head_ms_tok = head_ms_acc / static_cast<double>(new_tokens);
    // Bytes per decoded token: every weight once + the KV cache read (whole static cache: 2·L·H·T_max·D).
    const double kv_bytes = 2.0 * n_layers * kHeads * t_max * kHeadDim * at::elementSize(opt.dtype().toScalarType());
    const double bytes_tok = static_cast<double>(m.weight_bytes) + kv_bytes;
    json r{{"format", name},
           {"prefill_ms", prefill_ms},
           {"decode_tok_s", tok_s},
           {"decode_ms_per_token", 1e3 / tok_s},
           {"bytes_per_token", bytes_tok},
           {"achieved_gbps", bytes_tok * tok_s * 1e-9}};
    if (cuda) r["peak_memory_gb"] = static_cast<double>(cuda_peak_memory_bytes()) / (1 << 30);
    if (n_layers < 32 && !cuda) {
      // Honest scaling from the measured layers: per-layer time × 32, plus the head once (measured separately).
      // The 32-layer model's bytes: its decoder weights and KV cache scale with the layers, the head does not. With
      // few layers the head (fp32 on the CPU) is a large share of the bytes, so the measured percentage flatters.
      const double scaled_prefill_ms = (prefill_ms - prefill_head_ms) * 32.0 / n_layers + prefill_head_ms;
      const double layer_ms_tok = 1e3 / tok_s - head_ms_tok;
      const double head_bytes = static_cast<double>(m.lm_head.nbytes());
      r["head_ms_per_token"] = head_ms_tok;
      r["scaled_to_32_layers"] = {
          {"prefill_ms", scaled_prefill_ms},
          {"decode_tok_s", 1e3 / (layer_ms_tok * 32.0 / n_layers + head_ms_tok)},
          {"bytes_per_token", (static_cast<double>(m.weight_bytes) - head_bytes + kv_bytes) * 32.0 / n_layers + head_bytes}};
    }
    rows.push_back(r);
    if (!cuda) measure_copy();
  }
  // Roofline: every weight byte (and the KV cache) read once per token at the run's copy bandwidth.
  for (json& r : rows) {
    r["pct_of_copy_bw"] = 100.0 * r["achieved_gbps"].get<double>() / copy_gbps;
    r["roofline_tok_s"] = copy_gbps * 1e9 / r["bytes_per_token"].get<double>();
    if (r.contains("scaled_to_32_layers")) {
      json& sc = r["scaled_to_32_layers"];
      const double b32 = sc["bytes_per_token"].get<double>();
      sc["roofline_tok_s"] = copy_gbps * 1e9 / b32;
      sc["pct_of_copy_bw"] = 100.0 * b32 * sc["decode_tok_s"].get<double>() * 1e-9 / copy_gbps;
    }
    if (text) {
      std::cout << r["format"].get<std::string>() << ": prefill " << prompt << " tok " << r["prefill_ms"].get<double>()
                << " ms, decode " << r["decode_tok_s"].get<double>() << " tok/s (" << r["achieved_gbps"].get<double>()
                << " GB/s, " << r["pct_of_copy_bw"].get<double>() << "% of the " << copy_gbps << " GB/s copy bw";
      if (cuda) std::cout << ", peak " << r["peak_memory_gb"].get<double>() << " GB";
      std::cout << ")";
      if (r.contains("scaled_to_32_layers"))
        std::cout << "  [" << n_layers << " layers; scaled to 32: prefill "
                  << r["scaled_to_32_layers"]["prefill_ms"].get<double>() << " ms, decode "
                  << r["scaled_to_32_layers"]["decode_tok_s"].get<double>() << " tok/s, "
                  << r["scaled_to_32_layers"]["pct_of_copy_bw"].get<double>() << "% of the copy bw]";
      std::cout << std::endl;
    }
  }
  if (cuda) {
    out["d2d_copy_gbps"] = copy_gbps;
  } else {
    out["copy_gbps"] = copy_gbps;
    out["copy_gbps_samples"] = copy_samples;
  }
  out["results"] = rows;
  if (!text) std::cout << out.dump(2) << std::endl;
  return 0;
}

}  // namespace eqat
