#include "quant/qat/gptq.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>

#include "data/error.h"

namespace eqat {

HessianAccumulator::HessianAccumulator(int64_t K) : H_(at::zeros({K, K}, at::kDouble)) {}

void HessianAccumulator::add(const at::Tensor& x, const at::Tensor& valid) {
  c10::NoGradGuard g;
  at::Tensor rows = x.reshape({-1, x.size(-1)}).to(at::kCPU, at::kDouble);
  if (valid.defined()) rows = rows.index({valid.reshape({-1}).to(at::kCPU)});
  const int64_t m = rows.size(0);
  if (m == 0) return;
  // Running mean of 2·xxᵀ, as GPTQ's add_batch does.
  H_.mul_(static_cast<double>(n_) / static_cast<double>(n_ + m));
  n_ += m;
  rows = rows * std::sqrt(2.0 / static_cast<double>(n_));
  H_.addmm_(rows.t(), rows);
}

namespace {
// GPTQ's quantizer.find_params (asymmetric): the range always includes 0.
std::pair<at::Tensor, at::Tensor> gptq_params(const at::Tensor& Wg /*[N, g]*/, int64_t qmax) {
  at::Tensor xmin = std::get<0>(Wg.min(1)).clamp_max(0), xmax = std::get<0>(Wg.max(1)).clamp_min(0);
  at::Tensor both0 = (xmin == 0).logical_and(xmax == 0);
  xmin = xmin.masked_fill(both0, -1);
  xmax = xmax.masked_fill(both0, 1);
  at::Tensor s = (xmax - xmin) / static_cast<double>(qmax);
  at::Tensor z = (-xmin / s).round();
  return {s, z};
}
}  // namespace

QuantizedWeight gptq_quantize(const at::Tensor& W_in, const at::Tensor& H_in, const QuantSpec& spec, double damp,
                              int64_t block_size, at::Tensor* unrounded) {
  c10::NoGradGuard g;
  at::Tensor W = W_in.detach().to(at::kCPU, at::kDouble).clone();
  at::Tensor H = H_in.to(at::kDouble).clone();
  const int64_t N = W.size(0), K = W.size(1), gs = spec.group_for(K), G = spec.groups_for(K),
                qmax = spec.qmax();
  at::Tensor dead = H.diagonal() == 0;
  H.diagonal().masked_fill_(dead, 1);
  W.index_put_({at::indexing::Slice(), dead}, 0);
  H.diagonal().add_(damp * H.diagonal().mean().item<double>());
  // Each [K, K] float64 intermediate is dropped as soon as the next exists (a 7B down_proj: 970 MB each), so at most
  // two are alive at a time instead of four.
  at::Tensor Hinv = at::linalg_cholesky(H);
  H = at::Tensor();
  Hinv = at::cholesky_inverse(Hinv);
  Hinv = at::linalg_cholesky(Hinv, /*upper=*/true);

  at::Tensor Q = at::zeros({N, K}, at::kInt);
  at::Tensor S = at::zeros({N, G}, at::kDouble), Z = at::zeros({N, G}, at::kDouble);
  at::Tensor s_cur, z_cur;
  if (unrounded) *unrounded = at::zeros({N, K}, at::kDouble);
  for (int64_t i1 = 0; i1 < K; i1 += block_size) {
    const int64_t i2 = std::min(i1 + block_size, K), count = i2 - i1;
    at::Tensor W1 = W.narrow(1, i1, count).clone();
    at::Tensor Err1 = at::zeros_like(W1);
    at::Tensor Hinv1 = Hinv.narrow(0, i1, count).narrow(1, i1, count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t col = i1 + i;
      if (col % gs == 0) {
        // Group parameters from W as updated by the previous lazy blocks (AutoGPTQ reads the outer W here, which
        // does not yet hold this block's own updates).
        std::tie(s_cur, z_cur) = gptq_params(W.narrow(1, col, std::min(gs, K - col)), qmax);  // ragged last group
        z_cur = z_cur.clamp(spec.zero_min, static_cast<double>(qmax));  // GPTQ v1 cannot store a zero point of 0
        S.select(1, col / gs).copy_(s_cur);
        Z.select(1, col / gs).copy_(z_cur);
      }
      at::Tensor w = W1.select(1, i);
      at::Tensor q = (w / s_cur).round().add(z_cur).clamp(0, static_cast<double>(qmax));
      at::Tensor wq = (q - z_cur) * s_cur;
      Q.select(1, col).copy_(q.to(at::kInt));
      if (unrounded) unrounded->select(1, col).copy_(w);
      const double d = Hinv1[i][i].item<double>();
      at::Tensor err = (w - wq) / d;
      W1.narrow(1, i, count - i).sub_(err.unsqueeze(1) * Hinv1[i].narrow(0, i, count - i).unsqueeze(0));
      Err1.select(1, i).copy_(err);
    }
    if (i2 < K) W.narrow(1, i2, K - i2).sub_(Err1.mm(Hinv.narrow(0, i1, count).narrow(1, i2, K - i2)));
  }
  QuantizedWeight out;
  out.q = Q;
  out.zero = Z.clamp(spec.zero_min, static_cast<double>(qmax)).to(at::kInt);
  out.scale = S.clamp(kScaleMin, kScaleMax).to(at::kFloat);
  return out;
}

at::Tensor gptq_unrounded_start(const QuantizedWeight& qw, const at::Tensor& unrounded, const QuantSpec& spec) {
  c10::NoGradGuard g;
  const int64_t K = unrounded.size(1);
  at::Tensor gi = at::arange(K, at::kLong).div(spec.group_for(K), "floor");
  at::Tensor S = qw.scale.to(at::kDouble).index_select(1, gi), Z = qw.zero.to(at::kDouble).index_select(1, gi);
  at::Tensor q = qw.q.to(at::kDouble);
  at::Tensor base = (q - Z) * S;
  at::Tensor r = unrounded.to(at::kDouble) - base;
  at::Tensor lim = 0.45 * S;
  at::Tensor cut = at::max(at::min(r, lim), -lim);
  cut = at::where(q.eq(0).logical_and(r < 0), r, cut);
  cut = at::where(q.eq(static_cast<double>(spec.qmax())).logical_and(r > 0), r, cut);
  return (base + cut).to(at::kFloat);
}

}  // namespace eqat
