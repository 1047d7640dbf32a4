// Block loop shared by RTN, GPTQ and Block-AP (EFFICIENTQAT.md §3.3), step by step:
//   for block b: (1) FP targets: FP block b over the FP stream; (2) quantize block b (method); (3) save state;
//   (4) advance the quantized stream through the finalised block b (but the last).
// Legend: S samples, B batch, L sequence, C n_embd.
#include "quant/qat/block_ap.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "data/error.h"
#include "data/json_util.h"
#include "data/fs.h"
#include "data/safetensors.h"
#include "quant/cpu_bf16_gemm.h"
#include "quant/cpu_qgemv.h"
#include "quant/qat/block_grad.h"
#include "quant/qat/gptq.h"
#include "quant/qat/optim.h"
#include "quant/qat/progress.h"

namespace eqat {

std::vector<std::pair<std::string, QuantLinear>> block_linears(Model& m, int64_t layer) {
  auto* l = m.lm->model->layers[layer]->as<LlamaDecoderLayerImpl>();
  return {{"self_attn.q_proj", l->self_attn->q_proj}, {"self_attn.k_proj", l->self_attn->k_proj},
          {"self_attn.v_proj", l->self_attn->v_proj}, {"self_attn.o_proj", l->self_attn->o_proj},
          {"mlp.gate_proj", l->mlp->gate_proj},       {"mlp.up_proj", l->mlp->up_proj},
          {"mlp.down_proj", l->mlp->down_proj}};
}

namespace {

// fp16 activation cache, one tensor per batch, in RAM or as files in a directory (bounded RAM).
class ActivationCache {
 public:
  ActivationCache(std::string dir, std::string tag, size_t n) : dir_(std::move(dir)), tag_(std::move(tag)), mem_(n) {}
  void put(size_t i, const at::Tensor& x) {
    at::Tensor h = x.detach().to(at::kCPU, at::kHalf).contiguous();
    if (dir_.empty()) {
      mem_[i] = h;
    } else {
      write_safetensors(file(i), {{"x", h}});
    }
  }
  at::Tensor get(size_t i) const {
    if (dir_.empty()) return mem_[i];
    return Checkpoint::open(file(i)).get("x").clone();
  }
  size_t size() const { return mem_.size(); }

 private:
  std::string file(size_t i) const { return path_join(dir_, tag_ + "_" + std::to_string(i) + ".safetensors"); }
  std::string dir_, tag_;
  std::vector<at::Tensor> mem_;
};

std::vector<std::vector<CalibSample>> make_batches(const std::vector<CalibSample>& s, int64_t bs) {
  std::vector<std::vector<CalibSample>> out;
  for (size_t i = 0; i < s.size(); i += static_cast<size_t>(bs))
    out.emplace_back(s.begin() + i, s.begin() + std::min(s.size(), i + static_cast<size_t>(bs)));
  return out;
}

struct Stream {
  ActivationCache fp, q;
  std::vector<at::Tensor> valid;  // [B, L] bool per batch
};

// The part of the batches whose Hessians this thread accumulates (GPTQ's observers, data-parallel).
thread_local int64_t t_observed_part = 0;

// Σ valid (out − y)² over the valid positions.
at::Tensor masked_sse(const at::Tensor& out, const at::Tensor& y, const at::Tensor& valid) {
  at::Tensor v = valid.to(out.device()).unsqueeze(-1).to(out.scalar_type());
  return ((out - y).pow(2) * v).sum();
}

// Masked MSE over valid positions: Σ valid (out − y)² / (#valid · C).
at::Tensor masked_mse(const at::Tensor& out, const at::Tensor& y, const at::Tensor& valid) {
  return masked_sse(out, y, valid) / (valid.to(out.device()).to(out.scalar_type()).sum() * out.size(-1));
}

// One Block-AP step by hand (block_grad.h): Ŵ of the block's linears (q/k/v and gate/up stacked), the loss of the
// batch and its gradients, which become the gradients of W, s, z (the fused fake quantizer's backward) and of the
// two norms' weights. Returns the loss. bf16_gemms: BlockGradWeights::bf16_gemms.
double block_grad_step(const Model& m, LlamaDecoderLayerImpl& layer,
                       const std::vector<std::pair<std::string, QuantLinear>>& lins, const at::Tensor& x,
                       const at::Tensor& y, const at::Tensor& valid, bool bf16_gemms) {
  EQAT_ASSERT(lins.size() == 7 && lins[0].first == "self_attn.q_proj" && lins[4].first == "mlp.gate_proj",
              "block_grad_step: the linears in block_linears' order");
  BlockGradWeights w;
  std::vector<at::Tensor> hat(lins.size());  // each linear's rows of the stacked weights
  {
    c10::NoGradGuard ng;
    auto stacked = [&](size_t k0, size_t k1) {
      int64_t rows = 0;
      for (size_t k = k0; k < k1; ++k) rows += lins[k].second->weight.size(0);
      at::Tensor t = at::empty({rows, lins[k0].second->weight.size(1)}, at::kFloat);
      for (size_t k = k0, r = 0; k < k1; ++k) {
        hat[k] = t.narrow(0, static_cast<int64_t>(r), lins[k].second->weight.size(0));
        r += static_cast<size_t>(lins[k].second->weight.size(0));
      }
      return t;
    };
    w.qkv = stacked(0, 3), w.o = stacked(3, 4), w.gate_up = stacked(4, 6), w.down = stacked(6, 7);
    std::vector<FakeQuantJob> jobs;
    for (size_t k = 0; k < lins.size(); ++k) {
      const auto& lin = lins[k].second;
      jobs.push_back({lin->weight, lin->weight_scale, lin->weight_zero, lin->spec(), hat[k]});
    }
    fake_quantize_fused_into(jobs);  // the seven Ŵ in one parallel region
    w.norm_in = layer.input_layernorm->weight.detach();
    w.norm_post = layer.post_attention_layernorm->weight.detach();
    w.bf16_gemms = bf16_gemms;
  }
  const int64_t L = x.size(1);
  auto [cos, sin] = m.lm->model->rotary().cos_sin(at::arange(L, at::kLong).view({1, L}), at::kFloat, L);
  const double denom = valid.sum().item<double>() * static_cast<double>(y.size(-1));
  BlockGrads g = block_grad_cpu(m.cfg.text, w, x, y, valid, cos[0].contiguous(), sin[0].contiguous(), denom);
  const at::Tensor* stacks[] = {&g.qkv, &g.o, &g.gate_up, &g.down};
  std::vector<FakeQuantJob> jobs;
  for (size_t k = 0; k < lins.size(); ++k) {
    const auto& lin = lins[k].second;
    const int64_t r = stack_offset(k, [&](size_t j) { return lins[j].second->weight.size(0); });
    jobs.push_back({lin->weight, lin->weight_scale, lin->weight_zero, lin->spec(),
                    stacks[kLinearStack[k]]->narrow(0, r, lin->weight.size(0))});
  }
  const std::vector<FakeQuantGrads> fg = fake_quantize_backward_fused(jobs);  // one parallel region
  for (size_t k = 0; k < lins.size(); ++k) {
    const auto& lin = lins[k].second;
    lin->weight.mutable_grad() = fg[k].w;
    lin->weight_scale.mutable_grad() = fg[k].s;
    lin->weight_zero.mutable_grad() = fg[k].z;
  }
  layer.input_layernorm->weight.mutable_grad() = g.norm_in;
  layer.post_attention_layernorm->weight.mutable_grad() = g.norm_post;
  return g.loss;
}

class BlockRunner {
 public:
  // The rotary embedding moves its inverse frequencies to the device on first use; done here, before any
  // parallel_items, so threads only read it.
  BlockRunner(Model& m) : m_(m) {
    m_.lm->model->rotary().cos_sin(at::zeros({1, 1}, at::TensorOptions().dtype(at::kLong).device(m_.device)),
                                   at::kFloat, 1);
  }
  // One block forward on a batch: x [B, L, C] (cache dtype) -> [B, L, C] in `compute` dtype.
  at::Tensor forward(LlamaDecoderLayerImpl& layer, const at::Tensor& x, c10::ScalarType compute) {
    const int64_t L = x.size(1);
    at::Tensor pos = at::arange(L, at::TensorOptions().dtype(at::kLong).device(m_.device)).view({1, L});
    auto [cos, sin] = m_.lm->model->rotary().cos_sin(pos, compute, L);
    // Causal (SDPA's own when undefined), cut to Mistral's sliding window when the model has one.
    const at::Tensor mask = m_.lm->model->sliding_window_mask(at::Tensor(), L, nullptr, m_.device);
    return layer.forward(x.to(m_.device, compute), cos, sin, mask, nullptr, 0);
  }

 private:
  Model& m_;
};

std::string block_file(const std::string& dir, int64_t b) {
  char name[64];
  std::snprintf(name, sizeof(name), "block_%03lld.safetensors", static_cast<long long>(b));
  return path_join(dir, name);
}

void save_block_state(Model& m, int64_t b, const std::string& dir, const nlohmann::json& meta) {
  std::vector<std::pair<std::string, at::Tensor>> t;
  for (auto& [name, lin] : block_linears(m, b)) {
    GptqTensors p = lin->packed();
    t.emplace_back(name + ".qweight", p.qweight.cpu());
    t.emplace_back(name + ".qzeros", p.qzeros.cpu());
    t.emplace_back(name + ".scales", p.scales.cpu());
    t.emplace_back(name + ".g_idx", p.g_idx.cpu());
  }
  auto* l = m.lm->model->layers[b]->as<LlamaDecoderLayerImpl>();
  t.emplace_back("input_layernorm.weight", l->input_layernorm->weight.detach().cpu());
  t.emplace_back("post_attention_layernorm.weight", l->post_attention_layernorm->weight.detach().cpu());
  write_safetensors(block_file(dir, b), t);
  write_file_atomic(path_join(dir, "state.json"), meta.dump(2));
}

// Block b's packed linears from its state file. On the CPU they alias the file's mapping instead of copying it:
// once the quantized stream has gone through the block, release_block_pages() drops their pages from RSS, so host
// memory holds the block in training, not every finished block (a 13B at W2g64: 3.6 GB). A later reader (E2E-QP,
// the export) faults them back in from the file, which the mapping keeps alive even after the state directory is
// removed. E2E-QP trains fp32 copies of the scales; the integers are never written.
void load_block_state(Model& m, int64_t b, const std::string& dir, const QuantSpec& spec) {
  Checkpoint ck = Checkpoint::open(block_file(dir, b));
  c10::NoGradGuard g;
  const bool alias = m.device.is_cpu();
  auto get = [&](const std::string& name) { return alias ? ck.get(name) : ck.get(name).clone(); };
  for (auto& [name, lin] : block_linears(m, b)) {
    GptqTensors p{get(name + ".qweight"), get(name + ".qzeros"), get(name + ".scales"), get(name + ".g_idx")};
    lin->set_packed(p, spec);
  }
  auto* l = m.lm->model->layers[b]->as<LlamaDecoderLayerImpl>();
  l->input_layernorm->weight.set_data(ck.get("input_layernorm.weight").clone().to(m.device));
  l->post_attention_layernorm->weight.set_data(ck.get("post_attention_layernorm.weight").clone().to(m.device));
}

// After a block: its packed tensors' pages leave RSS, and so do the free pages inside the malloc heap. Tensors below
// glibc's mmap threshold (up to 32 MB: a 13B block's packed linears, the scales) live in the heap, whose holes stay
// resident after free; measured on the 13B at W2g64 without the trim, the anonymous RSS between blocks grew from 2.9 to
// 4.9 GB over blocks 14–38 (about 80 MB per block, nearly all of it [heap]) and the peak RSS with it.
void release_block_pages(Model& m, int64_t b) {
  for (auto& [name, lin] : block_linears(m, b))
    for (const at::Tensor& t : {lin->qweight, lin->qzeros, lin->scales, lin->g_idx})
      release_mapped_bytes(t.const_data_ptr(), t.nbytes());  // false (nothing done) for memory of our own
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

}  // namespace

int64_t unrounded_batch(int bits) { return bits == 2 ? kUnroundedBatch2Bit : kUnroundedBatch; }

void check_train_gemm(const std::string& train_gemm) {
  EQAT_CHECK(train_gemm == "fp32" || train_gemm == "bf16", "--train-gemm: expected fp32 or bf16, got '", train_gemm,
             "'");
  EQAT_CHECK(train_gemm != "bf16" || cpu_bf16_gemm_available(),
             "--train-gemm bf16: this CPU or LibTorch has no bf16 GEMM (it needs AVX512-BF16 or AMX, and LibTorch's "
             "oneMKL)");
}

double unrounded_lr_scale(int64_t batch_size, int bits) {
  return static_cast<double>(std::clamp<int64_t>(batch_size, 1, unrounded_batch(bits))) / 2.0;
}

BlockApResult run_block_quantization(Model& m, const CalibSet& calib, const BlockApOptions& opts) {
  const ExactCpuActivations exact;  // the quantized stream runs the packed blocks in fp32, never int8 activations
  EQAT_CHECK(opts.method == "efficientqat" || opts.method == "rtn" || opts.method == "gptq", "--method: unknown '",
             opts.method, "' (efficientqat, rtn or gptq)");
  EQAT_CHECK(packable_bits(opts.spec.bits), "--bits must be 2, 3, 4 or 8, got ", opts.spec.bits);
  EQAT_CHECK(opts.init == "minmax" || opts.init == "mse" || opts.init == "gptq" || opts.init == "gptq-unrounded",
             "--init: unknown '", opts.init, "' (minmax, mse, gptq or gptq-unrounded)");
  const int64_t n_layer = m.cfg.text.num_hidden_layers;
  for (int64_t b = 0; b < n_layer; ++b)
    for (auto& [name, lin] : block_linears(m, b))
      check_packable(lin->out_features(), lin->in_features(), opts.spec.bits,
                     opts.spec.group_for(lin->in_features()), str_cat("layer ", b, " ", name));
  // From GPTQ's unrounded start, 3 and 4 bits train the weights at 4e-5 per 2 samples (the paper's 1e-5 left both
  // models here behind GPTQ at W3: models/SOURCES.md, issue 18); 2 bits keep the paper's 2e-5, which measured best
  // there. Both scale with the batch (unrounded_lr_scale).
  const bool unrounded = opts.init == "gptq-unrounded";
  const double scale = unrounded ? unrounded_lr_scale(opts.batch_size, opts.spec.bits) : 1.0;
  const double weight_lr = opts.weight_lr >= 0 ? opts.weight_lr
                           : opts.spec.bits == 2 ? 2e-5 * scale
                           : unrounded           ? 4e-5 * scale
                                                 : 1e-5;
  const double quant_lr = opts.quant_lr >= 0 ? opts.quant_lr
                          : opts.init == "gptq" ? 0.0
                          : unrounded           ? 2e-5 * scale
                                                : 1e-4;
  check_train_gemm(opts.train_gemm);
  const bool bf16_gemms = opts.train_gemm == "bf16";
  const c10::ScalarType model_dtype = m.dtype;
  // Training runs on fp32 master copies of the block (P8); on CUDA the reference adds fp16 autocast + loss scaling.
  const c10::ScalarType train_dtype = at::kFloat;

  BlockApResult res;
  res.quant_lr = quant_lr;
  res.weight_lr = weight_lr;
  Progress overall("setup", 1, false);
  auto batches_tr = make_batches(calib.train, opts.batch_size);
  auto batches_va = make_batches(calib.val, opts.batch_size);
  if (!opts.offload_dir.empty()) {
    EQAT_CHECK(is_directory(opts.offload_dir), "--offload-dir: ", opts.offload_dir, " is not a directory");
  }
  Stream tr{ActivationCache(opts.offload_dir, "fp_train", batches_tr.size()),
            ActivationCache(opts.offload_dir, "q_train", batches_tr.size()), {}};
  Stream va{ActivationCache(opts.offload_dir, "fp_val", batches_va.size()),
            ActivationCache(opts.offload_dir, "q_val", batches_va.size()), {}};
  // The distillation samples ride the FP stream only; their `valid` holds the loss positions instead. When they are
  // the calibration samples themselves (train then val, in batches that line up: E2E-QP on Block-AP's data, the
  // default), the train and val FP streams already carry them, and no third stream runs the same batches again.
  const bool teacher_is_calib =
      opts.teacher_samples && opts.teacher_samples->size() == calib.train.size() + calib.val.size() &&
      calib.train.size() % static_cast<size_t>(opts.batch_size) == 0 &&
      std::equal(calib.train.begin(), calib.train.end(), opts.teacher_samples->begin(), same_sample) &&
      std::equal(calib.val.begin(), calib.val.end(), opts.teacher_samples->begin() + calib.train.size(), same_sample);
  std::vector<at::Tensor> calib_loss_positions;  // teacher_is_calib: per train batch, then per val batch
  auto batches_te = opts.teacher_samples && !teacher_is_calib ? make_batches(*opts.teacher_samples, opts.batch_size)
                                                              : std::vector<std::vector<CalibSample>>{};
  Stream te{ActivationCache(opts.offload_dir, "fp_teacher", batches_te.size()), ActivationCache("", "", 0), {}};
  // keep_sample_embeds: every sample's rows in one tensor (one allocation, not one per sample between the streams'
  // tensors), handed out as views.
  at::Tensor kept_embeds;
  int64_t kept_rows = 0;
  if (opts.keep_sample_embeds) {
    kept_embeds = at::empty({token_count(calib.train) + token_count(calib.val), m.cfg.text.hidden_size},
                            at::TensorOptions().dtype(m.dtype));
  }
  const bool data_parallel = data_parallel_training(m);
  // Runs fn over a stream's batch indices: on the threads when data_parallel (each batch's result is the same as
  // in order), else in order.
  auto each_batch = [&](size_t n, const std::function<void(int64_t)>& fn) {
    if (data_parallel) return parallel_items(static_cast<int64_t>(n), fn);
    for (size_t i = 0; i < n; ++i) fn(static_cast<int64_t>(i));
  };
  {
    Progress p("embedding calibration samples",
               static_cast<int64_t>(batches_tr.size() + batches_va.size() + batches_te.size()), opts.progress);
    int64_t done = 0;
    // The batches are embedded a chunk at a time on the threads (each_batch: a small model's vision tower and the
    // image decoding are per-op overhead on one sample, not work worth sharing), then stored in order.
    const size_t chunk = data_parallel ? 64 : 1;
    std::vector<EmbeddedBatch> embedded;
    for (auto* pair : {&batches_tr, &batches_va, &batches_te}) {
      Stream& st = pair == &batches_tr ? tr : pair == &batches_va ? va : te;
      for (size_t i = 0; i < pair->size(); ++i) {
        if (i % chunk == 0) {
          embedded.assign(std::min(chunk, pair->size() - i), EmbeddedBatch());
          each_batch(embedded.size(), [&](int64_t j) { embedded[j] = embed_samples(m, (*pair)[i + j]); });
        }
        EmbeddedBatch e = std::move(embedded[i % chunk]);
        st.fp.put(i, e.embeds);
        if (pair == &batches_te) {
          st.valid.push_back(loss_positions(e));
        } else {
          st.q.put(i, e.embeds);
          st.valid.push_back(e.valid);
          if (opts.keep_sample_embeds)
            for (int64_t j = 0; j < e.embeds.size(0); ++j) {
              const int64_t T = static_cast<int64_t>((*pair)[i][j].ids.size());
              res.sample_embeds.push_back(kept_embeds.narrow(0, kept_rows, T));
              res.sample_embeds.back().copy_(e.embeds[j].narrow(0, 0, T));
              kept_rows += T;
            }
          if (teacher_is_calib) calib_loss_positions.push_back(loss_positions(e));
        }
        p.update(++done);
      }
    }
  }

  // Resume: blocks already finished in state_dir are loaded instead of recomputed.
  int64_t blocks_done = 0;
  nlohmann::json meta = {{"method", opts.method}, {"tag", opts.spec.tag()}, {"blocks_done", 0},
                         {"records", nlohmann::json::array()}};
  if (!opts.state_dir.empty() && opts.resume && file_exists(path_join(opts.state_dir, "state.json"))) {
    const std::string state_path = path_join(opts.state_dir, "state.json");
    nlohmann::json old = parse_json_path(state_path);
    EQAT_CHECK(old.is_object() && (!old.contains("records") || old["records"].is_array()), state_path,
               ": not a Block-AP state (expected an object with a \"records\" list)");
    try {  // value() throws type_error for a key of another type (a hand-edited state)
      EQAT_CHECK(old.value("method", "") == opts.method && old.value("tag", "") == opts.spec.tag(),
                 opts.state_dir, ": saved run is ", old.value("method", "?"), " ", old.value("tag", "?"),
                 ", this run asks for ", opts.method, " ", opts.spec.tag(), " (use another --out or drop --resume)");
      blocks_done = old.value("blocks_done", 0);
      meta = old;
      for (const auto& r : old["records"]) {
        BlockRecord br;
        br.block = r.value("block", 0);
        br.train_loss = r.value("train_loss", std::vector<double>{});
        br.val_loss = r.value("val_loss", std::vector<double>{});
        br.seconds = r.value("seconds", 0.0);
        res.blocks.push_back(br);
      }
    } catch (const nlohmann::json::exception& e) {
      throw_input_error(str_cat(state_path, ": not a Block-AP state (", json_error_message(e), ")"));
    }
    std::fprintf(stderr, "resuming: %lld of %lld blocks already quantized\n", static_cast<long long>(blocks_done),
                 static_cast<long long>(n_layer));
  }

  BlockRunner runner(m);
  const KeepFreedMemory keep_freed(data_parallel);  // small blocks: every step's tapes and gradients (optim.h)
  auto advance = [&](Stream& st, LlamaDecoderLayerImpl& layer, bool fp_stream) {
    c10::NoGradGuard g;
    ActivationCache& c = fp_stream ? st.fp : st.q;
    each_batch(st.valid.size(), [&](int64_t i) { c.put(i, runner.forward(layer, c.get(i), model_dtype)); });
  };
  auto val_mse = [&](LlamaDecoderLayerImpl& layer, c10::ScalarType dt) {
    c10::NoGradGuard g;
    std::vector<double> mse(va.valid.size());
    each_batch(va.valid.size(), [&](int64_t i) {
      at::Tensor y = va.fp.get(i).to(m.device, dt);
      mse[i] = masked_mse(runner.forward(layer, va.q.get(i), dt), y, va.valid[i]).item<double>();
    });
    double total = 0;
    for (double v : mse) total += v;  // in batch order, as before
    return va.valid.empty() ? 0.0 : total / static_cast<double>(va.valid.size());
  };

  // GPTQ on one block: Hessians of the linears' inputs on the quantized stream, then each linear's integers. Linears
  // that read the same input (q/k/v, gate/up) share one Hessian and one factor: a 7B block accumulates and factors
  // four instead of seven. That they saw the very same tensors is checked, not assumed.
  auto gptq_block = [&](std::vector<std::pair<std::string, QuantLinear>>& lins, LlamaDecoderLayerImpl& layer,
                        std::vector<at::Tensor>* unrounded = nullptr) {
    auto input_of = [](const std::string& name) -> std::string {
      for (const char* p : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"})
        if (name == p) return "attention input";
      for (const char* p : {"mlp.gate_proj", "mlp.up_proj"})
        if (name == p) return "mlp input";
      return name;
    };
    std::vector<size_t> leader(lins.size());  // the first linear with the same input: the one that accumulates
    for (size_t k = 0; k < lins.size(); ++k) {
      leader[k] = k;
      for (size_t j = 0; j < k; ++j)
        if (input_of(lins[j].first) == input_of(lins[k].first)) {
          leader[k] = j;
          break;
        }
    }
    // Data-parallel (small blocks, several threads): each part of the batches, in order, accumulates its own
    // Hessians on its own thread; the parts' Hessians are then merged in part order. One part otherwise.
    const int64_t parts =
        data_parallel ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tr.valid.size())) : 1;
    std::vector<std::vector<HessianAccumulator>> hs(parts);  // [part][linear]
    std::vector<std::vector<std::vector<const void*>>> seen(parts, std::vector<std::vector<const void*>>(lins.size()));
    std::vector<at::Tensor> current_valid(parts);
    for (size_t k = 0; k < lins.size(); ++k) {
      for (auto& h : hs) h.emplace_back(leader[k] == k ? lins[k].second->in_features() : 0);
      lins[k].second->input_observer = [&, k](const at::Tensor& x) {
        const int64_t p = t_observed_part;
        seen[p][k].push_back(x.const_data_ptr());
        if (leader[k] == k) hs[p][k].add(x, current_valid[p]);
      };
    }
    auto observe_part = [&](int64_t p) {
      t_observed_part = p;
      const size_t n = tr.valid.size();
      for (size_t i = n * p / parts; i < n * (p + 1) / parts; ++i) {
        current_valid[p] = tr.valid[i];
        runner.forward(layer, tr.q.get(i), model_dtype);
      }
      t_observed_part = 0;
    };
    {
      c10::NoGradGuard g;
      if (parts == 1) observe_part(0);
      else parallel_items(parts, observe_part);
    }
    for (size_t k = 0; k < lins.size(); ++k) {
      lins[k].second->input_observer = nullptr;
      for (int64_t p = 0; p < parts; ++p)
        EQAT_ASSERT(seen[p][k] == seen[p][leader[k]], "GPTQ: ", lins[k].first, " did not read the same input as ",
                    lins[leader[k]].first);
      if (leader[k] == k)
        for (int64_t p = 1; p < parts; ++p) hs[0][k].merge(hs[p][k]);
    }
    std::vector<QuantizedWeight> out;
    GptqFactor f;
    size_t f_of = lins.size();  // whose factor f is
    for (size_t k = 0; k < lins.size(); ++k) {
      if (leader[k] == k) {  // reuses the Hessian's storage
        const int64_t K = lins[k].second->in_features();
        f = gptq_factor(hs[0][k].take(), opts.gptq_damp, opts.gptq_order, opts.spec.group_for(K));
        f_of = k;
      }
      EQAT_ASSERT(f_of == leader[k], "GPTQ: linears that share an input must be adjacent");
      at::Tensor pre;
      out.push_back(gptq_quantize(lins[k].second->weight, f, opts.spec, 128, unrounded ? &pre : nullptr));
      if (unrounded) unrounded->push_back(pre.to(at::kFloat));  // fp32: a 13B block's seven are 1.3 GB, not 2.5
    }
    return out;
  };

  int64_t iterations = 0;
  double train_seconds = 0;
  auto t_start = std::chrono::steady_clock::now();
  for (int64_t b = 0; b < n_layer; ++b) {
    auto& layer = *m.lm->model->layers[b]->as<LlamaDecoderLayerImpl>();
    auto t0 = std::chrono::steady_clock::now();
    materialize_layer(m, b);  // a deferred layer (LoadOptions::defer_decoder) is read and converted only now
    // (1) FP targets: the FP block over the FP stream (also the FP inputs of block b+1).
    advance(tr, layer, true);
    advance(va, layer, true);
    advance(te, layer, true);
    // Nothing reads the quantized stream after the last block: E2E-QP embeds its samples afresh.
    const bool q_stream_read = b + 1 < n_layer;
    if (b < blocks_done) {
      load_block_state(m, b, opts.state_dir, opts.spec);
      if (q_stream_read) {
        advance(tr, layer, false);
        advance(va, layer, false);
      }
      release_block_pages(m, b);
      continue;
    }
    BlockRecord rec;
    rec.block = b;
    auto lins = block_linears(m, b);
    const std::string label = str_cat("block ", b + 1, "/", n_layer, " ", opts.method);
    // (2) Quantize.
    if (opts.method == "rtn") {
      for (auto& [name, lin] : lins) {
        lin->to_fake_quant(opts.spec);
        lin->to_packed(at::kHalf);
      }
    } else if (opts.method == "gptq") {
      std::vector<QuantizedWeight> qws = gptq_block(lins, layer);
      for (size_t k = 0; k < lins.size(); ++k) {
        auto& lin = lins[k].second;
        lin->set_packed(pack_gptq(qws[k].q, qws[k].zero, qws[k].scale, opts.spec.bits,
                                  opts.spec.group_for(lin->in_features()), at::kHalf),
                        opts.spec);
      }
    } else {
      // Block-AP: fake-quant, fp32 master copies, two groups. s and z from min–max in the checkpoint's dtype, or
      // (--init mse) from each group's clip search (mse_clip_init), or (--init gptq) W, s and z from GPTQ's
      // integers: W = (q − z)·s rounds back to exactly q.
      // (--init gptq-unrounded) GPTQ's integers, s and z, with W where GPTQ's compensation left it before rounding.
      std::vector<QuantizedWeight> start;
      std::vector<at::Tensor> unrounded;
      if (opts.init == "gptq") start = gptq_block(lins, layer);
      if (opts.init == "gptq-unrounded") start = gptq_block(lins, layer, &unrounded);
      for (size_t k = 0; k < lins.size(); ++k) {
        auto& lin = lins[k].second;
        lin->weight.set_data(lin->weight.to(train_dtype));
        lin->to_fake_quant(opts.spec);
        if (!start.empty()) {
          c10::NoGradGuard g;
          const at::Tensor w0 = unrounded.empty()
                                    ? dequantize_integers(start[k], opts.spec.group_for(lin->in_features()))
                                    : gptq_unrounded_start(start[k], unrounded[k], opts.spec);
          lin->weight.set_data(w0.to(lin->weight.device(), train_dtype));
          lin->weight_scale.set_data(start[k].scale.to(lin->weight.device(), train_dtype));
          lin->weight_zero.set_data(start[k].zero.to(lin->weight.device(), train_dtype));
          // Dropped as soon as used, not at the end of the block's training: at 13B the seven int32 integer
          // tensors and fp32 unrounded weights are 2.5 GB, and holding them took a block's peak from ~6.4 to 10.2 GiB.
          start[k] = QuantizedWeight();
          if (!unrounded.empty()) unrounded[k] = at::Tensor();
        } else if (opts.init == "mse") {
          c10::NoGradGuard g;
          auto [s, z] = mse_clip_init(lin->weight, opts.spec);
          lin->weight_scale.set_data(s.to(train_dtype));
          lin->weight_zero.set_data(z.to(train_dtype));
        }
      }
      layer.input_layernorm->weight.set_data(layer.input_layernorm->weight.to(train_dtype));
      layer.post_attention_layernorm->weight.set_data(layer.post_attention_layernorm->weight.to(train_dtype));
      ParamGroup gq{"quant", {}, quant_lr, 0.0}, gw{"weight", {}, weight_lr, 0.0};
      for (auto& [name, lin] : lins) {
        gq.params.push_back(lin->weight_scale);
        gq.params.push_back(lin->weight_zero);
        gw.params.push_back(lin->weight);
      }
      gw.params.push_back(layer.input_layernorm->weight);
      gw.params.push_back(layer.post_attention_layernorm->weight);
      for (auto* grp : {&gq, &gw})
        for (auto& p : grp->params) p.set_requires_grad(true);
      AdamW opt({gq, gw});
      // The data-parallel step needs every linear on the fused fp32 fake quantizer (the CPU's path).
      bool fused_step = data_parallel;
      for (auto& [name, lin] : lins)
        fused_step = fused_step && fused_fake_quant_applies(lin->weight, lin->weight_scale, lin->weight_zero);
      // The hand-written step (block_grad.h) where it computes this block, LibTorch's autograd otherwise.
      const bool by_hand = fused_step && block_grad_cpu_applies(m.cfg.text);
      if (by_hand && bf16_gemms) res.train_gemm = "bf16";
      std::vector<at::Tensor> trained = gq.params;
      trained.insert(trained.end(), gw.params.begin(), gw.params.end());
      // On CUDA the forward runs under fp16 autocast with dynamic loss scaling; a step whose gradients overflow is
      // skipped (the schedule still advances, as with torch's GradScaler). The CPU trains in plain fp32.
      const bool amp = m.device.is_cuda();
      LossScaler scaler(amp);
      int64_t bad_in_a_row = 0;
      const int64_t total = opts.epochs * static_cast<int64_t>(tr.valid.size());
      Progress bar(label, total, opts.progress);
      int64_t step = 0;
      auto check_loss = [&](double lv) {
        bad_in_a_row = std::isfinite(lv) ? 0 : bad_in_a_row + 1;
        EQAT_CHECK(amp ? bad_in_a_row < 20 : bad_in_a_row == 0, "block ", b, ": non-finite training loss at step ",
                   step, " (try a lower --weight-lr / --quant-lr)");
      };
      auto tt0 = std::chrono::steady_clock::now();
      for (int64_t ep = 0; ep < opts.epochs; ++ep) {
        double sum = 0;
        for (size_t i = 0; i < tr.valid.size(); ++i) {
          at::Tensor y = tr.fp.get(i).to(m.device, train_dtype);
          double lv = 0;
          const int64_t B = y.size(0), parts = fused_step ? std::min<int64_t>(B, at::get_num_threads()) : 1;
          if (by_hand) {
            lv = block_grad_step(m, layer, lins, tr.q.get(i), y, tr.valid[i], bf16_gemms);
            check_loss(lv);
          } else if (parts == 1) {
            at::Tensor out;
            {
              AutocastGuard ac(m.device, at::kHalf, amp);
              out = runner.forward(layer, tr.q.get(i), train_dtype);
            }
            at::Tensor loss = masked_mse(out.to(train_dtype), y, tr.valid[i]);
            lv = loss.item<double>();
            check_loss(lv);
            scaler.scale(loss).backward();
          } else {
            // The batch's samples split over the threads. Each thread runs its rows, cut to their longest valid
            // length (right padding under a causal mask: the valid positions never see the cut ones), and returns
            // dL/dŴ and the norms' gradients of its share of the loss. Ŵ is computed once for all threads, and the
            // fake quantizer's backward runs once on the summed dL/dŴ, as FakeQuantLinearFn does for one batch:
            // the same loss and gradients as one forward of the whole batch, up to fp32 summation order.
            const at::Tensor x = tr.q.get(i), valid = tr.valid[i];
            const double denom = valid.sum().item<double>() * static_cast<double>(y.size(-1));
            std::vector<at::Tensor> inputs;  // Ŵ of each linear, then the two norms' weights
            struct ClearOverrides {  // also when a thread throws
              decltype(lins)& l;
              ~ClearOverrides() {
                for (auto& [name, lin] : l) lin->fake_quant_weight_override = at::Tensor();
              }
            } clear{lins};
            {
              c10::NoGradGuard ng;
              for (auto& [name, lin] : lins) {
                lin->fake_quant_weight_override =
                    fake_quantize_fused(lin->weight, lin->weight_scale, lin->weight_zero, lin->spec())
                        .requires_grad_(true);
                inputs.push_back(lin->fake_quant_weight_override);
              }
            }
            inputs.push_back(layer.input_layernorm->weight);
            inputs.push_back(layer.post_attention_layernorm->weight);
            std::vector<double> part_loss(parts);
            std::vector<std::vector<at::Tensor>> part_grads(parts);
            parallel_items(parts, [&](int64_t p) {
              const int64_t r0 = B * p / parts, r1 = B * (p + 1) / parts;
              const at::Tensor v = valid.narrow(0, r0, r1 - r0);
              const int64_t len = std::max<int64_t>(1, v.any(0).sum().item<int64_t>());
              auto rows = [&](const at::Tensor& t) { return t.narrow(0, r0, r1 - r0).narrow(1, 0, len); };
              at::Tensor out = runner.forward(layer, rows(x), train_dtype);
              at::Tensor loss = masked_sse(out, rows(y), v.narrow(1, 0, len)) / denom;
              part_loss[p] = loss.item<double>();
              part_grads[p] = torch::autograd::grad({loss}, inputs, {}, false, false, true);
            });
            for (double l : part_loss) lv += l;
            check_loss(lv);
            c10::NoGradGuard ng;
            std::vector<at::Tensor> sum(inputs.size());
            for (size_t k = 0; k < inputs.size(); ++k)
              for (const auto& pg : part_grads)
                if (pg[k].defined()) sum[k] = sum[k].defined() ? sum[k].add_(pg[k]) : pg[k];
            for (size_t k = 0; k < lins.size(); ++k) {
              auto& lin = lins[k].second;
              if (!sum[k].defined()) continue;
              FakeQuantGrads g =
                  fake_quantize_backward_fused(sum[k], lin->weight, lin->weight_scale, lin->weight_zero, lin->spec());
              lin->weight.mutable_grad() = g.w;
              lin->weight_scale.mutable_grad() = g.s;
              lin->weight_zero.mutable_grad() = g.z;
            }
            for (size_t k = lins.size(); k < inputs.size(); ++k)
              if (sum[k].defined()) inputs[k].mutable_grad() = sum[k];
          }
          opt.groups()[0].lr = cosine_lr(quant_lr, opts.min_lr_factor, step, total);
          opt.groups()[1].lr = cosine_lr(weight_lr, opts.min_lr_factor, step, total);
          if (scaler.unscale_and_check(trained)) opt.step();
          opt.zero_grad();
          if (std::isfinite(lv)) sum += lv;
          ++step;
          bar.update(step, str_cat("loss ", lv, " rss ", static_cast<int>(peak_rss_mib()), "MiB"));
        }
        rec.train_loss.push_back(sum / static_cast<double>(std::max<size_t>(1, tr.valid.size())));
        rec.val_loss.push_back(val_mse(layer, train_dtype));
      }
      train_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - tt0).count();
      iterations += total;
      rec.skipped_steps = scaler.skipped();
      rec.loss_scale = scaler.value();
      for (auto* grp : {&gq, &gw})
        for (auto& p : grp->params) p.set_requires_grad(false);
      // Finalise: back to the model dtype, weights replaced by their quantized values (packed).
      for (auto& [name, lin] : lins) lin->to_packed(at::kHalf);
      layer.input_layernorm->weight.set_data(layer.input_layernorm->weight.to(model_dtype));
      layer.post_attention_layernorm->weight.set_data(layer.post_attention_layernorm->weight.to(model_dtype));
    }
    if (rec.val_loss.empty()) rec.val_loss.push_back(val_mse(layer, model_dtype));
    rec.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // (3) Save state, then (4) advance the quantized stream through the finalised block.
    meta["blocks_done"] = b + 1;
    meta["records"].push_back({{"block", b}, {"train_loss", rec.train_loss}, {"val_loss", rec.val_loss},
                               {"seconds", rec.seconds}});
    if (!opts.state_dir.empty()) {
      save_block_state(m, b, opts.state_dir, meta);
      load_block_state(m, b, opts.state_dir, opts.spec);  // the in-RAM packed tensors give way to the file's
    }
    if (!opts.log_jsonl.empty()) {
      std::ofstream(opts.log_jsonl, std::ios::app)
          << nlohmann::json({{"phase", "block"}, {"method", opts.method}, {"block", b}, {"train_loss", rec.train_loss},
                             {"val_loss", rec.val_loss}, {"seconds", rec.seconds}, {"peak_rss_mib", peak_rss_mib()},
                             {"skipped_steps", rec.skipped_steps}, {"loss_scale", rec.loss_scale}})
                 .dump()
          << "\n";
    }
    std::fprintf(stderr, "%s: val mse %.4g%s (%.1fs)\n", label.c_str(), rec.val_loss.back(),
                 rec.train_loss.empty() ? "" : str_cat(", train mse ", rec.train_loss.back()).c_str(), rec.seconds);
    res.blocks.push_back(rec);
    if (opts.after_block) opts.after_block(b);
    if (q_stream_read) {
      advance(tr, layer, false);
      advance(va, layer, false);
    }
    release_block_pages(m, b);
  }
  // The teacher's last hidden states at each sample's loss positions (right-padded batches: row j's first T_j).
  auto teacher_rows = [&](const ActivationCache& fp, size_t i, const at::Tensor& positions) {
    at::Tensor h = fp.get(i);  // [B, L, C]
    const int64_t L = h.size(1);
    for (int64_t j = 0; j < h.size(0); ++j)
      res.teacher_hidden.push_back(h[j].narrow(0, 0, L - 1).index({positions[j]}).contiguous());
  };
  if (teacher_is_calib) {
    for (size_t i = 0; i < tr.valid.size(); ++i) teacher_rows(tr.fp, i, calib_loss_positions[i]);
    for (size_t i = 0; i < va.valid.size(); ++i) teacher_rows(va.fp, i, calib_loss_positions[tr.valid.size() + i]);
  }
  for (size_t i = 0; i < te.valid.size(); ++i) teacher_rows(te.fp, i, te.valid[i]);
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  res.ms_per_iteration = iterations > 0 ? 1000.0 * train_seconds / static_cast<double>(iterations) : 0.0;
  res.peak_rss_mib = peak_rss_mib();
  return res;
}

}  // namespace eqat
