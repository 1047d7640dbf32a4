// eqat train-tiny: trains the embedded default model (src/vision/train_tiny.h).
#include <algorithm>
#include <array>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <utility>

#include "args.h"
#include "commands.h"
#include "data/error.h"
#include "vision/train_tiny.h"

namespace eqat {

int cmd_train_tiny(const Argv& argv);
namespace {
const bool kRegistered =
    register_command("train-tiny", cmd_train_tiny, "train the tiny shapes LLaVA from scratch (CPU)");
}  // namespace

int cmd_train_tiny(const Argv& argv) {
  const TinyTrainOptions d;
  auto s = [](auto v) { return std::to_string(v); };
  auto g = [](double v) { std::ostringstream o; o << v; return o.str(); };
  auto mix_str = [](const std::array<int, 7>& m) {
    std::string r;
    for (int v : m) r += (r.empty() ? "" : ",") + std::to_string(v);
    return r;
  };
  CommandSpec spec{"train-tiny", "eqat train-tiny --out DIR [--seed S] [--resume] [options]",
                   "Trains a toy-scale LLaVA-1.5 from scratch on the procedural shapes world: SentencePiece "
                   "tokenizer, stage 0 (ViT per-cell classification), stage 1 (QA, answer-only loss), stage 2 (warm restart, "
                   "more multi-hop questions, some without the answer-format line), stage 3 (warm restart with hard "
                   "multiple-choice distractors). Writes an "
                   "HF llava directory (fp16), train_log.jsonl, loss.png and a resumable checkpoint/.",
                   {{"out", "DIR", "output model directory", ""},
                    {"seed", "S", "seed for data, init and tokenizer", s(d.seed)},
                    {"resume", "", "continue from DIR/checkpoint", ""},
                    {"overwrite", "", "start over in an earlier train-tiny output (anything else is never replaced)", ""},
                    {"threads", "N", "CPU threads", s(d.threads)},
                    {"no-progress", "", "no progress bar", ""},
                    {"vocab", "N", "SentencePiece vocabulary (<= 1024)", s(d.sp_vocab)},
                    {"no-option-pieces", "", "keep multiple-choice option texts (\"A. red\") as ordinary pieces", ""},
                    {"dim", "N", "decoder width", s(d.dim)},
                    {"layers", "N", "decoder layers", s(d.layers)},
                    {"heads", "N", "decoder heads", s(d.heads)},
                    {"kv-heads", "N", "decoder key/value heads", s(d.kv_heads)},
                    {"ff", "N", "decoder MLP width", s(d.ff)},
                    {"vit-dim", "N", "ViT width", s(d.vit_dim)},
                    {"vit-layers", "N", "ViT layers (the last is unused: feature layer -2)", s(d.vit_layers)},
                    {"vit-ff", "N", "ViT MLP width", s(d.vit_ff)},
                    {"patch", "N", "ViT patch size (96 px / (3·patch) must be whole)", s(d.patch_size)},
                    {"stage0-steps", "N", "stage 0 steps", s(d.stage0_steps)},
                    {"stage0-batch", "N", "stage 0 batch (images)", s(d.stage0_batch)},
                    {"stage0-lr", "LR", "stage 0 peak learning rate", g(d.stage0_lr)},
                    {"steps", "N", "stage 1 steps", s(d.stage1_steps)},
                    {"batch", "N", "stage 1 batch (images)", s(d.stage1_batch)},
                    {"questions-per-family", "N", "stage 1 questions of each family per image", s(d.questions_per_family)},
                    {"lr", "LR", "stage 1 peak learning rate", g(d.stage1_lr)},
                    {"vit-lr-scale", "X", "ViT learning rate in stages 1-3 = X * their lr", g(d.vit_lr_scale)},
                    {"warmup", "N", "warm-up steps per stage", s(d.warmup)},
                    {"eval-every", "N", "held-out accuracy every N stage-1/2/3 steps (0: never)", s(d.eval_every)},
                    {"eval-questions", "N", "held-out questions per evaluation", s(d.eval_questions)},
                    {"final-eval", "N", "standard-split questions to score the exported model on", "1000"},
                    {"checkpoint-every", "N", "checkpoint interval (steps)", s(d.checkpoint_every)},
                    {"max-steps", "N", "stop after this global step (checkpointed; --resume continues)", ""}},
                   0, 0};
  spec.flags.insert(spec.flags.end() - 6, {"stage3-grow-layers", "N",
                                           "decoder layers appended when stage 3 starts (identity-initialised copies of the last)",
                                           s(d.stage3_grow_layers)});
  for (int k : {2, 3}) {
    const TinyTrainOptions::Restart& r = k == 2 ? d.stage2 : d.stage3;
    const std::string p = "stage" + std::to_string(k) + "-";
    spec.flags.insert(spec.flags.end() - 6,
                        {{p + "steps", "N", "stage " + s(k) + " steps (warm restart on fresh images; 0: none)", s(r.steps)},
                         {p + "lr", "LR", "stage " + s(k) + " peak learning rate", g(r.lr)},
                         {p + "mix", "N,..", "stage " + s(k) + " questions per image of colour,shape,count,exists,position,choice,describe",
                          mix_str(r.mix.per_family)},
                         {p + "drop-format", "P", "stage " + s(k) + " probability of dropping a question's answer-format line",
                          g(r.mix.drop_format)},
                         {p + "hard-choice", "P", "stage " + s(k) + " probability of hard multiple-choice distractors (the other objects' colours/shapes)",
                          g(r.mix.hard_choice)},
                         {p + "choice-by-word", "P", "stage " + s(k) + " probability that a multiple-choice question (with its format line) asks for the option's text",
                          g(r.mix.choice_by_word)},
                         {p + "fewer-options", "P", "stage " + s(k) + " probability that a multiple-choice question keeps 2 or 3 of its 4 options",
                          g(r.mix.fewer_options)},
                         {p + "in-the-image", "P", "stage " + s(k) + " probability that a colour, shape or choice question reads '... in the image?'",
                          g(r.mix.in_the_image)},
                         {p + "locate", "N", "stage " + s(k) + " training-only 'Which row/column is the X in?' questions per image (0-8)",
                          s(r.mix.locate)},
                         {p + "confusable-position", "N", "stage " + s(k) + " training-only position questions per image about pairs sharing a colour or shape (0-8)",
                          s(r.mix.confusable_position)}});
  }
  ParsedArgs a = parse_args(spec, argv);
  TinyTrainOptions o;
  o.out = a.require("out");
  // Bounds: the model is "tiny" (a CPU trains it in hours); these keep a typo from allocating gigabytes.
  constexpr int64_t kMaxDim = 4096, kMaxLayers = 64, kMaxSteps = 100000000, kMaxBatch = 4096;
  o.seed = static_cast<uint64_t>(a.i64("seed", 0, INT64_MAX));
  o.resume = a.flag("resume");
  o.overwrite = a.flag("overwrite");
  o.threads = a.threads();
  o.progress = !a.flag("no-progress");
  o.sp_vocab = a.i64("vocab", 400, 1024);
  o.option_pieces = !a.flag("no-option-pieces");
  o.dim = a.i64("dim", 8, kMaxDim), o.layers = a.i64("layers", 1, kMaxLayers);
  o.heads = a.i64("heads", 1, 128), o.kv_heads = a.i64("kv-heads", 1, 128);
  o.ff = a.i64("ff", 8, 4 * kMaxDim);
  o.vit_dim = a.i64("vit-dim", 8, kMaxDim), o.vit_layers = a.i64("vit-layers", 1, kMaxLayers);
  o.vit_ff = a.i64("vit-ff", 8, 4 * kMaxDim);
  o.patch_size = a.i64("patch", 1, 336);
  o.stage0_steps = a.i64("stage0-steps", 0, kMaxSteps), o.stage0_batch = a.i64("stage0-batch", 1, kMaxBatch);
  o.stage0_lr = a.f64("stage0-lr", 0, 1);
  o.stage1_steps = a.i64("steps", 1, kMaxSteps), o.stage1_batch = a.i64("batch", 1, kMaxBatch);
  o.stage1_lr = a.f64("lr", 0, 1);
  o.vit_lr_scale = a.f64("vit-lr-scale", 0, 1000);
  o.questions_per_family = a.i64("questions-per-family", 1, 8);
  for (int k : {2, 3}) {
    TinyTrainOptions::Restart& r = k == 2 ? o.stage2 : o.stage3;
    const std::string p = "stage" + std::to_string(k) + "-";
    r.steps = a.i64(p + "steps", 0, kMaxSteps), r.lr = a.f64(p + "lr", 0, 1);
    using Probability = std::pair<const char*, double ShapesQAMix::*>;
    for (const auto& [name, field] : {Probability{"drop-format", &ShapesQAMix::drop_format},
                                      Probability{"hard-choice", &ShapesQAMix::hard_choice},
                                      Probability{"choice-by-word", &ShapesQAMix::choice_by_word},
                                      Probability{"fewer-options", &ShapesQAMix::fewer_options},
                                      Probability{"in-the-image", &ShapesQAMix::in_the_image}}) {
      r.mix.*field = a.f64(p + name, 0, 1);
    }
    using Count = std::pair<const char*, int ShapesQAMix::*>;
    for (const auto& [name, field] : {Count{"locate", &ShapesQAMix::locate},
                                      Count{"confusable-position", &ShapesQAMix::confusable_position}}) {
      r.mix.*field = a.i32(p + name, 0, 8);
    }
    const std::string m = a.str(p + "mix");
    std::istringstream in(m);
    std::string item;
    size_t n = 0;
    while (std::getline(in, item, ',')) {
      char* end = nullptr;
      const long v = std::strtol(item.c_str(), &end, 10);
      EQAT_CHECK(n < 7 && !item.empty() && *end == '\0' && v >= 0 && v <= 8,
                 "--", p, "mix: expected 7 comma-separated counts in [0, 8], got '", m, "'");
      r.mix.per_family[n++] = static_cast<int>(v);
    }
    EQAT_CHECK(n == 7 && *std::max_element(r.mix.per_family.begin(), r.mix.per_family.end()) >= 1,
               "--", p, "mix: expected 7 comma-separated counts in [0, 8], at least one >= 1, got '", m, "'");
  }
  o.stage3_grow_layers = a.i64("stage3-grow-layers", 0, 8);
  o.warmup = a.i64("warmup", 0, kMaxSteps);
  o.eval_every = a.i64("eval-every", 0, kMaxSteps), o.eval_questions = a.i64("eval-questions", 0, 100000);
  o.final_eval_questions = a.i64("final-eval", 0, 100000);
  o.checkpoint_every = a.i64("checkpoint-every", 1, kMaxSteps);
  if (a.has("max-steps")) o.max_steps = a.i64("max-steps", 1, 3 * kMaxSteps);
  EQAT_CHECK(o.threads >= 1, "--threads: must be >= 1 for train-tiny");
  EQAT_CHECK(o.dim % o.heads == 0 && o.heads % o.kv_heads == 0, "--dim/--heads/--kv-heads: inconsistent");
  EQAT_CHECK(o.vit_dim % o.vit_heads == 0, "--vit-dim: must be a multiple of the ViT heads");
  train_tiny(o);
  std::cerr << "wrote " << o.out << std::endl;
  return 0;
}

}  // namespace eqat
