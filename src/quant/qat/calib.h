// Calibration and training data for the quantizers, as decoder-input embeddings.
//   LLaVA: image-text samples from LLaVA instruction JSON (+ image folder), rendered with the vicuna_v1
//          conversation (tokenize_conversation) and run through vision tower + projector + embedding merge, so the
//          cached block inputs contain the image positions.
//   Text:  a .txt file (or .jsonl with a "text" field) tokenized once and cut into windows of seq_len tokens; train
//          windows start in the first 90 % of the token stream, validation windows in the last 10 %
//          (EFFICIENTQAT.md §2.1, adapted to one corpus file).
// Legend: S samples, L seq_len, C n_embd.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "vision/llava.h"

namespace eqat {

struct CalibSample {
  std::vector<int64_t> ids;        // expanded image positions included; ≤ seq_len
  std::vector<uint8_t> is_answer;  // loss mask for instruction data (all 1 for text)
  std::string image;               // image path, empty for text
  // Optional: the sample's decoder inputs [T, C] in the model dtype, already computed (E2E-QP embeds each training
  // sample once instead of running the vision tower every epoch); embed_samples uses them as they are.
  at::Tensor embeds;
};

struct CalibSet {
  std::vector<CalibSample> train, val;
  std::string source;  // description for logs
};

struct CalibOptions {
  int64_t n_train = 4096, n_val = 64, seq_len = 2048;
  uint64_t seed = 2;
};

// instruction_json: LLaVA instruction JSON (list of {id, image, conversations}); images_dir: where `image` paths
// resolve (default: the JSON's directory). Records are drawn in a seeded random order.
CalibSet load_instruction_data(const Model& m, const std::string& instruction_json, const std::string& images_dir,
                               const CalibOptions& opts);
CalibSet load_text_data(const Model& m, const std::string& text_file, const CalibOptions& opts);

// Embeds samples into right-padded decoder inputs: embeds [S, L, C] (model dtype, CPU), valid [S, L] bool,
// answer [S, L] bool (is_answer), ids [S, L] int64 (pads 0). L = the longest sample. A sample with `embeds` set
// is copied from them; the others run embed_prompt (image loaded, vision tower, projector, merge).
struct EmbeddedBatch {
  at::Tensor embeds, valid, answer, ids;
};
EmbeddedBatch embed_samples(Model& m, const std::vector<CalibSample>& samples);

// The loss positions of a batch: [S, L − 1] bool, true at position t when t predicts a valid answer token t + 1
// (every valid token for text). E2E-QP's losses and its distillation targets count exactly these positions.
at::Tensor loss_positions(const EmbeddedBatch& b);
// The number of loss positions of one sample (what loss_positions marks in its row).
int64_t loss_position_count(const CalibSample& s);
// The same sample: tokens, answer mask and image.
bool same_sample(const CalibSample& a, const CalibSample& b);
// Σ tokens of the samples.
int64_t token_count(const std::vector<CalibSample>& samples);

}  // namespace eqat
