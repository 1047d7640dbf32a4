// eqat bench kernels | decode | quant (bench_quant.cpp): speed of the packed linear (quant/qmatmul.h) against the float baseline measured in
// the same run, and of a LLaVA-1.5-7B-shaped decoder with random weights. Results to stdout (text or --json).
//
// Protocol (KERNELS.md §2.7): weights rotate through enough distinct copies (≥ 128 MB on the CPU = 4× its L3,
// ≥ 256 MB on CUDA > the 50 MB L2) that every call streams its matrix from DRAM/HBM; CUDA times are device times of
// CUDA-graph replays (host launch overhead excluded); CPU times are medians of wall-clock calls. GB/s counts the
// bytes a call must move: packed weight + zeros + scales (or the float weight) + x + y.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <ctime>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "args.h"
#include "bench_args.h"
#include "commands.h"
#include "data/error.h"
#include "quant/cpu_qgemv.h"
#include "quant/pack.h"
#include "quant/qmatmul.h"

namespace eqat {

int cmd_bench(const Argv& argv);

// ISO-8601 UTC time stamp for benchmark JSON (also used by bench_decode.cpp and bench_quant.cpp).
std::string now_utc() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}
int64_t bench_int(const std::string& flag, const std::string& item, int64_t lo, int64_t hi) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(item.c_str(), &end, 10);
  EQAT_CHECK(!item.empty() && end && *end == '\0' && errno == 0, flag, ": expected an integer, got '", item, "'");
  EQAT_CHECK(v >= lo && v <= hi, flag, ": ", v, " is out of range [", lo, ", ", hi, "]");
  return v;
}

std::vector<int64_t> bench_int_list(const std::string& flag, const std::string& list, int64_t lo, int64_t hi) {
  std::vector<int64_t> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(bench_int(flag, item, lo, hi));
  EQAT_CHECK(!out.empty(), flag, ": empty list");
  return out;
}

BenchFormat bench_format(const std::string& flag, const std::string& item) {
  const size_t g = item.find('g');
  EQAT_CHECK(item.size() >= 4 && item[0] == 'W' && g != std::string::npos, flag,
             ": expected entries like W4g128, got '", item, "'");
  BenchFormat f;
  f.name = item;
  f.bits = static_cast<int>(bench_int(flag, item.substr(1, g - 1), 2, 4));
  f.group = bench_int(flag, item.substr(g + 1), 32, kMaxBenchDim);
  EQAT_CHECK(f.group % 32 == 0, flag, ": group must be a multiple of 32 in '", item, "'");
  return f;
}

namespace {
const bool kRegistered = register_command("bench", cmd_bench, "benchmark the quantized kernels, a 7B decoder and the QAT phases");

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

std::vector<BenchFormat> parse_formats(const std::string& list, bool cuda) {
  std::vector<BenchFormat> out{{cuda ? "fp16" : "fp32", 0, 0}};
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(bench_format("--formats", item));
  return out;
}

std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

// A random packed weight [N, K] made directly on `dev`: random words are a valid packing of uniformly random
// integers (and zero points), so no pack_gptq pass over 10^8 values is needed. Scales ~ 1/(2^b·√K) keep outputs O(1).
GptqTensors random_packed(int64_t N, int64_t K, int bits, int64_t g, const at::Device& dev) {
  const auto io = at::TensorOptions().dtype(at::kInt).device(dev);
  GptqTensors w;
  w.qweight = at::randint(std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(), {K * bits / 32, N}, io);
  w.qzeros = at::randint(std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(), {K / g, N * bits / 32}, io);
  w.scales = ((at::rand({K / g, N}, io.dtype(at::kFloat)) + 0.5) / ((1 << bits) * std::sqrt(static_cast<double>(K))))
                 .to(at::kHalf);
  w.g_idx = at::arange(K, io.dtype(at::kLong)).div(g, "floor").to(at::kInt);
  return w;
}

GptqTensors clone(const GptqTensors& w) { return {w.qweight.clone(), w.qzeros.clone(), w.scales.clone(), w.g_idx}; }

int64_t packed_bytes(const GptqTensors& w) {
  return w.qweight.nbytes() + w.qzeros.nbytes() + w.scales.nbytes();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// CPU: median µs per call of fn(i), i cycling over the weight copies, ≥ 3 calls and ≥ 0.3 s after one warm-up.
double time_cpu_us(const std::function<void(int)>& fn, int copies) {
  fn(0);
  std::vector<double> t;
  const auto begin = Clock::now();
  for (int i = 1;; ++i) {
    const auto t0 = Clock::now();
    fn(i % copies);
    t.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    if (t.size() >= 3 && std::chrono::duration<double>(Clock::now() - begin).count() > 0.3) break;
    if (t.size() >= 200) break;
  }
  return median(t);
}

// ---------------------------------------------------------------------------------------------------------------
int bench_kernels(const ParsedArgs& a) {
  const bool cuda = a.str("device") == "cuda";
  EQAT_CHECK(cuda || a.str("device") == "cpu", "--device: expected cpu or cuda, got '", a.str("device"), "'");
  EQAT_CHECK(!cuda || quant_cuda_compiled(), "--device cuda: this eqat was built without the CUDA adapter");
  const at::Device dev = cuda ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  const auto fdt = cuda ? at::kHalf : at::kFloat;
  std::vector<BenchFormat> formats = parse_formats(a.str("formats"), cuda);
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (N out, K in)
  {
    std::stringstream ss(a.str("shapes"));
    std::string item;
    while (std::getline(ss, item, ',')) {
      const auto x = item.find('x');
      EQAT_CHECK(x != std::string::npos, "--shapes: expected NxK entries, got '", item, "'");
      const int64_t N = bench_int("--shapes", item.substr(0, x), 1, kMaxBenchDim);
      const int64_t K = bench_int("--shapes", item.substr(x + 1), 1, kMaxBenchDim);
      // Packed weights hold whole 32-bit words of codes along K and along N (qzeros), one group per g rows.
      for (const BenchFormat& f : formats)
        EQAT_CHECK(f.bits == 0 || (K % f.group == 0 && N % 32 == 0), "--shapes: ", item, " does not fit ", f.name,
                   " (K must be a multiple of the group size ", f.group, ", N a multiple of 32)");
      shapes.emplace_back(N, K);
    }
    EQAT_CHECK(!shapes.empty(), "--shapes: no shapes given");
  }
  // Activation rows: a decode GEMV (1) up to a prefill of 4096 tokens.
  const std::vector<int64_t> ms = bench_int_list("--m", a.str("m"), 1, 4096);
  std::vector<int> threads;
  if (!cuda) {
    for (int64_t t : bench_int_list("--threads", a.str("threads"), 1, 1024)) threads.push_back(static_cast<int>(t));
  } else {
    threads.push_back(0);
  }
  // Up to 64 GiB of rotated weights (the CPU protocol wants 4x L3; GPU L2 is tens of MB).
  const int64_t rotate_mb = a.i64("rotate-mb", 0, 65536);
  const int64_t rotate = rotate_mb > 0 ? rotate_mb << 20 : (cuda ? 256LL << 20 : 128LL << 20);

  json out;
  out["benchmark"] = "kernels";
  out["date"] = now_utc();
  out["device"] = cuda ? cuda_device_name() : cpu_name();
  out["device_kind"] = cuda ? "cuda" : "cpu";
  if (!cuda) out["cpu_isa"] = cpu_isa_name(cpu_qgemm_isa());
  out["rotation_bytes"] = rotate;
  double copy_gbps = 0;
  if (cuda) {
    copy_gbps = cuda_d2d_copy_gbps(1LL << 30);
    out["d2d_copy_gbps"] = copy_gbps;
  }
  out["baseline"] = cuda ? "at::linear fp16 (cuBLAS)" : "at::linear fp32 (LibTorch CPU BLAS)";
  json rows = json::array();
  const bool text = !a.flag("json");
  if (text)
    std::cout << "device: " << out["device"].get<std::string>() << (cuda ? "" : std::string(" (") +
                                                                               cpu_isa_name(cpu_qgemm_isa()) + ")")
              << "\n";
  for (auto [N, K] : shapes) {
    for (const BenchFormat& f : formats) {
      // Build the rotation set for this (shape, format).
      at::manual_seed(N * 7 + K + f.bits);
      std::vector<GptqTensors> packed;
      std::vector<at::Tensor> dense;
      int64_t wbytes = 0;
      if (f.bits == 0) {
        at::Tensor W = (at::randn({N, K}) / std::sqrt(static_cast<double>(K))).to(dev).to(fdt);
        wbytes = W.nbytes();
        dense.push_back(W);
        const int64_t copies = std::clamp<int64_t>((rotate + wbytes - 1) / wbytes, 1, 64);
        for (int64_t c = 1; c < copies; ++c) dense.push_back(W.clone());
      } else {
        GptqTensors w = random_packed(N, K, f.bits, f.group, dev);
        wbytes = packed_bytes(w);
        packed.push_back(w);
        const int64_t copies = std::clamp<int64_t>((rotate + wbytes - 1) / wbytes, 1, 64);
        for (int64_t c = 1; c < copies; ++c) packed.push_back(clone(w));
      }
      const int copies = static_cast<int>(f.bits == 0 ? dense.size() : packed.size());
      for (int64_t M : ms) {
        at::Tensor x = at::randn({M, K}).to(dev).to(fdt);
        for (int th : threads) {
          if (th > 0) at::set_num_threads(th);
          auto step = [&](int i) {
            if (f.bits == 0) {
              (void)at::linear(x, dense[i % copies]);
            } else {
              (void)quant_linear_forward(x, packed[i % copies], f.bits, f.group, at::Tensor());
            }
          };
          const double us = cuda ? cuda_graph_time_us(step, std::max(copies, 8), 5) : time_cpu_us(step, copies);
          const double bytes = static_cast<double>(wbytes) + static_cast<double>((M * K + M * N) * x.element_size());
          json r{{"shape", std::to_string(N) + "x" + std::to_string(K)},
                 {"N", N},
                 {"K", K},
                 {"M", M},
                 {"format", f.name},
                 {"us", us},
                 {"gbps", bytes / us * 1e-3},
                 {"weight_bytes", wbytes},
                 {"copies", copies}};
          if (!cuda) r["threads"] = th;
          if (cuda) r["pct_of_copy_bw"] = 100.0 * bytes / us * 1e-3 / copy_gbps;
          rows.push_back(r);
        }
      }
    }
  }
  // Speedups against the float baseline of the same shape, M and thread count.
  for (auto& r : rows) {
    for (const auto& b : rows)
      if (b["format"] == formats[0].name && b["shape"] == r["shape"] && b["M"] == r["M"] &&
          b.value("threads", 0) == r.value("threads", 0))
        r["speedup_vs_baseline"] = b["us"].get<double>() / r["us"].get<double>();
  }
  out["results"] = rows;
  if (!text) {
    std::cout << out.dump(2) << std::endl;
    return 0;
  }
  std::cout << std::left << std::setw(12) << "shape NxK" << std::setw(6) << "M" << std::setw(9) << "format"
            << (cuda ? "" : "thr  ") << std::right << std::setw(11) << "us" << std::setw(9) << "GB/s"
            << (cuda ? "   %copy" : "") << std::setw(10) << "speedup" << "\n";
  for (const auto& r : rows) {
    std::cout << std::left << std::setw(12) << r["shape"].get<std::string>() << std::setw(6) << r["M"].get<int64_t>()
              << std::setw(9) << r["format"].get<std::string>();
    if (!cuda) std::cout << std::setw(5) << r["threads"].get<int>();
    std::cout << std::right << std::fixed << std::setprecision(1) << std::setw(11) << r["us"].get<double>()
              << std::setw(9) << r["gbps"].get<double>();
    if (cuda) std::cout << std::setw(8) << r["pct_of_copy_bw"].get<double>();
    std::cout << std::setw(9) << std::setprecision(2) << r["speedup_vs_baseline"].get<double>() << "x\n";
  }
  return 0;
}

}  // namespace

int bench_decode(const ParsedArgs& a);  // bench_decode.cpp
int bench_quant(const ParsedArgs& a);   // bench_quant.cpp
int bench_serve(const ParsedArgs& a);   // bench_serve.cpp

int cmd_bench(const Argv& argv) {
  CommandSpec spec{
      "bench",
      "eqat bench kernels|decode|quant|serve [--device cpu|cuda] [--json] [options]",
      "Benchmarks the packed linear against the float baseline (kernels) or a LLaVA-1.5-7B-shaped decoder with "
      "random weights (decode: prefill 576 image + 64 text tokens, then greedy decode), or the EfficientQAT phases on one "
      "Llama-2-7B-shaped block (quant: Block-AP ms/iteration, E2E-QP ms/step, peak memory), or eqat serve under "
      "1, 4, 16 concurrent clients (serve: throughput, latency and time-to-first-token percentiles, rows per step).",
      {{"device", "DEV", "cpu or cuda", "cpu"},
       {"json", "", "print JSON (with device name and date) instead of a table", ""},
       {"formats", "LIST", "quantized formats besides the float baseline", "W4g128,W3g128,W2g64"},
       {"shapes", "LIST", "kernels: NxK (out x in) shapes",
        "4096x4096,11008x4096,4096x11008,12288x4096,22016x4096"},
       {"m", "LIST", "kernels: activation rows", "1,4,16"},
       {"threads", "LIST", "kernels, CPU: thread counts to measure", "1,2"},
       {"rotate-mb", "MB", "kernels: total size of the rotated weight copies (0 = 128 on CPU, 256 on CUDA)", "0"},
       {"layers", "N", "decode: decoder layers (32 = LLaVA-1.5-7B; fewer on the CPU, results also scaled to 32)",
        "32"},
       {"prompt", "T", "decode: prompt tokens (576 image + 64 text)", "640"},
       {"new-tokens", "T", "decode: tokens to generate", "128"},
       {"no-graph", "", "decode, CUDA: do not capture the decode step in a CUDA graph", ""},
       {"unfused", "", "decode: q/k/v and gate/up as separate linears instead of merged ones", ""},
       {"bits", "B", "quant: weight bits", "2"},
       {"group-size", "G", "quant: group size", "64"},
       {"batch", "N", "quant: samples per iteration (0 = 2 on CUDA, 1 on CPU)", "0"},
       {"seq-len", "L", "quant: tokens per sample (0 = 2048 on CUDA, 256 on CPU)", "0"},
       {"iters", "N", "quant: Block-AP iterations and E2E-QP steps to time", "4"},
       {"model", "DIR", "serve: the model (default: the embedded default model)", ""},
       {"clients", "LIST", "serve: concurrent clients per level", "1,4,16"},
       {"requests", "N", "serve: requests each client sends, one after the other", "4"},
       {"max-tokens", "N", "serve: tokens each request generates (its end-of-sequence ignored)", "64"}},
      1,
      1};
  ParsedArgs a = parse_args(spec, argv);
  const std::string what = a.positional()[0];
  if (what == "kernels") return bench_kernels(a);
  if (what == "decode") return bench_decode(a);
  if (what == "quant") return bench_quant(a);
  if (what == "serve") return bench_serve(a);
  EQAT_CHECK(false, "bench: expected 'kernels', 'decode', 'quant' or 'serve', got '", what, "'");
  return 2;
}

}  // namespace eqat
