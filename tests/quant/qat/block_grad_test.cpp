// block_grad_cpu (Block-AP's hand-written CPU step) against LibTorch's autograd through the model's own decoder layer.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "llm/llama.h"
#include "quant/cpu_bf16_gemm.h"
#include "quant/qat/optim.h"
#include "quant/qat/block_grad.h"

using namespace eqat;

namespace {

// max |a − b| / max |b|: the gradients' error relative to their scale.
double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-30);
}

struct Case {
  LlamaConfig cfg;
  at::Tensor x, y, valid;  // [B, L, C] fp16 (the activation cache's dtype), [B, L, C] fp32, [B, L] bool
};

Case make_case(int64_t sliding_window) {
  Case k;
  LlamaConfig& c = k.cfg;
  c.hidden_size = 64, c.intermediate_size = 96, c.num_hidden_layers = 1;
  c.num_attention_heads = 4, c.num_key_value_heads = 2, c.head_dim = 16;  // grouped queries: 2 per key head
  c.rms_norm_eps = 1e-5, c.rope_theta = 10000, c.sliding_window = sliding_window;
  const int64_t B = 4, L = 13;
  at::manual_seed(7);
  k.x = at::randn({B, L, c.hidden_size}).to(at::kHalf);
  k.y = at::randn({B, L, c.hidden_size});
  // Sample 0: every position but the first and the fourth (holes inside); 1: 7 positions, then padding; 2: none;
  // 3: only the last position (all of it computed, one loss position).
  k.valid = at::zeros({B, L}, at::kBool);
  k.valid[0].fill_(true);
  k.valid[0][0] = false, k.valid[0][3] = false;
  k.valid[1].narrow(0, 0, 7).fill_(true);
  k.valid[3][L - 1] = true;
  return k;
}

}  // namespace

// The loss and every gradient match autograd through LlamaDecoderLayerImpl (one sample at a time, cut after its
// last valid position, as Block-AP's autograd step runs them), at 1, 2 and 3 threads, with and without a sliding
// window: Block-AP's step (dL/dŴ, the norms' gradients), and E2E-QP's forward and backward pieces (dL/dŴᵀ, dL/dx),
// on all rows and with the output on the loss rows only.
// Tolerance: both sides are fp32 with different summation orders (the packed GEMMs, the attention's softmax by hand
// against SDPA, RMSNorm's backward by hand); over dot products of ≤ 96 terms the relative error
// per value is ≲ 96·6e-8 ≈ 6e-6 at worst, compounded over the block's ~10 stages in each direction: 1e-4 of the
// largest entry holds with margin, while a wrong sign, a missing term or a misplaced head moves the gradient by
// a large part of its scale.
//
// Then again with the first 4 positions of samples 0, 1 and 3 the same (inputs and targets; sample 2 computes nothing):
// computed once (PackedRows::prefix), their loss weighted by how many samples have them valid (1 at positions 0 and 3,
// sample 0's holes; 2 at 1 and 2), and their gradients, dL/dx included, the sums over the samples' copies.
TEST(BlockGrad, LossAndGradientsMatchAutogradThroughTheLayer) {
  const int threads = at::get_num_threads();
  for (auto [window, prefix] : {std::pair<int64_t, int64_t>{0, 0}, {5, 0}, {0, 4}, {5, 4}}) {
    Case k = make_case(window);
    for (int64_t b : {1, 3}) {
      k.x[b].narrow(0, 0, prefix).copy_(k.x[0].narrow(0, 0, prefix));
      k.y[b].narrow(0, 0, prefix).copy_(k.y[0].narrow(0, 0, prefix));
    }
    const LlamaConfig& cfg = k.cfg;
    LlamaModel model(cfg);
    auto* layer = model->layers[0]->as<LlamaDecoderLayerImpl>();
    at::manual_seed(11);
    std::vector<QuantLinear> lins = {layer->self_attn->q_proj, layer->self_attn->k_proj, layer->self_attn->v_proj,
                                     layer->self_attn->o_proj, layer->mlp->gate_proj,    layer->mlp->up_proj,
                                     layer->mlp->down_proj};
    for (auto& lin : lins)
      lin->set_float_weight(at::randn({lin->out_features(), lin->in_features()}) / std::sqrt(lin->in_features()));
    {
      c10::NoGradGuard ng;
      layer->input_layernorm->weight.set_data(1 + 0.3 * at::randn({cfg.hidden_size}));
      layer->post_attention_layernorm->weight.set_data(1 + 0.3 * at::randn({cfg.hidden_size}));
    }
    const int64_t B = k.x.size(0), L = k.x.size(1);
    auto [cos, sin] = model->rotary().cos_sin(at::arange(L, at::kLong).view({1, L}), at::kFloat, L);
    const double denom = k.valid.sum().item<double>() * cfg.hidden_size;

    // Autograd, sample by sample.
    std::vector<at::Tensor> params;
    for (auto& lin : lins) params.push_back(lin->weight);
    params.push_back(layer->input_layernorm->weight);
    params.push_back(layer->post_attention_layernorm->weight);
    for (auto& p : params) p.set_requires_grad(true);
    const at::Tensor xf = k.x.to(at::kFloat).requires_grad_(true);  // for dL/dx (E2E-QP's backward)
    params.push_back(xf);
    at::Tensor loss = at::zeros({}, at::kFloat);
    for (int64_t b = 0; b < B; ++b) {
      const at::Tensor v = k.valid[b];
      const int64_t len = v.nonzero().numel() == 0 ? 0 : v.nonzero().max().item<int64_t>() + 1;
      if (len == 0) continue;
      const at::Tensor mask = model->sliding_window_mask(at::Tensor(), len, nullptr, at::kCPU);
      at::Tensor out = layer->forward(xf[b].narrow(0, 0, len).unsqueeze(0),
                                      cos.narrow(1, 0, len), sin.narrow(1, 0, len), mask, nullptr, 0)[0];
      loss = loss + ((out - k.y[b].narrow(0, 0, len)).pow(2) * v.narrow(0, 0, len).unsqueeze(-1)).sum() / denom;
    }
    const std::vector<at::Tensor> ref = torch::autograd::grad({loss}, params);
    params.pop_back();
    for (auto& p : params) p.set_requires_grad(false);

    BlockGradWeights w;
    w.qkv = at::cat({lins[0]->weight, lins[1]->weight, lins[2]->weight}).contiguous();
    w.o = lins[3]->weight.contiguous();
    w.gate_up = at::cat({lins[4]->weight, lins[5]->weight}).contiguous();
    w.down = lins[6]->weight.contiguous();
    w.norm_in = layer->input_layernorm->weight.detach();
    w.norm_post = layer->post_attention_layernorm->weight.detach();
    for (int nthreads : {1, 2, 3}) {
      at::set_num_threads(nthreads);
      const BlockGrads g = block_grad_cpu(cfg, w, k.x, k.y, k.valid, cos[0].contiguous(), sin[0].contiguous(), denom);
      SCOPED_TRACE(testing::Message() << "window " << window << ", prefix " << prefix << ", " << nthreads << " threads");
      EXPECT_NEAR(g.loss, loss.item<double>(), 1e-5 * loss.item<double>());
      const int64_t Cq = cfg.num_attention_heads * cfg.head_dim, Ck = cfg.num_key_value_heads * cfg.head_dim,
                    F = cfg.intermediate_size;
      const std::vector<at::Tensor> mine = {g.qkv.narrow(0, 0, Cq),   g.qkv.narrow(0, Cq, Ck),
                                            g.qkv.narrow(0, Cq + Ck, Ck), g.o,
                                            g.gate_up.narrow(0, 0, F), g.gate_up.narrow(0, F, F),
                                            g.down,                    g.norm_in,
                                            g.norm_post};
      const char* names[] = {"q", "k", "v", "o", "gate", "up", "down", "norm_in", "norm_post"};
      for (size_t i = 0; i + 1 < ref.size(); ++i) EXPECT_LE(rel_err(mine[i], ref[i]), 1e-4) << names[i];

      // E2E-QP's pieces: the forward on packed rows, dL/dout of the same loss by hand, the backward to dL/dŴᵀ and
      // dL/dx; the weights given as transposed views, as E2E-QP passes its Ŵᵀ caches.
      std::vector<int64_t> lengths;
      for (int64_t b = 0; b < B; ++b)
        lengths.push_back(k.valid[b].nonzero().numel() == 0 ? 0 : k.valid[b].nonzero().max().item<int64_t>() + 1);
      const int64_t S = shared_prefix({k.x.contiguous(), k.y}, lengths, L);
      ASSERT_EQ(S, prefix);
      const PackedRows pk = pack_rows(lengths, S);
      // The (sample, position) pairs each packed row stands for: one, or every computing sample's in the prefix.
      std::vector<std::vector<std::pair<int64_t, int64_t>>> src(static_cast<size_t>(pk.rows));
      for (int64_t b = 0; b < B; ++b) {
        if (lengths[b] == 0) continue;
        const size_t seg = static_cast<size_t>(S > 0 ? b + 1 : b);
        for (int64_t t = 0; t < S; ++t) src[static_cast<size_t>(t)].push_back({b, t});
        for (int64_t j = 0; j < pk.len[seg]; ++j) src[static_cast<size_t>(pk.off[seg] + j)].push_back({b, S + j});
      }
      at::Tensor xin = at::empty({pk.rows, cfg.hidden_size}), y_of = at::empty_like(xin), v_of = at::zeros({pk.rows});
      at::Tensor ref_dx = at::zeros_like(xin);
      for (int64_t r = 0; r < pk.rows; ++r)
        for (auto [b, t] : src[static_cast<size_t>(r)]) {
          xin[r] = k.x[b][t].to(at::kFloat), y_of[r] = k.y[b][t];
          v_of[r] += k.valid[b][t].to(at::kFloat);
          ref_dx[r] += ref.back()[b][t];
        }
      BlockGradWeights wt = w;
      for (at::Tensor* t : {&wt.qkv, &wt.o, &wt.gate_up, &wt.down}) *t = t->t().contiguous().t();
      BlockTape tape;
      const at::Tensor c0 = cos[0].contiguous(), s0 = sin[0].contiguous();
      const at::Tensor out = block_forward_cpu(cfg, wt, pk, xin, c0, s0, &tape);
      const at::Tensor dout = ((out - y_of) * v_of.unsqueeze(1) * (2 / denom)).contiguous();
      auto expect_ref = [&](const BlockGradsT& gt, const char* what) {
        const std::vector<at::Tensor> mine_t = {gt.qkv.t().narrow(0, 0, Cq), gt.qkv.t().narrow(0, Cq, Ck),
                                                gt.qkv.t().narrow(0, Cq + Ck, Ck), gt.o.t(),
                                                gt.gate_up.t().narrow(0, 0, F), gt.gate_up.t().narrow(0, F, F),
                                                gt.down.t()};
        for (size_t i = 0; i < mine_t.size(); ++i)
          EXPECT_LE(rel_err(mine_t[i], ref[i]), 1e-4) << what << " " << names[i];
        EXPECT_LE(rel_err(gt.dx, ref_dx), 1e-4) << what << " dx";
      };
      expect_ref(block_backward_cpu(cfg, wt, pk, tape, dout, c0, s0, true), "all rows:");

      // The output wanted at the loss positions only (PackedRows::out, as E2E-QP's last layer runs): sample 0's
      // rows have holes, sample 2 has none, sample 3 only its last. The output there is the full forward's rows
      // (the same arithmetic in GEMMs of other shapes: ~1e-6 relative; 1e-5), and dL/dout on those rows alone gives
      // every gradient above, dL/dx included (the other rows' outputs were multiplied by 0 in the loss).
      PackedRows pk_out = pk;
      for (int64_t r = 0; r < pk.rows; ++r)
        if (v_of[r].item<float>() > 0) pk_out.out.push_back(r);
      const at::Tensor rows = at::tensor(pk_out.out, at::kLong);
      BlockTape tape_out;
      const at::Tensor out_sub = block_forward_cpu(cfg, wt, pk_out, xin, c0, s0, &tape_out);
      ASSERT_EQ(out_sub.size(0), rows.numel());
      EXPECT_LE(rel_err(out_sub, out.index_select(0, rows)), 1e-5);
      const at::Tensor dout_sub = dout.index_select(0, rows).contiguous();
      expect_ref(block_backward_cpu(cfg, wt, pk_out, tape_out, dout_sub, c0, s0, true), "loss rows:");
    }
  }
  at::set_num_threads(threads);
}

// shared_prefix: the leading positions that every computing sample has byte for byte, in every tensor given, at most
// the cap and the shortest computing sample; nothing for fewer than two computing samples.
TEST(BlockGrad, SharedPrefixIsWhatEveryComputingSampleBeginsWith) {
  at::manual_seed(3);
  at::Tensor x = at::randn({3, 6, 4}), y = at::randn({3, 6, 2});
  for (int64_t b : {1, 2}) x[b].narrow(0, 0, 5).copy_(x[0].narrow(0, 0, 5)), y[b].copy_(y[0]);
  EXPECT_EQ(shared_prefix({x, y}, {6, 6, 6}, 6), 5);
  EXPECT_EQ(shared_prefix({x, y}, {6, 6, 6}, 3), 3);     // the cap
  EXPECT_EQ(shared_prefix({x, y}, {6, 4, 6}, 6), 4);     // the shortest sample
  y[2][2][1] = 7.0f;                                       // a target differs at position 2
  EXPECT_EQ(shared_prefix({x, y}, {6, 6, 6}, 6), 2);
  EXPECT_EQ(shared_prefix({x}, {6, 6, 6}, 6), 5);
  EXPECT_EQ(shared_prefix({x, y}, {6, 6, 0}, 6), 5);     // sample 2 computes nothing
  EXPECT_EQ(shared_prefix({x, y}, {0, 6, 0}, 6), 0);     // one sample: nothing to share
  x[1][0][0] = -x[1][0][0] - 1;
  EXPECT_EQ(shared_prefix({x}, {6, 6, 6}, 6), 0);
}

// A batch without a loss position computes nothing: loss 0, zero gradients.
TEST(BlockGrad, NoValidPositionGivesZeroLossAndGradients) {
  Case k = make_case(0);
  k.valid.fill_(false);
  const LlamaConfig& c = k.cfg;
  const int64_t C = c.hidden_size, Cqkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  BlockGradWeights w{at::randn({Cqkv, C}), at::randn({C, c.num_attention_heads * c.head_dim}),
                     at::randn({2 * c.intermediate_size, C}), at::randn({C, c.intermediate_size}), at::ones({C}),
                     at::ones({C})};
  const int64_t L = k.x.size(1);
  const BlockGrads g =
      block_grad_cpu(c, w, k.x, k.y, k.valid, at::ones({L, c.head_dim}), at::zeros({L, c.head_dim}), 1.0);
  EXPECT_EQ(g.loss, 0.0);
  for (const at::Tensor* t : {&g.qkv, &g.o, &g.gate_up, &g.down, &g.norm_in, &g.norm_post})
    EXPECT_EQ(t->abs().max().item<double>(), 0.0);
}

// With bf16 GEMMs (BlockGradWeights::bf16_gemms) the step is the fp32 one (checked against autograd above) up to the
// GEMM inputs' rounding to bf16: relative 2⁻⁹ per operand, so each GEMM's output moves by ≲ 2·2⁻⁹ ≈ 4e-3 of
// Σ|a||b|, and the ~6 GEMMs on the longest path of the backward compound that to ≲ 2.5e-2 of the largest entry; 5e-2
// leaves margin, while a transposed operand read the wrong way or a gradient taken from the wrong stack moves entries
// by their own size. The two must also differ (> 1e-6): an fp32 run under the flag would pass the bound unseen.
// Block-AP's step, and E2E-QP's pieces on transposed weight views, at 1 and 2 threads, with a shared prefix.
TEST(BlockGrad, Bf16GemmsStayWithinTheirRoundingOfTheFp32Step) {
  if (!cpu_bf16_gemm_available()) GTEST_SKIP() << "no bf16 GEMM on this CPU or in this LibTorch";
  const int threads = at::get_num_threads();
  Case k = make_case(0);
  for (int64_t b : {1, 3}) {
    k.x[b].narrow(0, 0, 4).copy_(k.x[0].narrow(0, 0, 4));
    k.y[b].narrow(0, 0, 4).copy_(k.y[0].narrow(0, 0, 4));
  }
  const LlamaConfig& c = k.cfg;
  const int64_t C = c.hidden_size, Cq = c.num_attention_heads * c.head_dim,
                Cqkv = Cq + 2 * c.num_key_value_heads * c.head_dim, F = c.intermediate_size, L = k.x.size(1);
  at::manual_seed(13);
  BlockGradWeights w{at::randn({Cqkv, C}) / 8, at::randn({C, Cq}) / 8, at::randn({2 * F, C}) / 8,
                     at::randn({C, F}) / 10, 1 + 0.3 * at::randn({C}), 1 + 0.3 * at::randn({C})};
  LlamaModel model(c);
  auto [cos, sin] = model->rotary().cos_sin(at::arange(L, at::kLong).view({1, L}), at::kFloat, L);
  const at::Tensor c0 = cos[0].contiguous(), s0 = sin[0].contiguous();
  const double denom = k.valid.sum().item<double>() * C;
  BlockGradWeights wb = w;
  wb.bf16_gemms = true;
  for (int nthreads : {1, 2}) {
    at::set_num_threads(nthreads);
    SCOPED_TRACE(testing::Message() << nthreads << " threads");
    const BlockGrads g = block_grad_cpu(c, w, k.x, k.y, k.valid, c0, s0, denom);
    const BlockGrads gb = block_grad_cpu(c, wb, k.x, k.y, k.valid, c0, s0, denom);
    EXPECT_NEAR(gb.loss, g.loss, 5e-2 * g.loss);
    const char* names[] = {"qkv", "o", "gate_up", "down", "norm_in", "norm_post"};
    const at::Tensor* ref[] = {&g.qkv, &g.o, &g.gate_up, &g.down, &g.norm_in, &g.norm_post};
    const at::Tensor* got[] = {&gb.qkv, &gb.o, &gb.gate_up, &gb.down, &gb.norm_in, &gb.norm_post};
    for (size_t i = 0; i < 6; ++i) {
      EXPECT_LE(rel_err(*got[i], *ref[i]), 5e-2) << names[i];
      EXPECT_GT(rel_err(*got[i], *ref[i]), 1e-6) << names[i];
    }

    // E2E-QP's pieces: the forward's output, then dL/dŴᵀ and dL/dx, on transposed weight views.
    std::vector<int64_t> lengths;
    for (int64_t b = 0; b < k.x.size(0); ++b)
      lengths.push_back(k.valid[b].nonzero().numel() == 0 ? 0 : k.valid[b].nonzero().max().item<int64_t>() + 1);
    const PackedRows pk = pack_rows(lengths, shared_prefix({k.x.contiguous(), k.y}, lengths, L));
    const at::Tensor xin = at::randn({pk.rows, C});
    for (BlockGradWeights* v : {&w, &wb})
      for (at::Tensor* t : {&v->qkv, &v->o, &v->gate_up, &v->down}) *t = t->t().contiguous().t();
    BlockTape tape, tape_b;
    const at::Tensor out = block_forward_cpu(c, w, pk, xin, c0, s0, &tape);
    const at::Tensor out_b = block_forward_cpu(c, wb, pk, xin, c0, s0, &tape_b);
    EXPECT_LE(rel_err(out_b, out), 5e-2);
    EXPECT_GT(rel_err(out_b, out), 1e-6);
    const at::Tensor dout = at::randn({pk.rows, C});
    const BlockGradsT gt = block_backward_cpu(c, w, pk, tape, dout, c0, s0, true);
    const BlockGradsT gtb = block_backward_cpu(c, wb, pk, tape_b, dout, c0, s0, true);
    const at::Tensor* ref_t[] = {&gt.qkv, &gt.o, &gt.gate_up, &gt.down, &gt.dx};
    const at::Tensor* got_t[] = {&gtb.qkv, &gtb.o, &gtb.gate_up, &gtb.down, &gtb.dx};
    for (size_t i = 0; i < 5; ++i) {
      EXPECT_LE(rel_err(*got_t[i], *ref_t[i]), 5e-2) << "E2E-QP piece " << i;
      EXPECT_GT(rel_err(*got_t[i], *ref_t[i]), 1e-6) << "E2E-QP piece " << i;
    }
    for (BlockGradWeights* v : {&w, &wb})
      for (at::Tensor* t : {&v->qkv, &v->o, &v->gate_up, &v->down}) *t = t->contiguous();
  }
  at::set_num_threads(threads);
}

// parallel_items' workers run under the caller's dispatch keys (the hand-written steps dispatch below autograd, and
// at::parallel_for's OpenMP workers do not inherit that thread-local state by themselves). With 2 threads the second
// half of the items runs on another thread.
TEST(BlockGrad, ParallelItemsWorkersTakeTheCallersDispatchKeys) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  for (bool below : {false, true}) {
    std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
    if (below) guard.emplace();
    std::vector<char> excluded(8, 2);
    parallel_items(8, [&](int64_t i) {
      excluded[static_cast<size_t>(i)] = c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::ADInplaceOrView);
    });
    for (char e : excluded) EXPECT_EQ(e, below ? 1 : 0);
  }
  at::set_num_threads(threads);
}
