// The quantize pipeline as a library call (quant/qat/pipeline.h): resume compares the settings that change the
// result and names each difference; GPTQ v1's zero-point limit is honoured from the first step, so its export
// never meets a zero point it cannot store; --layout renames the LLaVA keys and nothing else.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <fstream>

#include "data/config.h"
#include "data/error.h"
#include "data/image.h"
#include "data/safetensors.h"
#include "model_test_util.h"
#include "quant/pack.h"
#include "quant/qat/gptq.h"
#include "quant/qat/pipeline.h"
#include "quant/quantizer.h"

using namespace eqat;
using namespace eqat_test;

namespace pipeline_test {

QuantizeOptions rtn_options(const std::string& out) {
  QuantizeOptions o;
  o.model_dir = fixture("tiny_llama");
  o.out = out;
  o.method = "rtn";
  o.spec.bits = 2;
  o.spec.group_size = -1;
  o.calib = data_path("text/tinyshakespeare.txt");
  o.calib_opts.n_train = 2;
  o.calib_opts.n_val = 1;
  o.calib_opts.seq_len = 16;
  o.progress = false;
  return o;
}

}  // namespace pipeline_test

TEST(Pipeline, ResumeNamesEverySettingThatChanged) {
  TempDir t;
  const std::string calib = t.str("calib.txt");
  std::ofstream(calib) << "some text";
  QuantizeOptions a = pipeline_test::rtn_options(t.str("q"));
  a.calib = calib;
  const nlohmann::json saved = quantize_settings(a);
  EXPECT_EQ(settings_differences(saved, quantize_settings(a)), "");
  QuantizeOptions b = a;
  b.calib_opts.seed = 3;
  b.block.epochs = 1;
  EXPECT_EQ(settings_differences(saved, quantize_settings(b)), "--epochs 2 -> 1, --seed 2 -> 3");
  // The same path with other content (here: another size) is another data set.
  std::ofstream(calib) << "some other text";
  EXPECT_NE(settings_differences(saved, quantize_settings(a)).find("--calib " + std::filesystem::weakly_canonical(calib).string() +
                                                                   " changed since the saved run"),
            std::string::npos);
  // E2E-QP settings count only when E2E-QP runs.
  QuantizeOptions e = a;
  e.method = "efficientqat";
  e.e2e.max_steps = 5;
  const std::string d = settings_differences(quantize_settings(a), quantize_settings(e));
  EXPECT_NE(d.find("--method rtn -> efficientqat"), std::string::npos) << d;
  EXPECT_NE(d.find("--e2e-steps (none) -> 5"), std::string::npos) << d;
}

// EfficientQAT's defaults: Block-AP from GPTQ's integers and E2E-QP by distillation when the targets are small (a
// few answer tokens per sample: 2 text windows of 16 tokens here). Both choices are named in the summary and the
// saved settings; the combinations that cannot work are refused before anything is created.
TEST(Pipeline, DistillationAndGptqStartAreChosenAndChecked) {
  TempDir t;
  QuantizeOptions o = pipeline_test::rtn_options(t.str("q"));
  o.method = "efficientqat";
  o.block.init = "gptq";
  o.block.epochs = 1;
  o.e2e.max_steps = 1;
  o.e2e.global_batch = o.e2e.micro_batch = 1;
  const nlohmann::json summary = run_quantize(o);
  EXPECT_EQ(summary["e2e_phase"]["loss"], "kd");
  EXPECT_GT(summary["e2e_phase"]["val_loss_before"].get<double>(), 0.0);  // a KL, not a cross-entropy of ~6
  EXPECT_LT(summary["e2e_phase"]["val_loss_before"].get<double>(), 1.0);
  o.e2e_loss = "ce";
  o.overwrite = true;
  EXPECT_GT(run_quantize(o)["e2e_phase"]["val_loss_before"].get<double>(), 1.0);
  EXPECT_EQ(quantize_settings(o)["--init"], "gptq");
  auto refused = [&](QuantizeOptions bad, const std::string& flag) {
    bad.out = t.str("never");
    try {
      run_quantize(bad);
      ADD_FAILURE() << flag << " accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(flag), std::string::npos) << e.what();
    }
    EXPECT_FALSE(std::filesystem::exists(t.str("never")));
  };
  QuantizeOptions b = o;
  b.e2e_loss = "kd";
  b.phases = "e2e-qp";
  refused(b, "--e2e-loss kd with --phases e2e-qp");
  b = o;
  b.e2e_loss = "mse";
  refused(b, "--e2e-loss");
  b = o;
  b.method = "gptq";
  refused(b, "--init gptq");
  b = o;
  b.block.init = "absmax";
  refused(b, "--init");
}

// --batch-size auto (not the default): the paper's 2 samples, or for efficientqat at 2 and 3 bits on short samples
// enough to hold about kAutoBatchTokens tokens, at most kAutoBatchMax; the pipeline resolves it from the training
// samples it loaded.
TEST(Pipeline, AutoBatchHoldsAboutAFixedTokenCount) {
  auto samples = [](std::vector<size_t> lengths) {
    std::vector<CalibSample> v(lengths.size());
    for (size_t i = 0; i < lengths.size(); ++i) v[i].ids.assign(lengths[i], 1);
    return v;
  };
  EXPECT_EQ(auto_block_batch("efficientqat", 2, samples({35, 34, 34})), 8);   // ⌈256 / 34.3⌉: the shapes world
  EXPECT_EQ(auto_block_batch("efficientqat", 2, samples({256, 256})), 2);     // text windows: the paper's batch
  EXPECT_EQ(auto_block_batch("efficientqat", 2, samples({2048})), 2);
  EXPECT_EQ(auto_block_batch("efficientqat", 2, samples({100, 200})), 2);     // ⌈256 / 150⌉ = 2
  EXPECT_EQ(auto_block_batch("efficientqat", 2, samples({60, 70})), 4);       // ⌈256 / 65⌉ = 4
  EXPECT_EQ(auto_block_batch("efficientqat", 2, samples({3, 4})), kAutoBatchMax);
  EXPECT_EQ(auto_block_batch("efficientqat", 3, samples({35, 34, 34})), 8);
  EXPECT_EQ(auto_block_batch("efficientqat", 4, samples({35, 34, 34})), 2);  // 4 bits: the paper's batch
  EXPECT_EQ(auto_block_batch("efficientqat", 8, samples({35, 34, 34})), 2);
  EXPECT_EQ(auto_block_batch("gptq", 2, samples({35, 34})), 2);               // no training: the batch only pads
  EXPECT_EQ(auto_block_batch("rtn", 2, samples({35})), 2);
  EXPECT_EQ(auto_block_batch("efficientqat", 2, {}), 2);

  TempDir t;
  QuantizeOptions o = pipeline_test::rtn_options(t.str("q"));
  EXPECT_EQ(o.block.batch_size, -1);  // default_block_batch, unless auto (0) or a size is asked for
  o.block.batch_size = 0;
  EXPECT_EQ(quantize_settings(o)["--batch-size"], 0);
  o.method = "efficientqat";
  o.phases = "block-ap";
  o.block.epochs = 1;
  EXPECT_EQ(run_quantize(o)["block_phase"]["batch_size"], 16);  // 16-token windows: ⌈256 / 16⌉ = 16
  o.overwrite = true;
  o.block.batch_size = 3;
  EXPECT_EQ(run_quantize(o)["block_phase"]["batch_size"], 3);
  o.method = "rtn";
  o.phases = "both";
  o.block.batch_size = 0;
  EXPECT_EQ(run_quantize(o)["block_phase"]["batch_size"], 2);
  o.block.batch_size = -1;
  EXPECT_EQ(run_quantize(o)["block_phase"]["batch_size"], 2);
}

// Without --batch-size: 4 (8 at 2 bits; at rates that scale with it) from the gptq-unrounded start on many short
// samples (at 3 bits, from 1024 of them), the paper's 2 otherwise.
TEST(Pipeline, DefaultBatchIsLargerOnlyForManyShortSamplesFromTheUnroundedStart) {
  auto samples = [](size_t n, size_t length) {
    CalibSample one;
    one.ids.assign(length, 1);
    return std::vector<CalibSample>(n, one);
  };
  auto batch = [](const std::string& init, int bits, const std::vector<CalibSample>& train) {
    return default_block_batch("efficientqat", init, bits, train);
  };
  // The CLI's default VLM run: 8 at 2 bits, 4 at 3 and 4 bits (and at 8 bits, where neither was measured).
  EXPECT_EQ(batch("gptq-unrounded", 2, samples(4096, 35)), 8);
  EXPECT_EQ(batch("gptq-unrounded", 3, samples(4096, 35)), 4);
  EXPECT_EQ(batch("gptq-unrounded", 4, samples(4096, 35)), 4);
  EXPECT_EQ(batch("gptq-unrounded", 8, samples(4096, 35)), 4);
  // At 3 bits from kUnrounded3BitMinSamples: 4 at the peers' 1024 samples, 2 below.
  EXPECT_EQ(batch("gptq-unrounded", 3, samples(1024, 35)), 4);
  EXPECT_EQ(batch("gptq-unrounded", 3, samples(4095, 35)), 4);
  EXPECT_EQ(batch("gptq-unrounded", 3, samples(1023, 35)), 2);
  EXPECT_EQ(batch("gptq-unrounded", 3, samples(1024, 128)), 2);  // two hold 256 tokens
  EXPECT_EQ(batch("minmax", 3, samples(1024, 35)), 2);           // the paper's recipe
  for (int bits : {2, 4}) {
    EXPECT_EQ(batch("gptq-unrounded", bits, samples(4095, 35)), 2) << bits;  // fewer than kUnroundedMinSamples
    EXPECT_EQ(batch("gptq-unrounded", bits, samples(1024, 35)), 2) << bits;  // measured: keeps 2
    EXPECT_EQ(batch("gptq-unrounded", bits, samples(8192, 127)), unrounded_batch(bits)) << bits;
    EXPECT_EQ(batch("gptq-unrounded", bits, samples(8192, 128)), 2) << bits;   // two hold 256 tokens
    EXPECT_EQ(batch("gptq-unrounded", bits, samples(4096, 2048)), 2) << bits;  // the paper's windows
    EXPECT_EQ(batch("minmax", bits, samples(4096, 35)), 2) << bits;            // the paper's recipe
    EXPECT_EQ(batch("gptq", bits, samples(4096, 35)), 2) << bits;
    EXPECT_EQ(batch("gptq-unrounded", bits, {}), 2) << bits;
    EXPECT_EQ(default_block_batch("gptq", "minmax", bits, samples(4096, 35)), 2) << bits;
  }
  // The rates scale with the batch up to unrounded_batch(bits): 1 at the batch-2 rates, then 2 from batch 4 at 3 and
  // 4 bits, 4 from batch 8 at 2 bits.
  EXPECT_EQ(unrounded_lr_scale(1, 4), 0.5);
  EXPECT_EQ(unrounded_lr_scale(2, 4), 1.0);
  EXPECT_EQ(unrounded_lr_scale(4, 4), 2.0);
  EXPECT_EQ(unrounded_lr_scale(8, 4), 2.0);
  EXPECT_EQ(unrounded_lr_scale(8, 3), 2.0);
  EXPECT_EQ(unrounded_lr_scale(2, 2), 1.0);
  EXPECT_EQ(unrounded_lr_scale(4, 2), 2.0);
  EXPECT_EQ(unrounded_lr_scale(8, 2), 4.0);
  EXPECT_EQ(unrounded_lr_scale(16, 2), 4.0);
}

// Rows whose weights are all >= 0 have a min–max zero point of 0, which GPTQ v1 (zero − 1 in `bits` bits) cannot
// store; with zero_min = 1 the quantizers never produce it and stay consistent (Ŵ = (q − z)·s).
TEST(Pipeline, GptqV1ZeroPointLimitHoldsInEveryQuantizer) {
  at::manual_seed(0);
  at::Tensor W = at::rand({8, 64});  // all in [0, 1)
  QuantSpec spec{2, 32};
  auto [s, z] = minmax_init(W, spec);
  EXPECT_EQ(quantize_integers(W, s, z, spec).zero.min().item<int>(), 0) << "the case v1 cannot store";
  spec.zero_min = 1;
  QuantizedWeight qw = quantize_integers(W, s, z, spec);
  EXPECT_GE(qw.zero.min().item<int>(), 1);
  EXPECT_TRUE(at::allclose(fake_quantize(W, s, z, spec), dequantize_integers(qw, 32), 1e-5, 1e-6));
  const QuantizedWeight g = gptq_quantize(W, W.t().mm(W).to(at::kDouble) + at::eye(64, at::kDouble), spec);
  EXPECT_GE(g.zero.min().item<int>(), 1);
  EXPECT_LE(g.q.max().item<int>(), 3);
  EXPECT_NO_THROW(qzeros_v2_to_v1(pack_rows(g.zero, 2).t().contiguous(), 2, 8, "test"));
}

TEST(Pipeline, GptqV1ExportOfA2BitRunLoadsBack) {
  TempDir t;
  QuantizeOptions o = pipeline_test::rtn_options(t.str("q"));
  o.format = "gptq-v1";
  const nlohmann::json summary = run_quantize(o);
  EXPECT_EQ(summary["bits"], 2);
  const ModelConfig cfg = load_model_config(t.str("q"));
  EXPECT_EQ(cfg.quant.checkpoint_format, "gptq");
  EXPECT_FALSE(std::filesystem::exists(t.str("q.eqat-state")));
  Model m = load_model(t.str("q"));  // v1 zero points read back
  EXPECT_TRUE(m.cfg.quant.present);
}

// --layout transformers writes the keys GPTQModel and current transformers expect (model.language_model.*), and
// the export is the same model as the llava-hf-layout one: same tensors under other names, same logits.
TEST(Pipeline, LayoutTransformersRenamesKeysOnly) {
  TempDir t;
  std::map<std::string, Model> models;
  std::map<std::string, std::vector<std::string>> names;
  for (const std::string layout : {"llava-hf", "transformers"}) {
    QuantizeOptions o = pipeline_test::rtn_options(t.str(layout));
    o.model_dir = fixture("tiny_llava");
    o.spec.bits = 4;
    o.layout = layout;
    run_quantize(o);
    names[layout] = Checkpoint::open(t.str(layout)).names();
    models.emplace(layout, load_model(t.str(layout)));
  }
  auto count_prefix = [](const std::vector<std::string>& v, const std::string& p) {
    return std::count_if(v.begin(), v.end(), [&](const std::string& n) { return n.rfind(p, 0) == 0; });
  };
  EXPECT_GT(count_prefix(names["transformers"], "model.language_model.layers.0."), 0);
  EXPECT_EQ(count_prefix(names["transformers"], "language_model."), 0);
  EXPECT_GT(count_prefix(names["transformers"], "model.vision_tower."), 0);
  // transformers 5 holds the CLIP tower flat; GPTQModel loads keys as they are, so a nested one would stay
  // uninitialised there (NaN logits, bench/peers/interop.py).
  EXPECT_EQ(count_prefix(names["transformers"], "model.vision_tower.vision_model."), 0);
  EXPECT_GT(count_prefix(names["transformers"], "model.vision_tower.encoder.layers.0."), 0);
  EXPECT_GT(count_prefix(names["llava-hf"], "language_model.model.layers.0."), 0);
  EXPECT_EQ(names["transformers"].size(), names["llava-hf"].size());
  for (const auto& n : names["llava-hf"])
    EXPECT_NE(std::find(names["transformers"].begin(), names["transformers"].end(),
                        relayout_key(n, CheckpointLayout::kTransformers)),
              names["transformers"].end())
        << n;
  auto g = Checkpoint::open(fixture("tiny_llava/golden.safetensors"));
  const std::vector<int64_t> ids = to_ids(g.get("p0.input_ids"));
  c10::NoGradGuard ng;
  auto logits = [&](Model& mm) {
    at::Tensor e = embed_prompt(mm, ids, g.get("pixel_values"));
    return mm.lm->forward(e, at::arange(e.size(1)).view({1, -1}), {}, nullptr);
  };
  EXPECT_TRUE(at::equal(logits(models.at("llava-hf")), logits(models.at("transformers"))));
  for (const auto& n : names["llava-hf"]) {  // the two layouts map onto each other (the tower nested in llava-hf's)
    const std::string tf = relayout_key(n, CheckpointLayout::kTransformers), back = relayout_key(tf, CheckpointLayout::kLlavaHf);
    if (n.rfind("vision_tower.", 0) == 0) EXPECT_EQ(back.rfind("vision_tower.vision_model.", 0), 0u) << n;
    else EXPECT_EQ(back, n);
    EXPECT_EQ(relayout_key(back, CheckpointLayout::kTransformers), tf);
  }

  // Files of the transformers layout with a nested tower (eqat's before the fix) still load, to the same model.
  const std::string old = t.str("old");
  std::filesystem::copy(t.str("transformers"), old);
  std::vector<std::pair<std::string, at::Tensor>> renamed;
  Checkpoint tf = Checkpoint::open(t.str("transformers"));
  for (const auto& n : tf.names()) {
    std::string k = n;
    if (k.rfind("model.vision_tower.", 0) == 0) k.insert(std::string("model.vision_tower.").size(), "vision_model.");
    renamed.emplace_back(k, tf.get(n).clone());
  }
  write_checkpoint(old, renamed);
  EXPECT_EQ(checkpoint_layout(Checkpoint::open(old)), CheckpointLayout::kTransformers);
  Model mo = load_model(old);
  EXPECT_TRUE(at::equal(logits(models.at("llava-hf")), logits(mo)));
}

// A Mistral decoder goes through the same pipeline: Block-AP's block runs see the sliding window (calibration
// windows of 32 tokens against a window of 8), and the export keeps MistralForCausalLM and its window, so the
// reloaded packed model serves with the same attention.
TEST(Pipeline, MistralQuantizesAndExportsWithItsSlidingWindow) {
  TempDir t;
  QuantizeOptions o = pipeline_test::rtn_options(t.str("q"));
  o.model_dir = fixture("tiny_mistral");
  o.method = "efficientqat";
  o.spec.bits = 4;
  o.block.epochs = 1;
  o.e2e.max_steps = 1;
  o.e2e.global_batch = o.e2e.micro_batch = 1;
  o.calib_opts.seq_len = 32;
  const nlohmann::json summary = run_quantize(o);
  ModelConfig c = load_model_config(t.str("q"));
  EXPECT_EQ(c.text.model_type, "mistral");
  EXPECT_EQ(c.text.sliding_window, 8);
  EXPECT_TRUE(c.quant.present);
  Model q = load_model(t.str("q"));
  Model f = load_model(fixture("tiny_mistral"));
  auto g = Checkpoint::open(fixture("tiny_mistral/golden.safetensors"));
  c10::NoGradGuard ng;
  at::Tensor ids = g.get("prompt.input_ids").to(at::kLong).view({1, -1});
  at::Tensor pos = at::arange(ids.size(1), at::kLong).view({1, -1});
  at::Tensor lq = q.lm->forward(q.lm->embed(ids), pos, {}, nullptr)[0];
  at::Tensor lf = f.lm->forward(f.lm->embed(ids), pos, {}, nullptr)[0];
  EXPECT_LE(max_abs_diff(lf, g.get("prompt.logits")), kLogitTol);
  // The same FP weights without the window (config edited in a copy) give other logits; the quantized model must
  // follow the windowed ones (measured: max |Δ| 2.2 to the windowed FP logits, 8.5 to the window-less ones).
  std::filesystem::copy(fixture("tiny_mistral"), t.path / "nowin");
  nlohmann::json cj = load_json(t.str("nowin/config.json"));
  cj["sliding_window"] = nullptr;
  std::ofstream(t.str("nowin/config.json")) << cj.dump();
  Model n = load_model(t.str("nowin"));
  at::Tensor ln = n.lm->forward(n.lm->embed(ids), pos, {}, nullptr)[0];
  const double to_window = max_abs_diff(lq, lf), to_full = max_abs_diff(lq, ln);
  EXPECT_LT(to_window, 0.5 * to_full) << "W4 vs windowed FP " << to_window << ", vs window-less FP " << to_full;
}

// LLaVA-NeXT through the whole pipeline (shapes calibration with anyres images, Block-AP, E2E-QP, export): the
// export is a LlavaNextForConditionalGeneration with its grid, and it answers closer to the FP model than RTN.
TEST(Pipeline, LlavaNextQuantizesEndToEnd) {
  TempDir t;
  const std::string src = fixture("tiny_llava_next_mistral");
  QuantizeOptions o = pipeline_test::rtn_options(t.str("q"));
  o.model_dir = src;
  o.calib.clear();  // the shapes world, with images
  o.method = "efficientqat";
  o.spec.bits = 4;
  o.spec.group_size = 32;
  o.block.epochs = 2;
  o.e2e.max_steps = 2;
  o.e2e.global_batch = o.e2e.micro_batch = 1;
  o.calib_opts.n_train = 8;
  o.calib_opts.seq_len = 256;
  run_quantize(o);
  ModelConfig c = load_model_config(t.str("q"));
  EXPECT_TRUE(c.anyres);
  EXPECT_EQ(c.text.model_type, "mistral");
  EXPECT_NE(model_config_to_json(c).find("LlavaNextForConditionalGeneration"), std::string::npos);
  Model q = load_model(t.str("q"));
  Model f = load_model(src);
  auto g = Checkpoint::open(src + "/golden.safetensors");
  const std::vector<int64_t> ids = to_ids(g.get("mid.input_ids"));
  c10::NoGradGuard ng;
  auto all_logits = [&](Model& mm, const ImageInput& image) {  // [T, V]
    at::Tensor e = embed_prompt(mm, ids, image);
    return mm.lm->forward(e, at::arange(e.size(1)).view({1, -1}), {}, nullptr)[0];
  };
  Image img = load_image(src + "/mid.png");
  const at::Tensor lq = all_logits(q, prepare_image(q, img)), lf = all_logits(f, prepare_image(f, img));
  EXPECT_LE(max_abs_diff(lf, g.get("mid.logits")), kLogitTol);
  // The same settings with RTN: Block-AP, calibrated on the anyres image-text samples in the model's mistral
  // template, must end closer to the FP model's next-token distributions over this prompt (a deterministic run;
  // measured mean KL 0.045 against RTN's 0.051).
  QuantizeOptions r = o;
  r.out = t.str("rtn");
  r.method = "rtn";
  run_quantize(r);
  Model rq = load_model(t.str("rtn"));
  const at::Tensor lr = all_logits(rq, prepare_image(rq, img));
  auto kl = [](const at::Tensor& p, const at::Tensor& q) {  // mean over the prompt's positions
    const at::Tensor lp = at::log_softmax(p, -1), lq2 = at::log_softmax(q, -1);
    return (lp.exp() * (lp - lq2)).sum(-1).mean().item<double>();
  };
  EXPECT_LT(kl(lf, lq), kl(lf, lr));
}
