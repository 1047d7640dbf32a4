#include "quant/qat/optim.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <algorithm>
#include <cmath>
#include <optional>

#include "data/error.h"
#include "quant/cpu_qgemv.h"
#include "quant/train_loops.h"
#include "vision/llava.h"

namespace eqat {

AdamW::AdamW(std::vector<ParamGroup> groups, double beta1, double beta2, double eps)
    : groups_(std::move(groups)), beta1_(beta1), beta2_(beta2), eps_(eps) {
  for (const auto& g : groups_) {
    exp_avg_.emplace_back();
    exp_avg_sq_.emplace_back();
    for (const auto& p : g.params) {
      exp_avg_.back().push_back(at::zeros_like(p, at::MemoryFormat::Contiguous));
      exp_avg_sq_.back().push_back(at::zeros_like(p, at::MemoryFormat::Contiguous));
    }
  }
}

void AdamW::zero_grad() {
  for (auto& g : groups_)
    for (auto& p : g.params)
      if (p.grad().defined()) p.mutable_grad() = at::Tensor();
}

namespace {
bool fused_step_applies(const at::Tensor& p, const at::Tensor& grad, const at::Tensor& m, const at::Tensor& v) {
  for (const at::Tensor* t : {&p, &grad, &m, &v})
    if (!t->is_cpu() || t->scalar_type() != at::kFloat || !t->is_contiguous() || t->sizes() != p.sizes()) return false;
  return true;
}

// One fp32 CPU parameter's share of the one-pass update: p, m, v and the gradient as raw pointers, with its group's
// constants.
struct FusedSpan {
  float *p, *m, *v;
  const float* g;
  int64_t n;
  AdamWStep c;
};
}  // namespace

void AdamW::step() {
  c10::NoGradGuard no_grad;
  ++step_;
  const double bc1 = 1.0 - std::pow(beta1_, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(beta2_, static_cast<double>(step_));
  // fp32 CPU parameters take the update in one pass (a 7B block: 202 M parameters, where the op-by-op form makes nine
  // passes and a temporary as large as the parameter), vectorised (train_loops.h). Same arithmetic, in float:
  // m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g², p −= lr/bc1 · m / (√v/√bc2 + ε); results may differ from the op-by-op
  // form in the last bit. All of the step's such parameters share one parallel region over their elements laid end
  // to end, split evenly by the threads: per parameter, a default-model block's 65 536-weight linears and its step
  // sizes fell under the split's grain and ran on one thread while the others waited (7 % of a Block-AP run's
  // samples on the main thread, models/SOURCES.md). Each element's operations do not depend on the split, so the
  // update is the same at any thread count.
  std::vector<FusedSpan> spans;
  std::vector<at::Tensor*> written;
  int64_t total = 0;
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    auto& g = groups_[gi];
    // decay is exactly 1 without weight decay, and p·1 = p.
    const AdamWStep c{static_cast<float>(beta1_),      static_cast<float>(beta2_),
                      static_cast<float>(1.0 - beta1_), static_cast<float>(1.0 - beta2_),
                      static_cast<float>(1.0 - g.lr * g.weight_decay), static_cast<float>(std::sqrt(bc2)),
                      static_cast<float>(eps_),         static_cast<float>(-g.lr / bc1)};
    for (size_t i = 0; i < g.params.size(); ++i) {
      at::Tensor& p = g.params[i];
      if (!p.grad().defined()) continue;
      at::Tensor grad = p.grad();
      at::Tensor &m = exp_avg_[gi][i], &v = exp_avg_sq_[gi][i];
      if (fused_step_applies(p, grad, m, v)) {
        spans.push_back({p.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), grad.const_data_ptr<float>(),
                         p.numel(), c});
        total += p.numel();
        written.insert(written.end(), {&p, &m, &v});
        continue;
      }
      if (g.weight_decay != 0) p.mul_(1.0 - g.lr * g.weight_decay);
      exp_avg_[gi][i].mul_(beta1_).add_(grad, 1.0 - beta1_);
      exp_avg_sq_[gi][i].mul_(beta2_).addcmul_(grad, grad, 1.0 - beta2_);
      // torch.optim.AdamW (non-capturable): p -= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)
      at::Tensor denom = (exp_avg_sq_[gi][i].sqrt() / std::sqrt(bc2)).add_(eps_);
      p.addcdiv_(exp_avg_[gi][i], denom, -g.lr / bc1);
    }
  }
  if (spans.empty()) return;
  const TrainLoops& loops = best_train_loops();
  std::vector<int64_t> sizes;
  for (const FusedSpan& sp : spans) sizes.push_back(sp.n);
  parallel_over_parts(sizes, 1 << 14, [&](size_t j, int64_t b, int64_t e) {
    const FusedSpan& sp = spans[j];
    loops.adamw(sp.p + b, sp.g + b, sp.m + b, sp.v + b, e - b, sp.c);
  });
  // Written through raw pointers: count it as the in-place update it is (what an op like add_ does), so anything
  // keyed on the version (autograd's saved-tensor check, a packed linear's training cache) sees the change.
  for (at::Tensor* t : written) t->unsafeGetTensorImpl()->bump_version();
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t gi = 0; gi < groups_.size(); ++gi)
    for (size_t i = 0; i < exp_avg_[gi].size(); ++i) {
      const std::string pre = groups_[gi].name + "." + std::to_string(i);
      out.emplace_back(pre + ".exp_avg", exp_avg_[gi][i].cpu());
      out.emplace_back(pre + ".exp_avg_sq", exp_avg_sq_[gi][i].cpu());
    }
  out.emplace_back("step", at::tensor({step_}, at::kLong));
  return out;
}

void AdamW::load_state(const std::map<std::string, at::Tensor>& state) {
  c10::NoGradGuard no_grad;
  for (size_t gi = 0; gi < groups_.size(); ++gi)
    for (size_t i = 0; i < exp_avg_[gi].size(); ++i) {
      const std::string pre = groups_[gi].name + "." + std::to_string(i);
      auto a = state.find(pre + ".exp_avg"), b = state.find(pre + ".exp_avg_sq");
      EQAT_CHECK(a != state.end() && b != state.end(), "optimizer state lacks ", pre);
      exp_avg_[gi][i].copy_(a->second);
      exp_avg_sq_[gi][i].copy_(b->second);
    }
  auto s = state.find("step");
  EQAT_CHECK(s != state.end(), "optimizer state lacks step");
  step_ = s->second.item<int64_t>();
}

namespace {
int keep_freed_depth = 0;  // KeepFreedMemory scopes alive (with on)
}  // namespace

KeepFreedMemory::KeepFreedMemory(bool on) : on_(on) {
  if (!on_ || keep_freed_depth++ > 0) return;
#ifdef __GLIBC__
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

KeepFreedMemory::~KeepFreedMemory() {
  if (!on_ || --keep_freed_depth > 0) return;
#ifdef __GLIBC__
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  malloc_trim(0);
#endif
}

double cosine_lr(double lr, double min_factor, int64_t step, int64_t total) {
  const double eta_min = lr / min_factor;
  if (total <= 1) return lr;
  const double c = 0.5 * (1.0 + std::cos(M_PI * static_cast<double>(step) / static_cast<double>(total)));
  return eta_min + (lr - eta_min) * c;
}

double warmup_cosine_lr(double lr, double warmup_ratio, int64_t step, int64_t total) {
  const int64_t warm = static_cast<int64_t>(std::ceil(warmup_ratio * static_cast<double>(total)));
  if (step < warm) return lr * static_cast<double>(step) / static_cast<double>(warm);  // HF: starts at 0
  const double progress = static_cast<double>(step - warm) / static_cast<double>(std::max<int64_t>(1, total - warm));
  return lr * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
}

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  c10::NoGradGuard no_grad;
  double total = 0;
  for (const auto& p : params)
    if (p.grad().defined()) total += p.grad().to(at::kDouble).pow(2).sum().item<double>();
  const double norm = std::sqrt(total);
  if (max_norm > 0 && norm > max_norm) {
    const double coef = max_norm / (norm + 1e-6);
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().mul_(coef);
  }
  return norm;
}

LossScaler::LossScaler(bool enabled, double init_scale, double growth, double backoff, int64_t growth_interval)
    : enabled_(enabled), scale_(enabled ? init_scale : 1.0), growth_(growth), backoff_(backoff),
      growth_interval_(growth_interval) {
  EQAT_ASSERT(init_scale > 0 && growth > 1 && backoff > 0 && backoff < 1 && growth_interval > 0,
              "LossScaler: bad parameters");
}

at::Tensor LossScaler::scale(const at::Tensor& loss) const { return enabled_ ? loss * scale_ : loss; }

bool LossScaler::unscale_and_check(const std::vector<at::Tensor>& params) {
  if (!enabled_) return true;
  c10::NoGradGuard no_grad;
  at::Tensor bad;  // one device-side flag, read once
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    at::Tensor g = p.mutable_grad();
    g.div_(scale_);
    at::Tensor b = at::isfinite(g).logical_not().any();
    bad = bad.defined() ? bad.logical_or(b) : b;
  }
  const bool finite = !bad.defined() || !bad.item<bool>();
  if (finite) {
    if (++good_ >= growth_interval_) scale_ *= growth_, good_ = 0;
  } else {
    scale_ *= backoff_, good_ = 0, ++skipped_;
  }
  return finite;
}

AutocastGuard::AutocastGuard(c10::Device device, c10::ScalarType dtype, bool enabled) {
  if (!enabled || !device.is_cuda()) return;
  active_ = true;
  was_enabled_ = at::autocast::is_autocast_enabled(at::kCUDA);
  prev_dtype_ = at::autocast::get_autocast_dtype(at::kCUDA);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::set_autocast_dtype(at::kCUDA, dtype);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(at::kCUDA, was_enabled_);
  at::autocast::set_autocast_dtype(at::kCUDA, prev_dtype_);
}

bool data_parallel_training(const Model& m) {
  constexpr int64_t kMaxBlockBytes = int64_t{64} << 20;
  const auto& t = m.cfg.text;
  const int64_t C = t.hidden_size, F = t.intermediate_size, D = t.head_dim;
  const int64_t params = C * D * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) + 3 * C * F;
  return m.device.is_cpu() && at::get_num_threads() > 1 && params * 4 <= kMaxBlockBytes;
}

void parallel_items(int64_t n, const std::function<void(int64_t)>& fn) {
  const bool grad = c10::GradMode::is_enabled(), exact = ExactCpuActivations::active();
  const c10::impl::LocalDispatchKeySet keys = c10::impl::tls_local_dispatch_key_set();
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    c10::impl::ForceDispatchKeyGuard k(keys);
    c10::AutoGradMode g(grad);
    std::optional<ExactCpuActivations> x;
    if (exact) x.emplace();
    for (int64_t i = i0; i < i1; ++i) fn(i);
  });
}

}  // namespace eqat
