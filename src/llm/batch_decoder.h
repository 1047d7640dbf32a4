// Continuous batching over a LlamaForCausalLM (iteration-level scheduling, as in Orca and vLLM): a pool of
// `max_batch` KV-cache rows. A sequence is admitted into a free row with its own prefill; every step() then advances
// all active rows by one token in one forward; a row that finishes (stop id, its token budget, or a full row) or is
// released frees its row for the next sequence at once, while the others go on.
//
// Each row keeps its own length and positions (no padding): a step writes row b's key/value at its own slot
// (KVCache::slot [B]) and attends over keys [0, longest row + 1) under a per-row key-validity mask. Masked keys
// contribute exact zeros, so a row's logits do not depend on which other rows share the step, up to the rounding of
// a matmul over a different batch size (greedy answers are checked equal to one-by-one runs in the tests).
//
// Not thread-safe: one thread owns a BatchDecoder (the server's engine thread).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "llm/llama.h"
#include "llm/sampler.h"

namespace eqat {

struct SequenceOptions {
  int64_t max_new_tokens = 128;    // tokens to generate at most (the stop id is not counted)
  SamplingOptions sampling;        // each sequence samples with its own seeded generator
  std::vector<int64_t> stop_ids;   // the sequence ends after sampling one of these (not emitted)
};

enum class FinishReason { kNone, kStop, kLength };  // kLength: token budget or the row's capacity reached

struct SequenceToken {
  int64_t row = -1;
  int64_t token = -1;  // -1 when the sequence ended on a stop id
  FinishReason finish = FinishReason::kNone;  // the row is free again when this is not kNone
};

class BatchDecoder {
 public:
  // `capacity`: positions per row (prompt + generated), at most the model's context. The pool (every row's keys and
  // values) is allocated here, in `dtype` on `device`; InputError when it does not fit in free memory.
  BatchDecoder(LlamaForCausalLM lm, int64_t max_batch, int64_t capacity, c10::ScalarType dtype, c10::Device device);

  int64_t max_batch() const { return static_cast<int64_t>(rows_.size()); }
  int64_t capacity() const { return capacity_; }
  int64_t active() const;
  bool has_free_row() const { return active() < max_batch(); }
  int64_t row_length(int64_t row) const { return rows_.at(row).length; }

  // Prefills prompt_embeds [1,T,C] (T >= 1) into a free row and samples its first token, which may already finish
  // it. InputError when T + 1 > capacity (no room for a generated token); logic_error when no row is free.
  SequenceToken admit(const at::Tensor& prompt_embeds, const SequenceOptions& opts);
  // One decode step for every active row; returns one entry per row that was active. Empty when none is.
  std::vector<SequenceToken> step();
  // Frees a row whatever its state (a cancelled request). Releasing a free row is a no-op.
  void release(int64_t row);

 private:
  struct Row {
    bool active = false;
    int64_t length = 0;     // positions in the cache (prompt + fed tokens)
    int64_t last = -1;      // the token to feed next
    int64_t generated = 0;  // tokens emitted
    SequenceOptions opts;
    std::unique_ptr<Sampler> sampler;
  };
  // Samples row r's next token from logits [1,V] and updates its state.
  SequenceToken take(int64_t r, const at::Tensor& logits);
  SequenceToken take_id(int64_t r, int64_t id);  // row r emits (or stops on) `id`

  LlamaForCausalLM lm_;
  int64_t capacity_;
  KVCache pool_;          // [max_batch, Hkv, capacity, D] per layer
  at::Tensor key_valid_;  // [max_batch, capacity] bool on the device: positions each row has written
  std::vector<Row> rows_;
};

}  // namespace eqat
