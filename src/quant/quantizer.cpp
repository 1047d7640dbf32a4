#include "quant/quantizer.h"

#include <ATen/ATen.h>

#include "data/error.h"

namespace eqat {

std::string QuantSpec::tag() const { return str_cat("w", bits, "g", group_size, zero_min ? "z1" : ""); }

namespace {
// Straight-through helpers: forward value of f(x), gradient of the identity.
at::Tensor ste(const at::Tensor& x, const at::Tensor& fx) { return x + (fx - x).detach(); }

// [N, K] -> [N, G, g]
at::Tensor grouped(const at::Tensor& W, int64_t g) { return W.reshape({W.size(0), W.size(1) / g, g}); }
}  // namespace

std::pair<at::Tensor, at::Tensor> minmax_init(const at::Tensor& W, const QuantSpec& spec) {
  const int64_t g = spec.group_for(W.size(1));
  EQAT_CHECK(W.size(1) % g == 0, "group size ", g, " does not divide in_features ", W.size(1));
  at::Tensor Wg = grouped(W.detach(), g);
  at::Tensor xmin = std::get<0>(Wg.min(-1)), xmax = std::get<0>(Wg.max(-1));  // [N, G]
  at::Tensor s = ((xmax - xmin) / static_cast<double>(spec.qmax())).clamp(kScaleMin, kScaleMax);
  at::Tensor z = (-xmin / s).clamp(-1e4, 1e4).round();
  return {s, z};
}

at::Tensor fake_quantize(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec) {
  const int64_t g = spec.group_for(W.size(1));
  const double qmax = static_cast<double>(spec.qmax());
  at::Tensor s1 = ste(s, s.clamp(kScaleMin, kScaleMax)).unsqueeze(-1);  // [N, G, 1]
  at::Tensor zr = ste(z, z.round());
  at::Tensor z1 = ste(zr, zr.clamp(spec.zero_min, qmax)).unsqueeze(-1);
  at::Tensor u = grouped(W, g) / s1;
  at::Tensor q = (ste(u, u.round()) + z1).clamp(0, qmax);
  return ((q - z1) * s1).reshape(W.sizes());
}

QuantizedWeight quantize_integers(const at::Tensor& W, const at::Tensor& s, const at::Tensor& z, const QuantSpec& spec) {
  const int64_t g = spec.group_for(W.size(1));
  const double qmax = static_cast<double>(spec.qmax());
  at::Tensor sc = s.detach().clamp(kScaleMin, kScaleMax);
  at::Tensor zc = z.detach().round().clamp(spec.zero_min, qmax);
  at::Tensor q = (grouped(W.detach(), g) / sc.unsqueeze(-1)).round().add(zc.unsqueeze(-1)).clamp(0, qmax);
  return {q.reshape(W.sizes()).to(at::kInt), zc.to(at::kInt), sc};
}

at::Tensor dequantize_integers(const QuantizedWeight& qw, int64_t group_size) {
  const int64_t N = qw.q.size(0), K = qw.q.size(1), g = group_size < 0 ? K : group_size;
  at::Tensor q = qw.q.to(at::kFloat).view({N, K / g, g});
  return ((q - qw.zero.to(at::kFloat).unsqueeze(-1)) * qw.scale.to(at::kFloat).unsqueeze(-1)).view({N, K});
}

}  // namespace eqat
