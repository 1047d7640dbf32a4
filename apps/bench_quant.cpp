// eqat bench quant: cost of the two EfficientQAT phases on one Llama-2-7B-shaped decoder block (d 4096, 32 heads ×
// 128, SwiGLU 11008; vocab 32000 for the E2E-QP loss) with random weights and random tokens, through the same code
// `eqat quantize` runs (run_block_quantization, run_e2e_qp):
//   Block-AP   ms per training iteration (forward + backward + AdamW on W, s, z and the norms of one block, batch ×
//              seq_len tokens), and peak memory of the phase;
//   E2E-QP     ms per optimizer step (one micro-batch = the global batch) through embedding → block → lm_head,
//              step sizes only, and peak memory.
// Defaults: batch 2 × 2048 tokens on CUDA (the paper's Block-AP setting), 1 × 256 on the CPU. The paper's figure to
// compare with (EFFICIENTQAT.md): Llama-2-7B Block-AP 3.3 h and 8.5 GB on one A100-80GB, i.e. 32 blocks × 4096
// samples × 2 epochs / batch 2 = 131072 iterations → ~91 ms per iteration. `projected_7b_block_ap_hours` scales the
// measured ms/iteration to that schedule (only meaningful at the paper's batch and length).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <nlohmann/json.hpp>

#include <iostream>

#include "args.h"
#include "bench_args.h"
#include "data/error.h"
#include "quant/qat/block_ap.h"
#include "quant/qat/e2e_qp.h"
#include "quant/qat/progress.h"
#include "quant/qmatmul.h"

namespace eqat {

std::string now_utc();  // cmd_bench.cpp

int bench_quant(const ParsedArgs& a) {
  using json = nlohmann::json;
  const bool cuda = a.str("device") == "cuda";
  EQAT_CHECK(cuda || a.str("device") == "cpu", "--device: expected cpu or cuda, got '", a.str("device"), "'");
  EQAT_CHECK(!cuda || quant_cuda_compiled(), "--device cuda: this eqat was built without the CUDA adapter");
  // 0 picks the device's default; the bounds keep the random token set ((iters + 1) x batch x seq-len) and the
  // activations within reach: seq-len up to the block's 4096-position context, batch up to 64, 10^4 iterations.
  const int64_t batch_flag = bench_int("--batch", a.str("batch"), 0, 64);
  const int64_t len_flag = bench_int("--seq-len", a.str("seq-len"), 0, 4096);
  const int64_t batch = batch_flag > 0 ? batch_flag : (cuda ? 2 : 1);
  const int64_t L = len_flag > 0 ? len_flag : (cuda ? 2048 : 256);
  EQAT_CHECK(L >= 2, "--seq-len must be at least 2 (a token and the next one it predicts), got ", L);
  const int64_t iters = bench_int("--iters", a.str("iters"), 1, 10000);
  QuantSpec spec;
  spec.bits = static_cast<int>(bench_int("--bits", a.str("bits"), 2, 8));
  spec.group_size = bench_int("--group-size", a.str("group-size"), 1, 4096);
  EQAT_CHECK(packable_bits(spec.bits), "--bits must be 2, 3, 4 or 8, got ", spec.bits);
  EQAT_CHECK(spec.group_size > 0 && 4096 % spec.group_size == 0 && 11008 % spec.group_size == 0,
             "--group-size must divide 4096 and 11008 (32, 64 or 128), got ",
             spec.group_size);

  Model m;
  m.cfg.arch = Arch::kLlama;
  LlamaConfig& t = m.cfg.text;
  t.vocab_size = 32000, t.hidden_size = 4096, t.intermediate_size = 11008, t.num_hidden_layers = 1;
  t.num_attention_heads = 32, t.num_key_value_heads = 32, t.head_dim = 128, t.max_position_embeddings = 4096;
  t.torch_dtype = cuda ? "float16" : "float32";
  m.dtype = cuda ? at::kHalf : at::kFloat;
  m.device = cuda ? c10::Device(at::kCUDA) : c10::Device(at::kCPU);
  m.lm = LlamaForCausalLM(t);
  {
    c10::NoGradGuard ng;
    at::manual_seed(0);
    for (auto& p : m.lm->parameters(true)) {
      if (p.dim() >= 2) p.normal_(0.0, 0.02);
      else p.fill_(1.0);  // norm weights
    }
  }
  m.lm->to(m.device, m.dtype);
  for (auto& p : m.lm->parameters(true)) p.set_requires_grad(false);

  CalibSet data;
  data.source = "random tokens";
  at::Tensor ids = at::randint(3, t.vocab_size, {(iters + 1) * batch, L}, at::kLong);
  auto sample = [&](int64_t i) {
    CalibSample s;
    s.ids.assign(ids[i].data_ptr<int64_t>(), ids[i].data_ptr<int64_t>() + L);
    s.is_answer.assign(static_cast<size_t>(L), 1);
    return s;
  };
  for (int64_t i = 0; i < iters * batch; ++i) data.train.push_back(sample(i));
  for (int64_t i = iters * batch; i < (iters + 1) * batch; ++i) data.val.push_back(sample(i));

  auto peak_mib = [&] {
    return cuda ? static_cast<double>(cuda_peak_memory_bytes()) / (1 << 20) : peak_rss_mib();
  };
  json out;
  out["benchmark"] = "quant";
  out["date"] = now_utc();
  out["device"] = cuda ? cuda_device_name() : "cpu";
  out["threads"] = at::get_num_threads();
  out["shape"] = "Llama-2-7B block: d 4096, 32 heads x 128, ff 11008, vocab 32000";
  out["format"] = "W" + std::to_string(spec.bits) + "g" + std::to_string(spec.group_size);
  out["batch"] = batch;
  out["seq_len"] = L;
  out["iterations"] = iters;
  out["model_dtype"] = cuda ? "float16" : "float32";
  out["peak_memory_kind"] = cuda ? "CUDA caching allocator, peak allocated" : "process peak RSS";

  if (cuda) cuda_reset_peak_memory();
  BlockApOptions bo;
  bo.method = "efficientqat";
  bo.spec = spec;
  bo.epochs = 1;
  bo.batch_size = batch;
  bo.progress = !a.flag("json");
  BlockApResult br = run_block_quantization(m, data, bo);
  const double block_peak = peak_mib();
  const bool paper_shape = batch == 2 && L == 2048;
  out["block_ap"] = {{"ms_per_iteration", br.ms_per_iteration}, {"seconds", br.seconds}, {"peak_memory_mib", block_peak},
                     {"paper_7b_block_ap", "3.3 h, 8.5 GB on one A100-80GB (batch 2 x 2048, 4096 samples, 2 epochs)"}};
  if (paper_shape) out["block_ap"]["projected_7b_block_ap_hours"] = br.ms_per_iteration * 131072.0 / 3.6e6;

  if (cuda) cuda_reset_peak_memory();
  E2eOptions eo;
  eo.micro_batch = batch;
  eo.global_batch = batch;
  eo.max_steps = iters;
  eo.progress = !a.flag("json");
  E2eResult er = run_e2e_qp(m, data, eo);
  out["e2e_qp"] = {{"ms_per_step", er.ms_per_step}, {"steps", er.steps}, {"seconds", er.seconds},
                   {"peak_memory_mib", peak_mib()}};

  if (a.flag("json")) {
    std::cout << out.dump(2) << std::endl;
  } else {
    std::printf("bench quant: %s, %s, %s, batch %lld x %lld tokens, %lld iterations\n",
                out["device"].get<std::string>().c_str(), out["shape"].get<std::string>().c_str(),
                out["format"].get<std::string>().c_str(), static_cast<long long>(batch), static_cast<long long>(L),
                static_cast<long long>(iters));
    std::printf("  Block-AP  %10.1f ms/iteration  peak %8.0f MiB\n", br.ms_per_iteration, block_peak);
    if (paper_shape)
      std::printf("  x131072 iterations = %.2f h for Llama-2-7B Block-AP (paper: 3.3 h, 8.5 GB on an A100)\n",
                  br.ms_per_iteration * 131072.0 / 3.6e6);
    std::printf("  E2E-QP    %10.1f ms/step       peak %8.0f MiB\n", er.ms_per_step,
                out["e2e_qp"]["peak_memory_mib"].get<double>());
  }
  return 0;
}

}  // namespace eqat
