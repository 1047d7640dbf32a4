#include "quant/quantizer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "data/error.h"
#include "quant/train_loops.h"

namespace eqat {

std::string QuantSpec::tag() const { return str_cat("w", bits, "g", group_size, zero_min ? "z1" : ""); }

namespace {
// Straight-through helpers: forward value of f(x), gradient of the identity.
at::Tensor ste(const at::Tensor& x, const at::Tensor& fx) { return x + (fx - x).detach(); }

// [N, K] -> [N, G, g]. A ragged last group is padded with copies of the row's last column: they change neither the
// group's min nor its max, and ungrouped() cuts them off again (so they get no gradient either).
at::Tensor grouped(const at::Tensor& W, int64_t g) {
  const int64_t N = W.size(0), K = W.size(1), G = QuantSpec::num_groups(K, g), pad = G * g - K;
  if (pad == 0) return W.reshape({N, G, g});
  return at::cat({W, W.narrow(1, K - 1, 1).expand({N, pad})}, 1).reshape({N, G, g});
}
// [N, G, g] -> [N, K]
at::Tensor ungrouped(const at::Tensor& Wg, int64_t K) {
  const int64_t N = Wg.size(0), padded = Wg.size(1) * Wg.size(2);
  at::Tensor flat = Wg.reshape({N, padded});
  return padded == K ? flat : flat.narrow(1, 0, K);
}
}  // namespace

std::pair<at::Tensor, at::Tensor> minmax_init(const at::Tensor& W, const QuantSpec& spec) {
  const int64_t g = spec.group_for(W.size(1));
  at::Tensor Wg = grouped(W.detach(), g);
  at::Tensor xmin = std::get<0>(Wg.min(-1)), xmax = std::get<0>(Wg.max(-1));  // [N, G]
  at::Tensor s = ((xmax - xmin) / static_cast<double>(spec.qmax())).clamp(kScaleMin, kScaleMax);
  at::Tensor z = (-xmin / s).clamp(-1e4, 1e4).round();
  return {s, z};
}

std::pair<at::Tensor, at::Tensor> mse_clip_init(const at::Tensor& W, const QuantSpec& spec, int steps, double min_ratio) {
  const int64_t g = spec.group_for(W.size(1));
  const double qmax = static_cast<double>(spec.qmax());
  at::Tensor Wg = grouped(W.detach().to(at::kFloat), g);                         // [N, G, g]
  at::Tensor xmin = std::get<0>(Wg.min(-1)).clamp_max(0), xmax = std::get<0>(Wg.max(-1)).clamp_min(0);
  at::Tensor best_s, best_z, best_err;
  for (int i = 0; i < steps; ++i) {
    const double a = 1.0 - (1.0 - min_ratio) * i / std::max(steps - 1, 1);
    at::Tensor s = ((xmax - xmin) * a / qmax).clamp(kScaleMin, kScaleMax);
    at::Tensor z = (-xmin * a / s).round().clamp(spec.zero_min, qmax);
    at::Tensor q = (Wg / s.unsqueeze(-1)).round().add(z.unsqueeze(-1)).clamp(0, qmax);
    at::Tensor err = ((q - z.unsqueeze(-1)) * s.unsqueeze(-1) - Wg).square().sum(-1);  // [N, G]
    if (i == 0) {
      best_s = s, best_z = z, best_err = err;
      continue;
    }
    at::Tensor better = err < best_err;
    best_s = at::where(better, s, best_s);
    best_z = at::where(better, z, best_z);
    best_err = at::where(better, err, best_err);
  }
  return {best_s.to(W.scalar_type()), best_z.to(W.scalar_type())};
}

at::Tensor fake_quantize(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec) {
  const int64_t g = spec.group_for(W.size(1));
  const double qmax = static_cast<double>(spec.qmax());
  at::Tensor s1 = ste(s, s.clamp(kScaleMin, kScaleMax)).unsqueeze(-1);  // [N, G, 1]
  at::Tensor zr = ste(z, z.round());
  at::Tensor z1 = ste(zr, zr.clamp(spec.zero_min, qmax)).unsqueeze(-1);
  at::Tensor u = grouped(W, g) / s1;
  at::Tensor q = (ste(u, u.round()) + z1).clamp(0, qmax);
  return ungrouped((q - z1) * s1, W.size(1));
}

namespace {
void check_fused_shapes(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec) {
  EQAT_ASSERT(fused_fake_quant_applies(W, s, z) && s.size(1) == spec.groups_for(W.size(1)),
              "fused fake quant: W ", W.sizes(), " s ", s.sizes(), " at ", spec.tag());
}
}  // namespace

bool fused_fake_quant_applies(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z) {
  auto ok = [](const at::Tensor& t) { return t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2; };
  return ok(W) && ok(s) && ok(z) && s.sizes() == z.sizes() && s.size(0) == W.size(0);
}

namespace {
FakeQuantRows rows_of(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec) {
  return FakeQuantRows{W.const_data_ptr<float>(), s.const_data_ptr<float>(), z.const_data_ptr<float>(), W.size(1),
                       spec.group_for(W.size(1)), s.size(1), static_cast<float>(spec.zero_min),
                       static_cast<float>(spec.qmax()), static_cast<float>(kScaleMin), static_cast<float>(kScaleMax)};
}
}  // namespace

at::Tensor fake_quantize_fused(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec) {
  at::Tensor out = at::empty_like(W);
  fake_quantize_fused_into(W, s, z, spec, out);
  return out;
}

void fake_quantize_fused_into(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec,
                              const at::Tensor& out) {
  fake_quantize_fused_into(std::vector<FakeQuantJob>{{W, s, z, spec, out}});
}

FakeQuantGrads fake_quantize_backward_fused(at::Tensor G, const at::Tensor& W, const at::Tensor& s,
                                            const at::Tensor& z, const QuantSpec& spec) {
  return fake_quantize_backward_fused(std::vector<FakeQuantJob>{{W, s, z, spec, G}})[0];
}

namespace {
// fn(j, n0, n1) for job j's rows [n0, n1), over the threads: the jobs' weights split by elements
// (parallel_over_parts, grain 4096), each row going to the piece that holds its first element.
template <class Fn>
void over_job_rows(const std::vector<FakeQuantJob>& jobs, const Fn& fn) {
  std::vector<int64_t> sizes;
  for (const auto& j : jobs) {
    check_fused_shapes(j.W, j.s, j.z, j.spec);
    EQAT_ASSERT(j.t.sizes() == j.W.sizes() && j.t.is_contiguous() && j.t.scalar_type() == at::kFloat && j.t.is_cpu(),
                "fused fake quant: ", j.t.sizes(), " for W ", j.W.sizes());
    sizes.push_back(j.W.numel());
  }
  parallel_over_parts(sizes, 4096, [&](size_t j, int64_t b, int64_t e) {
    const int64_t K = jobs[j].W.size(1);  // > 0: a part with elements
    const int64_t n0 = (b + K - 1) / K, n1 = (e + K - 1) / K;
    if (n0 < n1) fn(j, n0, n1);
  });
}
}  // namespace

void fake_quantize_fused_into(const std::vector<FakeQuantJob>& jobs) {
  const TrainLoops& loops = best_train_loops();
  over_job_rows(jobs, [&](size_t j, int64_t n0, int64_t n1) {
    const FakeQuantJob& jb = jobs[j];
    loops.fake_quant(rows_of(jb.W, jb.s, jb.z, jb.spec), n0, n1, jb.t.data_ptr<float>());
  });
}

std::vector<FakeQuantGrads> fake_quantize_backward_fused(const std::vector<FakeQuantJob>& jobs) {
  std::vector<FakeQuantGrads> out;
  for (const auto& j : jobs) out.push_back({j.t, at::empty_like(j.s), at::empty_like(j.z)});
  const TrainLoops& loops = best_train_loops();
  over_job_rows(jobs, [&](size_t j, int64_t n0, int64_t n1) {
    const FakeQuantJob& jb = jobs[j];
    loops.fake_quant_backward(rows_of(jb.W, jb.s, jb.z, jb.spec), n0, n1, jb.t.data_ptr<float>(),
                              out[j].s.data_ptr<float>(), out[j].z.data_ptr<float>());
  });
  return out;
}

QuantizedWeight quantize_integers(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec) {
  const int64_t g = spec.group_for(W.size(1));
  const double qmax = static_cast<double>(spec.qmax());
  at::Tensor sc = s.detach().clamp(kScaleMin, kScaleMax);
  at::Tensor zc = z.detach().round().clamp(spec.zero_min, qmax);
  at::Tensor q = (grouped(W.detach(), g) / sc.unsqueeze(-1)).round().add(zc.unsqueeze(-1)).clamp(0, qmax);
  return {ungrouped(q, W.size(1)).to(at::kInt).contiguous(), zc.to(at::kInt), sc};
}

at::Tensor dequantize_integers(const QuantizedWeight& qw, int64_t group_size) {
  const int64_t N = qw.q.size(0), K = qw.q.size(1), g = group_size < 0 ? K : group_size;
  (void)N;
  at::Tensor q = grouped(qw.q.to(at::kFloat), g);
  return ungrouped((q - qw.zero.to(at::kFloat).unsqueeze(-1)) * qw.scale.to(at::kFloat).unsqueeze(-1), K).contiguous();
}

}  // namespace eqat
