// Trains the embedded default model (issue 3): a toy-scale LLaVA-1.5 (CLIP-style ViT, mlp2x_gelu projector,
// Llama decoder) from scratch on the procedural "shapes" world, on the CPU, with LLaVA's staged recipe:
//   tokenizer  SentencePiece BPE trained on the world's text (+ the vicuna_v1 system prompt), byte fallback,
//              Llama-2 settings; <image> and <pad> as added tokens.
//   stage 0    stands in for CLIP pre-training: the ViT alone learns per-grid-cell classification (shape, colour,
//              the joint shape-colour pair and the joint cell-shape-colour triple) through a throwaway linear head
//              on hidden_states[vision_feature_layer].
//   stage 1    projector + decoder (the ViT frozen by default, or at a lower rate) on single-turn questions in
//              the llava-1.5 template, several per image packed into one row (shapes_qa_batch), loss on the
//              answers only, every question weighted equally (LLaVA's instruction tuning).
//   stage 2    a warm restart of stage 1 at a lower peak rate on fresh images, with more questions of the
//              multi-hop families (multiple choice, position, adversarial existence) and the answer-format line
//              dropped from some questions, so the model also answers in format when a user leaves it out.
//   stage 3    another warm restart whose multiple-choice distractors are mostly the other objects' colours
//              (shapes): after stage 2 the model answered choice questions by "which option is in the image?",
//              right whenever no distractor was present and at or below chance when two were.
// AdamW, linear warm-up + cosine decay per stage, gradient clipping. Training images are generated on the fly
// from (seed, index) — cheap in C++, and never repeated, so nothing to memorise. Everything derives from the
// seed; checkpoints (fp32 weights + optimizer state) are written atomically every 100 steps and
// --resume continues bit-identically. Output: an HF llava directory (fp16 safetensors, config.json, tokenizer,
// preprocessor_config.json) that load_model() reads, plus train_log.jsonl and loss.png.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "data/config.h"
#include "data/image.h"
#include "data/shapes.h"
#include "data/tokenizer.h"
#include "vision/llava.h"

namespace eqat {

// A stage-1 batch: every question about an image is its own single-turn llava-1.5 prompt, and an image's
// questions share one row (the common prefix computed once, turns masked from each other, single-turn position
// ids), so each turn's logits equal those of its unpacked prompt. `images` images from index `start` of the
// training stream of `seed`, up to mix.per_family[f] questions of family f per image; each short-answer or
// multiple-choice question loses its answer-format line with probability mix.drop_format (a deterministic draw
// from seed, image index and turn).
struct ShapesQAMix {
  std::array<int, 7> per_family{};  // ShapesFamily order; 0 leaves the family out
  double drop_format = 0.0;
  double hard_choice = 0.0;  // shapes_sample's hard multiple-choice distractors
  // Training-only rewrites (src/data/shapes.h), each drawn per question from its own stream: the probability that
  // a choice question with its letter line asks for the option's text (shapes_choice_by_word), that a choice
  // question keeps 2 or 3 of its 4 options (shapes_choice_fewer_options), and that a colour, shape or choice
  // question reads "... in the image?" (shapes_in_the_image). They vary where the asked object's name sits
  // relative to the prompt's end, so that finding it by distance stops working.
  double choice_by_word = 0.0, fewer_options = 0.0, in_the_image = 0.0;
  // Training-only row/column questions per image (shapes_locate_questions, their own stream), after the others:
  // the find-and-read-off-the-cell step that position questions need, supervised on its own.
  int locate = 0;
  // Training-only position questions per image about pairs that share a colour or a shape
  // (shapes_confusable_position_questions, their own stream), after the locate questions.
  int confusable_position = 0;
  static ShapesQAMix uniform(int per_family) {
    ShapesQAMix m;
    m.per_family.fill(per_family);
    return m;
  }
};

struct TinyTrainOptions {
  std::string out;         // output directory (model files + checkpoint/ + logs)
  uint64_t seed = 1;       // training images, init and tokenizer corpus all derive from it
  bool resume = false;     // continue from out/checkpoint
  bool overwrite = false;  // start over in an earlier train-tiny output (otherwise it is refused without resume)
  int64_t threads = 2;
  bool progress = true;    // progress bar on stderr
  // Model (LLaVA-1.5 layout at toy scale).
  int64_t image_size = kShapesImageSize, patch_size = 32;  // 3×3 = 9 image tokens, one per grid cell
  int64_t vit_dim = 128, vit_layers = 4, vit_heads = 4, vit_ff = 512;  // the last layer is unused (feature -2)
  int64_t dim = 256, layers = 3, heads = 4, kv_heads = 4, ff = 512;  // 256, 512: multiples of 128 (W4g128)
  int64_t sp_vocab = 1024;  // SentencePiece pieces (≤ 1024); <image> and <pad> follow
  bool option_pieces = true;  // each multiple-choice option text ("A. red") one piece (train_tokenizer)
  // Stage 0: ViT per-cell classification.
  int64_t stage0_steps = 2000, stage0_batch = 64;
  double stage0_lr = 3e-3;
  // Stage 1: QA instruction tuning (batch = images, each with its questions packed as single-turn prompts).
  int64_t stage1_steps = 4000, stage1_batch = 32;
  int64_t questions_per_family = 2;  // distinct questions per family and image, packed as single-turn prompts
  double stage1_lr = 2e-3, vit_lr_scale = 0.0;  // 0: the ViT stays frozen in stages 1 and 2 (as in LLaVA)
  // Stages 2 and 3: warm restarts on fresh images (their own image ranges), each with its question mix (per-family
  // caps in ShapesFamily order: colour, shape, count, exists, position, choice, describe; dropped answer-format
  // lines; hard multiple-choice distractors; the training-only rewrites).
  struct Restart {
    int64_t steps = 0;
    double lr = 0;
    ShapesQAMix mix;
  };
  Restart stage2{2500, 6e-4, {{1, 1, 2, 3, 3, 4, 1}, 0.25, 0.0}};
  Restart stage3{1500, 5e-4, {{1, 1, 1, 3, 3, 4, 1}, 0.25, 0.75}};
  // Decoder layers appended when stage 3 starts (LLaMA-Pro's block expansion): copies of the last layer with
  // o_proj and down_proj zeroed, so the grown model computes exactly what it did and the new layers start from
  // the identity. The exported model has layers + stage3_grow_layers decoder layers.
  int64_t stage3_grow_layers = 1;
  double weight_decay = 0.01, clip = 1.0;
  int64_t warmup = 100;
  // Bookkeeping.
  int64_t eval_every = 300, eval_questions = 140;  // held-out greedy exact match during stage 1
  int64_t checkpoint_every = 100;
  int64_t final_eval_questions = 0;  // > 0: evaluate that many standard-split questions at the end
  int64_t max_steps = -1;            // stop (after a checkpoint) at this global step; for tests and resume
};

struct ShapesQABatch {
  at::Tensor pixels, ids, positions, mask;  // [B,3,S,S], [B,T], [B,T], [B,1,T,T] bool (true = attend)
  at::Tensor targets, weights;               // [B,T]: the next token of the same turn (-100: none), loss weight
  int64_t tokens = 0, turns = 0;             // non-pad tokens, questions
};
ShapesQABatch shapes_qa_batch(uint64_t seed, int64_t start, int64_t images, const ShapesQAMix& mix, const Tokenizer& tok,
                              const ModelConfig& cfg, const ImageProcessorConfig& ipc);
// Training image `index` with the questions shapes_qa_batch packs for it under `mix`, in row order.
ShapesSample shapes_qa_sample(uint64_t seed, int64_t index, const ShapesQAMix& mix);
at::Tensor shapes_qa_logits(LlavaForConditionalGeneration& model, const ShapesQABatch& batch);  // [B,T,V]
// The stage-1 loss: the mean over the batch's questions of each question's mean answer-token cross-entropy.
at::Tensor shapes_qa_loss(LlavaForConditionalGeneration& model, const ShapesQABatch& batch);

// Runs (or resumes) training; writes the model directory `opts.out`.
void train_tiny(const TinyTrainOptions& opts);

// The exported model's config for the options (vocabulary from the trained tokenizer's size; decoder layers
// including stage 3's grown ones).
ModelConfig tiny_model_config(const TinyTrainOptions& opts, int64_t sp_vocab_actual);

// Block expansion: a model with `n` more decoder layers appended, each a copy of the last layer with its o_proj
// and down_proj zeroed (identity on the residual stream), every other parameter copied. Same outputs as `m`.
LlavaForConditionalGeneration grow_decoder(LlavaForConditionalGeneration& m, const ModelConfig& cfg, int64_t n,
                                           ModelConfig* grown_cfg);

// Exact-match scores on shapes questions.
struct ShapesScore {
  int64_t n = 0, correct = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> family;  // name -> (correct, n)
  int64_t tp = 0, fp = 0, fn = 0, tn = 0;                     // yes/no questions, "yes" positive
  double accuracy() const { return n ? static_cast<double>(correct) / n : 0.0; }
  double yes_no_f1() const { return tp ? 2.0 * tp / (2.0 * tp + fp + fn) : 0.0; }
  std::string to_json() const;  // {"accuracy", "n", "yes_no_f1", "families": {name: {"accuracy", "n"}}}
};

// Greedy answers (the llava-1.5 template, as `eqat ask` renders it) for `items`, batched.
std::vector<std::string> answer_shapes(LlavaForConditionalGeneration& model, const ModelConfig& cfg,
                                       const Tokenizer& tok, const ImageProcessorConfig& ipc,
                                       const std::vector<ShapesEvalItem>& items, int64_t batch = 64);
ShapesScore score_shapes(const std::vector<ShapesEvalItem>& items, const std::vector<std::string>& predictions);

}  // namespace eqat
