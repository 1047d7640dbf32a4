#include "llm/batch_decoder.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>

#include "data/error.h"
#include "data/memory.h"
#include "llm/generate.h"  // kv_cache_bytes

namespace eqat {

BatchDecoder::BatchDecoder(LlamaForCausalLM lm, int64_t max_batch, int64_t capacity, c10::ScalarType dtype,
                           c10::Device device)
    : lm_(std::move(lm)), capacity_(capacity), rows_(static_cast<size_t>(max_batch)) {
  const LlamaConfig& cfg = lm_->config();
  EQAT_CHECK(max_batch >= 1, "the batch size must be >= 1, got ", max_batch);
  EQAT_CHECK(capacity >= 2 && capacity <= cfg.max_position_embeddings, "the context per sequence must be in [2, ",
             cfg.max_position_embeddings, "] (the model's max_position_embeddings), got ", capacity);
  // Dynamic NTK scales RoPE by the sequence's length, which differs per row here.
  EQAT_CHECK(cfg.rope_scaling.type != "dynamic",
             "batched decoding cannot serve dynamic-NTK RoPE (rope_scaling type 'dynamic'): each row would need "
             "its own rotary table");
  if (device.is_cpu())
    check_memory_fits(kv_cache_bytes(cfg, max_batch, capacity, dtype),
                      str_cat("the KV cache for ", max_batch, " sequences x ", capacity, " positions"),
                      "lower the batch size or the context per sequence");
  pool_ = KVCache::create(cfg, max_batch, capacity, dtype, device);
  // Never-written slots are masked, but 0 x uninitialised NaN bits would still be NaN.
  for (size_t l = 0; l < pool_.k.size(); ++l) {
    pool_.k[l].zero_();
    pool_.v[l].zero_();
  }
  key_valid_ = at::zeros({max_batch, capacity}, at::TensorOptions().dtype(at::kBool).device(device));
}

int64_t BatchDecoder::active() const {
  return std::count_if(rows_.begin(), rows_.end(), [](const Row& r) { return r.active; });
}

void BatchDecoder::release(int64_t row) {
  EQAT_ASSERT(row >= 0 && row < max_batch(), "row ", row, " out of range");
  Row& r = rows_[row];
  r.active = false;
  r.sampler.reset();
  key_valid_[row].fill_(false);
}

SequenceToken BatchDecoder::take(int64_t r, const at::Tensor& logits) {
  return take_id(r, rows_[r].sampler->sample(logits).item<int64_t>());
}

SequenceToken BatchDecoder::take_id(int64_t r, int64_t id) {
  Row& row = rows_[r];
  SequenceToken t{r, id, FinishReason::kNone};
  if (std::find(row.opts.stop_ids.begin(), row.opts.stop_ids.end(), id) != row.opts.stop_ids.end()) {
    t.token = -1;
    t.finish = FinishReason::kStop;
  } else {
    row.generated++;
    row.last = id;
    // The token is emitted; feeding it needs one more slot.
    if (row.generated >= row.opts.max_new_tokens || row.length >= capacity_) t.finish = FinishReason::kLength;
  }
  if (t.finish != FinishReason::kNone) release(r);
  return t;
}

SequenceToken BatchDecoder::admit(const at::Tensor& prompt_embeds, const SequenceOptions& opts) {
  c10::NoGradGuard no_grad;
  const int64_t T = prompt_embeds.size(1);
  EQAT_CHECK(prompt_embeds.dim() == 3 && prompt_embeds.size(0) == 1 && T >= 1, "a prompt must be [1, T>=1, C]");
  EQAT_CHECK(T + 1 <= capacity_, "the prompt takes ", T, " positions, which leaves no room for an answer in the ",
             capacity_, " positions a sequence may use");
  int64_t r = 0;
  while (r < max_batch() && rows_[r].active) ++r;
  EQAT_ASSERT(r < max_batch(), "admit() with every row busy");

  // Prefill straight into row r of the pool: a one-row view of it, filled from position 0.
  KVCache view;
  view.capacity = capacity_;
  for (size_t l = 0; l < pool_.k.size(); ++l) {
    view.k.push_back(pool_.k[l].narrow(0, r, 1));
    view.v.push_back(pool_.v[l].narrow(0, r, 1));
  }
  at::Tensor pos = at::arange(T, at::TensorOptions().dtype(at::kLong).device(prompt_embeds.device())).view({1, T});
  at::Tensor logits = lm_->forward(prompt_embeds, pos, at::Tensor(), &view, /*last_only=*/true).select(1, 0);

  Row& row = rows_[r];
  row.active = true;
  row.length = T;
  row.generated = 0;
  row.opts = opts;
  row.sampler = std::make_unique<Sampler>(opts.sampling);
  key_valid_[r].fill_(false);
  key_valid_[r].narrow(0, 0, T).fill_(true);
  if (opts.max_new_tokens <= 0) {
    release(r);
    return {r, -1, FinishReason::kLength};
  }
  return take(r, logits);
}

std::vector<SequenceToken> BatchDecoder::step() {
  c10::NoGradGuard no_grad;
  // Rows [0, n) take part (n: one past the last active row); each attends over keys [0, window).
  int64_t n = 0, window = 0;
  for (int64_t r = 0; r < max_batch(); ++r)
    if (rows_[r].active) n = r + 1, window = std::max(window, rows_[r].length + 1);
  if (n == 0) return {};
  // Free rows inside [0, n) run along (cheaper than gathering the active ones): they feed token 0 at position 0
  // into their own row, whose contents nobody reads before the next admit() overwrites them.
  std::vector<int64_t> ids(n, 0), slot(n, 0);
  for (int64_t r = 0; r < n; ++r)
    if (rows_[r].active) ids[r] = rows_[r].last, slot[r] = rows_[r].length;
  const auto device = key_valid_.device();
  at::Tensor ids_t = at::tensor(ids, at::kLong).to(device).view({n, 1});
  at::Tensor slot_t = at::tensor(slot, at::kLong).to(device);
  at::Tensor valid = key_valid_.narrow(0, 0, n);
  valid.scatter_(1, slot_t.view({n, 1}), true);  // each new position attends to itself (free rows: position 0)

  KVCache view;
  view.capacity = capacity_;
  view.slot = slot_t;
  view.window = window;
  for (size_t l = 0; l < pool_.k.size(); ++l) {
    view.k.push_back(pool_.k[l].narrow(0, 0, n));
    view.v.push_back(pool_.v[l].narrow(0, 0, n));
  }
  at::Tensor mask = valid.narrow(1, 0, window).view({n, 1, 1, window});
  // A row's position id is its own length (no padding), the same number as its slot.
  at::Tensor logits =
      lm_->forward(lm_->embed(ids_t), slot_t.view({n, 1}), mask, &view, /*last_only=*/true).select(1, 0);  // [n,V]

  // Greedy rows (temperature 0) share one argmax over the batch, checked for NaN/inf once; sampling rows draw from
  // their own generators (Sampler checks their logits).
  bool any_greedy = false;
  for (int64_t r = 0; r < n; ++r) any_greedy = any_greedy || (rows_[r].active && rows_[r].opts.sampling.temperature == 0.0);
  std::vector<int64_t> greedy;
  if (any_greedy) {
    at::Tensor f = logits.to(at::kCPU, at::kFloat);
    check_logits_finite(f, logits.scalar_type());
    at::Tensor best = f.argmax(-1).contiguous();
    greedy.assign(best.data_ptr<int64_t>(), best.data_ptr<int64_t>() + n);
  }
  std::vector<SequenceToken> out;
  for (int64_t r = 0; r < n; ++r) {
    if (!rows_[r].active) continue;
    rows_[r].length++;
    out.push_back(rows_[r].opts.sampling.temperature == 0.0 ? take_id(r, greedy[r]) : take(r, logits.narrow(0, r, 1)));
  }
  return out;
}

}  // namespace eqat
