// eqat train-tiny on a very small config: the loss goes down, the output loads with load_model, and a run
// interrupted by --max-steps then resumed ends in bit-identical weights.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <array>
#include <sstream>

#include "data/fs.h"
#include "data/safetensors.h"
#include "llm/prompt.h"
#include "test_util.h"
#include "vision/llava.h"
#include "vision/train_tiny.h"

namespace eqat {
namespace {

TinyTrainOptions tiny(const std::string& out) {
  TinyTrainOptions o;
  o.out = out;
  o.seed = 3;
  o.threads = 1;
  o.progress = false;
  o.patch_size = 32;  // 3×3 = 9 image tokens
  o.vit_dim = 32, o.vit_layers = 2, o.vit_heads = 2, o.vit_ff = 64;
  o.dim = 64, o.layers = 2, o.heads = 2, o.kv_heads = 1, o.ff = 128;
  o.sp_vocab = 400;
  o.stage0_steps = 10, o.stage0_batch = 8, o.stage0_lr = 3e-3;
  o.stage1_steps = 30, o.stage1_batch = 4, o.stage1_lr = 3e-3;
  o.stage2.steps = 4, o.stage2.lr = 1e-3;
  o.stage3.steps = 2, o.stage3.lr = 1e-3, o.stage3_grow_layers = 1;
  o.warmup = 3;
  o.eval_every = 0;
  o.checkpoint_every = 1000;
  return o;
}

// A randomly initialised model (one step each of stages 0 and 1) with its tokenizer and configs, in fp32.
Model barely_trained(const eqat_test::TempDir& tmp) {
  TinyTrainOptions o = tiny(tmp.str("m"));
  o.stage0_steps = 1, o.stage1_steps = 1, o.stage2.steps = 0, o.stage3.steps = 0;
  train_tiny(o);
  Model m = load_model(o.out);
  m.llava->to(at::kFloat);
  return m;
}

std::vector<std::pair<int64_t, double>> stage1_losses(const std::string& dir) {
  std::vector<std::pair<int64_t, double>> out;
  std::istringstream in(read_file(dir + "/train_log.jsonl"));
  for (std::string l; std::getline(in, l);) {
    auto j = nlohmann::json::parse(l);
    if (j.contains("loss") && j["stage"] == 1) out.emplace_back(j["step"].get<int64_t>(), j["loss"].get<double>());
  }
  return out;
}

TEST(TrainTiny, LossGoesDownAndTheModelLoads) {
  eqat_test::TempDir tmp;
  TinyTrainOptions o = tiny(tmp.str("m"));
  train_tiny(o);
  auto l = stage1_losses(o.out);
  ASSERT_GE(l.size(), 3u);
  // The first logged loss is near ln(V) ≈ 5.7 for a uniform guess; 30 steps learn at least the answer vocabulary.
  EXPECT_LT(l.back().second, 0.75 * l.front().second);
  Model m = load_model(o.out);
  ASSERT_TRUE(m.multimodal());
  EXPECT_EQ(m.cfg.image_seq_length, 9);
  EXPECT_EQ(m.tok->added_token_id("<image>"), m.cfg.image_token_index);
  auto items = shapes_test_split(1, 7);
  auto preds = answer_shapes(m.llava, m.cfg, *m.tok, m.image_cfg, items, 7);
  EXPECT_EQ(preds.size(), 7u);
  EXPECT_TRUE(file_exists(o.out + "/loss.png"));
}

TEST(TrainTiny, ResumeIsBitIdentical) {
  eqat_test::TempDir tmp;
  TinyTrainOptions a = tiny(tmp.str("a"));
  a.stage1_steps = 8, a.stage2.steps = 6, a.stage3.steps = 4;  // stages end at global steps 10, 18, 24, 28
  train_tiny(a);
  TinyTrainOptions b = a;
  b.out = tmp.str("b");
  // Interrupted inside stage 1, exactly at the stage 1 -> 2 and 2 -> 3 boundaries, and inside stages 2 and 3:
  // weights and AdamW state come back from the checkpoint, and a stage starts with a fresh optimizer whether or
  // not the run was resumed.
  for (int64_t stop : {13, 18, 21, 24, 26, -1}) {
    b.max_steps = stop;
    train_tiny(b);
    EXPECT_EQ(file_exists(b.out + "/model.safetensors"), stop < 0) << stop;
    b.resume = true;
  }
  EXPECT_EQ(load_model(b.out).cfg.text.num_hidden_layers, a.layers + 1);  // stage 3 grew the decoder
  auto fa = SafetensorsFile::open(a.out + "/checkpoint/weights.safetensors");
  auto fb = SafetensorsFile::open(b.out + "/checkpoint/weights.safetensors");
  ASSERT_EQ(fa->tensors().size(), fb->tensors().size());
  for (auto& [name, info] : fa->tensors()) EXPECT_TRUE(at::equal(fa->get(name), fb->get(name))) << name;
}

// The packed stage-1 row must give every turn exactly the logits of its unpacked single-turn prompt (what
// `eqat ask` and the evaluation run): same tokens, same positions, nothing visible from other turns.
TEST(TrainTiny, PackedQuestionsMatchSingleTurnPrompts) {
  eqat_test::TempDir tmp;
  Model m = barely_trained(tmp);
  c10::NoGradGuard ng;
  ShapesQABatch b = shapes_qa_batch(5, 0, 2, ShapesQAMix::uniform(2), *m.tok, m.cfg, m.image_cfg);
  at::Tensor packed = shapes_qa_logits(m.llava, b);
  auto samples = std::vector<ShapesSample>{shapes_sample(5, 0, -1, 2), shapes_sample(5, 1, -1, 2)};
  ASSERT_GT(b.turns, 14);  // per_family 2 adds questions beyond one per family
  int64_t checked = 0;
  for (int64_t r = 0; r < 2; ++r) {
    // Walk the row's supervised positions turn by turn, in order.
    auto tg = b.targets[r], w = b.weights[r];
    int64_t i = 0;
    const int64_t T = b.ids.size(1);
    for (const auto& qa : samples[static_cast<size_t>(r)].qa) {
      std::vector<int64_t> ids = tokenize_prompt(*m.tok, render_prompt(PromptTemplate::kLlava15, qa.question, true),
                                                 m.cfg.image_token_index, m.cfg.image_seq_length);
      std::vector<int64_t> ans = m.tok->encode(qa.answer, false);
      ans.push_back(m.tok->eos_id());
      const int64_t prompt_len = static_cast<int64_t>(ids.size());
      ids.insert(ids.end(), ans.begin(), ans.end());
      at::Tensor single_ids = at::tensor(ids, at::kLong).unsqueeze(0);
      at::Tensor emb = m.llava->embed_with_images(single_ids, m.llava->image_features(b.pixels.narrow(0, r, 1)));
      at::Tensor pos = at::arange(single_ids.size(1), at::kLong).unsqueeze(0);
      at::Tensor single = m.llava->language_model->forward(emb, pos, at::Tensor(), nullptr)[0];
      while (i < T && tg[i].item<int64_t>() < 0) ++i;  // the next supervised position = this turn's last prompt token
      for (size_t k = 0; k < ans.size(); ++k, ++i) {
        ASSERT_LT(i, T);
        EXPECT_EQ(tg[i].item<int64_t>(), ans[k]);
        EXPECT_FLOAT_EQ(w[i].item<float>(), 1.f / static_cast<float>(ans.size()));
        EXPECT_EQ(b.positions[r][i].item<int64_t>(), prompt_len - 1 + static_cast<int64_t>(k));
        // fp32 logits of the same computation with a different attention layout (masked vs causal, extra
        // masked-out keys): only summation order differs, ~1e-6 relative at these magnitudes (|logit| < 10).
        EXPECT_TRUE(at::allclose(packed[r][i], single[prompt_len - 1 + static_cast<int64_t>(k)], 1e-4, 1e-4))
            << "row " << r << " question \"" << qa.question << "\" answer token " << k;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, (b.weights > 0).sum().item<int64_t>());
  // The training loss (vocabulary projection on the supervised positions only) equals the per-question mean
  // cross-entropy computed from the full packed logits. fp32, a few hundred terms: 1e-5 relative is ample.
  at::Tensor ce = at::cross_entropy_loss(packed.reshape({-1, packed.size(2)}), b.targets.reshape({-1}), {},
                                         at::Reduction::None, -100);
  const double want = (ce * b.weights.reshape({-1})).sum().item<double>() / static_cast<double>(b.turns);
  EXPECT_NEAR(shapes_qa_loss(m.llava, b).item<double>(), want, 1e-5 * want);
}

// Block expansion keeps the function: the grown model's logits equal the original's (the new layers add zero to
// the residual stream), and the new layers' zeroed projections are the only parameters that differ from a copy.
TEST(TrainTiny, GrownDecoderComputesTheSameLogits) {
  eqat_test::TempDir tmp;
  Model m = barely_trained(tmp);
  ModelConfig g;
  LlavaForConditionalGeneration big = grow_decoder(m.llava, m.cfg, 2, &g);
  EXPECT_EQ(g.text.num_hidden_layers, m.cfg.text.num_hidden_layers + 2);
  ShapesQABatch b = shapes_qa_batch(4, 0, 2, ShapesQAMix::uniform(1), *m.tok, m.cfg, m.image_cfg);
  c10::NoGradGuard ng;
  // Exactly equal: adding an exact zero (o_proj/down_proj of zeros) to the residual stream changes no bit.
  EXPECT_TRUE(at::equal(shapes_qa_logits(m.llava, b), shapes_qa_logits(big, b)));
  auto params = big->named_parameters(true);
  const std::string top = "language_model.model.layers." + std::to_string(m.cfg.text.num_hidden_layers + 1) + ".";
  EXPECT_EQ(params[top + "self_attn.o_proj.weight"].abs().sum().item<double>(), 0.0);
  EXPECT_TRUE(at::equal(params[top + "self_attn.q_proj.weight"],
                        m.llava->named_parameters(true)["language_model.model.layers." +
                                                        std::to_string(m.cfg.text.num_hidden_layers - 1) +
                                                        ".self_attn.q_proj.weight"]));
}

// Stage 2's mix: at most the cap of each family per image, questions drawn from the image's own pool, and about
// the requested share of them without their answer-format line (the rest unchanged).
TEST(TrainTiny, StageTwoMixCapsFamiliesAndDropsFormatLines) {
  ShapesQAMix mix;
  mix.per_family = {1, 1, 2, 3, 3, 4, 1};
  mix.drop_format = 0.25;
  int64_t droppable = 0, dropped = 0, hard = 0, total = 0;
  for (int64_t i = 0; i < 60; ++i) {
    ShapesSample s = shapes_qa_sample(9, i, mix), pool = shapes_sample(9, i, -1, 4);
    EXPECT_TRUE(s.image.rgb == pool.image.rgb);
    std::array<int, 7> n{};
    for (const auto& q : s.qa) {
      const auto f = static_cast<size_t>(q.family);
      EXPECT_LE(++n[f], mix.per_family[f]) << "image " << i;
      const bool format_line = q.family != ShapesFamily::kDescribe;
      auto same = [&](const ShapesQA& p) {
        return p.family == q.family && p.answer == q.answer &&
               (p.question == q.question || (format_line && p.question.rfind(q.question + "\n", 0) == 0));
      };
      EXPECT_TRUE(std::any_of(pool.qa.begin(), pool.qa.end(), same)) << q.question;
      if (format_line) {
        ++droppable;
        dropped += q.question.find("\nAnswer ") == std::string::npos;
      }
      hard += q.family == ShapesFamily::kChoice || q.family == ShapesFamily::kPosition;
      ++total;
    }
  }
  // ~600 format-line questions, share 0.25: one standard deviation is ~0.018, so [0.15, 0.35] is > 5 sigma.
  ASSERT_GT(droppable, 400);
  EXPECT_GT(static_cast<double>(dropped) / droppable, 0.15);
  EXPECT_LT(static_cast<double>(dropped) / droppable, 0.35);
  EXPECT_GT(static_cast<double>(hard) / total, 2.0 / 7);  // the hard families outweigh the uniform share
  // Without dropping and with every cap at the pool's size, the mix is the pool itself (stage 1's stream).
  ShapesSample u = shapes_qa_sample(9, 3, ShapesQAMix::uniform(2)), p = shapes_sample(9, 3, -1, 2);
  ASSERT_EQ(u.qa.size(), p.qa.size());
  for (size_t k = 0; k < u.qa.size(); ++k) EXPECT_EQ(u.qa[k].question, p.qa[k].question);
  // Stage 3's hard distractors reach the mix: the same questions as the generator's hard pool.
  ShapesQAMix h = ShapesQAMix::uniform(2);
  h.hard_choice = 1.0;
  ShapesSample hu = shapes_qa_sample(9, 3, h), hp = shapes_sample(9, 3, -1, 2, 1.0);
  ASSERT_EQ(hu.qa.size(), hp.qa.size());
  for (size_t k = 0; k < hu.qa.size(); ++k) EXPECT_EQ(hu.qa[k].question, hp.qa[k].question);
  // locate appends that many row/column questions (fewer when the scene has fewer unique objects) after the mix's
  // own questions, which stay as they were.
  ShapesQAMix l = mix;
  l.locate = 3;
  int64_t appended = 0;
  for (int64_t i = 0; i < 20; ++i) {
    ShapesSample a = shapes_qa_sample(9, i, mix), b = shapes_qa_sample(9, i, l);
    const size_t want = shapes_locate_questions(a.objects, 3, 0).size();  // the count does not depend on the draw
    ASSERT_EQ(b.qa.size(), a.qa.size() + want);
    for (size_t k = 0; k < a.qa.size(); ++k) EXPECT_EQ(b.qa[k].question, a.qa[k].question);
    for (size_t k = a.qa.size(); k < b.qa.size(); ++k) EXPECT_EQ(b.qa[k].question.rfind("Which ", 0), 0u) << b.qa[k].question;
    appended += static_cast<int64_t>(want);
  }
  EXPECT_GT(appended, 40);  // most scenes have 2+ unique objects (4+ possible questions)
  // confusable_position appends its questions after those.
  ShapesQAMix c = l;
  c.confusable_position = 2;
  int64_t confusable = 0;
  for (int64_t i = 0; i < 40; ++i) {
    ShapesSample a = shapes_qa_sample(9, i, l), b = shapes_qa_sample(9, i, c);
    const size_t want = shapes_confusable_position_questions(a.objects, 2, 0).size();
    ASSERT_EQ(b.qa.size(), a.qa.size() + want);
    for (size_t k = 0; k < a.qa.size(); ++k) EXPECT_EQ(b.qa[k].question, a.qa[k].question);
    for (size_t k = a.qa.size(); k < b.qa.size(); ++k) EXPECT_EQ(b.qa[k].question.rfind("Where is the ", 0), 0u) << b.qa[k].question;
    confusable += static_cast<int64_t>(want);
  }
  EXPECT_GT(confusable, 0);
  // choice_by_word turns about that share of the choice questions that kept their letter line into word
  // questions (shapes_choice_by_word) and leaves every other question, and the format-line draws, as they were.
  ShapesQAMix w = mix;
  w.choice_by_word = 0.5;
  int64_t letter = 0, by_word = 0;
  for (int64_t i = 0; i < 60; ++i) {
    ShapesSample a = shapes_qa_sample(9, i, mix), b = shapes_qa_sample(9, i, w);
    ASSERT_EQ(a.qa.size(), b.qa.size());
    for (size_t k = 0; k < a.qa.size(); ++k) {
      const bool has_letter_line = a.qa[k].family == ShapesFamily::kChoice &&
                                   a.qa[k].question != shapes_without_format_line(a.qa[k].question);
      if (!has_letter_line || b.qa[k].question == a.qa[k].question) {
        EXPECT_EQ(b.qa[k].question, a.qa[k].question);
        EXPECT_EQ(b.qa[k].answer, a.qa[k].answer);
        letter += has_letter_line;
        continue;
      }
      const ShapesQA want = shapes_choice_by_word(a.qa[k]);
      EXPECT_EQ(b.qa[k].question, want.question);
      EXPECT_EQ(b.qa[k].answer, want.answer);
      ++by_word;
    }
  }
  // ~180 choice questions with a letter line, share 0.5: one standard deviation is ~0.037; [0.3, 0.7] > 5 sigma.
  ASSERT_GT(letter + by_word, 120);
  EXPECT_GT(static_cast<double>(by_word) / static_cast<double>(letter + by_word), 0.3);
  EXPECT_LT(static_cast<double>(by_word) / static_cast<double>(letter + by_word), 0.7);
  // fewer_options and in_the_image: about half of the choice questions lose options (the right one stays) and
  // about half of the colour, shape and choice questions name their object "... in the image?"; nothing else moves.
  ShapesQAMix v = mix;
  v.fewer_options = 0.5, v.in_the_image = 0.5;
  int64_t choice = 0, fewer = 0, nameable = 0, in_image = 0;
  for (int64_t i = 0; i < 60; ++i) {
    ShapesSample a = shapes_qa_sample(9, i, mix), b = shapes_qa_sample(9, i, v);
    ASSERT_EQ(a.qa.size(), b.qa.size());
    for (size_t k = 0; k < a.qa.size(); ++k) {
      const ShapesQA &x = a.qa[k], &y = b.qa[k];
      ASSERT_EQ(x.family, y.family);
      if (x.family != ShapesFamily::kColour && x.family != ShapesFamily::kShape && x.family != ShapesFamily::kChoice) {
        EXPECT_EQ(y.question, x.question);
        EXPECT_EQ(y.answer, x.answer);
        continue;
      }
      ++nameable;
      in_image += y.question.find(" in the image?") != std::string::npos;
      if (x.family != ShapesFamily::kChoice) {
        EXPECT_EQ(y.answer, x.answer);
        continue;
      }
      ++choice;
      const auto ox = shapes_choice_options(x.question), oy = shapes_choice_options(y.question);
      fewer += oy.size() < ox.size();
      EXPECT_EQ(oy.at(static_cast<size_t>(y.answer.at(0) - 'A')), ox.at(static_cast<size_t>(x.answer.at(0) - 'A')));
    }
  }
  // ~240 choice and ~360 nameable questions, share 0.5: [0.3, 0.7] is more than 5 sigma either way.
  ASSERT_GT(choice, 150);
  EXPECT_GT(static_cast<double>(fewer) / static_cast<double>(choice), 0.3);
  EXPECT_LT(static_cast<double>(fewer) / static_cast<double>(choice), 0.7);
  EXPECT_GT(static_cast<double>(in_image) / static_cast<double>(nameable), 0.3);
  EXPECT_LT(static_cast<double>(in_image) / static_cast<double>(nameable), 0.7);
}

// A mix of multiple choice alone: scenes where no object's colour or shape is unique have no such question, and
// their images leave the batch instead of becoming empty rows.
TEST(TrainTiny, ChoiceOnlyMixDropsImagesWithoutQuestions) {
  eqat_test::TempDir tmp;
  Model m = barely_trained(tmp);
  ShapesQAMix mix;
  mix.per_family = {0, 0, 0, 0, 0, 2, 0};
  int64_t without = 0;
  for (int64_t i = 0; i < 64; ++i) without += shapes_qa_sample(9, i, mix).qa.empty();
  ASSERT_GT(without, 0);  // the case exists in these 64 images
  ShapesQABatch b = shapes_qa_batch(9, 0, 64, mix, *m.tok, m.cfg, m.image_cfg);
  EXPECT_EQ(b.ids.size(0), 64 - without);
  EXPECT_EQ(b.pixels.size(0), 64 - without);
  EXPECT_GT(b.turns, 0);
}

// Option pieces (the recipe's default; --no-option-pieces turns them off): each option text of a multiple-choice
// question ("B. star") is one token; at the recipe's vocabulary size the rest of the prompt, and every other family's
// questions, are tokenized as without it.
TEST(TrainTiny, OptionPiecesMakeEachOptionOneToken) {
  eqat_test::TempDir tmp;
  TinyTrainOptions o = tiny(tmp.str("plain"));
  o.stage0_steps = 1, o.max_steps = 1;  // the tokenizer is trained before step 1
  o.sp_vocab = 1024;  // the recipe's: BPE runs out of merges first, so the 56 option pieces take no merge's place
  o.option_pieces = false;
  train_tiny(o);
  o.out = tmp.str("fused"), o.option_pieces = true;
  train_tiny(o);
  const Tokenizer plain = Tokenizer::from_model_file(tmp.str("plain") + "/tokenizer.model");
  const Tokenizer fused = Tokenizer::from_model_file(tmp.str("fused") + "/tokenizer.model");
  EXPECT_EQ(fused.vocab_size(), plain.vocab_size() + 4 * (kShapesColours + kShapesKinds));
  int64_t choices = 0;
  for (const ShapesEvalItem& it : shapes_test_split(5, 70)) {
    const std::string q = "\n" + it.text + " ASSISTANT:";
    const std::vector<int64_t> a = plain.encode(q, false), b = fused.encode(q, false);
    const std::vector<std::string> opts = shapes_choice_options(it.text);
    if (opts.empty()) {
      EXPECT_EQ(plain.decode(a), fused.decode(b)) << it.text;
      EXPECT_EQ(a.size(), b.size()) << it.text;
      continue;
    }
    ++choices;
    for (size_t i = 0; i < opts.size(); ++i) {
      const std::string piece = std::string(1, static_cast<char>('A' + i)) + ".\xE2\x96\x81" + opts[i];
      const int64_t id = fused.piece_to_id(piece);
      ASSERT_GE(id, 0) << piece;
      EXPECT_EQ(std::count(b.begin(), b.end(), id), 1) << it.text;
    }
    EXPECT_EQ(fused.decode(b), plain.decode(a));
    EXPECT_EQ(b.size() + 2 * opts.size(), a.size()) << it.text;  // "A", ".", "▁red" became one token
  }
  EXPECT_EQ(choices, 10);  // question i is of family i % 7
}

}  // namespace
}  // namespace eqat
