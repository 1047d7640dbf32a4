#include "quant/qat/gptq.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>

#include "data/error.h"

namespace eqat {

namespace {
// Staged rows: as many as fill 8 MiB, at most 512 (a rank-512 update keeps the GEMM efficient; larger inputs are
// added directly). Panels of at least 64 rows, at most 8 of them.
constexpr int64_t kStageBytes = int64_t{8} << 20, kStageRowsMax = 512, kPanelRowsMin = 64, kPanelsMax = 8;
}  // namespace

HessianAccumulator::HessianAccumulator(int64_t K) : K_(K), sum_(at::zeros({K, K}, at::kDouble)) {}

// sum_ += rowsᵀ·rows on and below the diagonal: panel p (rows [r0, r1) of sum_) gets columns [0, r1).
void HessianAccumulator::accumulate(const at::Tensor& rows) {
  const int64_t panels = std::clamp<int64_t>(K_ / kPanelRowsMin, 1, kPanelsMax);
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t r0 = K_ * p / panels, r1 = K_ * (p + 1) / panels;
    sum_.narrow(0, r0, r1 - r0).narrow(1, 0, r1).addmm_(rows.narrow(1, r0, r1 - r0).t(), rows.narrow(1, 0, r1));
  }
}

void HessianAccumulator::flush() {
  if (staged_ == 0) return;
  c10::NoGradGuard g;
  accumulate(stage_.narrow(0, 0, staged_));
  staged_ = 0;
}

void HessianAccumulator::add(const at::Tensor& x, const at::Tensor& valid) {
  c10::NoGradGuard g;
  at::Tensor rows = x.reshape({-1, x.size(-1)});
  if (valid.defined()) rows = rows.index({valid.reshape({-1}).to(rows.device())});
  const int64_t m = rows.size(0);
  if (m == 0) return;
  n_ += m;
  const int64_t capacity = std::clamp<int64_t>(kStageBytes / std::max<int64_t>(1, 8 * K_), 1, kStageRowsMax);
  if (m >= capacity) {  // large enough to be its own update
    accumulate(rows.to(at::kCPU, at::kDouble).contiguous());
    return;
  }
  if (staged_ + m > capacity) flush();
  if (!stage_.defined()) stage_ = at::empty({capacity, K_}, at::kDouble);
  stage_.narrow(0, staged_, m).copy_(rows);
  staged_ += m;
}

void HessianAccumulator::merge(HessianAccumulator& other) {
  if (other.n_ == 0) return;
  c10::NoGradGuard g;
  flush();
  other.flush();
  sum_.add_(other.sum_);
  n_ += other.n_;
}

namespace {
// S[i][j] = S[j][i] for j > i, in place (S [K, K] contiguous float64), in 64×64 tiles so that the reads down the
// columns stay in cache.
void mirror_lower_(const at::Tensor& S) {
  const int64_t K = S.size(0), T = 64, tiles = (K + T - 1) / T;
  double* p = S.data_ptr<double>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t bi = t0; bi < t1; ++bi)
      for (int64_t bj = bi; bj < tiles; ++bj)
        for (int64_t i = bi * T; i < std::min(K, (bi + 1) * T); ++i)
          for (int64_t j = std::max(i + 1, bj * T); j < std::min(K, (bj + 1) * T); ++j) p[i * K + j] = p[j * K + i];
  });
}
}  // namespace

at::Tensor HessianAccumulator::H() {
  flush();
  at::Tensor h = sum_.clone();
  mirror_lower_(h);
  return n_ > 0 ? h.mul_(2.0 / static_cast<double>(n_)) : h;
}

at::Tensor HessianAccumulator::take() {
  flush();
  at::Tensor h = std::move(sum_);  // in place: at 13B a Hessian is 1.5 GB
  mirror_lower_(h);
  if (n_ > 0) h.mul_(2.0 / static_cast<double>(n_));
  stage_ = at::Tensor();
  staged_ = n_ = 0;
  return h;
}

namespace {
// GPTQ's quantizer.find_params (asymmetric) for a group of columns given as rows, Wg [g, N]: the range always
// includes 0.
std::pair<at::Tensor, at::Tensor> gptq_params(const at::Tensor& Wg, int64_t qmax) {
  at::Tensor xmin = std::get<0>(Wg.min(0)).clamp_max(0), xmax = std::get<0>(Wg.max(0)).clamp_min(0);
  at::Tensor both0 = (xmin == 0).logical_and(xmax == 0);
  xmin = xmin.masked_fill(both0, -1);
  xmax = xmax.masked_fill(both0, 1);
  at::Tensor s = (xmax - xmin) / static_cast<double>(qmax);
  at::Tensor z = (-xmin / s).round();
  return {s, z};
}

// L ← L⁻¹ in place, L [n, n] lower triangular (a view of a contiguous matrix), by halves: for L = [A 0; C D],
// L⁻¹ = [A⁻¹ 0; −D⁻¹·C·A⁻¹ D⁻¹]. About n³/2 flops, nearly all in GEMMs, and one (n/2)² temporary at a time.
void invert_lower_(const at::Tensor& L) {
  const int64_t n = L.size(0);
  if (n <= 128) {
    L.copy_(at::linalg_solve_triangular(L, at::eye(n, L.options()), /*upper=*/false));
    return;
  }
  const int64_t h = n / 2;
  at::Tensor A = L.narrow(0, 0, h).narrow(1, 0, h), C = L.narrow(0, h, n - h).narrow(1, 0, h),
             D = L.narrow(0, h, n - h).narrow(1, h, n - h);
  invert_lower_(A);
  invert_lower_(D);
  at::Tensor CA = at::mm(C, A);
  at::mm_out(C, D, CA);
  C.neg_();
}

// P·M·P for the reversal P (M[i][j] ← M[K−1−i][K−1−j]), in place: on a contiguous matrix, the flat buffer reversed.
void reverse_both_(at::Tensor& M) {
  EQAT_ASSERT(M.is_contiguous() && M.scalar_type() == at::kDouble, "reverse_both_: contiguous float64 expected");
  double* p = M.data_ptr<double>();
  std::reverse(p, p + M.numel());
}
}  // namespace

at::Tensor gar_permutation(const at::Tensor& diag, int64_t g) {
  c10::NoGradGuard ng;
  const int64_t K = diag.numel(), full = K / g;
  EQAT_ASSERT(g >= 1 && g <= K, "gar_permutation: group ", g, " for K = ", K);
  at::Tensor d = diag.to(at::kCPU, at::kDouble).reshape({-1});
  at::Tensor blocks = d.narrow(0, 0, full * g).view({full, g});
  at::Tensor local = std::get<1>(blocks.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));  // [full, g]
  at::Tensor order = std::get<1>(std::get<0>(blocks.max(1)).sort(/*stable=*/true, 0, /*descending=*/true));  // [full]
  at::Tensor perm = (local.index_select(0, order) + order.unsqueeze(1) * g).reshape({-1});
  if (full * g < K) perm = at::cat({perm, at::arange(full * g, K, at::kLong)});  // the ragged tail, as it is
  return perm;
}

// U, the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), from one Cholesky: with P the reversal, P·H·P = L·Lᵀ gives
// H⁻¹ = (P·L⁻ᵀ·P)(P·L⁻¹·P), and P·L⁻¹·P is upper triangular with a positive diagonal, so it is U. The textbook route
// (Cholesky, the inverse from it, Cholesky again) costs 4/3·K³ flops and held the caller's H, a copy and two
// intermediates; this costs 5/6·K³ and holds two [K, K] float64 matrices at most (H is consumed). Measured on one
// core at K = 4096: 4.5 s against 2.5 s, the same U to 5e-13 relative. A 7B down_proj (K = 11008: 970 MB per
// matrix) spends most of its GPTQ time here.
GptqFactor gptq_factor(at::Tensor H, double damp, const std::string& order, int64_t group) {
  c10::NoGradGuard g;
  EQAT_ASSERT(H.dim() == 2 && H.size(0) == H.size(1), "gptq_factor: H must be square");
  EQAT_ASSERT(order == "natural" || order == "gar", "gptq_factor: unknown order '", order, "'");
  H = H.to(at::kCPU, at::kDouble).contiguous();
  GptqFactor f;
  if (order == "gar") {
    f.perm = gar_permutation(H.diagonal(), group);
    f.group = group;
    H = H.index_select(0, f.perm);  // one [K, K] copy at a time
    H = H.index_select(1, f.perm);
  }
  f.dead = H.diagonal() == 0;
  H.diagonal().masked_fill_(f.dead, 1);
  H.diagonal().add_(damp * H.diagonal().mean().item<double>());
  reverse_both_(H);
  // LAPACK hands back column-major storage; the upper factor's transpose is then the lower factor in row-major
  // storage, with no copy.
  at::Tensor L = at::linalg_cholesky(H, /*upper=*/true).mT();
  H = at::Tensor();
  if (!L.is_contiguous()) L = L.contiguous();
  invert_lower_(L);
  reverse_both_(L);
  f.U = std::move(L);
  return f;
}

// Wᵀ [K, N] is worked on, so that each input column of W is a contiguous row. Within a lazy block of 128 columns
// the error propagation runs in sub-blocks of 16: rank-1 updates inside a sub-block, one GEMM onto the rest of the
// block after it (the same sums as GPTQ's per-column update of the whole block, in another order).
QuantizedWeight gptq_quantize(const at::Tensor& W_in, const GptqFactor& f, const QuantSpec& spec, int64_t block_size,
                              at::Tensor* unrounded) {
  c10::NoGradGuard g;
  const int64_t N = W_in.size(0), K = W_in.size(1), gs = spec.group_for(K), G = spec.groups_for(K),
                qmax = spec.qmax();
  EQAT_ASSERT(f.U.size(0) == K && f.dead.numel() == K, "gptq_quantize: the factor is for K = ", f.U.size(0),
              ", the weight has K = ", K);
  EQAT_ASSERT(!f.perm.defined() || f.group == gs, "gptq_quantize: the factor's order is for groups of ", f.group,
              ", the weight has groups of ", gs);
  const at::Tensor& U = f.U;
  at::Tensor Wt = at::empty({K, N}, at::TensorOptions().dtype(at::kDouble));
  Wt.copy_(f.perm.defined() ? W_in.detach().t().index_select(0, f.perm) : W_in.detach().t());
  Wt.masked_fill_(f.dead.unsqueeze(1), 0);

  at::Tensor Qt = at::empty({K, N}, at::kInt);
  at::Tensor S = at::zeros({G, N}, at::kDouble), Z = at::zeros({G, N}, at::kDouble);
  at::Tensor pre = unrounded ? at::empty({K, N}, at::kDouble) : at::Tensor();
  at::Tensor s_cur, z_cur;
  constexpr int64_t kSub = 16;
  for (int64_t i1 = 0; i1 < K; i1 += block_size) {
    const int64_t i2 = std::min(i1 + block_size, K), count = i2 - i1;
    at::Tensor W1 = Wt.narrow(0, i1, count).clone();
    at::Tensor Err1 = at::empty({count, N}, at::kDouble);
    at::Tensor U1 = U.narrow(0, i1, count).narrow(1, i1, count);
    for (int64_t b0 = 0; b0 < count; b0 += kSub) {
      const int64_t b1 = std::min(b0 + kSub, count);
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t col = i1 + i;
        if (col % gs == 0) {
          // Group parameters from W as updated by the previous lazy blocks (AutoGPTQ reads the outer W here, which
          // does not yet hold this block's own updates).
          std::tie(s_cur, z_cur) = gptq_params(Wt.narrow(0, col, std::min(gs, K - col)), qmax);  // ragged last group
          z_cur = z_cur.clamp(spec.zero_min, static_cast<double>(qmax));  // GPTQ v1 cannot store a zero point of 0
          S[col / gs].copy_(s_cur);
          Z[col / gs].copy_(z_cur);
        }
        at::Tensor w = W1[i];
        at::Tensor q = (w / s_cur).round_().add_(z_cur).clamp_(0, static_cast<double>(qmax));
        Qt[col].copy_(q);
        if (unrounded) pre[col].copy_(w);
        at::Tensor err = q.sub_(z_cur).mul_(s_cur).neg_().add_(w).div_(U1[i][i].item<double>());  // (w − ŵ) / U_ii
        Err1[i].copy_(err);
        if (i + 1 < b1) W1.narrow(0, i + 1, b1 - i - 1).addr_(U1[i].narrow(0, i + 1, b1 - i - 1), err, 1, -1);
      }
      if (b1 < count)
        W1.narrow(0, b1, count - b1)
            .addmm_(U1.narrow(0, b0, b1 - b0).narrow(1, b1, count - b1).t(), Err1.narrow(0, b0, b1 - b0), 1, -1);
    }
    if (i2 < K) Wt.narrow(0, i2, K - i2).addmm_(U.narrow(0, i1, count).narrow(1, i2, K - i2).t(), Err1, 1, -1);
  }
  if (f.perm.defined()) {  // back to the natural order: rows of Qt and pre by the inverse permutation, groups of S, Z
    const at::Tensor inv = at::argsort(f.perm);
    Qt = Qt.index_select(0, inv);
    if (unrounded) pre = pre.index_select(0, inv);
    const at::Tensor group_of = f.perm.index({at::indexing::Slice(0, at::indexing::None, gs)}).div(gs, "floor");
    S = at::zeros_like(S).index_copy_(0, group_of, S);  // permuted group j holds natural group group_of[j]
    Z = at::zeros_like(Z).index_copy_(0, group_of, Z);
  }
  if (unrounded) *unrounded = pre.t().contiguous();
  QuantizedWeight out;
  out.q = Qt.t().contiguous();
  out.zero = Z.t().clamp(spec.zero_min, static_cast<double>(qmax)).to(at::kInt).contiguous();
  out.scale = S.t().clamp(kScaleMin, kScaleMax).to(at::kFloat).contiguous();
  return out;
}

QuantizedWeight gptq_quantize(const at::Tensor& W, const at::Tensor& H, const QuantSpec& spec, double damp,
                              int64_t block_size, at::Tensor* unrounded) {
  return gptq_quantize(W, gptq_factor(H.to(at::kDouble).clone(), damp), spec, block_size, unrounded);
}

at::Tensor gptq_unrounded_start(const QuantizedWeight& qw, const at::Tensor& unrounded, const QuantSpec& spec) {
  c10::NoGradGuard g;
  const int64_t N = unrounded.size(0), K = unrounded.size(1);
  at::Tensor gi = at::arange(K, at::kLong).div(spec.group_for(K), "floor");
  at::Tensor out = at::empty({N, K}, at::kFloat);
  // In slices of 256 rows: the float64 temporaries below are each [rows, K] (whole, a 13B down_proj's were 566 MB
  // apiece, several GB at once).
  for (int64_t r0 = 0; r0 < N; r0 += 256) {
    const int64_t n = std::min<int64_t>(256, N - r0);
    at::Tensor S = qw.scale.narrow(0, r0, n).to(at::kDouble).index_select(1, gi);
    at::Tensor Z = qw.zero.narrow(0, r0, n).to(at::kDouble).index_select(1, gi);
    at::Tensor q = qw.q.narrow(0, r0, n).to(at::kDouble);
    at::Tensor base = (q - Z) * S;
    at::Tensor r = unrounded.narrow(0, r0, n).to(at::kDouble) - base;
    at::Tensor lim = 0.45 * S;
    at::Tensor cut = at::max(at::min(r, lim), -lim);
    cut = at::where(q.eq(0).logical_and(r < 0), r, cut);
    cut = at::where(q.eq(static_cast<double>(spec.qmax())).logical_and(r > 0), r, cut);
    out.narrow(0, r0, n).copy_(base + cut);
  }
  return out;
}

}  // namespace eqat
