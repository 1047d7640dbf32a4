// Decoding under a CUDA graph (GenerateOptions::Decode::Graph, what `eqat ask` / `eqat generate` pick on CUDA)
// against static-shape and growing-shape (eager) steps on the same device, for a small random Llama (GQA, 3 layers)
// in fp16, as a float model and as a W4g32 packed model served through the fused kernels with q/k/v and gate/up
// merged. Built from random weights (no model files), so scripts/gpu-check.sh's standalone build runs it too. Skips
// itself without a CUDA device (label gpu).
//
// Tolerance. All three modes run the same fp16 prefill; decode steps differ only in kernel blocking (attention over
// the whole cache under a mask vs over the filled positions) and, for the graph, in nothing at all (the captured
// kernels replay on the same inputs). Logits here are |ℓ| ≲ 8; an fp16 rounding is 2^-11 relative, and a step
// passes ~10 roundings per layer × 3 layers through residual adds that do not amplify them, so two orders differ
// by ≲ 30·2^-11·8 ≈ 0.12 in the worst case and ~√30·2^-11·8 ≈ 0.02 typically. kTol = 0.06. Greedy tokens must agree
// wherever the eager top-2 margin exceeds 2·kTol (a closer tie may legitimately flip).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <cmath>

#include "llm/generate.h"
#include "llm/llama.h"

using namespace eqat;

namespace {

constexpr double kTol = 0.06;

LlamaConfig tiny_config() {
  LlamaConfig c;
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.intermediate_size = 160;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 256;
  return c;
}

std::vector<QuantLinear> decoder_linears(LlamaForCausalLM& lm) {
  std::vector<QuantLinear> out;
  for (size_t i = 0; i < lm->model->layers->size(); ++i) {
    auto* l = lm->model->layers[i]->as<LlamaDecoderLayerImpl>();
    for (const QuantLinear& q : {l->self_attn->q_proj, l->self_attn->k_proj, l->self_attn->v_proj,
                                 l->self_attn->o_proj, l->mlp->gate_proj, l->mlp->up_proj, l->mlp->down_proj})
      out.push_back(q);
  }
  return out;
}

// A seeded random Llama on the CUDA device in fp16: unit-variance embeddings, block linears N(0, 1/K) so activations
// keep their scale, lm_head N(0, 4/K) so the logits spread over a few units (clear greedy choices), norms 1.
LlamaForCausalLM random_llama_cuda(bool packed) {
  c10::NoGradGuard g;
  const LlamaConfig cfg = tiny_config();
  at::manual_seed(3);
  LlamaForCausalLM cpu(cfg), dev(cfg);
  for (auto& p : cpu->named_parameters()) {
    at::Tensor v = p.value();
    if (v.dim() == 1) {
      v.fill_(1.0);
    } else if (p.key().find("embed_tokens") != std::string::npos) {
      v.normal_(0.0, 1.0);
    } else if (p.key().find("lm_head") != std::string::npos) {
      v.normal_(0.0, 2.0 / std::sqrt(static_cast<double>(v.size(1))));  // logits ~ N(0, 4): max over 512 ≈ 6
    } else {
      v.normal_(0.0, 1.0 / std::sqrt(static_cast<double>(v.size(1))));
    }
  }
  auto dst = dev->named_parameters();
  for (auto& p : cpu->named_parameters()) dst[p.key()].set_data(p.value().to(at::kCUDA, at::kHalf));
  if (packed) {
    // RTN W4g32 on the CPU copy, packed with fp16 scales, installed into the CUDA model, merged for serving.
    QuantSpec spec;
    spec.bits = 4;
    spec.group_size = 32;
    auto src = decoder_linears(cpu), out = decoder_linears(dev);
    for (size_t i = 0; i < src.size(); ++i) {
      src[i]->to_fake_quant(spec);
      src[i]->to_packed(at::kHalf);
      out[i]->set_packed(src[i]->packed(), spec);
    }
    EXPECT_EQ(dev->fuse_projections(), 2 * cfg.num_hidden_layers);
  }
  return dev;
}

GenerateResult run(LlamaForCausalLM& lm, GenerateOptions::Decode d) {
  c10::NoGradGuard g;
  GenerateOptions o;
  o.max_new_tokens = 24;
  o.keep_logits = true;
  o.decode = d;
  at::Tensor ids = at::arange(1, 40, 3, at::kLong).view({1, -1}).to(at::kCUDA);  // 13 prompt tokens
  return generate(lm, lm->embed(ids), at::ones({1, ids.size(1)}, at::kBool), o);
}

void expect_same_decode(const GenerateResult& ref, const GenerateResult& got, const std::string& what) {
  ASSERT_EQ(ref.tokens[0].size(), got.tokens[0].size()) << what;
  for (size_t s = 0; s < ref.tokens[0].size(); ++s) {
    at::Tensor top2 = std::get<0>(ref.step_logits[s][0].topk(2));
    const double margin = (top2[0] - top2[1]).item<double>();
    if (margin > 2 * kTol) {
      EXPECT_EQ(ref.tokens[0][s], got.tokens[0][s]) << what << " step " << s;
    }
    if (ref.tokens[0][s] != got.tokens[0][s]) return;  // a legitimate tie flip: later steps see other inputs
    const double d = (ref.step_logits[s] - got.step_logits[s]).abs().max().item<double>();
    EXPECT_LE(d, kTol) << what << " step " << s;
  }
}

}  // namespace

TEST(Generate, CudaGraphDecodeMatchesEagerSteps_CUDA) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  using D = GenerateOptions::Decode;
  for (bool packed : {false, true}) {
    const std::string what = packed ? "W4g32 packed" : "fp16";
    LlamaForCausalLM lm = random_llama_cuda(packed);
    GenerateResult eager = run(lm, D::Eager), stat = run(lm, D::Static), graph = run(lm, D::Graph),
                   aut = run(lm, D::Auto);
    EXPECT_FALSE(eager.cuda_graph);
    EXPECT_FALSE(stat.cuda_graph);
    EXPECT_TRUE(graph.cuda_graph);
    EXPECT_TRUE(aut.cuda_graph) << "Auto picks the graph on CUDA for 24 new tokens";
    expect_same_decode(eager, stat, what + " static vs eager");
    expect_same_decode(stat, graph, what + " graph vs static");
    expect_same_decode(eager, aut, what + " auto vs eager");
  }
}
