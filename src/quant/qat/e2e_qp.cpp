#include "quant/qat/e2e_qp.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <numeric>
#include <random>

#include "data/error.h"
#include "data/fs.h"
#include "data/safetensors.h"
#include "quant/cpu_qgemv.h"
#include "quant/qmatmul.h"
#include "quant/qat/block_ap.h"
#include "quant/qat/block_grad.h"
#include "quant/qat/optim.h"
#include "quant/qat/progress.h"

namespace eqat {

namespace {
// Logits of the final-normed hidden states x [..., C]: lm_head, or the tied embedding.
at::Tensor head_of_normed(Model& m, const at::Tensor& x) {
  return m.lm->lm_head ? m.lm->lm_head->forward(x) : at::linear(x, m.lm->model->embed_tokens->weight);
}

// Logits from the last decoder block's output h [..., C]: the final norm, then the head.
at::Tensor head_logits(Model& m, const at::Tensor& h) { return head_of_normed(m, m.lm->model->norm->forward(h)); }

// The loss summed over a batch's loss positions (`mask`, loss_positions(b)) from their logits [n, V] (see lm_loss).
// per_row: the loss of each position instead, [n] (for validation's per-sample losses; the sum keeps its order).
at::Tensor loss_of_logits(Model& m, const EmbeddedBatch& b, const at::Tensor& mask, const at::Tensor& logits,
                          const at::Tensor& teacher, bool per_row = false) {
  const int64_t L = b.embeds.size(1), n = logits.size(0);
  if (teacher.defined()) {
    EQAT_ASSERT(teacher.size(0) == n, "distillation targets: ", teacher.size(0), " rows for ", n, " loss positions");
    at::Tensor lq = logits.to(at::kFloat).log_softmax(-1);  // [n, V]
    at::Tensor lp;
    {
      c10::NoGradGuard g;
      lp = head_logits(m, teacher.to(m.device, m.dtype)).to(at::kFloat).log_softmax(-1);
    }
    const at::Tensor kl = lp.exp() * (lp - lq);
    return per_row ? kl.sum(-1) : kl.sum();  // Σ_positions KL(p_FP ‖ p_q)
  }
  at::Tensor target = b.ids.narrow(1, 1, L - 1).to(m.device).index({mask});  // [n]
  at::Tensor lp = logits.to(at::kFloat).log_softmax(-1);
  const at::Tensor nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1);  // [n]
  return per_row ? nll : nll.sum();
}

// Loss of one micro-batch, summed over its loss positions (position t predicts ids[t+1] where answer[t+1] and
// valid), with the number of positions. teacher: null for cross-entropy; for distillation, the FP model's last
// hidden states at those positions, [n, C] (the batch's samples' rows, in order). The head runs on the loss
// positions only (an answer is a few tokens of each sample; the head's GEMM and its backward on every position
// were about 5 % of a default-model step).
std::pair<at::Tensor, int64_t> lm_loss(Model& m, const EmbeddedBatch& b, const at::Tensor& teacher = at::Tensor(),
                                       bool per_row = false) {
  const int64_t L = b.embeds.size(1);
  at::Tensor pos = at::arange(L, at::TensorOptions().dtype(at::kLong).device(m.device)).view({1, L});
  at::Tensor h = m.lm->model->forward(b.embeds.to(m.device), pos, at::Tensor(), nullptr);  // [B, L, C], normed
  at::Tensor mask = loss_positions(b).to(m.device);
  const int64_t n = mask.sum().item<int64_t>();
  at::Tensor logits = head_of_normed(m, h.narrow(1, 0, L - 1).index({mask}));  // [n, V]
  return {loss_of_logits(m, b, mask, logits, teacher, per_row), n};
}

// The distillation rows of samples `idx` of the teacher list, concatenated in order (undefined for cross-entropy).
at::Tensor teacher_rows(const E2eOptions& o, const std::vector<size_t>& idx) {
  if (o.loss != "kd") return at::Tensor();
  std::vector<at::Tensor> rows;
  for (size_t i : idx) rows.push_back(o.teacher_hidden->at(i));
  return at::cat(rows);
}

// E2E-QP's step by hand (block_grad.h), where data-parallel training and the weight cache apply: each micro-batch
// runs on all the threads, its samples packed up to their last loss position, through the layers' hand-written
// forward and backward on the cached Ŵᵀ (q/k/v and gate/up stacked); the final norm, the head and the loss go
// through autograd on the loss positions' rows only. dL/ds of a linear = Σ_group (q − z) ⊙ dL/dŴᵀ, as
// PackedLinearFn computes it.
struct HandLayer {
  BlockGradWeights w;
  std::vector<std::shared_ptr<const TrainWeightCache>> caches;  // the 7 linears' (block_linears' order)
};
bool e2e_by_hand_applies(Model& m, bool data_parallel, bool weight_cache) {
  if (!data_parallel || !weight_cache || m.dtype != at::kFloat || !m.device.is_cpu() ||
      !block_grad_cpu_applies(m.cfg.text))
    return false;
  for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
    for (auto& [name, lin] : block_linears(m, b))
      if (!lin->train_cache()) return false;
  return true;
}
// The layers' weights for the current step sizes.
std::vector<HandLayer> hand_layers(Model& m) {
  std::vector<HandLayer> out;
  for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b) {
    HandLayer hl;
    for (auto& [name, lin] : block_linears(m, b)) hl.caches.push_back(lin->train_cache());
    auto wt = [&](size_t k) { return hl.caches[k]->wt; };  // Ŵᵀ [K, N]
    hl.w.qkv = at::cat({wt(0), wt(1), wt(2)}, 1).t();
    hl.w.o = wt(3).t();
    hl.w.gate_up = at::cat({wt(4), wt(5)}, 1).t();
    hl.w.down = wt(6).t();
    auto* layer = m.lm->model->layers[b]->as<LlamaDecoderLayerImpl>();
    hl.w.norm_in = layer->input_layernorm->weight.detach().to(at::kFloat).contiguous();
    hl.w.norm_post = layer->post_attention_layernorm->weight.detach().to(at::kFloat).contiguous();
    out.push_back(std::move(hl));
  }
  return out;
}
// One micro-batch: returns its loss / tokens and adds its dL/ds to grads (per linear of every layer, [G, N]).
double e2e_micro_batch_by_hand(Model& m, const std::vector<HandLayer>& layers, const EmbeddedBatch& b,
                               const at::Tensor& teacher, int64_t tokens, std::vector<at::Tensor>& grads) {
  const int64_t B = b.embeds.size(0), L = b.embeds.size(1), C = m.cfg.text.hidden_size;
  const at::Tensor mask = loss_positions(b).contiguous();  // [B, L − 1]
  std::vector<int64_t> lengths(static_cast<size_t>(B), 0), rows_at;
  int64_t first_loss = L;  // the earliest loss position of any sample
  for (int64_t i = 0; i < B; ++i) {
    const bool* mk = mask.const_data_ptr<bool>() + i * (L - 1);
    for (int64_t t = 0; t < L - 1; ++t)
      if (mk[t]) {
        lengths[static_cast<size_t>(i)] = t + 1;
        first_loss = std::min(first_loss, t);
      }
  }
  // The positions that every sample begins with (the chat template's system prompt: 8 of a default-model sample's
  // ~34) run once (PackedRows::prefix), up to the first loss position, so that the loss rows are each sample's own.
  const at::Tensor embeds = b.embeds.to(at::kFloat).contiguous();
  const int64_t S = shared_prefix({embeds}, lengths, first_loss);
  const PackedRows pk = pack_rows(lengths, S);
  auto segment = [S](int64_t i) { return static_cast<size_t>(S > 0 ? i + 1 : i); };  // sample i's
  for (int64_t i = 0; i < B; ++i) {
    const bool* mk = mask.const_data_ptr<bool>() + i * (L - 1);
    for (int64_t t = 0; t < L - 1; ++t)
      if (mk[t]) rows_at.push_back(pk.off[segment(i)] + t - S);
  }
  if (rows_at.empty()) return 0.0;
  at::Tensor x = at::empty({pk.rows, C}, at::kFloat);
  if (S > 0) {  // the same bytes in every sample that runs
    const int64_t i0 = std::find_if(lengths.begin(), lengths.end(), [](int64_t n) { return n > 0; }) - lengths.begin();
    x.narrow(0, 0, S).copy_(embeds[i0].narrow(0, 0, S));
  }
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = pk.len[segment(i)];
    if (n > 0) x.narrow(0, pk.off[segment(i)], n).copy_(embeds[i].narrow(0, S, n));
  }
  auto [cos, sin] = m.lm->model->rotary().cos_sin(at::arange(L, at::kLong).view({1, L}), at::kFloat, L);
  cos = cos[0].contiguous(), sin = sin[0].contiguous();
  // The last layer computes its output on the loss rows only (PackedRows::out): the others are its keys and values.
  PackedRows pk_last = pk;
  pk_last.out = rows_at;
  auto pk_of = [&](size_t l) -> const PackedRows& { return l + 1 == layers.size() ? pk_last : pk; };
  std::vector<BlockTape> tapes(layers.size());
  for (size_t l = 0; l < layers.size(); ++l)
    x = block_forward_cpu(m.cfg.text, layers[l].w, pk_of(l), x, cos, sin, &tapes[l]);
  at::Tensor h = x.requires_grad_(true);  // [loss rows, C]
  at::Tensor loss;
  {
    c10::AutoGradMode on(true);
    loss = loss_of_logits(m, b, mask, head_logits(m, h), teacher) / static_cast<double>(std::max<int64_t>(1, tokens));
  }
  at::Tensor dx = torch::autograd::grad({loss}, {h})[0].contiguous();
  const double lv = loss.item<double>();
  for (size_t l = layers.size(); l-- > 0;) {
    BlockGradsT g = block_backward_cpu(m.cfg.text, layers[l].w, pk_of(l), tapes[l], dx, cos, sin, l > 0);
    tapes[l] = BlockTape();
    const at::Tensor* stacks[] = {&g.qkv, &g.o, &g.gate_up, &g.down};
    // Item i: linear i % 7, its part i / 7 of the groups, so that each thread's share holds a part of every linear.
    const int64_t parts = std::max<int64_t>(1, at::get_num_threads());
    parallel_items(7 * parts, [&](int64_t i) {
      const int64_t k = i % 7, part = i / 7;
      const auto& cache = *layers[l].caches[static_cast<size_t>(k)];
      const at::Tensor& stack = *stacks[kLinearStack[k]];
      const int64_t c0 =  // the linear's first column in its stack
          stack_offset(static_cast<size_t>(k), [&](size_t j) { return layers[l].caches[j]->qmz.size(1); });
      at::Tensor& gs = grads[l * 7 + static_cast<size_t>(k)];
      const int64_t K = cache.qmz.size(0), N = cache.qmz.size(1), G = gs.size(0), gsz = K / G, ld = stack.size(1);
      const float *q = cache.qmz.const_data_ptr<float>(), *dw = stack.const_data_ptr<float>() + c0;
      float* out = gs.data_ptr<float>();
      for (int64_t gi = G * part / parts; gi < G * (part + 1) / parts; ++gi)
        for (int64_t r = gi * gsz; r < (gi + 1) * gsz; ++r)
          for (int64_t n = 0; n < N; ++n) out[gi * N + n] += q[r * N + n] * dw[r * ld + n];
    });
    if (l > 0) dx = g.dx;
  }
  return lv;
}
}  // namespace

MicroBatchPlan plan_micro_batches(const std::vector<int64_t>& lengths, int64_t micro_batch, int64_t parts) {
  EQAT_ASSERT(micro_batch > 0 && parts > 0, "plan_micro_batches: micro_batch and parts must be positive");
  std::vector<size_t> by_length(lengths.size());
  std::iota(by_length.begin(), by_length.end(), 0);
  std::stable_sort(by_length.begin(), by_length.end(), [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
  MicroBatchPlan plan;
  std::vector<int64_t> cost;  // padded tokens: the micro-batch's size times its longest (first) sample
  for (size_t i = 0; i < by_length.size(); i += static_cast<size_t>(micro_batch)) {
    const size_t end = std::min(by_length.size(), i + static_cast<size_t>(micro_batch));
    plan.micro.emplace_back(by_length.begin() + static_cast<std::ptrdiff_t>(i),
                            by_length.begin() + static_cast<std::ptrdiff_t>(end));
    cost.push_back(static_cast<int64_t>(end - i) * lengths[by_length[i]]);
  }
  plan.runs.resize(static_cast<size_t>(parts));
  std::vector<int64_t> load(static_cast<size_t>(parts), 0);
  for (size_t a = 0; a < plan.micro.size(); ++a) {
    const size_t p = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    plan.runs[p].push_back(a);
    load[p] += cost[a];
  }
  return plan;
}

bool e2e_embeds_cached(const Model& m, const CalibSet& data) {
  const int64_t tokens = token_count(data.train) + token_count(data.val);
  return tokens * m.cfg.text.hidden_size * static_cast<int64_t>(c10::elementSize(m.dtype)) <= kE2eEmbedCacheBytes;
}

bool worse_on_validation(const ValLoss& before, const ValLoss& now, int64_t* worse, int64_t* better) {
  EQAT_ASSERT(before.per_sample.size() == now.per_sample.size(), "worse_on_validation: ", before.per_sample.size(),
              " samples against ", now.per_sample.size());
  int64_t w = 0, b = 0;
  for (size_t i = 0; i < now.per_sample.size(); ++i) {
    w += now.per_sample[i] > before.per_sample[i];
    b += now.per_sample[i] < before.per_sample[i];
  }
  if (worse) *worse = w;
  if (better) *better = b;
  return now.mean > before.mean && w > b;
}

E2eResult run_e2e_qp(Model& m, const CalibSet& data, const E2eOptions& opts) {
  const ExactCpuActivations exact;  // training forward in fp32 activations (the CPU kernels' int8 path is serving's)
  EQAT_CHECK(opts.micro_batch > 0 && opts.global_batch >= opts.micro_batch && opts.global_batch % opts.micro_batch == 0,
             "--e2e-batch must be a multiple of --e2e-micro-batch (got ", opts.global_batch, " and ",
             opts.micro_batch, ")");
  EQAT_CHECK(opts.loss == "ce" || opts.loss == "kd", "--e2e-loss: unknown '", opts.loss, "' (ce or kd)");
  EQAT_ASSERT(opts.loss != "kd" || (opts.teacher_hidden && opts.teacher_hidden->size() == data.train.size() +
                                                                                          data.val.size()),
              "E2E-QP distillation needs the FP model's hidden states of every train and val sample");
  // The samples' decoder inputs (train and val), computed once when they fit kE2eEmbedCacheBytes: every epoch
  // would otherwise load each image and run the vision tower and projector again (18 % of a default-model step).
  // Samples that arrive embedded keep theirs: run_quantize hands over the ones Block-AP computed for its stream, so
  // the default run embeds each sample once. Larger sets (a 7B's long LLaVA samples: about 5 MB each) are embedded
  // per step, as before. The values are the same either way.
  std::vector<CalibSample> cached_train, cached_val;
  if (e2e_embeds_cached(m, data)) {
    cached_train = data.train;
    cached_val = data.val;
    for (auto* set : {&cached_train, &cached_val})
      for (auto& s : *set)
        if (!s.embeds.defined()) s.embeds = embed_samples(m, {s}).embeds[0];
  }
  const std::vector<CalibSample>& train = cached_train.empty() ? data.train : cached_train;
  const std::vector<CalibSample>& val = cached_val.empty() ? data.val : cached_val;
  const bool data_parallel = data_parallel_training(m);
  std::vector<at::Tensor> scales;
  // Block-AP's step sizes, kept in case training raises the validation loss (restored at the end, see below), in
  // their stored dtype (fp16 in a packed model: half the bytes of the fp32 masters, and exact). Without validation
  // samples there is nothing to judge by, so nothing is kept.
  std::vector<at::Tensor> start_scales;
  int bits = 0;
  std::vector<QuantLinear> linears;  // for the training cache below
  int64_t cache_bytes = 0;
  for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
    for (auto& [name, lin] : block_linears(m, b)) {
      EQAT_CHECK(lin->mode() == LinearMode::kPacked, "E2E-QP needs a packed model (run Block-AP first or load a ",
                 "quantized checkpoint); layer ", b, " ", name, " is not packed");
      if (!data.val.empty()) start_scales.push_back(lin->scales.detach().clone());
      lin->scales.set_data(lin->scales.to(at::kFloat));  // fp32 master (P8)
      lin->scales.set_requires_grad(true);
      scales.push_back(lin->scales);
      bits = lin->spec().bits;
      cache_bytes += 8 * lin->in_features() * lin->out_features();
      linears.push_back(lin);
    }
  // The training cache, where the model is small enough (kE2eWeightCacheBytes); dropped again before returning.
  const bool weight_cache = m.device.is_cpu() && cache_bytes <= kE2eWeightCacheBytes;
  struct CacheOff {
    std::vector<QuantLinear>& lins;
    ~CacheOff() {
      for (auto& l : lins) l->set_train_cache(false);
    }
  } cache_off{linears};
  if (weight_cache)
    for (auto& l : linears) l->set_train_cache(true);
  const double lr = opts.lr >= 0 ? opts.lr : (bits == 2 ? 2e-5 : 1e-5);
  const int64_t n = static_cast<int64_t>(data.train.size());
  EQAT_CHECK(n > 0, "E2E-QP: no training samples in ", data.source.empty() ? "the calibration data" : data.source);
  // A step reads global_batch distinct samples of one epoch's permutation. With fewer samples than that, the batch
  // shrinks to what the data holds (whole micro-batches; one micro-batch of all samples when even that is too
  // many) instead of reading past the permutation.
  int64_t micro_batch = opts.micro_batch, global_batch = opts.global_batch;
  if (n < global_batch) {
    micro_batch = std::min(micro_batch, n);
    global_batch = n / micro_batch * micro_batch;
    std::fprintf(stderr, "warning: E2E-QP: %lld training samples are fewer than the batch of %lld; using a batch of "
                 "%lld (micro-batch %lld)\n", static_cast<long long>(n), static_cast<long long>(opts.global_batch),
                 static_cast<long long>(global_batch), static_cast<long long>(micro_batch));
  }
  const int64_t accum = global_batch / micro_batch;
  const int64_t steps_per_epoch = n / global_batch;  // >= 1: global_batch <= n
  int64_t total = steps_per_epoch * opts.epochs;
  if (opts.max_steps > 0) total = std::min(total, opts.max_steps);
  AdamW opt({ParamGroup{"scales", scales, lr, 0.0}});

  std::vector<int64_t> val_lengths;
  for (const auto& v : val) val_lengths.push_back(static_cast<int64_t>(v.ids.size()));
  const MicroBatchPlan val_plan = plan_micro_batches(val_lengths, opts.micro_batch, 1);
  const int64_t parts = data_parallel ? std::min<int64_t>(accum, at::get_num_threads()) : 1;
  const bool by_hand = opts.by_hand && e2e_by_hand_applies(m, data_parallel, weight_cache);
  const KeepFreedMemory keep_freed(by_hand);  // the steps' tapes, allocated and freed every step
  // The validation loss: the mean over all loss positions, and each sample's own mean (ValLoss).
  auto val_loss = [&]() {
    c10::NoGradGuard g;
    ValLoss out;
    out.per_sample.assign(val.size(), 0.0);
    double sum = 0;
    int64_t cnt = 0;
    for (const auto& positions : val_plan.micro) {
      std::vector<CalibSample> mb;
      std::vector<size_t> idx;
      for (size_t j : positions) {
        mb.push_back(val[j]);
        idx.push_back(data.train.size() + j);
      }
      const EmbeddedBatch eb = embed_samples(m, mb);
      auto [rows, c] = lm_loss(m, eb, teacher_rows(opts, idx), true);
      const at::Tensor r = rows.to(at::kCPU, at::kDouble).contiguous();
      // each sample's loss positions, whose rows come in sample order
      const at::Tensor per = loss_positions(eb).sum(1).to(at::kCPU, at::kLong).contiguous();
      const double* rp = r.const_data_ptr<double>();
      const int64_t* np = per.const_data_ptr<int64_t>();
      for (size_t a = 0, row = 0; a < positions.size(); ++a) {
        const int64_t n = np[a];
        double own = 0;
        for (int64_t t = 0; t < n; ++t) own += rp[row++];
        sum += own;
        out.per_sample[positions[a]] = n > 0 ? own / static_cast<double>(n) : 0.0;
      }
      cnt += c;
    }
    out.mean = cnt > 0 ? sum / static_cast<double>(cnt) : 0.0;
    return out;
  };
  // Block-AP's validation loss, measured before a resumed run loads its saved step sizes: the end's comparison
  // (and the early check) is against where E2E-QP started, on a resumed run as on an uninterrupted one.
  E2eResult res;
  const ValLoss before = val_loss();
  res.val_loss_before = before.mean;
  ValLoss at_check;
  int64_t start_step = 0;
  const std::string state_file = opts.state_dir.empty() ? "" : path_join(opts.state_dir, "e2e_state.safetensors");
  if (opts.resume && !state_file.empty() && file_exists(state_file)) {
    Checkpoint ck = Checkpoint::open(state_file);
    std::map<std::string, at::Tensor> st;
    for (const auto& k : ck.names()) st[k] = ck.get(k).clone();
    c10::NoGradGuard g;
    for (size_t i = 0; i < scales.size(); ++i) {
      auto it = st.find("scale." + std::to_string(i));
      EQAT_CHECK(it != st.end() && it->second.sizes() == scales[i].sizes(), state_file, ": tensor 'scale.", i,
                 "' is missing or has the wrong shape; the state is from another model or quantization (delete it ",
                 "to start over)");
      scales[i].copy_(it->second);
    }
    opt.load_state(st);
    start_step = opt.steps();
    auto losses = st.find("step_loss");
    EQAT_CHECK(losses == st.end() || losses->second.scalar_type() == at::kDouble, state_file,
               ": 'step_loss' must be float64");
    if (losses != st.end())
      res.step_loss.assign(losses->second.data_ptr<double>(), losses->second.data_ptr<double>() + losses->second.numel());
    std::fprintf(stderr, "resuming E2E-QP at step %lld of %lld\n", static_cast<long long>(start_step),
                 static_cast<long long>(total));
  }
  auto save_state = [&]() {
    if (state_file.empty()) return;
    std::vector<std::pair<std::string, at::Tensor>> t = opt.state();
    for (size_t i = 0; i < scales.size(); ++i) t.emplace_back("scale." + std::to_string(i), scales[i].detach().cpu());
    t.emplace_back("step_loss", at::tensor(res.step_loss, at::kDouble));
    write_safetensors(state_file, t);
  };

  // Sample order: a seeded permutation per epoch (deterministic, so a resumed run sees the same batches).
  auto order_for_epoch = [&](int64_t ep) {
    std::vector<size_t> o(static_cast<size_t>(n));
    std::iota(o.begin(), o.end(), 0);
    std::mt19937_64 rng(opts.seed + static_cast<uint64_t>(ep));
    for (size_t i = o.size(); i > 1; --i) std::swap(o[i - 1], o[rng() % i]);
    return o;
  };
  // The early check: once, after early_check of the steps, validation is measured; worse than where E2E-QP started
  // (worse_on_validation), training stops there and Block-AP's step sizes are restored (the end's rule, applied
  // sooner). Under the mean-only rule of the time, on the default VLM at 3 and 4 bits, E2E-QP ended above its start
  // in 3 of 6 runs (calibration seeds 2, 3, 4), and in each of those the check after the first quarter, where the
  // cosine rate is highest, already showed it; the other 3 were below at the check and at the end
  // (models/SOURCES.md). A resumed run that saved its state at the check repeats it (same step sizes, same loss), so
  // it decides alike.
  int64_t check_at =
      opts.early_check > 0 && !val.empty()
          ? std::max<int64_t>(1, static_cast<int64_t>(std::floor(opts.early_check * static_cast<double>(total))))
          : -1;
  if (check_at >= total) check_at = -1;  // no step left after it
  bool stopped = false;
  int64_t step = start_step;
  Progress bar("E2E-QP", total, opts.progress);
  auto t0 = std::chrono::steady_clock::now();
  for (; step < total; ++step) {
    if (step == check_at) {
      at_check = val_loss();
      res.val_loss_check = at_check.mean;
      res.check_step = step;
      const bool worse = worse_on_validation(before, at_check, &res.val_worse, &res.val_better);
      if (!opts.log_jsonl.empty())
        std::ofstream(opts.log_jsonl, std::ios::app)
            << nlohmann::json({{"phase", "e2e"}, {"check_step", step}, {"val_loss", res.val_loss_check},
                               {"val_loss_before", res.val_loss_before}, {"val_samples_worse", res.val_worse},
                               {"val_samples_better", res.val_better}})
                   .dump()
            << "\n";
      if (worse) {
        stopped = true;
        break;
      }
    }
    const int64_t ep = step / steps_per_epoch, in_ep = step % steps_per_epoch;
    const std::vector<size_t> order = order_for_epoch(ep);
    // The step's samples, in micro-batches of similar length (plan_micro_batches). First pass: the loss tokens of
    // the whole global batch, so that accumulation averages over tokens.
    std::vector<size_t> batch(static_cast<size_t>(global_batch));
    std::vector<int64_t> lengths;
    for (size_t j = 0; j < batch.size(); ++j) {
      batch[j] = order.at(static_cast<size_t>(in_ep * global_batch) + j);
      lengths.push_back(static_cast<int64_t>(train[batch[j]].ids.size()));
    }
    int64_t step_micro = micro_batch;
    if (by_hand) {  // kE2eHandPassBytes
      const int64_t budget = opts.hand_pass_bytes >= 0 ? opts.hand_pass_bytes : kE2eHandPassBytes;
      std::vector<int64_t> longest = lengths;
      std::sort(longest.begin(), longest.end(), std::greater<>());
      for (int64_t k = global_batch; k > micro_batch; k /= 2) {
        const std::vector<int64_t> first(longest.begin(), longest.begin() + k);
        if (m.cfg.text.num_hidden_layers * block_tape_bytes(m.cfg.text, first) <= budget) {
          step_micro = k;
          break;
        }
      }
    }
    const MicroBatchPlan plan = plan_micro_batches(lengths, step_micro, parts);
    std::vector<EmbeddedBatch> micro;
    std::vector<at::Tensor> teachers;
    int64_t tokens = 0;
    for (const auto& positions : plan.micro) {
      std::vector<CalibSample> mb;
      std::vector<size_t> idx;
      for (size_t j : positions) {
        idx.push_back(batch[j]);
        mb.push_back(train[idx.back()]);
      }
      micro.push_back(embed_samples(m, mb));
      teachers.push_back(teacher_rows(opts, idx));
      tokens += loss_positions(micro.back()).sum().item<int64_t>();
    }
    double step_loss = 0;
    if (by_hand) {
      const std::vector<HandLayer> layers = hand_layers(m);
      std::vector<at::Tensor> grads;
      for (const auto& sc : scales) grads.push_back(at::zeros(sc.sizes(), at::kFloat));
      for (size_t a = 0; a < micro.size(); ++a) {
        step_loss += e2e_micro_batch_by_hand(m, layers, micro[a], teachers[a], tokens, grads);
        res.pass_samples = std::max<int64_t>(res.pass_samples, micro[a].embeds.size(0));
      }
      for (size_t k = 0; k < scales.size(); ++k) scales[k].mutable_grad() = grads[k];
    } else if (parts == 1) {
      for (size_t a : plan.runs[0]) {
        auto [s, c] = lm_loss(m, micro[a], teachers[a]);
        at::Tensor loss = s / static_cast<double>(std::max<int64_t>(1, tokens));
        loss.backward();
        step_loss += loss.item<double>();
      }
    } else {
      // The micro-batches split over the threads as the plan deals them, each thread accumulating its own
      // gradients in order; the threads' gradients and losses are then summed in thread order.
      std::vector<double> part_loss(parts, 0.0);
      std::vector<std::vector<at::Tensor>> part_grads(parts);
      parallel_items(parts, [&](int64_t p) {
        for (size_t a : plan.runs[static_cast<size_t>(p)]) {
          auto [s, c] = lm_loss(m, micro[a], teachers[a]);
          at::Tensor loss = s / static_cast<double>(std::max<int64_t>(1, tokens));
          part_loss[p] += loss.item<double>();
          std::vector<at::Tensor> g = torch::autograd::grad({loss}, scales, {}, false, false, true);
          c10::NoGradGuard ng;
          auto& acc = part_grads[p];
          if (acc.empty()) acc.resize(g.size());
          for (size_t k = 0; k < g.size(); ++k)
            if (g[k].defined()) acc[k] = acc[k].defined() ? acc[k].add_(g[k]) : g[k];
        }
      });
      c10::NoGradGuard ng;
      for (int64_t p = 0; p < parts; ++p) {
        step_loss += part_loss[p];
        for (size_t k = 0; k < part_grads[p].size(); ++k) {
          const at::Tensor& g = part_grads[p][k];
          if (!g.defined()) continue;
          if (scales[k].grad().defined()) scales[k].mutable_grad().add_(g);
          else scales[k].mutable_grad() = g;
        }
      }
    }
    EQAT_CHECK(std::isfinite(step_loss), "E2E-QP: non-finite loss at step ", step, " (try a lower --e2e-lr)");
    if (opts.on_gradients) {
      std::vector<at::Tensor> g;
      for (const auto& sc : scales) g.push_back(sc.grad().defined() ? sc.grad().clone() : at::zeros_like(sc));
      opts.on_gradients(g);
    }
    clip_grad_norm(scales, opts.max_grad_norm);
    opt.groups()[0].lr = warmup_cosine_lr(lr, opts.warmup_ratio, step, total);
    opt.step();
    opt.zero_grad();
    res.step_loss.push_back(step_loss);
    bar.update(step + 1, str_cat("loss ", step_loss, " lr ", opt.groups()[0].lr));
    if (!opts.log_jsonl.empty())
      std::ofstream(opts.log_jsonl, std::ios::app)
          << nlohmann::json({{"phase", "e2e"}, {"step", step}, {"loss", step_loss}, {"lr", opt.groups()[0].lr}}).dump()
          << "\n";
    if (opts.save_every > 0 && (step + 1) % opts.save_every == 0) save_state();
    if (opts.on_step) opts.on_step(step + 1);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bar.finish();
  save_state();
  // Measured as val_loss_before was: while the step sizes still require grad, the packed linears run the training
  // forward (the fp32 masters exactly, each layer's integers dropped from RSS after use). The serving kernels would
  // round the masters to fp16, so the two losses would not be comparable, and leave every layer's integers resident:
  // the 13B at W2g64 peaked at 9.4 GiB here, 3.2 GB of it the integers paged back in for this one loss.
  const ValLoss after = stopped ? at_check : val_loss();
  res.val_loss_after = after.mean;
  for (auto& s : scales) s.set_requires_grad(false);
  res.steps = step;
  res.stopped_early = stopped;
  res.weight_cache = weight_cache;
  res.by_hand = by_hand;
  res.seconds = secs;
  res.ms_per_step = step > start_step ? 1000.0 * secs / static_cast<double>(step - start_step) : 0.0;
  // Early stopping at its coarsest: step sizes that ended worse on validation than Block-AP's (worse_on_validation)
  // are not kept (measured: W3g128 with a 1e-4 lr doubled the distillation KL). Needs validation samples to judge.
  // Keeping the early check's step sizes where they validated better than the end's was tried and lost on the 1000
  // test questions (W2g64, 4096 samples, seed 2: answer KL 2.31e-4 against the end's 1.84e-4, the end lower on 574
  // of 1000; models/SOURCES.md, issue 18).
  if (!data.val.empty() && worse_on_validation(before, after, &res.val_worse, &res.val_better)) {
    c10::NoGradGuard g;
    for (size_t i = 0; i < scales.size(); ++i) scales[i].copy_(start_scales[i]);
    res.reverted = true;
    std::fprintf(stderr,
                 "E2E-QP raised the validation loss (%.4g -> %.4g, worse on %lld of %zu samples%s); keeping Block-AP's "
                 "step sizes\n",
                 res.val_loss_before, res.val_loss_after, static_cast<long long>(res.val_worse),
                 before.per_sample.size(),
                 stopped ? str_cat(" after ", step, " of ", total, " steps: stopped there").c_str() : "");
  }
  res.peak_rss_mib = peak_rss_mib();
  return res;
}

}  // namespace eqat
