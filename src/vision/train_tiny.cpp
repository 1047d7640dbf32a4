#include "vision/train_tiny.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <nlohmann/json.hpp>
#include <sentencepiece_trainer.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <sys/stat.h>

#include "data/cpu.h"
#include "data/error.h"
#include "data/json_util.h"
#include "data/fs.h"
#include "data/image.h"
#include "data/plot.h"
#include "data/safetensors.h"
#include "llm/generate.h"
#include "llm/prompt.h"

namespace eqat {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string fmt_hms(double s) {
  if (!(s >= 0) || s > 1e7) return "--:--";
  const int64_t t = static_cast<int64_t>(s);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else std::snprintf(buf, sizeof buf, "%02lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer: SentencePiece BPE on the world's text, Llama-2's trainer settings (identity normalisation, byte
// fallback, split digits, dummy prefix, unk/bos/eos = 0/1/2, no pad piece; pieces never cross words, which keeps
// colours and shapes separate tokens: letting pieces span words made whole questions single pieces, and binding
// stayed at chance). <image> and <pad> are added tokens.
void train_tokenizer(const std::string& dir, uint64_t seed, int64_t vocab, bool option_pieces) {
  const std::string corpus = path_join(dir, "tokenizer_corpus.txt");
  {
    std::ofstream f(corpus);
    // The lines are the chunks the trainer and `eqat ask` encode (SentencePiece sees no newlines: a question's
    // lines are separate sentences, the last one ends in " ASSISTANT:"). The fixed system text is repeated so
    // that it merges into a few pieces.
    for (int i = 0; i < 3000; ++i) f << kVicunaSystem << " USER:\n";
    int64_t k = 0;
    for (const auto& line : shapes_corpus(seed, 3000)) {
      std::vector<std::string> parts;
      std::istringstream in(line);
      for (std::string p; std::getline(in, p);) parts.push_back(p);
      if (parts.size() > 1 || line.find('?') != std::string::npos || line.rfind("Describe", 0) == 0) {
        parts.back() += " ASSISTANT:";
        if (k++ % 2) parts.front() = "USER: " + parts.front();
      }
      for (const auto& p : parts) f << p << "\n";
    }
  }
  // The template's fixed text becomes single pieces (user-defined symbols; spaces are "▁" inside a piece, and the
  // list is comma-separated, so the system prompt is cut at its commas): a short-answer turn is 12–17 tokens
  // instead of 22–28, which halves the cost of a training step and keeps attention on the words that matter.
  std::vector<std::string> fixed{" USER:", " ASSISTANT:", kLlavaShortAnswerPrompt, kLlavaOptionAnswerPrompt};
  {
    std::string sys = std::string(" ") + kVicunaSystem;
    for (size_t p = 0;;) {
      const size_t c = sys.find(',', p);
      fixed.push_back(sys.substr(p, c == std::string::npos ? std::string::npos : c - p));
      if (c == std::string::npos) break;
      p = c + 1;
    }
  }
  // With option_pieces, every multiple-choice option line's text ("A. red": letter, full stop, space, colour or
  // shape) is one piece too, so the option's letter and its word share a token: answering with the letter becomes
  // one content look-up (the token that names the asked attribute) instead of a word match followed by a hop two
  // tokens back to the letter, and a 4-option question is 8 tokens shorter.
  if (option_pieces) {
    std::vector<std::string> words;  // the options are colours or shapes
    for (int c = 0; c < kShapesColours; ++c) words.emplace_back(shapes_colour_name(c));
    for (int k = 0; k < kShapesKinds; ++k) words.emplace_back(shapes_kind_name(k));
    for (char letter = 'A'; letter <= 'D'; ++letter)
      for (const auto& w : words) fixed.push_back(std::string(1, letter) + ". " + w);
  }
  std::string symbols;
  for (const auto& f : fixed) {
    std::string piece;
    for (char ch : f) piece += ch == ' ' ? std::string("\xE2\x96\x81") : std::string(1, ch);  // U+2581 "▁"
    symbols += (symbols.empty() ? "" : ",") + piece;
  }
  const std::string args = str_cat(
      "--input=", corpus, " --user_defined_symbols=", symbols, " --model_prefix=", path_join(dir, "tokenizer"),
      " --model_type=bpe --vocab_size=", vocab,
      " --byte_fallback=true --split_digits=true --character_coverage=1.0 --normalization_rule_name=identity",
      " --remove_extra_whitespaces=false --add_dummy_prefix=true --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1",
      " --hard_vocab_limit=false --num_threads=1 --max_sentence_length=8192 --allow_whitespace_only_pieces=true",

      " --shuffle_input_sentence=false --minloglevel=2");
  auto status = sentencepiece::SentencePieceTrainer::Train(args);
  EQAT_CHECK(status.ok(), "tokenizer training failed: ", status.ToString());
  std::remove(corpus.c_str());
  std::remove(path_join(dir, "tokenizer.vocab").c_str());
}

void write_side_files(const std::string& dir, const ModelConfig& cfg) {
  using nlohmann::ordered_json;
  write_file_atomic(path_join(dir, "config.json"), model_config_to_json(cfg) + "\n");
  write_file_atomic(path_join(dir, "preprocessor_config.json"), clip_preprocessor_json(cfg.vision.image_size, "pad"));
  write_file_atomic(path_join(dir, "generation_config.json"),
                    ordered_json{{"bos_token_id", 1}, {"eos_token_id", 2}, {"pad_token_id", cfg.text.pad_token_id},
                                 {"use_cache", true}}.dump(2) + "\n");
}

// ---------------------------------------------------------------------------------------------------------------
// Initialisation (GPT-2/Llama style): N(0, 0.02) for matrices and embeddings, residual output projections scaled
// by 1/sqrt(2·layers), zero biases, unit norm weights.
void init_weights(LlavaForConditionalGeneration& m, const ModelConfig& cfg, uint64_t seed) {
  c10::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 2654435761ull + 17);
  for (auto& item : m->named_parameters(true)) {
    const std::string& n = item.key();
    at::Tensor p = item.value();
    auto ends = [&](const char* s) { return n.size() >= strlen(s) && n.compare(n.size() - strlen(s), strlen(s), s) == 0; };
    if (n.find("norm") != std::string::npos || n.find("layrnorm") != std::string::npos) {
      if (ends("weight")) p.fill_(1.0);
      else p.zero_();
    } else if (ends("bias")) {
      p.zero_();
    } else {
      double std = 0.02;
      if (n.find("o_proj") != std::string::npos || n.find("down_proj") != std::string::npos)
        std /= std::sqrt(2.0 * cfg.text.num_hidden_layers);
      if (n.find("out_proj") != std::string::npos || n.find("fc2") != std::string::npos)
        std /= std::sqrt(2.0 * cfg.vision.num_hidden_layers);
      p.normal_(0.0, std, gen);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Batches. Stage 0 images come from index range [1e9, …) of the training stream, stage 1 from [0, …), stage 2
// from [5e8, …), stage 3 from [7.5e8, …): disjoint for any practical number of steps (checked).
constexpr int64_t kStage0Offset = 1000000000;
constexpr int64_t kStage2Offset = 500000000;
constexpr int64_t kStage3Offset = 750000000;
// Stage 0 classes per cell: kind (+empty), colour (+empty), the (kind, colour) pair (+empty) and the (cell, kind,
// colour) triple (+empty). Why the joint heads: with only separate kind and colour heads the cell features can be
// additive (red star + blue circle has the same mean as blue star + red circle), so nothing about binding is
// readable until the decoder has learned sharp attention. Measured on 140 held-out questions after ~600–700 stage-1
// steps: 52 % with separate heads, 64 % with the joint heads (models/SOURCES.md).
constexpr int64_t kPairs = static_cast<int64_t>(kShapesKinds) * kShapesColours;
constexpr int64_t kCellPairs = 9 * kPairs;
constexpr int64_t kHeadOut = (kShapesKinds + 1) + (kShapesColours + 1) + (kPairs + 1) + (kCellPairs + 1);

at::Tensor pixels_of(const std::vector<const Image*>& imgs, const ImageProcessorConfig& ipc) {
  std::vector<at::Tensor> px;
  for (const Image* im : imgs) px.push_back(preprocess_image(*im, ipc));
  return at::stack(px);
}

struct Stage0Batch {
  at::Tensor pixels, kind, colour;  // [B,3,S,S]; [B·9] with kShapesKinds / kShapesColours meaning "empty"
  at::Tensor pair, cell_pair;       // [B·9] joint classes (kPairs / kCellPairs meaning "empty"), see kHeadOut
};

Stage0Batch stage0_batch(uint64_t seed, int64_t start, int64_t B, const ImageProcessorConfig& ipc) {
  std::vector<ShapesSample> ss;
  std::vector<const Image*> imgs;
  std::vector<int64_t> kind(static_cast<size_t>(B * 9), kShapesKinds), colour(static_cast<size_t>(B * 9), kShapesColours);
  for (int64_t b = 0; b < B; ++b) ss.push_back(shapes_sample(seed, kStage0Offset + start + b));
  for (int64_t b = 0; b < B; ++b) {
    imgs.push_back(&ss[static_cast<size_t>(b)].image);
    for (const auto& o : ss[static_cast<size_t>(b)].objects) {
      kind[static_cast<size_t>(b * 9 + o.cell)] = o.kind;
      colour[static_cast<size_t>(b * 9 + o.cell)] = o.colour;
    }
  }
  std::vector<int64_t> pair(kind.size()), cell_pair(kind.size());
  for (size_t i = 0; i < kind.size(); ++i) {
    const bool empty = kind[i] == kShapesKinds;
    pair[i] = empty ? kPairs : kind[i] * kShapesColours + colour[i];
    cell_pair[i] = empty ? kCellPairs : static_cast<int64_t>(i % 9) * kPairs + pair[i];
  }
  return {pixels_of(imgs, ipc), at::tensor(kind, at::kLong), at::tensor(colour, at::kLong), at::tensor(pair, at::kLong),
          at::tensor(cell_pair, at::kLong)};
}

}  // namespace

// Stage 1 batch: each question about an image is its own single-turn llava-1.5 prompt — exactly what `eqat ask`
// and the evaluation feed the model — and all of an image's questions are packed into one row that computes the
// shared prefix ({system} USER: <image>…, the longest common prefix of the turns) once:
//   [prefix][q1 ASSISTANT: a1</s>][q2 ASSISTANT: a2</s>]…[pad]
// A turn's tokens attend causally to the prefix and to their own turn only, with the position ids of the
// single-turn prompt, so every turn's logits equal those of the unpacked prompt (tested). Each question weighs the
// same in the loss (its answer tokens' cross-entropies are averaged first), so one-word answers are not drowned
// by the long description. (The first recipe trained multi-turn conversations instead: a question asked after the
// description could be answered by copying text, which the single-turn evaluation never allows.)
ShapesSample shapes_qa_sample(uint64_t seed, int64_t index, const ShapesQAMix& mix) {
  const int most = *std::max_element(mix.per_family.begin(), mix.per_family.end());
  EQAT_CHECK(most >= 1 && most <= 8, "shapes: per-family question caps must lie in [0, 8] with one >= 1");
  ShapesSample s = shapes_sample(seed, index, -1, most, mix.hard_choice);
  std::array<int, 7> kept{};
  std::vector<ShapesQA> qa;
  std::mt19937_64 drop(seed * 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(index));
  // The rewrites' own streams (one draw each per kept question), so the format-line draws stay as they were.
  std::mt19937_64 rewrite(seed * 0xC2B2AE3D27D4EB4Full ^ static_cast<uint64_t>(index));
  const auto unit = [](uint64_t u) { return static_cast<double>(u >> 11) * 0x1.0p-53; };
  for (auto& q : s.qa) {
    const int f = static_cast<int>(q.family);
    if (kept[static_cast<size_t>(f)]++ >= mix.per_family[static_cast<size_t>(f)]) continue;
    const uint64_t u = drop();  // one draw per kept question, used or not, so the stream is stable
    const bool dropped = mix.drop_format > 0 && unit(u) < mix.drop_format;
    if (dropped) q.question = shapes_without_format_line(q.question);
    const uint64_t by_word = rewrite(), fewer = rewrite(), pick = rewrite(), in_image = rewrite();
    if (mix.fewer_options > 0 && unit(fewer) < mix.fewer_options)
      q = shapes_choice_fewer_options(q, 2 + static_cast<int>(pick % 2), pick);
    if (!dropped && mix.choice_by_word > 0 && unit(by_word) < mix.choice_by_word) q = shapes_choice_by_word(q);
    if (mix.in_the_image > 0 && unit(in_image) < mix.in_the_image) q = shapes_in_the_image(q);
    qa.push_back(std::move(q));
  }
  if (mix.locate > 0)
    for (auto& q : shapes_locate_questions(s.objects, mix.locate, seed * 0x165667B19E3779F9ull ^ static_cast<uint64_t>(index)))
      qa.push_back(std::move(q));
  if (mix.confusable_position > 0)
    for (auto& q : shapes_confusable_position_questions(s.objects, mix.confusable_position,
                                                        seed * 0x27D4EB2F165667C5ull ^ static_cast<uint64_t>(index)))
      qa.push_back(std::move(q));
  s.qa = std::move(qa);
  return s;
}

ShapesQABatch shapes_qa_batch(uint64_t seed, int64_t start, int64_t B, const ShapesQAMix& mix, const Tokenizer& tok,
                              const ModelConfig& cfg, const ImageProcessorConfig& ipc) {
  std::vector<ShapesSample> ss;
  std::vector<const Image*> imgs;
  struct Row {
    std::vector<int64_t> ids, pos, turn, tgt;  // turn -1: the shared prefix
    std::vector<float> w;
  };
  std::vector<Row> rows;
  const int64_t F = cfg.image_seq_length;
  for (int64_t b = 0; b < B; ++b) ss.push_back(shapes_qa_sample(seed, start + b, mix));
  // A mix that leaves families out can leave an image without questions (e.g. choice only, and a scene where no
  // object's colour or shape is unique): such images are dropped from the batch.
  ss.erase(std::remove_if(ss.begin(), ss.end(), [](const ShapesSample& s) { return s.qa.empty(); }), ss.end());
  B = static_cast<int64_t>(ss.size());
  EQAT_CHECK(B > 0, "shapes: no image in the batch has a question of the mix's families");
  size_t T = 0;
  ShapesQABatch out;
  for (auto& s : ss) {
    imgs.push_back(&s.image);
    std::vector<std::vector<int64_t>> prompts, answers;
    size_t P = SIZE_MAX;
    for (const auto& qa : s.qa) {
      prompts.push_back(tokenize_prompt(tok, render_prompt(PromptTemplate::kLlava15, qa.question, true),
                                        cfg.image_token_index, F));
      answers.push_back(tok.encode(qa.answer, false));
      answers.back().push_back(tok.eos_id());
      const auto& p0 = prompts.front();
      const auto& p = prompts.back();
      size_t k = 0;
      while (k < p.size() && k < p0.size() && p[k] == p0[k]) ++k;
      P = std::min({P, k, p.size() - 1});  // every turn keeps at least its last prompt token
    }
    Row r;
    r.ids.assign(prompts.front().begin(), prompts.front().begin() + static_cast<std::ptrdiff_t>(P));
    for (size_t i = 0; i < P; ++i) r.pos.push_back(static_cast<int64_t>(i)), r.turn.push_back(-1);
    r.tgt.assign(P, -100), r.w.assign(P, 0.f);
    for (size_t t = 0; t < prompts.size(); ++t) {
      std::vector<int64_t> seq(prompts[t].begin() + static_cast<std::ptrdiff_t>(P), prompts[t].end());
      const size_t answer_at = seq.size();  // index in seq of the first answer token
      seq.insert(seq.end(), answers[t].begin(), answers[t].end());
      const float w = 1.f / static_cast<float>(answers[t].size());
      for (size_t i = 0; i < seq.size(); ++i) {
        r.ids.push_back(seq[i]);
        r.pos.push_back(static_cast<int64_t>(P + i));
        r.turn.push_back(static_cast<int64_t>(t));
        const bool supervised = i + 1 >= answer_at && i + 1 < seq.size();
        r.tgt.push_back(supervised ? seq[i + 1] : -100);
        r.w.push_back(supervised ? w : 0.f);
      }
    }
    out.turns += static_cast<int64_t>(prompts.size());
    T = std::max(T, r.ids.size());
    rows.push_back(std::move(r));
  }
  const int64_t pad = cfg.text.pad_token_id >= 0 ? cfg.text.pad_token_id : 0;
  const int64_t TT = static_cast<int64_t>(T);
  at::Tensor I = at::full({B, TT}, pad, at::kLong), Pos = at::zeros({B, TT}, at::kLong);
  at::Tensor Tg = at::full({B, TT}, -100, at::kLong), W = at::zeros({B, TT}, at::kFloat);
  at::Tensor turn = at::full({B, TT}, -2, at::kLong);  // -2: padding
  for (int64_t b = 0; b < B; ++b) {
    const Row& r = rows[static_cast<size_t>(b)];
    const int64_t n = static_cast<int64_t>(r.ids.size());
    I[b].narrow(0, 0, n).copy_(at::tensor(r.ids, at::kLong));
    Pos[b].narrow(0, 0, n).copy_(at::tensor(r.pos, at::kLong));
    turn[b].narrow(0, 0, n).copy_(at::tensor(r.turn, at::kLong));
    Tg[b].narrow(0, 0, n).copy_(at::tensor(r.tgt, at::kLong));
    W[b].narrow(0, 0, n).copy_(at::tensor(r.w, at::kFloat));
    out.tokens += n;
  }
  // query i may see key j iff j <= i and (j is prefix or j is in i's turn); everything may see itself (padding).
  at::Tensor qi = turn.unsqueeze(2), kj = turn.unsqueeze(1);
  at::Tensor causal = at::ones({TT, TT}, at::kBool).tril();
  at::Tensor mask = causal.unsqueeze(0).logical_and(kj.eq(-1).logical_or(kj.eq(qi)));
  mask = mask.logical_or(at::eye(TT, at::kBool).unsqueeze(0));
  out.pixels = pixels_of(imgs, ipc);
  out.ids = I, out.positions = Pos, out.mask = mask.unsqueeze(1), out.targets = Tg, out.weights = W;
  return out;
}

namespace {
// The decoder's final-normed hidden states of a packed batch, [B,T,C].
at::Tensor qa_hidden(LlavaForConditionalGeneration& model, const ShapesQABatch& b) {
  at::Tensor embeds = model->embed_with_images(b.ids, model->image_features(b.pixels));
  return model->language_model->model->forward(embeds, b.positions, b.mask, nullptr);
}
at::Tensor vocab_logits(LlamaForCausalLM& lm, const at::Tensor& h) {
  return lm->lm_head ? lm->lm_head->forward(h) : at::linear(h, lm->lm_head_weight());
}
}  // namespace

at::Tensor shapes_qa_logits(LlavaForConditionalGeneration& model, const ShapesQABatch& b) {
  return vocab_logits(model->language_model, qa_hidden(model, b));
}

// The vocabulary projection runs on the supervised positions only (about 1 in 8).
at::Tensor shapes_qa_loss(LlavaForConditionalGeneration& model, const ShapesQABatch& b) {
  at::Tensor h = qa_hidden(model, b);
  at::Tensor at_ = b.weights.reshape({-1}).gt(0).nonzero().squeeze(1);
  h = h.reshape({-1, h.size(2)}).index_select(0, at_);
  at::Tensor logits = vocab_logits(model->language_model, h);
  at::Tensor ce = at::cross_entropy_loss(logits, b.targets.reshape({-1}).index_select(0, at_), {}, at::Reduction::None);
  return (ce * b.weights.reshape({-1}).index_select(0, at_)).sum() / static_cast<double>(std::max<int64_t>(1, b.turns));
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
double lr_at(int64_t step, int64_t steps, int64_t warmup, double base) {
  const double w = std::min(1.0, static_cast<double>(step + 1) / static_cast<double>(std::max<int64_t>(1, warmup)));
  const double c = 0.5 * (1.0 + std::cos(3.14159265358979323846 * static_cast<double>(step) / static_cast<double>(steps)));
  return base * w * (0.05 + 0.95 * c);
}

void set_lrs(torch::optim::AdamW& opt, const std::vector<double>& lrs) {
  for (size_t g = 0; g < opt.param_groups().size(); ++g)
    static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[g].options()).lr(lrs[g]);
}

std::vector<at::Tensor> params_of(torch::nn::Module& m) { return m.parameters(true); }

// Stage 0 head over hidden_states[feature layer]: mean of each grid cell's patches -> kind + colour logits.
struct CellHead {
  at::Tensor w, b;  // [kinds+1 + colours+1, E], [..]
};

at::Tensor cell_features(LlavaForConditionalGeneration& m, const ModelConfig& cfg, const at::Tensor& pixels) {
  const int64_t L = m->vision_model->num_layers();
  const int64_t index = cfg.vision_feature_layer >= 0 ? cfg.vision_feature_layer : L + 1 + cfg.vision_feature_layer;
  at::Tensor h = m->vision_model->hidden_state(pixels, index);
  h = h.narrow(1, 1, h.size(1) - 1);  // drop CLS: [N,P,E]
  const int64_t N = h.size(0), E = h.size(2), g = cfg.vision.image_size / cfg.vision.patch_size, k = g / kShapesGrid;
  // [N, 3, k, 3, k, E] -> mean over the k×k patches of each cell -> [N·9, E]
  return h.view({N, kShapesGrid, k, kShapesGrid, k, E}).mean({2, 4}).reshape({N * 9, E});
}

// Checkpoint: fp32 weights (+ head in stage 0), optimizer state, step.
void save_checkpoint(const std::string& out, LlavaForConditionalGeneration& m, const CellHead* head,
                     torch::optim::AdamW& opt, int64_t step) {
  write_dir_atomic(path_join(out, "checkpoint"), OutputKind::kCheckpoint, [&](const std::string& tmp) {
    std::vector<std::pair<std::string, at::Tensor>> ts;
    for (auto& it : m->named_parameters(true)) ts.emplace_back(it.key(), it.value().detach());
    if (head) ts.emplace_back("stage0_head.weight", head->w.detach()), ts.emplace_back("stage0_head.bias", head->b.detach());
    write_safetensors(path_join(tmp, "weights.safetensors"), ts);
    torch::save(opt, path_join(tmp, "optimizer.pt"));
    write_file_atomic(path_join(tmp, "state.json"), nlohmann::json{{"step", step}}.dump() + "\n");
  });
}

int64_t checkpoint_step(const std::string& out) {
  const std::string path = path_join(out, "checkpoint/state.json");
  const nlohmann::json j = parse_json_path(path);
  EQAT_CHECK(j.is_object() && j.contains("step") && j["step"].is_number_integer(), path, ": needs an integer \"step\"");
  return j["step"].get<int64_t>();
}

int64_t load_checkpoint(const std::string& out, LlavaForConditionalGeneration& m, CellHead* head) {
  auto f = SafetensorsFile::open(path_join(out, "checkpoint/weights.safetensors"));
  c10::NoGradGuard ng;
  for (auto& it : m->named_parameters(true)) it.value().copy_(f->get(it.key()));
  if (head && f->has("stage0_head.weight")) head->w.copy_(f->get("stage0_head.weight")), head->b.copy_(f->get("stage0_head.bias"));
  return checkpoint_step(out);
}

struct Logger {
  std::string path;
  std::array<std::vector<std::pair<double, double>>, 4> loss;  // per stage
  void line(const nlohmann::json& j) {
    std::ofstream f(path, std::ios::app);
    f << j.dump() << "\n";
  }
  // On resume: keep the log up to `step`, rebuild the curves.
  void restore(int64_t step) {
    std::string kept;
    if (file_exists(path)) {
      std::istringstream in(read_file(path));
      for (std::string l; std::getline(in, l);) {
        if (l.empty()) continue;
        auto j = nlohmann::json::parse(l, nullptr, false);
        if (j.is_discarded() || !j.contains("step") || j["step"].get<int64_t>() > step) continue;
        kept += l + "\n";
        if (j.contains("loss") && j.contains("stage") && j["stage"].get<int>() >= 0 && j["stage"].get<int>() < 4)
          loss[j["stage"].get<size_t>()].emplace_back(j["step"].get<double>(), j["loss"].get<double>());
      }
    }
    write_file_atomic(path, kept);
  }
};

void write_plot(const std::string& out, const Logger& log) {
  std::vector<PlotSeries> s{{"stage 0: cell classification", log.loss[0]}, {"stage 1: answer-only LM loss", log.loss[1]}};
  if (!log.loss[2].empty()) s.push_back({"stage 2: warm restart", log.loss[2]});
  if (!log.loss[3].empty()) s.push_back({"stage 3: hard choices", log.loss[3]});
  const std::string png = plot_png(s, "eqat train-tiny: training loss", "step", true);
  if (!png.empty()) write_file_atomic(path_join(out, "loss.png"), png);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
std::string ShapesScore::to_json() const {
  nlohmann::ordered_json j;
  j["accuracy"] = accuracy();
  j["n"] = n;
  j["correct"] = correct;
  j["yes_no_f1"] = yes_no_f1();
  nlohmann::ordered_json fam = nlohmann::ordered_json::object();
  for (auto& [name, cn] : family)
    fam[name] = {{"accuracy", cn.second ? static_cast<double>(cn.first) / cn.second : 0.0}, {"n", cn.second}};
  j["families"] = fam;
  return j.dump();
}

ModelConfig tiny_model_config(const TinyTrainOptions& o, int64_t sp_vocab_actual) {
  ModelConfig c;
  c.arch = Arch::kLlava;
  c.text.vocab_size = sp_vocab_actual + 2;
  c.text.hidden_size = o.dim;
  c.text.intermediate_size = o.ff;
  c.text.num_hidden_layers = o.layers + (o.stage3.steps > 0 ? o.stage3_grow_layers : 0);
  c.text.num_attention_heads = o.heads;
  c.text.num_key_value_heads = o.kv_heads;
  c.text.head_dim = o.dim / o.heads;
  c.text.max_position_embeddings = 512;
  c.text.rms_norm_eps = 1e-5;
  c.text.pad_token_id = sp_vocab_actual + 1;
  c.text.torch_dtype = "float16";
  c.vision.hidden_size = o.vit_dim;
  c.vision.intermediate_size = o.vit_ff;
  c.vision.num_hidden_layers = o.vit_layers;
  c.vision.num_attention_heads = o.vit_heads;
  c.vision.image_size = o.image_size;
  c.vision.patch_size = o.patch_size;
  c.vision.hidden_act = "quick_gelu";
  c.image_token_index = sp_vocab_actual;
  c.projector_hidden_act = "gelu";
  c.vision_feature_layer = -2;
  c.vision_feature_select_strategy = "default";
  c.image_seq_length = c.vision.num_patches();
  return c;
}

LlavaForConditionalGeneration grow_decoder(LlavaForConditionalGeneration& m, const ModelConfig& cfg, int64_t n,
                                           ModelConfig* grown_cfg) {
  EQAT_CHECK(n >= 0, "grow_decoder: negative layer count");
  ModelConfig g = cfg;
  const int64_t L = cfg.text.num_hidden_layers;
  g.text.num_hidden_layers = L + n;
  LlavaForConditionalGeneration out(g);
  c10::NoGradGuard ng;
  auto src = m->named_parameters(true);
  const std::string last = str_cat("language_model.model.layers.", L - 1, ".");
  for (auto& it : out->named_parameters(true)) {
    std::string key = it.key();
    for (int64_t i = L; i < L + n; ++i) {
      const std::string prefix = str_cat("language_model.model.layers.", i, ".");
      if (key.rfind(prefix, 0) == 0) {
        const std::string rest = key.substr(prefix.size());
        key = last + rest;
        if (rest == "self_attn.o_proj.weight" || rest == "mlp.down_proj.weight") key.clear();
        break;
      }
    }
    const at::Tensor* from = key.empty() ? nullptr : src.find(key);
    EQAT_ASSERT(key.empty() || from, "grow_decoder: no source for ", it.key());
    if (from) it.value().copy_(*from);
    else it.value().zero_();
  }
  out->to(m->language_model->lm_head_weight().scalar_type());
  if (grown_cfg) *grown_cfg = g;
  return out;
}

std::vector<std::string> answer_shapes(LlavaForConditionalGeneration& model, const ModelConfig& cfg,
                                       const Tokenizer& tok, const ImageProcessorConfig& ipc,
                                       const std::vector<ShapesEvalItem>& items, int64_t batch) {
  c10::NoGradGuard ng;
  std::vector<std::string> preds;
  const int64_t pad = tok.pad_id() >= 0 ? tok.pad_id() : 0;
  const auto dtype = model->language_model->lm_head_weight().scalar_type();
  for (size_t s = 0; s < items.size(); s += static_cast<size_t>(batch)) {
    const size_t e = std::min(items.size(), s + static_cast<size_t>(batch));
    std::vector<std::vector<int64_t>> rows;
    std::vector<const Image*> imgs;
    for (size_t i = s; i < e; ++i) {
      rows.push_back(tokenize_prompt(tok, render_prompt(PromptTemplate::kLlava15, items[i].text, true),
                                     cfg.image_token_index, cfg.image_seq_length));
      imgs.push_back(&items[i].pixels);
    }
    auto [ids, valid] = left_pad(rows, pad);
    at::Tensor feats = model->image_features(pixels_of(imgs, ipc).to(dtype));
    at::Tensor embeds = model->embed_with_images(ids, feats);
    GenerateOptions o;
    o.max_new_tokens = 48;
    o.stop_ids = {tok.eos_id()};
    GenerateResult r = generate(model->language_model, embeds, valid, o);
    for (auto& t : r.tokens) preds.push_back(tok.decode(t));
  }
  return preds;
}

ShapesScore score_shapes(const std::vector<ShapesEvalItem>& items, const std::vector<std::string>& preds) {
  EQAT_ASSERT(items.size() == preds.size(), "predictions/items size mismatch");
  ShapesScore sc;
  for (size_t i = 0; i < items.size(); ++i) {
    const bool ok = shapes_answer_matches(preds[i], items[i].answer);
    sc.n++, sc.correct += ok;
    auto& f = sc.family[items[i].category];
    f.first += ok, f.second++;
    const std::string a = shapes_normalize_answer(items[i].answer), p = shapes_normalize_answer(preds[i]);
    if (a == "yes" || a == "no") {
      if (a == "yes") (p == "yes" ? sc.tp : sc.fn)++;
      else (p == "yes" ? sc.fp : sc.tn)++;
    }
  }
  return sc;
}

// ---------------------------------------------------------------------------------------------------------------
void train_tiny(const TinyTrainOptions& o_in) {
  TinyTrainOptions o = o_in;
  EQAT_CHECK(!o.out.empty(), "train-tiny: --out is required");
  EQAT_CHECK(o.sp_vocab >= 400 && o.sp_vocab <= 1024, "--vocab: must be in [400, 1024] (259 byte and control pieces + the characters come first)");
  EQAT_CHECK(o.image_size % (o.patch_size * kShapesGrid) == 0, "--patch: the image (", o.image_size,
             " px) must split into 3×3 cells of whole patches");
  EQAT_CHECK(o.stage1_steps * o.stage1_batch <= kStage2Offset &&
                 o.stage2.steps * o.stage1_batch <= kStage3Offset - kStage2Offset &&
                 o.stage3.steps * o.stage1_batch <= kStage0Offset - kStage3Offset,
             "--steps/--stage2-steps/--stage3-steps x --batch: a stage would use more images than its index range "
             "holds (stage 1: ", kStage2Offset, ", stages 2 and 3: ", kStage3Offset - kStage2Offset,
             ") and overlap the next stage's");
  // The output is eqat's own: new, empty, or an earlier train-tiny run (continued with --resume, restarted with
  // --overwrite). One run at a time.
  o.out = check_in_place_dir({o.out, "--out", OutputKind::kTrainRun, o.overwrite, {}}, o.resume);
  claim_dir(o.out, OutputKind::kTrainRun, /*start_over=*/o.overwrite && !o.resume);
  FileLock lock(path_join(o.out, ".eqat-lock"), "--out " + o.out);
  set_compute_threads(o.threads);
  const bool resume = o.resume && file_exists(path_join(o.out, "checkpoint/state.json"));
  if (!resume) train_tokenizer(o.out, o.seed, o.sp_vocab, o.option_pieces);
  Tokenizer sp_only = Tokenizer::from_model_file(path_join(o.out, "tokenizer.model"));
  const int64_t sp_n = sp_only.vocab_size();
  const ModelConfig final_cfg = tiny_model_config(o, sp_n);
  ModelConfig cfg = final_cfg;  // the training config: stages 0-2 run without stage 3's grown layers
  const int64_t grow = o.stage3.steps > 0 ? o.stage3_grow_layers : 0;
  cfg.text.num_hidden_layers -= grow;
  write_llama_tokenizer_files(o.out, cfg.image_token_index, cfg.text.pad_token_id, 512);
  write_side_files(o.out, final_cfg);
  Tokenizer tok = Tokenizer::load(o.out);
  const ImageProcessorConfig ipc = load_image_processor_config(o.out, cfg.vision.image_size);

  at::manual_seed(o.seed);
  LlavaForConditionalGeneration model(cfg);
  init_weights(model, cfg, o.seed);
  CellHead head;
  {
    c10::NoGradGuard ng;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 99);
    head.w = at::empty({kHeadOut, o.vit_dim}).normal_(0.0, 0.02, gen).requires_grad_();
    head.b = at::zeros({kHeadOut}).requires_grad_();
  }
  for (auto& p : model->parameters(true)) p.set_requires_grad(true);

  const int64_t total = o.stage0_steps + o.stage1_steps + o.stage2.steps + o.stage3.steps;
  const int64_t stage3_first = o.stage0_steps + o.stage1_steps + o.stage2.steps;
  int64_t step = 0;
  if (resume && grow > 0 && checkpoint_step(o.out) > stage3_first) model = grow_decoder(model, cfg, grow, &cfg);
  if (resume) step = load_checkpoint(o.out, model, &head);
  Logger log{path_join(o.out, "train_log.jsonl"), {}};
  if (resume) log.restore(step);
  else write_file_atomic(log.path, "");
  if (!resume)
    log.line({{"event", "start"}, {"seed", o.seed}, {"step", 0}, {"vocab", cfg.text.vocab_size},
              {"params", [&] { int64_t n = 0; for (auto& p : model->parameters(true)) n += p.numel(); return n; }()}});
  const auto eval_items = shapes_test_split(o.seed + 0x9E3779B9ull, o.eval_questions);

  auto t0 = Clock::now();
  const int64_t start_step = step;
  // ---- stage 0: ViT per-cell classification.
  if (step < o.stage0_steps) {
    std::vector<at::Tensor> vp = params_of(*model->vision_model);
    vp.push_back(head.w), vp.push_back(head.b);
    torch::optim::AdamW opt({torch::optim::OptimizerParamGroup(vp)},
                            torch::optim::AdamWOptions(o.stage0_lr).weight_decay(o.weight_decay).betas({0.9, 0.98}));
    if (resume && step > 0) torch::load(opt, path_join(o.out, "checkpoint/optimizer.pt"));
    double ema = 0, acc_ema = 0;
    for (; step < o.stage0_steps; ++step) {
      if (o.max_steps >= 0 && step >= o.max_steps) break;
      auto ts = Clock::now();
      set_lrs(opt, {lr_at(step, o.stage0_steps, o.warmup, o.stage0_lr)});
      Stage0Batch b = stage0_batch(o.seed, step * o.stage0_batch, o.stage0_batch, ipc);
      at::Tensor logits = at::linear(cell_features(model, cfg, b.pixels), head.w, head.b);
      int64_t at0 = 0;
      auto next = [&](int64_t n) { at::Tensor t = logits.narrow(1, at0, n); at0 += n; return t; };
      at::Tensor lk = next(kShapesKinds + 1), lc = next(kShapesColours + 1), lp = next(kPairs + 1),
                 lcp = next(kCellPairs + 1);
      at::Tensor loss = at::cross_entropy_loss(lk, b.kind) + at::cross_entropy_loss(lc, b.colour) +
                        at::cross_entropy_loss(lp, b.pair) + at::cross_entropy_loss(lcp, b.cell_pair);
      opt.zero_grad();
      loss.backward();
      torch::nn::utils::clip_grad_norm_(vp, o.clip);
      opt.step();
      const double l = loss.item<double>();
      const double acc = (lk.argmax(1).eq(b.kind).logical_and(lc.argmax(1).eq(b.colour))).to(at::kFloat).mean().item<double>();
      ema = step == start_step ? l : 0.95 * ema + 0.05 * l;
      acc_ema = step == start_step ? acc : 0.95 * acc_ema + 0.05 * acc;
      const double dt = seconds_since(ts), el = seconds_since(t0);
      const double eta = el / static_cast<double>(step + 1 - start_step) * static_cast<double>(total - step - 1);
      if (o.progress)
        std::fprintf(stderr, "\r[stage 0] step %lld/%lld loss %.4f cell-acc %.3f img/s %.0f elapsed %s ETA %s   ",
                     (long long)(step + 1), (long long)total, ema, acc_ema, o.stage0_batch / dt, fmt_hms(el).c_str(),
                     fmt_hms(eta).c_str());
      if ((step + 1) % 10 == 0 || step + 1 == o.stage0_steps) {
        log.line({{"step", step + 1}, {"stage", 0}, {"loss", l}, {"cell_acc", acc}, {"lr", lr_at(step, o.stage0_steps, o.warmup, o.stage0_lr)},
                  {"images_per_s", o.stage0_batch / dt}, {"elapsed_s", el}});
        log.loss[0].emplace_back(static_cast<double>(step + 1), l);
      }
      if ((step + 1) % o.checkpoint_every == 0 || step + 1 == o.stage0_steps || step + 1 == o.max_steps) {
        save_checkpoint(o.out, model, &head, opt, step + 1);
        write_plot(o.out, log);
      }
    }
    if (o.progress) std::fprintf(stderr, "\n");
  }
  // ---- stages 1 and 2: projector + decoder (+ ViT at a lower rate) on QA, answer-only loss. Each stage has its
  // own AdamW state and warm-up + cosine schedule; stage 2 draws its images from a disjoint index range.
  auto qa_stage = [&](int stage, int64_t first, int64_t steps, double peak, const ShapesQAMix& mix, int64_t images_from) {
    const int64_t end = first + steps;
    if (step < first || step >= end || (o.max_steps >= 0 && step >= o.max_steps)) return;
    std::vector<at::Tensor> rest = params_of(*model->multi_modal_projector);
    for (auto& p : params_of(*model->language_model)) rest.push_back(p);
    torch::optim::AdamW opt({torch::optim::OptimizerParamGroup(params_of(*model->vision_model)),
                             torch::optim::OptimizerParamGroup(rest)},
                            torch::optim::AdamWOptions(peak).weight_decay(o.weight_decay).betas({0.9, 0.98}));
    if (resume && step > first) torch::load(opt, path_join(o.out, "checkpoint/optimizer.pt"));
    std::vector<at::Tensor> all = model->parameters(true);
    double ema = 0;
    const int64_t stage_start = step;
    auto t1 = Clock::now();
    for (; step < end; ++step) {
      if (o.max_steps >= 0 && step >= o.max_steps) break;
      auto ts = Clock::now();
      const int64_t s = step - first;
      const double lr = lr_at(s, steps, o.warmup, peak);
      set_lrs(opt, {lr * o.vit_lr_scale, lr});
      ShapesQABatch b = shapes_qa_batch(o.seed, images_from + s * o.stage1_batch, o.stage1_batch, mix, tok, cfg, ipc);
      at::Tensor loss = shapes_qa_loss(model, b);
      opt.zero_grad();
      loss.backward();
      torch::nn::utils::clip_grad_norm_(all, o.clip);
      opt.step();
      const double l = loss.item<double>();
      ema = step == stage_start ? l : 0.95 * ema + 0.05 * l;
      const double dt = seconds_since(ts), el = seconds_since(t0);
      const double eta = seconds_since(t1) / static_cast<double>(step + 1 - stage_start) * static_cast<double>(total - step - 1);
      if (o.progress)
        std::fprintf(stderr, "\r[stage %d] step %lld/%lld loss %.4f tok/s %.0f elapsed %s ETA %s   ", stage,
                     (long long)(step + 1), (long long)total, ema, static_cast<double>(b.tokens) / dt,
                     fmt_hms(el).c_str(), fmt_hms(eta).c_str());
      if ((step + 1) % 10 == 0 || step + 1 == end) {
        log.line({{"step", step + 1}, {"stage", stage}, {"loss", l}, {"lr", lr}, {"tokens_per_s", b.tokens / dt},
                  {"elapsed_s", el}});
        log.loss[static_cast<size_t>(stage)].emplace_back(static_cast<double>(step + 1), l);
      }
      if (o.eval_every > 0 && ((s + 1) % o.eval_every == 0 || step + 1 == end) && !eval_items.empty()) {
        ShapesScore sc = score_shapes(eval_items, answer_shapes(model, cfg, tok, ipc, eval_items));
        if (o.progress) std::fprintf(stderr, "\n[eval] step %lld %s\n", (long long)(step + 1), sc.to_json().c_str());
        log.line({{"step", step + 1}, {"stage", stage}, {"eval", nlohmann::json::parse(sc.to_json())}});
      }
      if ((step + 1) % o.checkpoint_every == 0 || step + 1 == end || step + 1 == o.max_steps) {
        save_checkpoint(o.out, model, nullptr, opt, step + 1);
        write_plot(o.out, log);
      }
    }
    if (o.progress) std::fprintf(stderr, "\n");
  };
  qa_stage(1, o.stage0_steps, o.stage1_steps, o.stage1_lr, ShapesQAMix::uniform(static_cast<int>(o.questions_per_family)), 0);
  qa_stage(2, o.stage0_steps + o.stage1_steps, o.stage2.steps, o.stage2.lr, o.stage2.mix, kStage2Offset);
  if (grow > 0 && step == stage3_first && (o.max_steps < 0 || step < o.max_steps)) {
    model = grow_decoder(model, cfg, grow, &cfg);
    for (auto& p : model->parameters(true)) p.set_requires_grad(true);
    log.line({{"step", step}, {"event", "grew decoder"}, {"layers", cfg.text.num_hidden_layers}});
  }
  qa_stage(3, stage3_first, o.stage3.steps, o.stage3.lr, o.stage3.mix, kStage3Offset);
  write_plot(o.out, log);
  if (step < total) return;  // stopped early (max_steps): the checkpoint is the state

  // ---- export: fp16 safetensors in the llava-hf layout.
  std::vector<std::pair<std::string, at::Tensor>> ts;
  for (auto& it : model->named_parameters(true)) ts.emplace_back(it.key(), it.value().detach().to(at::kHalf));
  write_checkpoint(o.out, ts);
  log.line({{"step", step}, {"event", "exported"}, {"elapsed_s", seconds_since(t0)}});
  if (o.final_eval_questions > 0) {
    Model m = load_model(o.out);
    auto items = shapes_test_split(kShapesStandardTestSeed, o.final_eval_questions);
    ShapesScore sc = score_shapes(items, answer_shapes(m.llava, m.cfg, *m.tok, m.image_cfg, items));
    std::fprintf(stderr, "[final eval, standard split, fp16 model] %s\n", sc.to_json().c_str());
    log.line({{"step", step}, {"final_eval", nlohmann::json::parse(sc.to_json())}});
  }
}

}  // namespace eqat
