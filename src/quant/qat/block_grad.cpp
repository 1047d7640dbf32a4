// Block-AP's CPU step by hand (block_grad.h). Forward, per packed position n (HF order, llm/llama.cpp):
//   x̂1 = x·r1, r1 = 1/√(mean x² + ε);  h1 = w_in ⊙ x̂1;  [q k v] = h1·Ŵqkvᵀ;  q, k rotated (rotate-half RoPE);
//   per head: P = softmax(q·kᵀ/√D, causal);  o = P·v;  x2 = x + o·Ŵoᵀ;  h2 = w_post ⊙ x̂2;  [g u] = h2·Ŵguᵀ;
//   m = g·σ(g)·u;  out = x2 + m·Ŵdᵀ;  loss = Σ valid·(out − y)² / denom.
// Backward, the chain rule in reverse. Two shortcuts: dL/dx is never formed (the block's input does not train), so
// the last GEMM (dL/dh1 = dqkv·Ŵqkv) is replaced by M = dqkvᵀ·x̂1, from which dL/dŴqkv = M ⊙ w_in (per column) and
// dL/dw_in = Σ_o Ŵqkv ⊙ M; and P is kept from the forward (the blocks this path serves have short samples).
#include "quant/qat/block_grad.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "data/error.h"
#include "quant/cpu_bf16_gemm.h"
#include "quant/qat/optim.h"

namespace eqat {

bool block_grad_cpu_applies(const LlamaConfig& cfg) {
  return !cfg.attention_bias && !cfg.mlp_bias && cfg.hidden_act == "silu" && cfg.num_key_value_heads > 0 &&
         cfg.num_attention_heads % cfg.num_key_value_heads == 0 && cfg.head_dim % 2 == 0;
}

namespace {

// The hand-written steps build no graph: their ops dispatch below autograd, skipping the autograd and view-tracking
// kernels that every view op of the attention loops (narrow, cat, mm of a head) would otherwise pass through.
struct BelowAutograd {
  c10::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below;
};

int64_t threads_for(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)); }

// fn(p, r0, r1) for each thread p's share [r0, r1) of rows [0, n).
template <class Fn>
void over_rows(int64_t n, int64_t parts, const Fn& fn) {
  parallel_items(parts, [&](int64_t p) { fn(p, n * p / parts, n * (p + 1) / parts); });
}

// out = a · b (fp32 out; a and b both fp32, or both bf16: cpu_bf16_gemm.h). The products run on the threads, one
// each; with fewer products than threads, each is split by its output columns (b's columns), so a thread packs only
// its part of the weight operand.
struct Mm {
  at::Tensor out, a, b;
};
void run_mms(const std::vector<Mm>& mms) {
  const int64_t n = static_cast<int64_t>(mms.size());
  const int64_t split = std::max<int64_t>(1, at::get_num_threads() / n);
  parallel_items(n * split, [&](int64_t i) {
    const Mm& m = mms[static_cast<size_t>(i / split)];
    const int64_t k = i % split, cols = m.out.size(1), c0 = cols * k / split, c1 = cols * (k + 1) / split;
    if (c1 == c0) return;
    at::Tensor out = m.out.narrow(1, c0, c1 - c0);
    if (m.a.scalar_type() == at::kBFloat16) mm_bf16_f32(out, m.a, m.b.narrow(1, c0, c1 - c0));
    else at::mm_out(out, m.a, m.b.narrow(1, c0, c1 - c0));
  });
}

// A GEMM operand: the tensor itself, or its bf16 copy when the block's GEMMs take bf16 (BlockGradWeights::bf16_gemms).
at::Tensor gemm_in(const at::Tensor& t, bool bf16) { return bf16 ? t.to(at::kBFloat16) : t; }

// Rotate-half RoPE on a [T, D] head whose rows are `stride` floats apart, in place; backward = the transpose.
void rope(float* p, int64_t T, int64_t stride, int64_t D, const float* cos, const float* sin, bool backward) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t, p += stride) {
    const float *c = cos + t * D, *s = sin + t * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      if (!backward) {
        p[i] = a * c[i] - b * s[i];
        p[i + half] = b * c[i + half] + a * s[i + half];
      } else {
        p[i] = a * c[i] + b * s[i + half];
        p[i + half] = b * c[i + half] - a * s[i];
      }
    }
  }
}

// The keys query i attends: [first_key(i), i] (causal, within a sliding window of W keys when W > 0).
int64_t first_key(int64_t i, int64_t W) { return W > 0 ? std::max<int64_t>(0, i - W + 1) : 0; }

}  // namespace

PackedRows pack_rows(const std::vector<int64_t>& lengths, int64_t prefix) {
  PackedRows pk;
  auto add = [&pk](int64_t len) {
    pk.off.push_back(pk.rows);
    pk.len.push_back(len);
    pk.rows += len;
  };
  if (prefix > 0) add(prefix);
  pk.prefix = prefix;
  for (int64_t len : lengths) {
    EQAT_ASSERT(prefix == 0 || len == 0 || len >= prefix, "pack_rows: a sample of ", len, " positions under a prefix of ",
                prefix);
    add(len > 0 ? len - prefix : 0);
  }
  return pk;
}

int64_t shared_prefix(const std::vector<at::Tensor>& rows_of, const std::vector<int64_t>& lengths, int64_t cap) {
  std::vector<int64_t> used;
  for (size_t b = 0; b < lengths.size(); ++b)
    if (lengths[b] > 0) {
      used.push_back(static_cast<int64_t>(b));
      cap = std::min(cap, lengths[b]);
    }
  if (used.size() < 2) return 0;
  int64_t S = std::max<int64_t>(0, cap);
  for (const at::Tensor& t : rows_of) {
    EQAT_ASSERT(t.is_cpu() && t.is_contiguous() && t.dim() >= 2 && t.size(0) == static_cast<int64_t>(lengths.size()),
                "shared_prefix: [B, L, ...] contiguous CPU tensors, one sample per length");
    const int64_t row = t.nbytes() / static_cast<size_t>(t.size(0) * t.size(1));  // bytes per position
    const auto* base = static_cast<const char*>(t.const_data_ptr());
    auto at_row = [&](int64_t b, int64_t pos) { return base + (b * t.size(1) + pos) * row; };
    S = std::min(S, t.size(1));
    for (size_t i = 1; i < used.size(); ++i) {
      int64_t same = 0;
      while (same < S && std::memcmp(at_row(used[0], same), at_row(used[i], same), static_cast<size_t>(row)) == 0)
        ++same;
      S = same;
    }
  }
  return S;
}

namespace {

struct Dims {
  int64_t C, H, Hkv, D, F, Cq, Ck, Cqkv, group, window;
  float eps, scale;
  explicit Dims(const LlamaConfig& cfg)
      : C(cfg.hidden_size), H(cfg.num_attention_heads), Hkv(cfg.num_key_value_heads), D(cfg.head_dim),
        F(cfg.intermediate_size), Cq(H * D), Ck(Hkv * D), Cqkv(Cq + 2 * Ck), group(H / Hkv),
        window(cfg.sliding_window), eps(static_cast<float>(cfg.rms_norm_eps)),
        scale(1.0f / std::sqrt(static_cast<float>(D))) {}
};

// One head's [len, D] columns of a packed [rows, ·] matrix.
at::Tensor head_of(const at::Tensor& t, const PackedRows& pk, int64_t b, int64_t col, int64_t D) {
  return t.narrow(0, pk.off[static_cast<size_t>(b)], pk.len[static_cast<size_t>(b)]).narrow(1, col, D);
}

// The rows whose output a block computes (PackedRows::out), by sample: sample b's are rows [off[b], off[b] + len[b])
// of the output; pos: each output row's position in its sample; rows: each one's packed row (a subset only).
struct Queries {
  bool all = true;
  int64_t n = 0;
  std::vector<int64_t> off, len, pos;
  at::Tensor rows;
};
Queries queries_of(const PackedRows& pk) {
  Queries q;
  const size_t B = pk.len.size();
  q.all = pk.out.empty();
  if (q.all) {
    q.n = pk.rows, q.off = pk.off, q.len = pk.len;
    for (size_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < pk.len[b]; ++t) q.pos.push_back(t);
    return q;
  }
  q.n = static_cast<int64_t>(pk.out.size());
  q.len.assign(B, 0);
  size_t b = 0;
  for (size_t i = 0; i < pk.out.size(); ++i) {
    const int64_t r = pk.out[i];
    EQAT_ASSERT(r >= 0 && r < pk.rows && (i == 0 || r > pk.out[i - 1]), "PackedRows::out: row ", r,
                " is not an increasing row of the ", pk.rows);
    while (r >= pk.off[b] + pk.len[b]) ++b;
    ++q.len[b];
    q.pos.push_back(r - pk.off[b]);
  }
  for (size_t c = 0, first = 0; c < B; first += static_cast<size_t>(q.len[c++]))
    q.off.push_back(static_cast<int64_t>(first));
  q.rows = at::tensor(pk.out, at::kLong);
  return q;
}

// Query head h's rows (rotated q) of sample b that attend: a view of all of them, or a copy of the subset's.
at::Tensor queries_of_head(const at::Tensor& qkv, const PackedRows& pk, const Queries& q, int64_t b, int64_t col,
                           int64_t D) {
  const size_t i = static_cast<size_t>(b);
  if (q.all) return head_of(qkv, pk, b, col, D);
  return qkv.narrow(1, col, D).index_select(0, q.rows.narrow(0, q.off[i], q.len[i]));
}

// Segment b's keys or values for one key head (columns [col, col + D)): its own rows, after the shared prefix's
// (PackedRows::prefix) for a segment that continues it, [start + len, D].
at::Tensor keys_of(const at::Tensor& t, const PackedRows& pk, int64_t b, int64_t col, int64_t D) {
  const at::Tensor own = head_of(t, pk, b, col, D);
  return pk.start(static_cast<size_t>(b)) > 0 ? at::cat({head_of(t, pk, 0, col, D), own}) : own;
}

// Σ over the threads' partial sums, as a [C] fp32 tensor.
at::Tensor reduce_parts(const std::vector<std::vector<double>>& parts, int64_t C) {
  at::Tensor t = at::empty({C}, at::kFloat);
  float* p = t.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    double s = 0;
    for (const auto& v : parts) s += v[static_cast<size_t>(c)];
    p[c] = static_cast<float>(s);
  }
  return t;
}

}  // namespace

int64_t block_tape_bytes(const LlamaConfig& cfg, const std::vector<int64_t>& lengths) {
  const Dims d(cfg);
  // Per row: xh1, h1, x2, h2 [C]; qkv; attn; gu [2F], sig, mid [F]; r1, r2. Per sample and query head: P [T, T].
  const int64_t per_row = 4 * d.C + d.Cqkv + d.Cq + 4 * d.F + 2;
  int64_t floats = 0;
  for (int64_t T : lengths) floats += T * per_row + d.H * T * T;
  return floats * static_cast<int64_t>(sizeof(float));
}

at::Tensor block_forward_cpu(const LlamaConfig& cfg, const BlockGradWeights& w, const PackedRows& pk,
                             const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, BlockTape* tape) {
  BelowAutograd below;
  const Dims d(cfg);
  const int64_t C = d.C, D = d.D, F = d.F, Cq = d.Cq, Ck = d.Ck, Cqkv = d.Cqkv, N = pk.rows;
  const int64_t B = static_cast<int64_t>(pk.len.size());
  EQAT_ASSERT(block_grad_cpu_applies(cfg) && x.dim() == 2 && x.size(0) == N && x.size(1) == C &&
                  x.scalar_type() == at::kFloat && x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.size(1) == D &&
                  sin.sizes() == cos.sizes() && w.norm_in.scalar_type() == at::kFloat &&
                  w.norm_post.scalar_type() == at::kFloat && w.norm_in.is_contiguous() && w.norm_post.is_contiguous(),
              "block_forward_cpu: x ", x.sizes(), " rows ", N, " cos ", cos.sizes());
  for (size_t b = 0; b < pk.len.size(); ++b)
    EQAT_ASSERT(pk.start(b) + pk.len[b] <= cos.size(0), "block_forward_cpu: a sample longer than cos/sin");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  BlockTape local;
  BlockTape& t = tape ? *tape : local;
  const Queries qs = queries_of(pk);
  const int64_t NQ = qs.n, P = threads_for(N), PQ = threads_for(NQ);
  const float *win = w.norm_in.const_data_ptr<float>(), *wpost = w.norm_post.const_data_ptr<float>();
  const float *cs = cos.const_data_ptr<float>(), *sn = sin.const_data_ptr<float>();

  t.xh1 = at::empty({N, C}, f32), t.r1 = at::empty({N}, f32), t.h1 = at::empty({N, C}, f32);
  over_rows(N, P, [&](int64_t, int64_t r0, int64_t r1) {
    const float* xp = x.const_data_ptr<float>();
    float *xh = t.xh1.data_ptr<float>(), *hp = t.h1.data_ptr<float>(), *rp = t.r1.data_ptr<float>();
    for (int64_t n = r0; n < r1; ++n) {
      const float* xs = xp + n * C;
      float ss = 0;
      for (int64_t c = 0; c < C; ++c) ss += xs[c] * xs[c];
      const float r = rp[n] = 1.0f / std::sqrt(ss / static_cast<float>(C) + d.eps);
      for (int64_t c = 0; c < C; ++c) {
        xh[n * C + c] = xs[c] * r;
        hp[n * C + c] = win[c] * xh[n * C + c];
      }
    }
  });
  const bool bf = w.bf16_gemms;
  t.qkv_g = gemm_in(w.qkv, bf), t.o_g = gemm_in(w.o, bf), t.gate_up_g = gemm_in(w.gate_up, bf);
  t.down_g = gemm_in(w.down, bf), t.h1_g = gemm_in(t.h1, bf), t.xh1_g = gemm_in(t.xh1, bf);
  t.qkv = at::empty({N, Cqkv}, f32);
  run_mms({{t.qkv, t.h1_g, t.qkv_g.t()}});

  // Attention by (key head, segment), key heads outermost so that each thread's share holds every segment; the
  // queries are the output rows. A shared prefix's queries and keys are rotated first: every segment reads its keys.
  // A few rows: on this thread, no barrier.
  for (int64_t h = 0; pk.prefix > 0 && h < d.H + d.Hkv; ++h)  // q heads, then k heads: columns h·D
    rope(t.qkv.data_ptr<float>() + h * D, pk.len[0], Cqkv, D, cs, sn, false);
  t.probs.assign(static_cast<size_t>(B * d.H), at::Tensor());
  t.attn = at::empty({NQ, Cq}, f32);
  parallel_items(d.Hkv * B, [&](int64_t item) {
    const int64_t kh = item / B, b = item % B, T = pk.len[static_cast<size_t>(b)];
    const int64_t nq = qs.len[static_cast<size_t>(b)], q0 = qs.off[static_cast<size_t>(b)];
    if (nq == 0) return;
    const int64_t S = pk.start(static_cast<size_t>(b)), TK = S + T;  // the keys: the prefix's S, then its own T
    const bool is_prefix = pk.prefix > 0 && b == 0;                   // rotated above
    float* rows = t.qkv.data_ptr<float>() + pk.off[static_cast<size_t>(b)] * Cqkv;
    if (!is_prefix) rope(rows + Cq + kh * D, T, Cqkv, D, cs + S * D, sn + S * D, false);
    const at::Tensor k = keys_of(t.qkv, pk, b, Cq + kh * D, D), v = keys_of(t.qkv, pk, b, Cq + Ck + kh * D, D);
    for (int64_t h = kh * d.group; h < (kh + 1) * d.group; ++h) {
      if (!is_prefix) rope(rows + h * D, T, Cqkv, D, cs + S * D, sn + S * D, false);
      at::Tensor s = at::mm(queries_of_head(t.qkv, pk, qs, b, h * D, D), k.t());  // [nq, TK]
      float* sp = s.data_ptr<float>();
      for (int64_t r = 0; r < nq; ++r) {
        float* row = sp + r * TK;
        const int64_t i = S + qs.pos[static_cast<size_t>(q0 + r)], j0 = first_key(i, d.window);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = j0; j <= i; ++j) mx = std::max(mx, row[j] * d.scale);
        float sum = 0;
        for (int64_t j = j0; j <= i; ++j) sum += (row[j] = std::exp(row[j] * d.scale - mx));
        for (int64_t j = 0; j < TK; ++j) row[j] = (j >= j0 && j <= i) ? row[j] / sum : 0.0f;
      }
      at::Tensor o = t.attn.narrow(0, q0, nq).narrow(1, h * D, D);
      at::mm_out(o, s, v);
      t.probs[static_cast<size_t>(b * d.H + h)] = s;
    }
  });
  t.x2 = at::empty({NQ, C}, f32), t.h2 = at::empty({NQ, C}, f32), t.r2 = at::empty({NQ}, f32);
  t.attn_g = gemm_in(t.attn, bf);
  run_mms({{t.x2, t.attn_g, t.o_g.t()}});
  over_rows(NQ, PQ, [&](int64_t, int64_t r0, int64_t r1) {
    const float* xp = x.const_data_ptr<float>();
    const int64_t* xrow = qs.all ? nullptr : qs.rows.const_data_ptr<int64_t>();  // the residual's row
    float *x2p = t.x2.data_ptr<float>(), *hp = t.h2.data_ptr<float>(), *rp = t.r2.data_ptr<float>();
    for (int64_t n = r0; n < r1; ++n) {
      float* xs = x2p + n * C;
      const float* xin = xp + (xrow ? xrow[n] : n) * C;
      float ss = 0;
      for (int64_t c = 0; c < C; ++c) {
        xs[c] += xin[c];
        ss += xs[c] * xs[c];
      }
      const float r = rp[n] = 1.0f / std::sqrt(ss / static_cast<float>(C) + d.eps);
      for (int64_t c = 0; c < C; ++c) hp[n * C + c] = wpost[c] * (xs[c] * r);
    }
  });
  t.gu = at::empty({NQ, 2 * F}, f32), t.sig = at::empty({NQ, F}, f32), t.mid = at::empty({NQ, F}, f32);
  t.h2_g = gemm_in(t.h2, bf);
  run_mms({{t.gu, t.h2_g, t.gate_up_g.t()}});
  over_rows(NQ, PQ, [&](int64_t, int64_t r0, int64_t r1) {
    at::Tensor sg = t.sig.narrow(0, r0, r1 - r0);
    at::sigmoid_out(sg, t.gu.narrow(0, r0, r1 - r0).narrow(1, 0, F));
    const float *gp = t.gu.const_data_ptr<float>(), *sp = t.sig.const_data_ptr<float>();
    float* mp = t.mid.data_ptr<float>();
    for (int64_t n = r0; n < r1; ++n)
      for (int64_t f = 0; f < F; ++f) mp[n * F + f] = gp[n * 2 * F + f] * sp[n * F + f] * gp[n * 2 * F + F + f];
  });
  at::Tensor out = at::empty({NQ, C}, f32);
  t.mid_g = gemm_in(t.mid, bf);
  run_mms({{out, t.mid_g, t.down_g.t()}});
  over_rows(NQ, PQ, [&](int64_t, int64_t r0, int64_t r1) {
    const float* x2p = t.x2.const_data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t n = r0 * C; n < r1 * C; ++n) op[n] += x2p[n];
  });
  return out;
}

namespace {

// The backward shared by Block-AP (block_ap: dL/dŴ as [N, K], the norms' gradients, no dL/dx) and E2E-QP
// (dL/dŴᵀ as [K, N], dL/dx when asked).
void backward_impl(const LlamaConfig& cfg, const BlockGradWeights& w, const PackedRows& pk, const BlockTape& t,
                   const at::Tensor& dout, const at::Tensor& cos, const at::Tensor& sin, bool block_ap, bool want_dx,
                   BlockGrads* ga, BlockGradsT* ge) {
  BelowAutograd below;
  const Dims d(cfg);
  const int64_t C = d.C, D = d.D, F = d.F, Cq = d.Cq, Ck = d.Ck, Cqkv = d.Cqkv, N = pk.rows;
  const int64_t B = static_cast<int64_t>(pk.len.size());
  const Queries qs = queries_of(pk);
  const int64_t NQ = qs.n;
  EQAT_ASSERT(dout.sizes() == at::IntArrayRef({NQ, C}) && dout.scalar_type() == at::kFloat && dout.is_contiguous() &&
                  (qs.all || !block_ap),
              "block_backward_cpu: dout ", dout.sizes(), " for ", NQ, " output rows");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t P = threads_for(N), PQ = threads_for(NQ);
  const float *win = w.norm_in.const_data_ptr<float>(), *wpost = w.norm_post.const_data_ptr<float>();
  const float *cs = cos.const_data_ptr<float>(), *sn = sin.const_data_ptr<float>();
  // A weight's gradient: dL/dŴ = dYᵀ·X [N, K] for Block-AP, dL/dŴᵀ = Xᵀ·dY [K, N] for E2E-QP.
  auto weight_grad = [&](at::Tensor* out, const at::Tensor& dy, const at::Tensor& xin) {
    *out = block_ap ? at::empty({dy.size(1), xin.size(1)}, f32) : at::empty({xin.size(1), dy.size(1)}, f32);
    return block_ap ? Mm{*out, dy.t(), xin} : Mm{*out, xin.t(), dy};
  };

  const bool bf = w.bf16_gemms;  // dL/dY of each GEMM goes in as bf16 too
  at::Tensor dmid = at::empty({NQ, F}, f32);
  {
    const at::Tensor dy = gemm_in(dout, bf);
    run_mms({weight_grad(block_ap ? &ga->down : &ge->down, dy, t.mid_g), {dmid, dy, t.down_g}});
  }
  at::Tensor dgu = at::empty({NQ, 2 * F}, f32);
  over_rows(NQ, PQ, [&](int64_t, int64_t r0, int64_t r1) {
    const float *gp = t.gu.const_data_ptr<float>(), *sp = t.sig.const_data_ptr<float>(),
                *dm = dmid.const_data_ptr<float>();
    float* dp = dgu.data_ptr<float>();
    for (int64_t n = r0; n < r1; ++n)
      for (int64_t f = 0; f < F; ++f) {
        const float gv = gp[n * 2 * F + f], uv = gp[n * 2 * F + F + f], s = sp[n * F + f], dv = dm[n * F + f];
        dp[n * 2 * F + f] = dv * uv * s * (1.0f + gv * (1.0f - s));  // d silu(g)/dg = σ(1 + g(1 − σ))
        dp[n * 2 * F + F + f] = dv * gv * s;
      }
  });
  at::Tensor dx2 = at::empty({NQ, C}, f32);  // dL/dh2, then dL/dx2
  {
    const at::Tensor dy = gemm_in(dgu, bf);
    run_mms({weight_grad(block_ap ? &ga->gate_up : &ge->gate_up, dy, t.h2_g), {dx2, dy, t.gate_up_g}});
  }
  std::vector<std::vector<double>> part_norm(static_cast<size_t>(PQ),
                                             std::vector<double>(block_ap ? static_cast<size_t>(C) : 0, 0.0));
  over_rows(NQ, PQ, [&](int64_t p, int64_t r0, int64_t r1) {
    const float *x2p = t.x2.const_data_ptr<float>(), *rp = t.r2.const_data_ptr<float>(),
                *dop = dout.const_data_ptr<float>();
    float* dp = dx2.data_ptr<float>();
    std::vector<double>& dw = part_norm[static_cast<size_t>(p)];
    for (int64_t n = r0; n < r1; ++n) {
      const float r = rp[n];
      float* dr = dp + n * C;
      float dot = 0;  // Σ_c dL/dx̂2 · x̂2
      for (int64_t c = 0; c < C; ++c) {
        const float xh = x2p[n * C + c] * r;
        if (block_ap) dw[c] += static_cast<double>(dr[c]) * xh;
        dot += dr[c] * wpost[c] * xh;
      }
      dot /= static_cast<float>(C);
      for (int64_t c = 0; c < C; ++c) dr[c] = dop[n * C + c] + r * (dr[c] * wpost[c] - x2p[n * C + c] * r * dot);
    }
  });
  if (block_ap) ga->norm_post = reduce_parts(part_norm, C);
  at::Tensor dattn = at::empty({NQ, Cq}, f32);
  {
    const at::Tensor dy = gemm_in(dx2, bf);
    run_mms({weight_grad(block_ap ? &ga->o : &ge->o, dy, t.attn_g), {dattn, dy, t.o_g}});
  }
  // With a subset of queries, the other rows' dL/dq (and a sample without queries' dL/dk, dL/dv) are 0.
  at::Tensor dqkv = qs.all ? at::empty({N, Cqkv}, f32) : at::zeros({N, Cqkv}, f32);
  // A segment that continues the shared prefix leaves its share of the prefix's dL/dk and dL/dv here ([S, D] each,
  // per item); they are added to the prefix's own after all items, in segment order.
  std::vector<at::Tensor> prefix_dk(static_cast<size_t>(d.Hkv * B)), prefix_dv(prefix_dk.size());
  parallel_items(d.Hkv * B, [&](int64_t item) {
    const int64_t kh = item / B, b = item % B, T = pk.len[static_cast<size_t>(b)], off = pk.off[static_cast<size_t>(b)];
    const int64_t nq = qs.len[static_cast<size_t>(b)], q0 = qs.off[static_cast<size_t>(b)];
    if (nq == 0) return;
    const int64_t S = pk.start(static_cast<size_t>(b)), TK = S + T;
    const at::Tensor k = keys_of(t.qkv, pk, b, Cq + kh * D, D), v = keys_of(t.qkv, pk, b, Cq + Ck + kh * D, D);
    at::Tensor dk = head_of(dqkv, pk, b, Cq + kh * D, D), dv = head_of(dqkv, pk, b, Cq + Ck + kh * D, D);
    at::Tensor dkf = S > 0 ? at::empty({TK, D}, f32) : dk, dvf = S > 0 ? at::empty({TK, D}, f32) : dv;  // all keys'
    for (int64_t h = kh * d.group; h < (kh + 1) * d.group; ++h) {
      const at::Tensor& pr = t.probs[static_cast<size_t>(b * d.H + h)];
      const at::Tensor dO = dattn.narrow(0, q0, nq).narrow(1, h * D, D);
      const at::Tensor q = queries_of_head(t.qkv, pk, qs, b, h * D, D);
      if (h == kh * d.group) at::mm_out(dvf, pr.t(), dO);
      else dvf.addmm_(pr.t(), dO);
      at::Tensor ds = at::mm(dO, v.t());  // dL/dP, then dL/d(q·kᵀ)
      float* dp = ds.data_ptr<float>();
      const float* pp = pr.const_data_ptr<float>();
      for (int64_t i = 0; i < nq; ++i) {
        float delta = 0;
        for (int64_t j = 0; j < TK; ++j) delta += dp[i * TK + j] * pp[i * TK + j];
        for (int64_t j = 0; j < TK; ++j) dp[i * TK + j] = pp[i * TK + j] * (dp[i * TK + j] - delta) * d.scale;
      }
      if (qs.all) {
        at::Tensor dq = head_of(dqkv, pk, b, h * D, D);
        at::mm_out(dq, ds, k);
      } else {
        dqkv.narrow(1, h * D, D).index_copy_(0, qs.rows.narrow(0, q0, nq), at::mm(ds, k));
      }
      if (h == kh * d.group) at::mm_out(dkf, ds.t(), q);
      else dkf.addmm_(ds.t(), q);
      rope(dqkv.data_ptr<float>() + off * Cqkv + h * D, T, Cqkv, D, cs + S * D, sn + S * D, true);
    }
    if (S > 0) {
      dk.copy_(dkf.narrow(0, S, T));
      dv.copy_(dvf.narrow(0, S, T));
      prefix_dk[static_cast<size_t>(item)] = dkf.narrow(0, 0, S);
      prefix_dv[static_cast<size_t>(item)] = dvf.narrow(0, 0, S);
    }
    if (!(pk.prefix > 0 && b == 0))  // the prefix's keys are rotated back once all their gradient is in
      rope(dqkv.data_ptr<float>() + off * Cqkv + Cq + kh * D, T, Cqkv, D, cs + S * D, sn + S * D, true);
  });
  // A few rows per segment: on this thread, no barrier.
  for (int64_t kh = 0; pk.prefix > 0 && kh < d.Hkv; ++kh) {
    float* dkp = dqkv.data_ptr<float>() + Cq + kh * D;  // the prefix's rows of this key head, then its values'
    for (int64_t b = 1; b < B; ++b) {
      const size_t item = static_cast<size_t>(kh * B + b);
      if (!prefix_dk[item].defined()) continue;
      const float *pk_k = prefix_dk[item].const_data_ptr<float>(), *pk_v = prefix_dv[item].const_data_ptr<float>();
      for (int64_t r = 0; r < pk.prefix; ++r)
        for (int64_t j = 0; j < D; ++j) {
          dkp[r * Cqkv + j] += pk_k[r * D + j];
          dkp[r * Cqkv + Ck + j] += pk_v[r * D + j];
        }
    }
    rope(dkp, pk.prefix, Cqkv, D, cs, sn, true);
  }
  if (block_ap) {
    // M = dqkvᵀ·x̂1; dL/dŴqkv = M·diag(w_in), dL/dw_in = Σ_o Ŵqkv ⊙ M.
    ga->qkv = at::empty({Cqkv, C}, f32);
    run_mms({{ga->qkv, gemm_in(dqkv, bf).t(), t.xh1_g}});
    const int64_t Po = threads_for(Cqkv);
    std::vector<std::vector<double>> part_in(static_cast<size_t>(Po), std::vector<double>(static_cast<size_t>(C), 0.0));
    over_rows(Cqkv, Po, [&](int64_t p, int64_t o0, int64_t o1) {
      const float* wp = w.qkv.const_data_ptr<float>();
      float* mp = ga->qkv.data_ptr<float>();
      std::vector<double>& dw = part_in[static_cast<size_t>(p)];
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t c = 0; c < C; ++c) {
          dw[c] += static_cast<double>(wp[o * C + c]) * mp[o * C + c];
          mp[o * C + c] *= win[c];
        }
    });
    ga->norm_in = reduce_parts(part_in, C);
    return;
  }
  const at::Tensor dqkv_in = gemm_in(dqkv, bf);
  if (!want_dx) {
    run_mms({weight_grad(&ge->qkv, dqkv_in, t.h1_g)});
    return;
  }
  ge->dx = at::empty({N, C}, f32);  // dL/dh1, then dL/dx
  run_mms({weight_grad(&ge->qkv, dqkv_in, t.h1_g), {ge->dx, dqkv_in, t.qkv_g}});
  // The residual's share: dL/dx2 at the output rows, 0 elsewhere.
  const at::Tensor dres = qs.all ? dx2 : at::zeros({N, C}, f32).index_copy_(0, qs.rows, dx2);
  over_rows(N, P, [&](int64_t, int64_t r0, int64_t r1) {
    const float *xh = t.xh1.const_data_ptr<float>(), *rp = t.r1.const_data_ptr<float>(),
                *d2 = dres.const_data_ptr<float>();
    float* dp = ge->dx.data_ptr<float>();
    for (int64_t n = r0; n < r1; ++n) {
      float* dr = dp + n * C;
      float dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += dr[c] * win[c] * xh[n * C + c];
      dot /= static_cast<float>(C);
      for (int64_t c = 0; c < C; ++c) dr[c] = d2[n * C + c] + rp[n] * (dr[c] * win[c] - xh[n * C + c] * dot);
    }
  });
}

}  // namespace

BlockGradsT block_backward_cpu(const LlamaConfig& cfg, const BlockGradWeights& w, const PackedRows& pk,
                               const BlockTape& tape, const at::Tensor& dout, const at::Tensor& cos,
                               const at::Tensor& sin, bool want_dx) {
  BlockGradsT g;
  backward_impl(cfg, w, pk, tape, dout, cos, sin, /*block_ap=*/false, want_dx, nullptr, &g);
  return g;
}

BlockGrads block_grad_cpu(const LlamaConfig& cfg, const BlockGradWeights& w, const at::Tensor& x, const at::Tensor& y,
                          const at::Tensor& valid, const at::Tensor& cos, const at::Tensor& sin, double denom) {
  BelowAutograd below;
  const int64_t B = x.size(0), L = x.size(1), C = cfg.hidden_size, D = cfg.head_dim;
  const Dims d(cfg);
  EQAT_ASSERT(block_grad_cpu_applies(cfg) && x.dim() == 3 && x.size(2) == C && y.sizes() == x.sizes() &&
                  valid.sizes() == x.sizes().slice(0, 2) && cos.sizes() == at::IntArrayRef({L, D}) &&
                  sin.sizes() == cos.sizes(),
              "block_grad_cpu: x ", x.sizes(), " y ", y.sizes(), " valid ", valid.sizes(), " cos ", cos.sizes());
  for (const auto* t : {&w.qkv, &w.o, &w.gate_up, &w.down, &w.norm_in, &w.norm_post, &cos, &sin})
    EQAT_ASSERT(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(), "block_grad_cpu: fp32 CPU");
  EQAT_ASSERT(w.qkv.sizes() == at::IntArrayRef({d.Cqkv, C}) && w.o.sizes() == at::IntArrayRef({C, d.Cq}) &&
                  w.gate_up.sizes() == at::IntArrayRef({2 * d.F, C}) && w.down.sizes() == at::IntArrayRef({C, d.F}) &&
                  w.norm_in.numel() == C && w.norm_post.numel() == C,
              "block_grad_cpu: weight shapes");

  // Pack each sample's positions up to its last valid one.
  const at::Tensor vb = valid.to(at::kCPU, at::kBool).contiguous();
  std::vector<int64_t> lengths(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const bool* v = vb.const_data_ptr<bool>() + b * L;
    int64_t last = -1;
    for (int64_t j = 0; j < L; ++j)
      if (v[j]) last = j;
    lengths[static_cast<size_t>(b)] = last + 1;
  }
  // The positions that every sample begins with, the same inputs and targets to the byte, run once
  // (PackedRows::prefix); their loss counts once per sample that has them valid.
  const at::Tensor xc = x.to(at::kCPU).contiguous(), yc = y.to(at::kCPU).contiguous();
  const int64_t S = shared_prefix({xc, yc}, lengths, L);
  const PackedRows pk = pack_rows(lengths, S);
  const int64_t N = pk.rows;
  BlockGrads g;
  if (N == 0) {
    g.qkv = at::zeros_like(w.qkv), g.o = at::zeros_like(w.o), g.gate_up = at::zeros_like(w.gate_up);
    g.down = at::zeros_like(w.down), g.norm_in = at::zeros_like(w.norm_in), g.norm_post = at::zeros_like(w.norm_post);
    return g;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor xr = at::empty({N, C}, f32), yr = at::empty({N, C}, f32), vm = at::empty({N}, f32);
  if (S > 0) {
    const int64_t b0 = std::find_if(lengths.begin(), lengths.end(), [](int64_t n) { return n > 0; }) - lengths.begin();
    xr.narrow(0, 0, S).copy_(xc[b0].narrow(0, 0, S));
    yr.narrow(0, 0, S).copy_(yc[b0].narrow(0, 0, S));
    vm.narrow(0, 0, S).copy_(vb.narrow(1, 0, S).to(at::kFloat).sum(0));
  }
  for (int64_t b = 0; b < B; ++b) {
    const size_t seg = static_cast<size_t>(S > 0 ? b + 1 : b);
    const int64_t len = pk.len[seg], off = pk.off[seg];
    if (len == 0) continue;
    xr.narrow(0, off, len).copy_(xc[b].narrow(0, S, len));
    yr.narrow(0, off, len).copy_(yc[b].narrow(0, S, len));
    vm.narrow(0, off, len).copy_(vb[b].narrow(0, S, len));
  }
  BlockTape tape;
  at::Tensor dout = block_forward_cpu(cfg, w, pk, xr, cos, sin, &tape);  // the output, then dL/dout
  const int64_t P = threads_for(N);
  std::vector<double> part_loss(static_cast<size_t>(P), 0.0);
  over_rows(N, P, [&](int64_t p, int64_t r0, int64_t r1) {
    const float *yp = yr.const_data_ptr<float>(), *vp = vm.const_data_ptr<float>();
    float* dp = dout.data_ptr<float>();
    double sse = 0;
    for (int64_t n = r0; n < r1; ++n) {
      const float k = 2.0f * vp[n] / static_cast<float>(denom);
      double row = 0;
      for (int64_t c = 0; c < C; ++c) {
        const float dv = dp[n * C + c] - yp[n * C + c];
        row += static_cast<double>(dv) * dv;
        dp[n * C + c] = k * dv;
      }
      sse += vp[n] * row;
    }
    part_loss[static_cast<size_t>(p)] = sse;
  });
  for (double l : part_loss) g.loss += l;
  g.loss /= denom;
  backward_impl(cfg, w, pk, tape, dout, cos, sin, /*block_ap=*/true, /*want_dx=*/false, &g, nullptr);
  return g;
}

}  // namespace eqat
