// EfficientQAT end to end on the tiny fixtures: STE gradients, Block-AP beats RTN, GPTQ beats RTN on the block
// MSE, export -> reload gives the in-memory model's logits, resume after a killed run is bit-identical, Block-AP from
// GPTQ's start, E2E-QP by distillation.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <set>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <random>
#include <set>

#include "data/error.h"
#include "data/safetensors.h"
#include "data/shapes.h"
#include "model_test_util.h"
#include "quant/qat/block_ap.h"
#include "quant/qat/calib.h"
#include "quant/qat/e2e_qp.h"
#include "quant/qat/export.h"
#include "quant/qat/gptq.h"
#include "quant/qat/optim.h"
#include "quant/cpu_qgemv.h"
#include "quant/pack.h"
#include "vision/random_model.h"
#include "quant/quantizer.h"

using namespace eqat;
using namespace eqat_test;

namespace {
CalibSet tiny_calib(const Model& m) {
  CalibOptions co;
  co.n_train = 8;
  co.n_val = 4;
  co.seq_len = 32;
  return load_text_data(m, data_path("text/tinyshakespeare.txt"), co);
}
double last_val(const BlockApResult& r) { return r.blocks.back().val_loss.back(); }
// The FP tiny model's distillation targets for tiny_calib's train then val samples (computed once). Wrecked step
// sizes raise every validation sample's KL to the FP model, so E2E-QP's rule (worse_on_validation) sees a worse
// mean and a worse majority; a cross-entropy on this random model's text sits near log V whatever the step sizes,
// and a wrecked model scored better than RTN's on 2 of the 4 samples.
const std::vector<at::Tensor>& tiny_fp_targets();
BlockApOptions opts(const std::string& method, int bits) {
  BlockApOptions o;
  o.method = method;
  o.spec.bits = bits;
  o.spec.group_size = 32;
  o.epochs = 2;
  o.batch_size = 2;
  o.progress = false;
  o.weight_lr = 1e-3;  // tiny model, few steps: a larger lr than the paper's so 8 iterations/block move weights
  o.quant_lr = 1e-2;
  return o;
}
// E2E-QP on the tiny fixtures: 8 samples in steps of 4, 4 epochs, an lr large enough to move in 8 steps.
E2eOptions e2e_opts() {
  E2eOptions o;
  o.lr = 1e-2;
  o.global_batch = 4;
  o.micro_batch = 2;
  o.epochs = 4;
  o.progress = false;
  return o;
}
E2eOptions kd_opts() {
  E2eOptions o = e2e_opts();
  o.loss = "kd";
  o.teacher_hidden = &tiny_fp_targets();
  return o;
}
// RTN at 2 bits on m, returning the FP stream's distillation targets for `teacher` = calib's train then val samples.
BlockApResult rtn_with_fp_targets(Model& m, const CalibSet& calib, std::vector<CalibSample>& teacher) {
  teacher = calib.train;
  teacher.insert(teacher.end(), calib.val.begin(), calib.val.end());
  BlockApOptions bo = opts("rtn", 2);
  bo.teacher_samples = &teacher;
  return run_block_quantization(m, calib, bo);
}
const std::vector<at::Tensor>& tiny_fp_targets() {
  static const std::vector<at::Tensor> targets = [] {
    Model m = load_model(fixture("tiny_llama"));
    std::vector<CalibSample> teacher;
    return rtn_with_fp_targets(m, tiny_calib(m), teacher).teacher_hidden;
  }();
  return targets;
}
}  // namespace

TEST(Quantizer, SteGradientsFollowTheReference) {
  QuantSpec spec{2, 4};
  at::Tensor W = at::tensor({0.0f, 0.3f, 0.7f, 5.0f}).view({1, 4}).set_requires_grad(true);
  at::Tensor s = at::tensor({0.25f}).view({1, 1}).set_requires_grad(true);
  at::Tensor z = at::tensor({0.4f}).view({1, 1}).set_requires_grad(true);  // rounds to 0
  fake_quantize(W, s, z, spec).sum().backward();
  // W=5.0: 5/0.25 = 20 > qmax = 3 -> clamped: ∂Ŵ/∂W = 0; the others are in range: 1.
  EXPECT_TRUE(at::equal(W.grad(), at::tensor({1.0f, 1.0f, 1.0f, 0.0f}).view({1, 4})));
  // ∂Ŵ/∂s: in range round(u) − u (u = 0, 1.2, 2.8), clamped qmax − z' = 3.
  EXPECT_NEAR(s.grad().item<float>(), (0 - 0.0) + (1 - 1.2) + (3 - 2.8) + 3.0, 1e-5);
  // ∂Ŵ/∂z: 0 in range, −s' when clamped.
  EXPECT_NEAR(z.grad().item<float>(), -0.25, 1e-6);
}

// The fused CPU fake quantizer (Block-AP's fp32 path) against the composite autograd form. Values: bit-identical (the
// same float operations). Gradients: the composite reaches dL/dW as ((G·s')·in)/s' and sums each group in float, the
// fused kernel takes G·in and sums in double, so they agree to float rounding: a group sum of ≤ 32 terms carries a
// relative error ≤ 32·2⁻²⁴ ≈ 2e-6 of its absolute sum, well inside 1e-4 of the largest gradient. The case covers a
// ragged last group (K = 100, g = 32), scales under the clamp, zero points off the grid and outside [zero_min, qmax],
// weights clamped at both ends, 2 and 3 bits, zero_min 0 and 1.
TEST(Quantizer, FusedFakeQuantMatchesTheCompositeAndItsGradients) {
  at::manual_seed(11);
  for (int bits : {2, 3})
    for (int zero_min : {0, 1}) {
      QuantSpec spec{bits, 32, zero_min};
      const int64_t N = 12, K = 100, G = spec.groups_for(K);
      const at::Tensor W0 = at::randn({N, K});
      auto [s0, z0] = minmax_init(W0, spec);
      s0 = s0 * (0.6 + at::rand({N, G}));  // some groups clip
      s0[0][1] = 1e-6;                      // under kScaleMin: s' = 1e-4
      z0 = z0 + at::rand({N, G}) - 0.5;     // off the integer grid
      z0[1][0] = -2.3;                      // under zero_min
      z0[2][3] = static_cast<float>(spec.qmax()) + 3.6f;
      const at::Tensor x0 = at::randn({2, 5, K}), R = at::randn({2, 5, N});

      auto leaves = [&] {
        return std::vector<at::Tensor>{x0.clone().set_requires_grad(true), W0.clone().set_requires_grad(true),
                                       s0.clone().set_requires_grad(true), z0.clone().set_requires_grad(true)};
      };
      std::vector<at::Tensor> ref = leaves(), fused = leaves();
      const at::Tensor what = fake_quantize(ref[1], ref[2], ref[3], spec);
      EXPECT_TRUE(at::equal(fake_quantize_fused(W0, s0, z0, spec), what.detach()));
      (at::linear(ref[0], what) * R).sum().backward();

      QuantLinear lin(K, N, false);
      lin->to_fake_quant(spec);
      lin->weight.set_data(fused[1].detach()), lin->weight_scale.set_data(fused[2].detach());
      lin->weight_zero.set_data(fused[3].detach());
      for (auto* p : {&lin->weight, &lin->weight_scale, &lin->weight_zero}) p->set_requires_grad(true);
      (lin->forward(fused[0]) * R).sum().backward();
      const std::vector<at::Tensor> got = {fused[0].grad(), lin->weight.grad(), lin->weight_scale.grad(),
                                           lin->weight_zero.grad()};
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_TRUE(got[i].defined()) << i;
        const double tol = 1e-4 * ref[i].grad().abs().max().item<double>() + 1e-7;
        EXPECT_LE((got[i] - ref[i].grad()).abs().max().item<double>(), tol) << "bits " << bits << " input " << i;
      }
      // The clamps were exercised: some weights got no gradient, some zero points did.
      EXPECT_GT((got[1] == 0).sum().item<int64_t>(), 0);
      EXPECT_NE(got[3][2][3].item<float>(), 0.0f);
    }
}

// The fake quantizer and its backward for several linears in one parallel region (FakeQuantJob) give each linear
// bit for bit what a call of its own gives, at 1, 2 and 3 threads: rows of different widths (a ragged last group
// included) and counts, so that the threads' element shares end inside rows of every job. A row mapped to the wrong
// job, skipped or done twice changes values.
TEST(Quantizer, FusedFakeQuantOfSeveralLinearsIsEachLinearsOwn) {
  const int threads = at::get_num_threads();
  at::manual_seed(12);
  const QuantSpec spec{2, 64};
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{37, 256}, {5, 100}, {130, 512}, {64, 64}};  // [N, K]
  std::vector<at::Tensor> W, s, z, dhat;
  for (auto [N, K] : shapes) {
    W.push_back(at::randn({N, K}));
    auto [s0, z0] = minmax_init(W.back(), spec);
    s.push_back((s0 * (0.6 + at::rand_like(s0))).contiguous());  // some weights clip
    z.push_back(z0.contiguous());
    dhat.push_back(at::randn({N, K}));
  }
  for (int nthreads : {1, 2, 3}) {
    at::set_num_threads(nthreads);
    std::vector<FakeQuantJob> fwd, bwd;
    for (size_t j = 0; j < W.size(); ++j) {
      fwd.push_back({W[j], s[j], z[j], spec, at::full_like(W[j], 7.0f)});
      bwd.push_back({W[j], s[j], z[j], spec, dhat[j].clone()});
    }
    fake_quantize_fused_into(fwd);
    const std::vector<FakeQuantGrads> got = fake_quantize_backward_fused(bwd);
    for (size_t j = 0; j < W.size(); ++j) {
      SCOPED_TRACE(testing::Message() << nthreads << " threads, linear " << j);
      EXPECT_TRUE(at::equal(fwd[j].t, fake_quantize_fused(W[j], s[j], z[j], spec)));
      const FakeQuantGrads own = fake_quantize_backward_fused(dhat[j].clone(), W[j], s[j], z[j], spec);
      EXPECT_TRUE(at::equal(got[j].w, own.w));
      EXPECT_TRUE(at::equal(got[j].s, own.s));
      EXPECT_TRUE(at::equal(got[j].z, own.z));
    }
  }
  at::set_num_threads(threads);
}

#ifdef __GLIBC__
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif
#else
constexpr bool kAddressSanitizer = false;
#endif
// KeepFreedMemory: 96 MiB allocated in 1 MiB blocks and freed again stay in the heap while a scope is alive (glibc
// would give back a free top above 64 MiB), also after an inner scope ended; when the outermost one ends, the heap is
// trimmed. The blocks are written so that their pages are real. mallinfo2().fordblks: free bytes inside the heap.
TEST(KeepFreedMemory, FreedMemoryStaysInTheHeapUntilTheOutermostScopeEnds) {
  if (kAddressSanitizer) GTEST_SKIP() << "under ASan, malloc is ASan's: glibc's thresholds and mallinfo2 do not apply";
  constexpr size_t kBlock = size_t{1} << 20, kBlocks = 96;
  auto churn = [&] {
    std::vector<void*> p;
    for (size_t i = 0; i < kBlocks; ++i) {
      p.push_back(std::malloc(kBlock));
      std::memset(p.back(), 1, kBlock);
    }
    for (void* q : p) std::free(q);
    return mallinfo2().fordblks;
  };
  {
    KeepFreedMemory outer(true);
    EXPECT_GE(churn(), kBlocks * kBlock);
    { KeepFreedMemory inner(true); }
    EXPECT_GE(churn(), kBlocks * kBlock) << "the inner scope's end must not restore the thresholds";
    { KeepFreedMemory off(false); }
  }
  EXPECT_LT(mallinfo2().fordblks, kBlocks * kBlock / 2);
  EXPECT_LT(churn(), kBlocks * kBlock / 2) << "outside a scope, a free top above 64 MiB goes back to the kernel";
}
#endif

// The one-pass AdamW on fp32 CPU tensors against the op-by-op form (taken by fp64 tensors), over three steps with
// weight decay. A float update carries a relative error of a few 2⁻²⁴ per step; 1e-6 of the parameters' scale
// bounds three of them.
TEST(AdamW, FusedStepMatchesTheOpByOpForm) {
  at::manual_seed(3);
  const at::Tensor p0 = at::randn({1000}), grads = at::randn({3, 1000});
  at::Tensor pf = p0.clone(), pd = p0.to(at::kDouble);
  AdamW of({ParamGroup{"w", {pf}, 1e-2, 0.1}}), od({ParamGroup{"w", {pd}, 1e-2, 0.1}});
  for (int64_t t = 0; t < 3; ++t) {
    pf.mutable_grad() = grads[t].clone();
    pd.mutable_grad() = grads[t].to(at::kDouble);
    of.step();
    od.step();
  }
  EXPECT_GT((pd - p0.to(at::kDouble)).abs().max().item<double>(), 1e-2);  // the parameters moved
  EXPECT_LE((pf.to(at::kDouble) - pd).abs().max().item<double>(), 1e-6 * p0.abs().max().item<double>());
}

// AdamW's one parallel region over all of a step's fp32 parameters (two groups, sizes that split across the threads
// anywhere, one of them in a ragged vector tail) gives every parameter, m and v bit for bit what an optimizer of that
// parameter alone gives, at 1, 2 and 3 threads: a share mapped to the wrong parameter or offset changes values.
TEST(AdamW, OneRegionOverAllParametersIsEachParametersOwnStep) {
  const int threads = at::get_num_threads();
  at::manual_seed(6);
  const std::vector<int64_t> sizes = {70001, 3, 65536, 40000};
  std::vector<at::Tensor> p0, grads;
  for (int64_t n : sizes) {
    p0.push_back(at::randn({n}));
    grads.push_back(at::randn({2, n}));
  }
  auto run = [&](bool alone, int nthreads) {
    at::set_num_threads(nthreads);
    std::vector<at::Tensor> p;
    for (const auto& t : p0) p.push_back(t.clone());
    std::vector<std::unique_ptr<AdamW>> opts;
    if (alone) {
      for (size_t i = 0; i < p.size(); ++i)
        opts.push_back(std::make_unique<AdamW>(std::vector<ParamGroup>{{"g", {p[i]}, i < 2 ? 1e-2 : 3e-3, 0.1}}));
    } else {
      opts.push_back(std::make_unique<AdamW>(
          std::vector<ParamGroup>{{"a", {p[0], p[1]}, 1e-2, 0.1}, {"b", {p[2], p[3]}, 3e-3, 0.1}}));
    }
    for (int64_t t = 0; t < 2; ++t) {
      for (size_t i = 0; i < p.size(); ++i) p[i].mutable_grad() = grads[i][t].clone();
      for (auto& o : opts) o->step();
    }
    return p;
  };
  const std::vector<at::Tensor> want = run(true, 1);
  for (int nthreads : {1, 2, 3}) {
    const std::vector<at::Tensor> got = run(false, nthreads);
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_TRUE(at::equal(got[i], want[i])) << "parameter " << i << ", " << nthreads << " threads";
  }
  EXPECT_FALSE(at::equal(want[0], p0[0]));  // the step moved them
  at::set_num_threads(threads);
}

// The clip search never does worse than its a = 1 start (the min–max range widened to include 0) in any group,
// gains on heavy-tailed weights (a few large values stretch each group's range), and keeps the integers storable.
TEST(Quantizer, MseClipSearchLowersEachGroupsWeightError) {
  at::manual_seed(5);
  QuantSpec spec{4, 64};
  const at::Tensor W = at::randn({16, 256}) * at::randn({16, 256}).exp();  // heavy tails
  auto err = [&](const at::Tensor& s, const at::Tensor& z) {
    const at::Tensor d = fake_quantize(W, s, z, spec) - W;
    return d.square().view({16, 4, 64}).sum(-1);  // [N, G]
  };
  auto [s1, z1] = mse_clip_init(W, spec, /*steps=*/1);  // a = 1 only
  auto [s, z] = mse_clip_init(W, spec);
  EXPECT_TRUE((err(s, z) <= err(s1, z1) + 1e-6).all().item<bool>());
  EXPECT_LT(err(s, z).sum().item<double>(), 0.98 * err(s1, z1).sum().item<double>());  // measured: 3.7 % lower
  EXPECT_TRUE((s <= s1 + 1e-7).all().item<bool>());
  EXPECT_GE(z.min().item<double>(), 0);
  EXPECT_LE(z.max().item<double>(), 15);
  EXPECT_TRUE(at::equal(z, z.round()));
}

TEST(BlockAp, BeatsRtnAndGptqBeatsRtn) {
  std::map<std::string, double> mse;
  for (const char* method : {"rtn", "gptq", "efficientqat"}) {
    Model m = load_model(fixture("tiny_llama"));
    mse[method] = last_val(run_block_quantization(m, tiny_calib(m), opts(method, 2)));
  }
  EXPECT_LT(mse["efficientqat"], mse["rtn"]);
  EXPECT_LT(mse["gptq"], mse["rtn"]);
}

TEST(BlockAp, ExportReloadGivesTheSameLogits) {
  TempDir t;
  Model m = load_model(fixture("tiny_llava"));
  CalibOptions co;
  co.n_train = 4;
  co.n_val = 2;
  co.seq_len = 64;
  CalibSet calib = load_text_data(m, data_path("text/tinyshakespeare.txt"), co);
  run_block_quantization(m, calib, opts("rtn", 4));
  ExportOptions eo;
  eo.spec = opts("rtn", 4).spec;
  eo.method = "rtn";
  export_gptq(m, t.str("q"), eo);
  Model r = load_model(t.str("q"));
  ASSERT_TRUE(r.cfg.quant.present);
  EXPECT_EQ(r.cfg.quant.checkpoint_format, "gptq_v2");
  auto g = Checkpoint::open(fixture("tiny_llava/golden.safetensors"));
  std::vector<int64_t> ids = to_ids(g.get("p0.input_ids"));
  c10::NoGradGuard ng;
  auto logits = [&](Model& mm) {
    at::Tensor e = embed_prompt(mm, ids, g.get("pixel_values"));
    return mm.lm->forward(e, at::arange(e.size(1)).view({1, -1}), {}, nullptr);
  };
  // Same packed integers and fp16 scales on both sides; only the kernel path may differ (fp32 accumulation order).
  EXPECT_LE(max_abs_diff(logits(m), logits(r)), kLogitTol);
  // Served with q/k/v and gate/up merged (what ask/generate/eval load): the same logits.
  LoadOptions lo;
  lo.fuse_projections = true;
  Model f = load_model(t.str("q"), lo);
  EXPECT_EQ(f.lm->fuse_projections(), 2 * f.cfg.text.num_hidden_layers);  // already merged: a no-op that says so
  EXPECT_LE(max_abs_diff(logits(f), logits(r)), kLogitTol);
  // With the step sizes kept as stored (fp16, as ask/generate/eval/serve load them): the kernels read the same fp16
  // values they converted the fp32 copies back to, so the logits are bit for bit the same.
  lo.weights_as_stored = true;
  Model s = load_model(t.str("q"), lo);
  auto* layer = s.lm->model->layers[0]->as<LlamaDecoderLayerImpl>();
  EXPECT_EQ(layer->self_attn->q_proj->scales.scalar_type(), at::kHalf);
  EXPECT_EQ(layer->mlp->down_proj->scales.scalar_type(), at::kHalf);
  EXPECT_TRUE(at::equal(logits(s), logits(f)));
}

// LLaVA-NeXT: Block-AP calibrates on image-text samples whose image-token counts vary with each image's size
// (anyres tiles of the shapes world's pictures), the export keeps image_newline and the grid, and the reloaded
// packed model (in llava-hf's key layout, image_newline top-level) gives the in-memory model's logits.
TEST(BlockAp, LlavaNextCalibratesOnImagesAndExportsExactly) {
  TempDir t;
  const std::string src = fixture("tiny_llava_next_vicuna");
  Model m = load_model(src);
  write_shapes_dataset(t.str("shapes"), 8, 0, 7);
  CalibOptions co;
  co.n_train = 6;
  co.n_val = 2;
  co.seq_len = 256;
  CalibSet calib = load_instruction_data(m, t.str("shapes/train.json"), t.str("shapes/images"), co);
  ASSERT_EQ(calib.train.size(), 6u);
  const int64_t image_positions = std::count(calib.train[0].ids.begin(), calib.train[0].ids.end(), m.image_token_id());
  EXPECT_GT(image_positions, m.cfg.image_seq_length);  // base image + unpadded grid + newlines
  BlockApOptions o = opts("efficientqat", 4);
  o.epochs = 1;
  run_block_quantization(m, calib, o);
  ExportOptions eo;
  eo.spec = o.spec;
  eo.method = "efficientqat";
  eo.layout = "llava-hf";
  export_gptq(m, t.str("q"), eo);
  Checkpoint ck = Checkpoint::open(t.str("q"));
  ASSERT_TRUE(ck.has("image_newline"));
  EXPECT_TRUE(at::equal(ck.get("image_newline").to(at::kFloat), m.llava->image_newline.to(at::kFloat)));
  Model r = load_model(t.str("q"));
  ASSERT_TRUE(r.cfg.quant.present);
  EXPECT_TRUE(r.cfg.anyres);
  EXPECT_EQ(r.cfg.image_grid_pinpoints, m.cfg.image_grid_pinpoints);
  auto g = Checkpoint::open(src + "/golden.safetensors");
  const std::vector<int64_t> ids = to_ids(g.get("mid.input_ids"));
  c10::NoGradGuard ng;
  auto logits = [&](Model& mm) {
    at::Tensor e = embed_prompt(mm, ids, load_pixels(mm, src + "/mid.png"));
    return mm.lm->forward(e, at::arange(e.size(1)).view({1, -1}), {}, nullptr);
  };
  EXPECT_LE(max_abs_diff(logits(m), logits(r)), kLogitTol);
}

// A group size that divides no layer of tiny_llama (48: hidden 64 = 48 + 16, FFN 160 = 3·48 + 16) gives every layer a
// ragged last group, in every method: G = ⌈K/48⌉ scale rows, g_idx = k / 48 (GPTQModel's layout for such layers),
// RTN's integers are those of each group quantized on its own, and export → reload gives the same logits.
TEST(BlockAp, RaggedGroupsExportAndReloadExactly) {
  for (const char* method : {"rtn", "gptq", "efficientqat"}) {
    TempDir t;
    Model m = load_model(fixture("tiny_llama"));
    std::vector<at::Tensor> fp_down;
    for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
      fp_down.push_back(block_linears(m, b).back().second->weight.detach().clone());
    BlockApOptions o = opts(method, 3);
    o.spec.group_size = 48;
    o.epochs = 1;
    run_block_quantization(m, tiny_calib(m), o);
    ExportOptions eo;
    eo.spec = o.spec;
    eo.method = method;
    export_gptq(m, t.str("q"), eo);
    Model r = load_model(t.str("q"));
    for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b) {
      auto [name, down] = block_linears(r, b).back();
      ASSERT_EQ(name, "mlp.down_proj");
      EXPECT_EQ(down->scales.sizes(), at::IntArrayRef({4, 64})) << method;
      EXPECT_TRUE(at::equal(down->g_idx.to(at::kLong), at::arange(160, at::kLong).div(48, "floor"))) << method;
      if (std::string(method) != "rtn") continue;
      auto [q, z] = unpack_gptq(down->packed(), 3);
      for (int64_t g0 = 0; g0 < 160; g0 += 48) {
        const int64_t w = std::min<int64_t>(48, 160 - g0);
        at::Tensor Wg = fp_down[b].narrow(1, g0, w);
        QuantSpec per_row{3, -1};
        auto [sg, zg] = minmax_init(Wg, per_row);
        QuantizedWeight qw = quantize_integers(Wg, sg, zg, per_row);
        EXPECT_TRUE(at::equal(q.narrow(1, g0, w), qw.q)) << "layer " << b << " group at " << g0;
        EXPECT_TRUE(at::equal(z.narrow(1, g0 / 48, 1), qw.zero)) << "layer " << b << " group at " << g0;
      }
    }
    std::vector<int64_t> ids = {1, 45, 72, 300, 12, 99, 7};
    c10::NoGradGuard ng;
    auto logits = [&](Model& mm) {
      return mm.lm->forward(mm.lm->embed(at::tensor(ids).view({1, -1})), at::arange(7).view({1, -1}), {}, nullptr);
    };
    EXPECT_LE(max_abs_diff(logits(m), logits(r)), kLogitTol) << method;
  }
}

// --init gptq: W = (q − z)·s rounds back to exactly GPTQ's integers, so Block-AP with 0 epochs exports GPTQ's tensors
// bit for bit; with training it only moves where the block's output error falls (block MSE below GPTQ's).
namespace {
// GPTQ on the tiny Llama, then Block-AP from `init` with 0 epochs: the exports must be equal, bit for bit. Returns
// GPTQ's last validation MSE.
double expect_zero_epochs_export_gptqs(const std::string& init) {
  auto packed = [](Model& m) {
    std::vector<at::Tensor> out;
    for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
      for (auto& [n, lin] : block_linears(m, b))
        for (const at::Tensor& t : {lin->qweight, lin->qzeros, lin->scales}) out.push_back(t.clone());
    return out;
  };
  Model g = load_model(fixture("tiny_llama"));
  const double gptq_mse = last_val(run_block_quantization(g, tiny_calib(g), opts("gptq", 2)));
  Model e = load_model(fixture("tiny_llama"));
  BlockApOptions o = opts("efficientqat", 2);
  o.init = init;
  o.epochs = 0;
  run_block_quantization(e, tiny_calib(e), o);
  auto a = packed(g), b = packed(e);
  EXPECT_EQ(a.size(), b.size());
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << init << " tensor " << i;
  return gptq_mse;
}
}  // namespace

TEST(BlockAp, GptqInitStartsFromGptqsIntegers) {
  const double gptq_mse = expect_zero_epochs_export_gptqs("gptq");
  BlockApOptions o = opts("efficientqat", 2);
  o.init = "gptq";
  Model t = load_model(fixture("tiny_llama"));
  o.epochs = 2;
  o.weight_lr = 1e-4;  // tiny model, 8 iterations per block (the weight lr of opts() would overshoot a good start)
  o.quant_lr = -1;     // the default for this start: s and z stay GPTQ's
  EXPECT_LT(last_val(run_block_quantization(t, tiny_calib(t), o)), gptq_mse);
  o.init = "absmax";
  EXPECT_THROW(run_block_quantization(t, tiny_calib(t), o), InputError);
}

namespace {
// GPTQ as written before it was optimised (and as AutoGPTQ writes it): W [N, K] as is, H⁻¹'s upper Cholesky factor by
// Cholesky, inverse and Cholesky again, and each column's error propagated over the rest of its lazy block at once.
QuantizedWeight textbook_gptq(const at::Tensor& W_in, const at::Tensor& H_in, const QuantSpec& spec, at::Tensor* pre) {
  c10::NoGradGuard g;
  at::Tensor W = W_in.to(at::kDouble).clone(), H = H_in.to(at::kDouble).clone();
  const int64_t N = W.size(0), K = W.size(1), gs = spec.group_for(K), G = spec.groups_for(K), qmax = spec.qmax();
  at::Tensor dead = H.diagonal() == 0;
  H.diagonal().masked_fill_(dead, 1);
  W.index_put_({at::indexing::Slice(), dead}, 0);
  H.diagonal().add_(0.01 * H.diagonal().mean().item<double>());
  at::Tensor Hinv = at::linalg_cholesky(at::cholesky_inverse(at::linalg_cholesky(H)), /*upper=*/true);
  at::Tensor Q = at::zeros({N, K}, at::kInt), S = at::zeros({N, G}, at::kDouble), Z = at::zeros({N, G}, at::kDouble);
  *pre = at::zeros({N, K}, at::kDouble);
  at::Tensor s, z;
  for (int64_t i1 = 0; i1 < K; i1 += 128) {
    const int64_t i2 = std::min(i1 + 128, K), count = i2 - i1;
    at::Tensor W1 = W.narrow(1, i1, count).clone(), Err1 = at::zeros_like(W1);
    at::Tensor Hinv1 = Hinv.narrow(0, i1, count).narrow(1, i1, count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t col = i1 + i;
      if (col % gs == 0) {
        at::Tensor Wg = W.narrow(1, col, std::min(gs, K - col));
        at::Tensor lo = std::get<0>(Wg.min(1)).clamp_max(0), hi = std::get<0>(Wg.max(1)).clamp_min(0);
        at::Tensor both0 = (lo == 0).logical_and(hi == 0);
        lo = lo.masked_fill(both0, -1);
        hi = hi.masked_fill(both0, 1);
        s = (hi - lo) / static_cast<double>(qmax);
        z = (-lo / s).round().clamp(spec.zero_min, static_cast<double>(qmax));
        S.select(1, col / gs).copy_(s);
        Z.select(1, col / gs).copy_(z);
      }
      at::Tensor w = W1.select(1, i);
      at::Tensor q = (w / s).round().add(z).clamp(0, static_cast<double>(qmax));
      Q.select(1, col).copy_(q.to(at::kInt));
      pre->select(1, col).copy_(w);
      at::Tensor err = (w - (q - z) * s) / Hinv1[i][i].item<double>();
      W1.narrow(1, i, count - i).sub_(err.unsqueeze(1) * Hinv1[i].narrow(0, i, count - i).unsqueeze(0));
      Err1.select(1, i).copy_(err);
    }
    if (i2 < K) W.narrow(1, i2, K - i2).sub_(Err1.mm(Hinv.narrow(0, i1, count).narrow(1, i2, K - i2)));
  }
  return {Q, Z.to(at::kInt), S.clamp(kScaleMin, kScaleMax).to(at::kFloat)};
}
}  // namespace

// The optimised GPTQ (one Cholesky of the reversed H and a blocked triangular inverse; Wᵀ in sub-blocks of 16) gives
// the textbook's integers, zero points and scales exactly, and its unrounded weights to rounding: K = 328 has a
// ragged last lazy block, groups of 96 start inside lazy blocks and end ragged, one input is dead, and H has rank
// 200 < K (damping makes it definite, as with short calibration). Both run in float64 with the same operations in
// another order: the unrounded weights (|w| ≲ 4) agree to ~1e-12, far inside 1e-9, and a rounding decision could
// only flip for w/s within ~1e-12 of a half-integer (none here; the seed is fixed).
// Merging accumulators of two parts of the rows (GPTQ's data-parallel Hessian pass) gives the Hessian of all rows:
// the same mean of 2·xxᵀ, summed in another order. In fp64 over 3 batches of ≤ 50 rows the difference is rounding:
// asserted ≤ 1e-12 of the largest entry (a few hundred terms of relative error 2⁻⁵³ each bound it near 1e-13).
TEST(Gptq, MergedHessiansAreTheHessianOfAllRows) {
  at::manual_seed(4);
  const int64_t K = 48;
  const at::Tensor X = at::randn({3, 50, K}), valid = at::rand({3, 50}) > 0.2;
  HessianAccumulator all(K), a(K), b(K), none(K);
  for (int64_t i = 0; i < 3; ++i) all.add(X[i], valid[i]);
  a.add(X[0], valid[0]);
  b.add(X[1], valid[1]);
  b.add(X[2], valid[2]);
  a.merge(b);
  a.merge(none);
  EXPECT_EQ(a.samples(), all.samples());
  EXPECT_LE(max_abs_diff(a.H(), all.H()), 1e-12 * all.H().abs().max().item<double>());
  HessianAccumulator c(K);
  c.merge(all);  // into an empty one: a copy
  EXPECT_TRUE(at::equal(c.H(), all.H()));
  EXPECT_EQ(c.samples(), all.samples());
}

// The accumulator stages small inputs and adds them in one update of H's lower triangle, in panels (K = 200: three
// ragged panels), then mirrors it: H is 2/n XᵀX of the valid rows, exactly symmetric, whether the rows came in small
// adds that fill and overflow the stage (512 rows), in one add too large to stage, or with none valid. Against the
// product in one fp64 GEMM the sums differ only in order: each entry sums ~1500 products, so each sum is exact to
// ~1500·2⁻⁵³ ≈ 1.7e-13 of Σ|x_i·x_j|, which is at most the largest diagonal entry (|x_i·x_j| ≤ (x_i² + x_j²)/2); two
// such sums differ by at most twice that, and 1e-12 of the largest entry is asserted. take() hands over the same H.
TEST(Gptq, StagedLowerTriangleHessianIsTheFullProduct) {
  at::manual_seed(5);
  const int64_t K = 200;
  HessianAccumulator h(K);
  std::vector<at::Tensor> kept;
  auto add = [&](int64_t rows, double p_valid) {
    const at::Tensor x = at::randn({rows, K}), valid = at::rand({rows}) < p_valid;
    h.add(x, valid);
    kept.push_back(x.index({valid}).to(at::kDouble));
  };
  for (int64_t i = 0; i < 40; ++i) add(1 + (i * 7) % 40, 0.8);  // ~650 rows: the stage fills and is flushed
  add(5, 0.0);                                                   // nothing valid
  add(900, 0.9);                                                 // over the stage: added directly
  add(30, 1.0);
  const at::Tensor X = at::cat(kept);
  const at::Tensor want = at::mm(X.t(), X) * (2.0 / static_cast<double>(X.size(0)));
  EXPECT_EQ(h.samples(), X.size(0));
  const at::Tensor got = h.H();
  EXPECT_TRUE(at::equal(got, got.t()));
  EXPECT_LE(max_abs_diff(got, want), 1e-12 * want.abs().max().item<double>());
  EXPECT_TRUE(at::equal(h.take(), got));
  EXPECT_EQ(h.samples(), 0);
}

TEST(Gptq, MatchesTheTextbookAlgorithm) {
  at::manual_seed(11);
  const int64_t N = 40, K = 328;
  at::Tensor W = at::randn({N, K});
  at::Tensor X = at::randn({200, K}) * (at::rand({K}) + 0.1);
  X.select(1, 7).zero_();
  HessianAccumulator h(K);
  h.add(X, at::Tensor());
  for (const auto& [bits, group] : std::vector<std::pair<int, int64_t>>{{2, 96}, {3, 64}, {4, -1}, {4, 128}}) {
    QuantSpec spec;
    spec.bits = bits;
    spec.group_size = group;
    at::Tensor pre, want_pre;
    const QuantizedWeight want = textbook_gptq(W, h.H(), spec, &want_pre);
    const QuantizedWeight got = gptq_quantize(W, h.H(), spec, 0.01, 128, &pre);
    EXPECT_TRUE(at::equal(got.q, want.q)) << bits << "/" << group;
    EXPECT_TRUE(at::equal(got.zero, want.zero)) << bits << "/" << group;
    EXPECT_TRUE(at::equal(got.scale, want.scale)) << bits << "/" << group;
    EXPECT_LE(max_abs_diff(pre, want_pre), 1e-9) << bits << "/" << group;
    // The dead input's weights are zeroed and nothing propagates into them (H, so H⁻¹, has no coupling to it): they
    // quantize to their group's zero point.
    EXPECT_TRUE(at::equal(got.q.select(1, 7), got.zero.select(1, 7 / spec.group_for(K)).to(got.q.scalar_type())));
  }
  // The factor: UᵀU = (H + λI)⁻¹ with the dead input's diagonal set to 1 first.
  const GptqFactor f = gptq_factor(h.H().clone(), 0.01);
  EXPECT_TRUE(f.dead[7].item<bool>());
  EXPECT_EQ(f.dead.sum().item<int64_t>(), 1);
  at::Tensor Hd = h.H().clone();
  Hd.diagonal().masked_fill_(f.dead, 1);
  Hd.diagonal().add_(0.01 * Hd.diagonal().mean().item<double>());
  EXPECT_LE(max_abs_diff(f.U.t().mm(f.U).mm(Hd), at::eye(K, at::kDouble)), 1e-9);
  EXPECT_TRUE(at::equal(f.U, f.U.triu()));
}

// Group-aware reordering (--gptq-order gar) is the textbook algorithm run on the permuted problem (W[:, P],
// H[P][:, P], groups in the permuted order) and mapped back: integers column by column, s and z group by group, the
// unrounded weights to rounding (same operations in another order, as above). P keeps each group's columns together
// (so the export's g_idx stays k / g), puts the columns of a group by descending H_kk and the groups by descending
// largest H_kk; K = 328 in groups of 96 leaves a ragged tail of 40 that stays last; per-channel it is act-order.
TEST(Gptq, GroupAwareReorderingIsTheTextbookOnThePermutedProblem) {
  at::manual_seed(12);
  const int64_t N = 40, K = 328;
  at::Tensor W = at::randn({N, K});
  at::Tensor X = at::randn({200, K}) * (at::rand({K}) * 3 + 0.1);
  X.select(1, 5).zero_();
  HessianAccumulator h(K);
  h.add(X, at::Tensor());
  const at::Tensor d = h.H().diagonal();
  for (const auto& [bits, group] : std::vector<std::pair<int, int64_t>>{{2, 96}, {3, 64}, {4, -1}, {4, 82}}) {
    QuantSpec spec;
    spec.bits = bits;
    spec.group_size = group;
    const int64_t gs = spec.group_for(K), full = K / gs;
    const at::Tensor P = gar_permutation(d, gs);
    ASSERT_TRUE(at::equal(std::get<0>(P.sort()), at::arange(K, at::kLong))) << "a permutation";
    ASSERT_FALSE(at::equal(P, at::arange(K, at::kLong))) << "not the identity on this H";
    for (int64_t j = 0; j < full; ++j) {  // whole groups, each by descending H_kk; the groups by their largest H_kk
      const at::Tensor cols = P.narrow(0, j * gs, gs);
      EXPECT_TRUE(at::equal(cols.div(gs, "floor"), cols.div(gs, "floor")[0].expand({gs}))) << gs << ": group " << j;
      const at::Tensor dj = d.index_select(0, cols);
      EXPECT_TRUE(at::equal(dj, std::get<0>(dj.sort(0, /*descending=*/true)))) << gs;
      if (j > 0)
        EXPECT_GE(d.index_select(0, P.narrow(0, (j - 1) * gs, gs)).max().item<double>(), dj.max().item<double>());
    }
    EXPECT_TRUE(at::equal(P.narrow(0, full * gs, K - full * gs), at::arange(full * gs, K, at::kLong))) << "ragged tail";

    at::Tensor pre, want_pre;
    const QuantizedWeight want = textbook_gptq(W.index_select(1, P), h.H().index_select(0, P).index_select(1, P), spec,
                                               &want_pre);
    const QuantizedWeight got = gptq_quantize(W, gptq_factor(h.H().clone(), 0.01, "gar", gs), spec, 128, &pre);
    const at::Tensor inv = at::argsort(P);
    const at::Tensor group_of = P.index({at::indexing::Slice(0, at::indexing::None, gs)}).div(gs, "floor");
    EXPECT_TRUE(at::equal(got.q, want.q.index_select(1, inv))) << bits << "/" << group;
    EXPECT_TRUE(at::equal(got.scale.index_select(1, group_of), want.scale)) << bits << "/" << group;
    EXPECT_TRUE(at::equal(got.zero.index_select(1, group_of), want.zero)) << bits << "/" << group;
    EXPECT_LE(max_abs_diff(pre, want_pre.index_select(1, inv)), 1e-9) << bits << "/" << group;
    // The natural order gives other integers on this H: the order is used.
    EXPECT_FALSE(at::equal(gptq_quantize(W, h.H(), spec, 0.01, 128).q, got.q)) << bits << "/" << group;
  }
}

// --init gptq-unrounded: the start lies where GPTQ's compensation left each weight before rounding (off the grid),
// yet fake quantization with GPTQ's s and z gives exactly GPTQ's dequantized weights; with 0 epochs the export is
// GPTQ's bit for bit, and with training (s and z at this start's default lr) the block MSE falls below GPTQ's.
TEST(BlockAp, GptqUnroundedInitRoundsToGptqsIntegersFromOffTheGrid) {
  at::manual_seed(3);
  const int64_t N = 24, K = 128;
  QuantSpec spec;
  spec.bits = 2;
  spec.group_size = 32;
  at::Tensor W = at::randn({N, K});
  at::Tensor X = at::randn({256, K}) * (at::rand({K}) + 0.1);
  HessianAccumulator h(K);
  h.add(X, at::Tensor());
  at::Tensor pre;
  const QuantizedWeight qw = gptq_quantize(W, h.H(), spec, 0.01, 128, &pre);
  ASSERT_EQ(pre.sizes(), W.sizes());
  const at::Tensor start = gptq_unrounded_start(qw, pre, spec);
  const at::Tensor grid = dequantize_integers(qw, spec.group_size);
  EXPECT_TRUE(at::equal(fake_quantize(start, qw.scale, qw.zero.to(at::kFloat), spec), grid));
  EXPECT_GT((start != grid).to(at::kFloat).mean().item<float>(), 0.9f);  // off the grid points almost everywhere
  // Where GPTQ's residual is inside ±0.45·s the start is the unrounded weight itself.
  at::Tensor S = qw.scale.repeat_interleave(spec.group_size, 1);
  at::Tensor inside = (pre.to(at::kFloat) - grid).abs() < 0.45 * S;
  EXPECT_LE(((start - pre.to(at::kFloat)).abs() * inside).max().item<float>(), 1e-6f);

  const double gptq_mse = expect_zero_epochs_export_gptqs("gptq-unrounded");
  BlockApOptions o = opts("efficientqat", 2);
  o.init = "gptq-unrounded";
  Model t = load_model(fixture("tiny_llama"));
  o.epochs = 2;
  o.weight_lr = 1e-4;  // as in GptqInitStartsFromGptqsIntegers
  o.quant_lr = -1;     // the default for this start: 2e-5
  EXPECT_LT(last_val(run_block_quantization(t, tiny_calib(t), o)), gptq_mse);
}

TEST(BlockAp, ResumeAfterKillIsBitIdentical) {
  TempDir t;
  auto run = [&](const std::string& state, bool kill_after_first, bool resume) {
    Model m = load_model(fixture("tiny_llama"));
    BlockApOptions o = opts("efficientqat", 3);
    o.state_dir = state;
    o.resume = resume;
    if (kill_after_first) o.after_block = [](int64_t b) { if (b == 0) throw std::runtime_error("killed"); };
    std::filesystem::create_directories(state);
    run_block_quantization(m, tiny_calib(m), o);
    std::vector<at::Tensor> out;
    for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
      for (auto& [n, lin] : block_linears(m, b)) {
        out.push_back(lin->qweight.clone());
        out.push_back(lin->scales.clone());
      }
    return out;
  };
  auto full = run(t.str("a"), false, false);
  EXPECT_THROW(run(t.str("b"), true, false), std::runtime_error);
  auto resumed = run(t.str("b"), false, true);
  ASSERT_EQ(full.size(), resumed.size());
  for (size_t i = 0; i < full.size(); ++i) EXPECT_TRUE(at::equal(full[i], resumed[i])) << i;
}

// With a state directory, a finished block's packed tensors are served from its state file's mapping (so their
// pages can leave RSS) and the model computes exactly what the in-RAM run's does.
TEST(BlockAp, FinishedBlocksAreServedFromTheirStateFiles) {
  TempDir t;
  auto run = [&](const std::string& state) {
    Model m = load_model(fixture("tiny_llama"));
    BlockApOptions o = opts("efficientqat", 2);
    o.state_dir = state;
    if (!state.empty()) std::filesystem::create_directories(state);
    run_block_quantization(m, tiny_calib(m), o);
    return m;
  };
  Model in_ram = run(""), streamed = run(t.str("state"));
  c10::NoGradGuard g;
  auto logits = [](Model& mm) {
    return mm.lm->forward(mm.lm->embed(at::arange(1, 40, at::kLong).view({1, -1})), at::arange(39).view({1, -1}), {},
                          nullptr);
  };
  EXPECT_TRUE(at::equal(logits(streamed), logits(in_ram)));
  for (int64_t b = 0; b < streamed.cfg.text.num_hidden_layers; ++b)
    for (auto& [name, lin] : block_linears(streamed, b)) {
      EXPECT_TRUE(release_mapped_bytes(lin->qweight.const_data_ptr(), lin->qweight.nbytes())) << b << " " << name;
      EXPECT_TRUE(release_mapped_bytes(lin->scales.const_data_ptr(), lin->scales.nbytes())) << b << " " << name;
    }
  for (auto& [name, lin] : block_linears(in_ram, 0))
    EXPECT_FALSE(release_mapped_bytes(lin->qweight.const_data_ptr(), lin->qweight.nbytes())) << name;
}

TEST(E2eQp, TrainsStepSizesAndLowersTheLoss) {
  Model m = load_model(fixture("tiny_llama"));
  CalibSet calib = tiny_calib(m);
  run_block_quantization(m, calib, opts("rtn", 2));
  E2eResult r = run_e2e_qp(m, calib, e2e_opts());
  EXPECT_EQ(r.steps, 8);  // 8 samples in steps of 4, 4 epochs
  EXPECT_LT(r.val_loss_after, r.val_loss_before);
  // The early check ran after a quarter of the steps, found the loss lower, and training went on.
  EXPECT_EQ(r.check_step, 2);
  EXPECT_LT(r.val_loss_check, r.val_loss_before);
  EXPECT_FALSE(r.stopped_early);
  EXPECT_FALSE(r.reverted);
}

// E2E-QP over blocks that Block-AP streamed to its state files: every layer's packed integers leave RSS after each
// use, through the validation loss at the end too (that one ran the serving kernels once and left them all resident:
// the 13B at W2g64 peaked at 9.4 GiB there, 3.2 GB of it integers). Checked page by page with the page tables, on a
// llama-2-7b config shrunk so that each qweight still spans 128 pages or more (1024 x 1024 at 4 bits: 512 KiB). A
// fault on a neighbouring tensor in the file that stays mapped (qzeros, a norm) maps in the pages of the same 64 KiB
// window with it (the kernel's fault-around, fault_around_bytes): up to 15 at either end of a qweight, 30 in all.
TEST(E2eQp, EveryLayersIntegersLeaveRssAfterUse) {
  TempDir t;
  RandomModelOptions ro;
  ro.like = "llama-2-7b";
  ro.out = t.str("m");
  ro.tokenizer = data_path("tokenizers/llama2/tokenizer.model");
  ro.layers = 2;
  ro.config_patch = R"({"hidden_size": 1024, "intermediate_size": 2048, "num_attention_heads": 8,
                        "num_key_value_heads": 8})";
  write_random_model(ro);
  Model m = load_model(ro.out);
  CalibSet calib = tiny_calib(m);
  BlockApOptions o = opts("rtn", 4);
  o.state_dir = t.str("state");
  std::filesystem::create_directories(o.state_dir);
  run_block_quantization(m, calib, o);
  E2eOptions e = e2e_opts();
  e.epochs = 1;
  const E2eResult r = run_e2e_qp(m, calib, e);
  EXPECT_GT(r.steps, 0);
  int64_t pages = 0;
  for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
    for (auto& [name, lin] : block_linears(m, b)) {
      const auto [present, whole] = present_pages(lin->qweight.const_data_ptr(), lin->qweight.nbytes());
      if (present < 0) GTEST_SKIP() << "/proc/self/pagemap is not readable";
      EXPECT_LE(present, 30) << "layer " << b << " " << name << ": " << present << " of " << whole << " pages resident";
      pages += whole;
    }
  EXPECT_GE(pages, 2 * 7 * 127);  // whole pages inside the qweights
  // Reading a qweight maps its pages in again, from the state file: the check can see residency.
  EXPECT_NE(block_linears(m, 0)[0].second->qweight.sum().item<int64_t>(), 0);
  auto q0 = block_linears(m, 0)[0].second->qweight;
  EXPECT_GT(present_pages(q0.const_data_ptr(), q0.nbytes()).first, 0);
}

// --e2e-loss kd: the distillation targets Block-AP's FP stream returns are the FP model's (its logits at every loss
// position, through the final norm and lm_head), and E2E-QP's val loss is then the mean KL(FP ‖ quantized) over
// those positions, which training lowers.
TEST(E2eQp, DistillationTargetsAreTheFpModelsAndKlFalls) {
  Model fp = load_model(fixture("tiny_llama"));
  Model m = load_model(fixture("tiny_llama"));
  CalibSet calib = tiny_calib(m);
  std::vector<CalibSample> teacher;
  BlockApResult br = rtn_with_fp_targets(m, calib, teacher);
  ASSERT_EQ(br.teacher_hidden.size(), teacher.size());
  double kl_sum = 0;
  int64_t positions = 0;
  for (size_t i = 0; i < teacher.size(); ++i) {
    c10::NoGradGuard ng;
    EmbeddedBatch e = embed_samples(fp, {teacher[i]});
    const int64_t L = e.ids.size(1);
    at::Tensor mask = loss_positions(e)[0];
    ASSERT_EQ(br.teacher_hidden[i].size(0), loss_position_count(teacher[i]));
    ASSERT_EQ(br.teacher_hidden[i].size(0), mask.sum().item<int64_t>());
    at::Tensor pos = at::arange(L).view({1, L});
    at::Tensor want = fp.lm->forward(e.embeds, pos, {}, nullptr)[0].narrow(0, 0, L - 1).index({mask});
    at::Tensor h = br.teacher_hidden[i].to(at::kFloat);
    at::Tensor x = fp.lm->model->norm->forward(h);  // tiny_llama ties lm_head to the embedding
    at::Tensor got = fp.lm->lm_head ? fp.lm->lm_head->forward(x) : at::linear(x, fp.lm->model->embed_tokens->weight);
    // The FP stream is cached in fp16 at each of the 3 blocks' inputs and outputs (relative rounding 2^-11 each, 4
    // roundings) and the norm rescales: logits of magnitude ≲ 8 move by ≲ 8 · 4 · 2^-11 ≈ 0.015.
    EXPECT_LE(max_abs_diff(got, want), 0.015) << "sample " << i;
    if (i >= calib.train.size()) {  // val: the KL E2E-QP reports before training (in fp32 activations, as it runs)
      const ExactCpuActivations exact;
      at::Tensor lq = m.lm->forward(e.embeds, pos, {}, nullptr)[0].narrow(0, 0, L - 1).index({mask}).log_softmax(-1);
      at::Tensor lp = got.log_softmax(-1);
      kl_sum += (lp.exp() * (lp - lq)).sum().item<double>();
      positions += mask.sum().item<int64_t>();
    }
  }
  E2eOptions o = e2e_opts();
  o.loss = "kd";
  o.teacher_hidden = &br.teacher_hidden;
  E2eResult r = run_e2e_qp(m, calib, o);
  // Same positions, same targets; the quantized logits differ only by batching (fp32 sums in another order).
  EXPECT_NEAR(r.val_loss_before, kl_sum / static_cast<double>(positions), 1e-4 * r.val_loss_before);
  EXPECT_GT(r.val_loss_before, 0);
  EXPECT_LT(r.val_loss_after, r.val_loss_before);
}

// Distillation samples that are the calibration samples (train then val, the default) take their targets from the
// train and val FP streams; other samples ride a third stream of their own. Both give each sample the same targets:
// here the same samples in reverse order, so the third stream's batches pair other samples (other padding). Rows
// of a batch do not see each other, so only the fp16 stream caches' rounding may differ; it does not here (measured:
// equal), and the bound allows one fp16 rounding step of the largest value.
TEST(E2eQp, DistillationTargetsAreTheSameFromTheCalibrationStreamsOrTheirOwn) {
  auto targets = [](bool reversed) {
    Model m = load_model(fixture("tiny_llama"));
    CalibSet calib = tiny_calib(m);
    for (size_t i = 0; i < calib.train.size(); i += 2) {  // padded batches
      calib.train[i].ids.resize(20 - i);
      calib.train[i].is_answer.resize(20 - i);
    }
    std::vector<CalibSample> teacher = calib.train;
    teacher.insert(teacher.end(), calib.val.begin(), calib.val.end());
    if (reversed) std::reverse(teacher.begin(), teacher.end());
    BlockApOptions bo = opts("rtn", 2);
    bo.teacher_samples = &teacher;
    std::vector<at::Tensor> h = run_block_quantization(m, calib, bo).teacher_hidden;
    if (reversed) std::reverse(h.begin(), h.end());
    return h;
  };
  const std::vector<at::Tensor> own = targets(true), calib = targets(false);
  ASSERT_EQ(own.size(), calib.size());
  for (size_t i = 0; i < own.size(); ++i) {
    ASSERT_EQ(own[i].sizes(), calib[i].sizes()) << i;
    const double tol = calib[i].abs().max().item<double>() * std::pow(2.0, -10);
    EXPECT_LE((own[i].to(at::kFloat) - calib[i].to(at::kFloat)).abs().max().item<double>(), tol) << i;
  }
}

// E2E-QP gives Block-AP's step sizes back only when the validation mean rose AND more samples got worse than
// better: a mean carried by one sample is not enough (the case that reverted W2g64 runs whose trained step sizes
// were the better on the test questions), nor is a majority of slightly worse samples under a mean that fell.
TEST(E2eQp, ValidationJudgesByTheMeanAndBySampleCounts) {
  const ValLoss before{1.0, {1.0, 1.0, 1.0, 1.0, 1.0}};
  int64_t worse = -1, better = -1;
  // One sample much worse, four slightly better: the mean rose, but it is one sample's.
  EXPECT_FALSE(worse_on_validation(before, {1.5, {3.8, 0.9, 0.9, 0.9, 0.9}}, &worse, &better));
  EXPECT_EQ(worse, 1);
  EXPECT_EQ(better, 4);
  // Three of five worse and the mean up: worse.
  EXPECT_TRUE(worse_on_validation(before, {1.1, {1.2, 1.2, 1.2, 0.9, 0.9}}, &worse, &better));
  EXPECT_EQ(worse, 3);
  EXPECT_EQ(better, 2);
  // Three of five slightly worse, the mean down: not worse.
  EXPECT_FALSE(worse_on_validation(before, {0.9, {1.01, 1.01, 1.01, 0.5, 0.5}}));
  // Unchanged samples count neither way: two worse, one better, two equal, the mean up: worse.
  EXPECT_TRUE(worse_on_validation(before, {1.02, {1.05, 1.05, 0.98, 1.0, 1.0}}, &worse, &better));
  EXPECT_EQ(worse, 2);
  EXPECT_EQ(better, 1);
  // As many worse as better: not worse.
  EXPECT_FALSE(worse_on_validation(before, {1.2, {2.0, 1.1, 0.9, 0.9, 1.0}}));
}

// A learning rate far too large for step sizes raises the validation loss; E2E-QP then restores Block-AP's step
// sizes exactly (a run never ends worse on validation than it started).
TEST(E2eQp, AWorseValidationLossRestoresBlockApsStepSizes) {
  Model m = load_model(fixture("tiny_llama"));
  CalibSet calib = tiny_calib(m);
  run_block_quantization(m, calib, opts("rtn", 2));
  std::vector<at::Tensor> before;
  for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
    for (auto& [n, lin] : block_linears(m, b)) before.push_back(lin->scales.to(at::kFloat).clone());
  E2eOptions o = kd_opts();
  o.lr = 50;  // Adam moves every step size by ~lr per step: scales of ~0.05 end far from any useful value
  o.warmup_ratio = 0;
  o.early_check = 0;  // the end's rule alone (the early check has its own test)
  E2eResult r = run_e2e_qp(m, calib, o);
  EXPECT_GT(r.val_loss_after, r.val_loss_before);
  EXPECT_TRUE(r.reverted) << r.val_worse << " worse, " << r.val_better << " better";
  EXPECT_EQ(r.val_worse, 4);
  EXPECT_FALSE(r.stopped_early);
  EXPECT_EQ(r.check_step, -1);
  EXPECT_EQ(r.steps, 8);
  size_t i = 0;
  for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
    for (auto& [n, lin] : block_linears(m, b)) EXPECT_TRUE(at::equal(lin->scales, before[i++])) << n;
}

// The early check: after a quarter of the steps a raised validation loss stops training there and restores
// Block-AP's step sizes. A run killed after it saved its state at the check, then resumed, repeats the check and
// stops alike. A run killed mid-training judges, once resumed, against Block-AP's loss (not the loss of the step
// sizes it resumed with, which the resumed run used to measure as its start) and ends exactly where an
// uninterrupted run ends.
namespace {
Model rtn_tiny() {
  Model m = load_model(fixture("tiny_llama"));
  run_block_quantization(m, tiny_calib(m), opts("rtn", 2));
  return m;
}
// Every packed linear's step sizes, in block_linears' order, as fp32 copies.
std::vector<at::Tensor> scales_of(Model& m) {
  std::vector<at::Tensor> s;
  for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
    for (auto& [n, lin] : block_linears(m, b)) s.push_back(lin->scales.to(at::kFloat).clone());
  return s;
}
bool same(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!at::equal(a[i], b[i])) return false;
  return true;
}
}  // namespace

TEST(E2eQp, TheEarlyCheckStopsARunThatRaisedTheValidationLoss) {
  E2eOptions o = kd_opts();
  o.lr = 50;  // as above: every step raises the loss
  o.warmup_ratio = 0;
  o.save_every = 1;
  Model m = rtn_tiny();
  const std::vector<at::Tensor> start = scales_of(m);
  CalibSet calib = tiny_calib(m);
  E2eResult r = run_e2e_qp(m, calib, o);
  EXPECT_TRUE(r.stopped_early);
  EXPECT_TRUE(r.reverted);
  EXPECT_EQ(r.check_step, 2);
  EXPECT_EQ(r.steps, 2);
  EXPECT_EQ(r.step_loss.size(), 2u);
  EXPECT_GT(r.val_loss_check, r.val_loss_before);
  EXPECT_EQ(r.val_loss_after, r.val_loss_check);
  EXPECT_TRUE(same(scales_of(m), start));

  // Killed right after the state at the check was saved (step 2), then resumed: the same check, the same stop.
  TempDir t;
  o.state_dir = t.str();
  E2eOptions killed = o;
  killed.on_step = [](int64_t done) {
    if (done == 2) throw std::runtime_error("killed");  // after step 2's state was saved, before the check
  };
  Model k = rtn_tiny();
  EXPECT_THROW(run_e2e_qp(k, calib, killed), std::runtime_error);
  Model resumed = rtn_tiny();
  E2eOptions again = o;
  again.resume = true;
  const E2eResult rr = run_e2e_qp(resumed, calib, again);
  EXPECT_TRUE(rr.stopped_early);
  EXPECT_EQ(rr.val_loss_before, r.val_loss_before);
  EXPECT_EQ(rr.val_loss_check, r.val_loss_check);
  EXPECT_TRUE(same(scales_of(resumed), start));

  // Without the early check, killed mid-training at step 5 of 8 and resumed: the start's loss is Block-AP's and the
  // run ends reverted to Block-AP's step sizes, as the uninterrupted run does.
  o.early_check = 0;
  Model u = rtn_tiny();
  const E2eResult full = run_e2e_qp(u, calib, [&] { E2eOptions x = o; x.state_dir.clear(); return x; }());
  ASSERT_TRUE(full.reverted);
  TempDir t2;
  o.state_dir = t2.str();
  o.on_step = [](int64_t done) {
    if (done == 5) throw std::runtime_error("killed");
  };
  Model k2 = rtn_tiny();
  EXPECT_THROW(run_e2e_qp(k2, calib, o), std::runtime_error);
  o.on_step = nullptr;
  o.resume = true;
  Model r2 = rtn_tiny();
  const E2eResult mid = run_e2e_qp(r2, calib, o);
  EXPECT_EQ(mid.val_loss_before, full.val_loss_before);
  EXPECT_EQ(mid.val_loss_after, full.val_loss_after);
  EXPECT_TRUE(mid.reverted);
  EXPECT_TRUE(same(scales_of(r2), start));
}

// An lr of 0 is 0, not "the default" (--e2e-lr 0 used to train at 2e-5): the step sizes end where they started.
TEST(E2eQp, AZeroLrTrainsNothing) {
  Model m = rtn_tiny();
  const std::vector<at::Tensor> start = scales_of(m);
  E2eOptions o = e2e_opts();
  o.lr = 0;
  const E2eResult r = run_e2e_qp(m, tiny_calib(m), o);
  EXPECT_EQ(r.steps, 8);
  EXPECT_EQ(r.val_loss_after, r.val_loss_before);
  EXPECT_TRUE(same(scales_of(m), start));
}

// Block-AP hands each calibration sample's decoder input to E2E-QP (keep_sample_embeds): for image-text samples of
// varied lengths in padded batches, each is exactly the sample embedded alone, and E2E-QP given them trains exactly
// as it does embedding the samples itself.
TEST(E2eQp, BlockApsEmbeddingsAreEachSamplesOwnAndTrainAlike) {
  TempDir t;
  write_shapes_dataset(t.str("shapes"), 11, 0, 5);
  auto run = [&](bool hand_over) {
    Model m = load_model(fixture("tiny_llava"));
    CalibOptions co;
    co.n_train = 8;
    co.n_val = 3;
    co.seq_len = 256;
    CalibSet calib = load_instruction_data(m, t.str("shapes/train.json"), t.str("shapes/images"), co);
    BlockApOptions bo = opts("rtn", 4);
    bo.batch_size = 4;
    bo.keep_sample_embeds = hand_over;
    BlockApResult br = run_block_quantization(m, calib, bo);
    CalibSet e2e = calib;
    if (hand_over) {
      std::vector<CalibSample> all = calib.train;
      all.insert(all.end(), calib.val.begin(), calib.val.end());
      EXPECT_EQ(br.sample_embeds.size(), all.size());
      std::set<size_t> lengths;
      for (size_t i = 0; i < std::min(all.size(), br.sample_embeds.size()); ++i) {
        lengths.insert(all[i].ids.size());
        EXPECT_TRUE(at::equal(br.sample_embeds[i], embed_samples(m, {all[i]}).embeds[0])) << "sample " << i;
      }
      EXPECT_GT(lengths.size(), 1u);  // padded batches
      for (size_t i = 0; i < e2e.train.size(); ++i) e2e.train[i].embeds = br.sample_embeds[i];
      for (size_t i = 0; i < e2e.val.size(); ++i) e2e.val[i].embeds = br.sample_embeds[e2e.train.size() + i];
    } else {
      EXPECT_TRUE(br.sample_embeds.empty());
    }
    E2eOptions o = e2e_opts();
    o.epochs = 2;
    E2eResult r = run_e2e_qp(m, e2e, o);
    std::vector<at::Tensor> s;
    for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
      for (auto& [n, lin] : block_linears(m, b)) s.push_back(lin->scales.clone());
    return std::make_pair(r, s);
  };
  const auto [own, own_scales] = run(false);
  const auto [given, given_scales] = run(true);
  EXPECT_EQ(own.step_loss, given.step_loss);
  EXPECT_EQ(own.val_loss_before, given.val_loss_before);
  EXPECT_EQ(own.val_loss_after, given.val_loss_after);
  ASSERT_EQ(own_scales.size(), given_scales.size());
  for (size_t i = 0; i < own_scales.size(); ++i) EXPECT_TRUE(at::equal(own_scales[i], given_scales[i])) << i;
}

// Fewer training samples than the batch (issue 16): the step used to read past the epoch's permutation. The batch
// now shrinks to the data (3 samples, batch 8 of micro-batches 4 -> one micro-batch of 3), and no data at all is an
// InputError; a resume state from another model is refused naming the file.
TEST(E2eQp, FewerSamplesThanTheBatchShrinkTheBatch) {
  Model m = load_model(fixture("tiny_llama"));
  CalibSet calib = tiny_calib(m);
  run_block_quantization(m, calib, opts("rtn", 2));
  calib.train.resize(3);
  E2eOptions o;
  o.global_batch = 8;
  o.micro_batch = 4;
  o.progress = false;
  E2eResult r = run_e2e_qp(m, calib, o);
  EXPECT_EQ(r.steps, 1);  // one epoch of 3 samples = one step of the shrunk batch
  ASSERT_EQ(r.step_loss.size(), 1u);
  EXPECT_TRUE(std::isfinite(r.step_loss[0]));

  CalibSet empty = calib;
  empty.train.clear();
  EXPECT_THROW(run_e2e_qp(m, empty, o), InputError);

  TempDir t;
  write_safetensors(t.str("e2e_state.safetensors"), {{"step", at::tensor({int64_t{3}})}});
  o.state_dir = t.str();
  o.resume = true;
  try {
    run_e2e_qp(m, calib, o);
    ADD_FAILURE() << "resumed from a state without scales";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("e2e_state.safetensors"), std::string::npos) << e.what();
  }
}

// GradScaler semantics: gradients come back unscaled, an overflow skips the step and halves the scale, and
// `growth_interval` good steps in a row double it. Powers of two keep every comparison exact.
TEST(LossScaler, UnscalesSkipsOverflowsAndGrows) {
  at::Tensor p = at::zeros({3}).set_requires_grad(true);
  LossScaler sc(true, /*init_scale=*/1024.0, 2.0, 0.5, /*growth_interval=*/2);
  auto backward = [&](float a) {
    p.mutable_grad() = at::Tensor();
    sc.scale((p * at::tensor({a, 2.0f, 4.0f})).sum()).backward();
  };
  backward(1.0f);
  EXPECT_TRUE(sc.unscale_and_check({p}));
  EXPECT_TRUE(at::equal(p.grad(), at::tensor({1.0f, 2.0f, 4.0f})));
  EXPECT_EQ(sc.value(), 1024.0);
  backward(std::numeric_limits<float>::infinity());
  EXPECT_FALSE(sc.unscale_and_check({p}));
  EXPECT_EQ(sc.value(), 512.0);
  EXPECT_EQ(sc.skipped(), 1);
  backward(1.0f);
  EXPECT_TRUE(sc.unscale_and_check({p}));
  backward(1.0f);
  EXPECT_TRUE(sc.unscale_and_check({p}));
  EXPECT_EQ(sc.value(), 1024.0) << "two finite steps in a row double the scale";
  LossScaler off(false);
  backward(std::numeric_limits<float>::infinity());
  EXPECT_TRUE(off.unscale_and_check({p})) << "disabled: never skips (the CPU path checks the loss instead)";
  EXPECT_EQ(off.value(), 1.0);
}

// Data-parallel training (two threads, small blocks) against the one-thread order, on the tiny model with samples of
// unequal length (right padding that each thread cuts off). The two compute the same losses and gradients in another
// fp32 summation order (and per-sample GEMMs), so they agree to rounding, not bit for bit:
//  - without learning (lr 0) every loss is a pure forward: a sum of ≤ 2·32·64 squares or KL terms in another order,
//    relative error ≤ n·2⁻²⁴ ≈ 2.4e-4 at worst, asserted at 1e-4 since these errors are random-signed (measured:
//    under 7e-8);
//    The lr-0 run trains nothing at all (an lr of 0 is 0, not "the default"): its norms are the checkpoint's.
//  - with learning, the parameters' movement is the same movement: AdamW's first steps are ±lr per element (the sign
//    of the gradient), so rounding only flips elements whose gradient is near zero, and a flip changes the next
//    steps' inputs, so the two runs drift apart slowly. The difference of the two movements is asserted under 10 %
//    of the movement. Measured: 0 while both thread counts ran autograd (the norms and step sizes being stored in
//    the model's 16-bit dtype); since two threads run the hand-written step (block_grad.h), which sums in another
//    order, 0.028 (norms) and 0.053 (step sizes) on an AMD EPYC, under 0.05 on an Intel Xeon. A lost gradient
//    differs by far more (measured with the bug put in: the norms' gradients dropped, 49× under autograd, 1.37×
//    (norms) and 0.21× (step sizes) in block_grad's post-attention norm; one thread's E2E-QP share dropped, 0.44×).
//  - GPTQ's Hessians from two threads' parts, merged, differ from one pass by fp64 rounding, which flips no integer
//    here: the block losses agree within 1e-4 (measured: equal; with one part's Hessian dropped: 0.53–0.65).
TEST(BlockAp, DataParallelStepsMatchTheOneThreadOrder) {
  const int threads = at::get_num_threads();
  struct Run {
    BlockApResult block;
    E2eResult e2e;
    std::vector<at::Tensor> norms, scales;  // after Block-AP, then the step sizes after E2E-QP
  };
  auto run = [&](int nthreads, double lr) {
    at::set_num_threads(nthreads);
    Model m = load_model(fixture("tiny_llama"));
    EXPECT_EQ(data_parallel_training(m), nthreads > 1);
    CalibSet calib = tiny_calib(m);
    for (size_t i = 0; i < calib.train.size(); i += 2) {  // every other sample shorter: padded batches
      calib.train[i].ids.resize(20 - i);
      calib.train[i].is_answer.resize(20 - i);
    }
    BlockApOptions o = opts("efficientqat", 2);
    o.weight_lr = lr, o.quant_lr = lr;
    Run r;
    r.block = run_block_quantization(m, calib, o);
    for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b) {
      auto* l = m.lm->model->layers[b]->as<LlamaDecoderLayerImpl>();
      r.norms.push_back(l->input_layernorm->weight.detach().to(at::kFloat).clone());
      r.norms.push_back(l->post_attention_layernorm->weight.detach().to(at::kFloat).clone());
    }
    E2eOptions e = e2e_opts();
    e.lr = lr > 0 ? 1e-3 : 0;
    calib.val.clear();  // nothing to judge by: E2E-QP keeps what it trained
    r.e2e = run_e2e_qp(m, calib, e);
    for (int64_t b = 0; b < m.cfg.text.num_hidden_layers; ++b)
      for (auto& [name, lin] : block_linears(m, b)) r.scales.push_back(lin->scales.detach().to(at::kFloat).clone());
    return r;
  };
  auto rel = [](double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-30); };
  {
    const Run one = run(1, 0.0), two = run(2, 0.0);
    for (size_t b = 0; b < one.block.blocks.size(); ++b)
      for (size_t k = 0; k < one.block.blocks[b].train_loss.size(); ++k) {
        EXPECT_LE(rel(two.block.blocks[b].train_loss[k], one.block.blocks[b].train_loss[k]), 1e-4) << b << " " << k;
        EXPECT_LE(rel(two.block.blocks[b].val_loss[k], one.block.blocks[b].val_loss[k]), 1e-4) << b << " " << k;
      }
    Model fresh = load_model(fixture("tiny_llama"));
    for (int64_t b = 0; b < fresh.cfg.text.num_hidden_layers; ++b) {
      auto* l = fresh.lm->model->layers[b]->as<LlamaDecoderLayerImpl>();
      EXPECT_TRUE(one.norms[2 * b].equal(l->input_layernorm->weight.detach().to(at::kFloat))) << b;
      EXPECT_TRUE(two.norms[2 * b + 1].equal(l->post_attention_layernorm->weight.detach().to(at::kFloat))) << b;
    }
    ASSERT_EQ(one.e2e.step_loss.size(), two.e2e.step_loss.size());
    for (size_t k = 0; k < one.e2e.step_loss.size(); ++k)
      EXPECT_LE(rel(two.e2e.step_loss[k], one.e2e.step_loss[k]), 1e-4) << k;
  }
  {  // GPTQ (the default start's pass): each thread's Hessians of its part of the batches, merged in order
    auto gptq = [&](int nthreads) {
      at::set_num_threads(nthreads);
      Model m = load_model(fixture("tiny_llama"));
      return run_block_quantization(m, tiny_calib(m), opts("gptq", 2));
    };
    const BlockApResult one = gptq(1), two = gptq(2);
    for (size_t b = 0; b < one.blocks.size(); ++b)
      EXPECT_LE(rel(two.blocks[b].val_loss.back(), one.blocks[b].val_loss.back()), 1e-4) << b;
  }
  {
    const Run start = run(1, 0.0), one = run(1, 1e-3), two = run(2, 1e-3);
    auto moved = [&](const std::vector<at::Tensor>& from, const std::vector<at::Tensor>& a,
                     const std::vector<at::Tensor>& b) {
      double d2 = 0, m2 = 0;
      for (size_t i = 0; i < from.size(); ++i) {
        d2 += (a[i] - b[i]).square().sum().item<double>();
        m2 += (a[i] - from[i]).square().sum().item<double>();
      }
      EXPECT_GT(m2, 0.0);
      return std::sqrt(d2 / m2);
    };
    EXPECT_LE(moved(start.norms, two.norms, one.norms), 0.1);
    EXPECT_LE(moved(start.scales, two.scales, one.scales), 0.1);
  }
  at::set_num_threads(threads);
}

// plan_micro_batches: samples longest first (ties in their order), cut into micro-batches of consecutive ones, dealt
// longest first to the least-loaded thread. Worked by hand for lengths 5 9 3 9 7 1 4 8, micro-batches of 2, two
// threads: sorted 9(1) 9(3) 8(7) 7(4) 5(0) 4(6) 3(2) 1(5); padded costs 18, 16, 10, 6; thread 0 takes 18, thread 1
// 16 then 10 (16 < 18), thread 0 then 6 (18 < 26): loads 24 and 26 (50 padded tokens), against 36 and 30 (66) for
// the micro-batches in the given order, two to each thread.
TEST(E2eQp, MicroBatchesAreCutFromTheSamplesByLengthAndDealtToBalanceTheThreads) {
  const std::vector<int64_t> len = {5, 9, 3, 9, 7, 1, 4, 8};
  MicroBatchPlan p = plan_micro_batches(len, 2, 2);
  using V = std::vector<size_t>;
  EXPECT_EQ(p.micro, (std::vector<V>{{1, 3}, {7, 4}, {0, 6}, {2, 5}}));
  EXPECT_EQ(p.runs, (std::vector<V>{{0, 3}, {1, 2}}));
  // One thread runs every micro-batch, longest first; a ragged end makes a smaller last micro-batch.
  p = plan_micro_batches({2, 6, 4, 6, 1}, 2, 1);
  EXPECT_EQ(p.micro, (std::vector<V>{{1, 3}, {2, 0}, {4}}));
  EXPECT_EQ(p.runs, (std::vector<V>{{0, 1, 2}}));
  // More threads than micro-batches: the extra ones run nothing.
  p = plan_micro_batches({3, 3}, 2, 3);
  EXPECT_EQ(p.runs, (std::vector<V>{{0}, {}, {}}));
  // Random lengths: every sample once, never more padded tokens than the micro-batches in the given order.
  std::mt19937 rng(5);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<int64_t> l(32);
    for (auto& x : l) x = 20 + static_cast<int64_t>(rng() % 30);
    p = plan_micro_batches(l, 4, 2);
    std::multiset<size_t> seen;
    int64_t padded = 0, in_order = 0;
    for (const auto& mb : p.micro) {
      int64_t longest = 0;
      for (size_t j : mb) seen.insert(j), longest = std::max(longest, l[j]);
      padded += longest * static_cast<int64_t>(mb.size());
    }
    for (size_t i = 0; i < l.size(); i += 4) in_order += 4 * *std::max_element(l.begin() + i, l.begin() + i + 4);
    EXPECT_EQ(seen.size(), l.size());
    EXPECT_EQ(std::set<size_t>(seen.begin(), seen.end()).size(), l.size());
    EXPECT_LE(padded, in_order);
    EXPECT_EQ(p.runs[0].size() + p.runs[1].size(), p.micro.size());
  }
}

// A step's loss does not depend on how its samples are cut into micro-batches: one micro-batch of all four (padded
// to the longest), two or four of them give the same distillation loss and validation loss, each sample against
// its own targets (a sample paired with another's targets fails the row-count assertion or changes the loss). The
// valid positions never see the padding (right padding, causal mask), so only fp32 summation order differs: GEMMs
// of another row count block their sums differently, a relative 1e-6 on these few-hundred-term sums, checked at 1e-5.
TEST(E2eQp, TheStepsLossIsTheSameInAnyMicroBatches) {
  Model m0 = load_model(fixture("tiny_llama"));
  CalibSet calib = tiny_calib(m0);
  for (size_t i = 0; i < calib.train.size(); ++i) {  // lengths 32, 29, 26, ...: every micro-batch pads
    calib.train[i].ids.resize(32 - 3 * i);
    calib.train[i].is_answer.resize(32 - 3 * i);
  }
  calib.val[1].ids.resize(17);
  calib.val[1].is_answer.resize(17);
  std::vector<CalibSample> teacher = calib.train;
  teacher.insert(teacher.end(), calib.val.begin(), calib.val.end());
  std::vector<double> first, val;
  for (int64_t micro : {4, 2, 1}) {
    Model m = load_model(fixture("tiny_llama"));
    BlockApOptions bo = opts("rtn", 2);
    bo.teacher_samples = &teacher;
    BlockApResult br = run_block_quantization(m, calib, bo);
    E2eOptions o = e2e_opts();
    o.loss = "kd";
    o.teacher_hidden = &br.teacher_hidden;
    o.micro_batch = micro;
    o.max_steps = 1;
    E2eResult r = run_e2e_qp(m, calib, o);
    ASSERT_EQ(r.step_loss.size(), 1u);
    first.push_back(r.step_loss[0]);
    val.push_back(r.val_loss_before);
  }
  for (size_t i = 1; i < first.size(); ++i) {
    EXPECT_NEAR(first[i], first[0], 1e-5 * first[0]) << i;
    EXPECT_NEAR(val[i], val[0], 1e-5 * val[0]) << i;
  }
  EXPECT_GT(first[0], 0);
}

// E2E-QP's step by hand (block_grad.h) has the autograd step's loss and gradients: one step at two threads, each
// way, with cross-entropy and with distillation, on micro-batches of samples of different lengths; by hand both as
// one pass of the step's 4 samples (kE2eHandPassBytes) and as its 2 micro-batches one by one. Tolerance as in
// BlockGrad.LossAndGradientsMatchAutogradThroughTheLayer (fp32, other summation orders, here through two blocks and
// the head): 1e-4 of the largest entry of each linear's dL/ds. A gradient on the wrong linear or group moves
// entries by a large part of that scale; AdamW's first step, which only sees each gradient's sign, would not show it.
// Then again with the training samples beginning with the same 6 tokens, none of them a loss position (a chat
// template's system prompt), which by hand run once (PackedRows::prefix).
TEST(E2eQp, TheStepByHandHasAutogradsGradients) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  Model m0 = load_model(fixture("tiny_llama"));
  for (const auto& [prompted, loss] :
       std::vector<std::pair<bool, std::string>>{{false, "ce"}, {false, "kd"}, {true, "ce"}, {true, "kd"}}) {
    CalibSet calib = tiny_calib(m0);
    for (size_t i = 0; i < calib.train.size(); ++i) {  // lengths 32, 29, 26, ...
      calib.train[i].ids.resize(32 - 3 * i);
      calib.train[i].is_answer.resize(32 - 3 * i);
      if (!prompted) continue;
      std::copy_n(calib.train[0].ids.begin(), 6, calib.train[i].ids.begin());
      std::fill_n(calib.train[i].is_answer.begin(), 6, 0);
    }
    std::vector<CalibSample> teacher = calib.train;
    teacher.insert(teacher.end(), calib.val.begin(), calib.val.end());
    SCOPED_TRACE(prompted ? "a shared prompt" : "no shared prompt");
    std::vector<std::vector<at::Tensor>> grads;
    std::vector<double> first;
    const E2eOptions base = e2e_opts();
    for (const int64_t pass : {int64_t{0}, base.global_batch, base.micro_batch}) {  // 0: autograd
      Model m = load_model(fixture("tiny_llama"));
      BlockApOptions bo = opts("rtn", 2);
      bo.teacher_samples = &teacher;
      BlockApResult br = run_block_quantization(m, calib, bo);
      E2eOptions o = base;
      o.loss = loss;
      if (loss == "kd") o.teacher_hidden = &br.teacher_hidden;
      o.max_steps = 1;
      o.by_hand = pass > 0;
      if (pass == base.micro_batch) o.hand_pass_bytes = 0;
      o.on_gradients = [&](const std::vector<at::Tensor>& g) { grads.push_back(g); };
      E2eResult r = run_e2e_qp(m, calib, o);
      EXPECT_EQ(r.by_hand, pass > 0) << loss;
      EXPECT_EQ(r.pass_samples, pass) << loss;
      ASSERT_EQ(r.step_loss.size(), 1u);
      first.push_back(r.step_loss[0]);
    }
    ASSERT_EQ(grads.size(), 3u);
    for (size_t way = 1; way < grads.size(); ++way) {
      EXPECT_NEAR(first[way], first[0], 1e-5 * first[0]) << loss << " way " << way;
      ASSERT_EQ(grads[0].size(), grads[way].size());
      for (size_t k = 0; k < grads[0].size(); ++k) {
        const double scale = grads[0][k].abs().max().item<double>();
        EXPECT_GT(scale, 0.0) << loss << " " << k;
        EXPECT_LE((grads[way][k] - grads[0][k]).abs().max().item<double>(), 1e-4 * scale)
            << loss << " way " << way << " linear " << k;
      }
    }
  }
  at::set_num_threads(threads);
}

// E2E-QP's training cache on a packed linear (set_train_cache): forward and gradients equal the uncached module's
// bit for bit, step after step of AdamW. AdamW's fused update writes the step sizes through a raw pointer, so it
// must bump their version; without that the cache would keep the first step's Ŵᵀ and the outputs would part after
// the first step. The integers are zeroed once the cache exists, so equal outputs after that also show the cache,
// not the integers, was read.
TEST(E2eQp, TrainingCacheFollowsTheStepSizesThroughAdamW) {
  at::manual_seed(7);
  const int64_t K = 256, N = 96, M = 10;
  const at::Tensor W = at::randn({N, K}) * 0.05, x = at::randn({M, K}), r = at::randn({M, N});
  auto make = [&]() {
    QuantLinear lin(K, N, /*bias=*/false);
    lin->weight.set_data(W.clone());
    lin->to_fake_quant(QuantSpec{2, 64});
    lin->to_packed(at::kHalf);
    lin->scales.set_data(lin->scales.to(at::kFloat));
    lin->scales.set_requires_grad(true);
    return lin;
  };
  QuantLinear plain = make(), cached = make();
  cached->set_train_cache(true);
  AdamW opt_plain({ParamGroup{"scales", {plain->scales}, 1e-3, 0.0}});
  AdamW opt_cached({ParamGroup{"scales", {cached->scales}, 1e-3, 0.0}});
  at::Tensor before = plain->scales.detach().clone();
  for (int step = 0; step < 3; ++step) {
    const at::Tensor xa = x.clone().set_requires_grad(true), xb = x.clone().set_requires_grad(true);
    const at::Tensor ya = plain->forward(xa), yb = cached->forward(xb);
    ASSERT_TRUE(at::equal(ya, yb)) << "step " << step;
    (ya * r).sum().backward();
    (yb * r).sum().backward();
    EXPECT_TRUE(at::equal(xa.grad(), xb.grad())) << "step " << step;
    EXPECT_TRUE(at::equal(plain->scales.grad(), cached->scales.grad())) << "step " << step;
    opt_plain.step();
    opt_cached.step();
    opt_plain.zero_grad();
    opt_cached.zero_grad();
    EXPECT_FALSE(at::equal(plain->scales.detach(), before)) << "the step sizes must move, step " << step;
    before = plain->scales.detach().clone();
    if (step == 0) {  // the cache exists now: later steps must not read the integers
      c10::NoGradGuard g;
      cached->qweight.zero_();
    }
  }
}
