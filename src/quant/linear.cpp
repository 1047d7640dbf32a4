#include "quant/linear.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/autograd.h>

#include <mutex>

#include "data/error.h"
#include "data/safetensors.h"
#include "quant/qmatmul.h"

namespace eqat {
namespace {

// y = x·Ŵᵀ with Ŵ[n, k] = s[g(k), n]·(q − z) read from the packed integers at every call, as an autograd function
// (E2E-QP on the CPU): no [N, K] float copy of the weight exists even within a call (quant_linear_train_forward
// works in chunks of rows), where caching (q − z) would hold a full fp32 copy of the model (26 GB for a 7B); the
// fp32 master step sizes are used as they are. Gradients for x and the step sizes (quant_linear_backward).
// When the integers alias a checkpoint's mapping (Block-AP's finished blocks, a loaded export), their pages are
// dropped after each use (they are never written): a training step then holds one layer's integers in RSS, not the
// model's (a 13B at W4g128: 6.9 GB), and the next use maps them again from the page cache.
// Small models instead keep a training cache (QuantLinearImpl::set_train_cache, kE2eWeightCacheBytes): (q − z) and
// Ŵᵀ in fp32, Ŵᵀ remade once per optimizer step; the integers are then not read at all, and no pages are dropped.
struct PackedLinearFn : public torch::autograd::Function<PackedLinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scales,
                            const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& g_idx, int64_t bits,
                            int64_t group, const std::shared_ptr<const TrainWeightCache>& train_cache) {
    // (Passed as a non-tensor argument: Function::apply records every tensor argument's metadata, and an undefined
    // one has none.)
    const at::Tensor qmz = train_cache ? train_cache->qmz : at::Tensor();
    const at::Tensor wt = train_cache ? train_cache->wt : at::Tensor();
    ctx->save_for_backward({x, scales, qweight, qzeros, g_idx, qmz, wt});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group"] = group;
    const TrainWeightCache cache{qmz, wt};
    at::Tensor y = quant_linear_train_forward(x, {qweight, qzeros, scales, g_idx}, static_cast<int>(bits), group,
                                              qmz.defined() ? &cache : nullptr);
    if (!qmz.defined()) release_mapped_bytes(qweight.const_data_ptr(), qweight.nbytes());
    return y;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scales = saved[1];
    const TrainWeightCache cache{saved[5], saved[6]};
    const QuantLinearGrads g = quant_linear_backward(
        grads[0], x, {saved[2], saved[3], scales, saved[4]}, static_cast<int>(ctx->saved_data["bits"].toInt()),
        ctx->saved_data["group"].toInt(), ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        cache.qmz.defined() ? &cache : nullptr);
    if (!cache.qmz.defined()) release_mapped_bytes(saved[2].const_data_ptr(), saved[2].nbytes());
    return {g.grad_input, g.grad_scales.defined() ? g.grad_scales.to(scales.scalar_type()) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// y = x·Ŵᵀ with Ŵ = fake_quantize(W, s, z), fused for fp32 on the CPU (Block-AP): only x, W, s and z are kept for
// the backward, which rebuilds Ŵ, where the composite keeps three [N, K] tensors per linear (about 2.4 GB of a 7B
// block's 3.2 GB of training state besides). Gradients: fake_quantize_backward_fused on dL/dŴ = gyᵀ·x.
struct FakeQuantLinearFn : public torch::autograd::Function<FakeQuantLinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& W,
                            const at::Tensor& s, const at::Tensor& z, int64_t bits, int64_t group, int64_t zero_min) {
    ctx->save_for_backward({x, W, s, z});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["group"] = group;
    ctx->saved_data["zero_min"] = zero_min;
    return at::linear(x, fake_quantize_fused(W, s, z, spec_of(bits, group, zero_min)));
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &W = saved[1], &s = saved[2], &z = saved[3];
    const QuantSpec spec = spec_of(ctx->saved_data["bits"].toInt(), ctx->saved_data["group"].toInt(),
                                   ctx->saved_data["zero_min"].toInt());
    const at::Tensor gy = grads[0].contiguous();
    const int64_t N = W.size(0), K = W.size(1);
    at::Tensor gx;
    if (ctx->needs_input_grad(0)) gx = at::matmul(gy, fake_quantize_fused(W, s, z, spec));
    if (!ctx->needs_input_grad(1) && !ctx->needs_input_grad(2) && !ctx->needs_input_grad(3))
      return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    FakeQuantGrads g = fake_quantize_backward_fused(at::mm(gy.reshape({-1, N}).t(), x.reshape({-1, K})), W, s, z, spec);
    return {gx, g.w, g.s, g.z, at::Tensor(), at::Tensor(), at::Tensor()};
  }
  static QuantSpec spec_of(int64_t bits, int64_t group, int64_t zero_min) {
    QuantSpec spec;
    spec.bits = static_cast<int>(bits);
    spec.group_size = group;
    spec.zero_min = static_cast<int>(zero_min);
    return spec;
  }
};

}  // namespace

QuantLinearImpl::QuantLinearImpl(int64_t in_features, int64_t out_features, bool with_bias)
    : in_features_(in_features), out_features_(out_features) {
  EQAT_ASSERT(in_features > 0 && out_features > 0, "linear dims ", in_features, "x", out_features);
  weight = register_parameter("weight", at::empty({out_features, in_features}));
  if (with_bias) bias = register_parameter("bias", at::empty({out_features}));
}

at::Tensor QuantLinearImpl::set_tensor(const std::string& name, const at::Tensor& value, bool is_buffer) {
  auto dict = is_buffer ? named_buffers(false) : named_parameters(false);  // shallow handles to the registered tensors
  at::Tensor* existing = dict.find(name);
  if (existing) {
    c10::NoGradGuard g;
    existing->set_data(value);
    existing->set_requires_grad(!is_buffer && value.requires_grad());
    return *existing;
  }
  return is_buffer ? register_buffer(name, value) : register_parameter(name, value, value.requires_grad());
}

at::Tensor QuantLinearImpl::forward(const at::Tensor& x) {
  if (input_observer) input_observer(x);
  const c10::optional<at::Tensor> b = bias.defined() ? c10::optional<at::Tensor>(bias.to(x.scalar_type())) : c10::nullopt;
  switch (mode_) {
    case LinearMode::kFloat:
      return float_linear(x, weight, b);
    case LinearMode::kFakeQuant:
      if (fake_quant_weight_override.defined()) return at::linear(x, fake_quant_weight_override, b);
      if (x.is_cpu() && x.scalar_type() == at::kFloat && fused_fake_quant_applies(weight, weight_scale, weight_zero)) {
        if (!c10::GradMode::is_enabled())
          return at::linear(x, fake_quantize_fused(weight, weight_scale, weight_zero, spec_), b);
        at::Tensor y = FakeQuantLinearFn::apply(x, weight, weight_scale, weight_zero, spec_.bits, spec_.group_size,
                                                spec_.zero_min);
        return b ? y + *b : y;
      }
      return at::linear(x, fake_quantize(weight, weight_scale, weight_zero, spec_).to(x.scalar_type()), b);
    case LinearMode::kPacked:
      // Training step sizes (E2E-QP) needs autograd through (q − z)·s: on CUDA through a cached fp32 (q − z), on
      // the CPU through PackedLinearFn (chunks of (q − z) per call: measured on a llama-2-7b-shaped layer pair,
      // 2.5 s per step against 7.6 s with the fp32 cache, and 1.5 against 3.9 GiB). Inference goes to the fused
      // kernels (CPU AVX2 / VNNI / CUDA; they fall back to the reference dequant where a shape is not covered).
      if (scales.requires_grad() || (c10::GradMode::is_enabled() && x.requires_grad())) {
        if (!x.is_cpu()) return at::linear(x, packed_weight(x.scalar_type()), b);
        const int64_t group = spec_.group_for(in_features_);
        const std::shared_ptr<const TrainWeightCache> cache = train_cache_on_ ? train_cache() : nullptr;
        at::Tensor y = PackedLinearFn::apply(x, scales, qweight, qzeros, g_idx, spec_.bits, group, cache);
        return b ? y + *b : y;
      }
      return quant_linear_forward(x, packed(), spec_.bits, spec_.group_for(in_features_),
                                  bias.defined() ? bias : at::Tensor());
    case LinearMode::kCount:
      break;
  }
  EQAT_ASSERT(false, "invalid linear mode");
}

at::Tensor QuantLinearImpl::packed_weight(c10::ScalarType dtype) {
  if (scales.requires_grad()) {
    dequant_ = at::Tensor();  // the scales are changing: the inference cache is stale
    // E2E-QP: Ŵ = (q − z)·s with s trainable; (q − z) is fixed, so cache it once.
    if (!q_minus_z_.defined()) {
      c10::NoGradGuard g;
      auto [q, z] = unpack_gptq(packed(), spec_.bits);
      at::Tensor gi = g_idx.to(at::kLong);
      q_minus_z_ = (q.to(at::kFloat) - z.index_select(1, gi).to(at::kFloat)).to(scales.device());
    }
    return (q_minus_z_ * scales.t().index_select(1, g_idx.to(at::kLong).to(scales.device()))).to(dtype);
  }
  if (!dequant_.defined() || dequant_.scalar_type() != dtype) {
    c10::NoGradGuard g;
    dequant_ = dequantize_gptq(packed(), spec_.bits).to(qweight.device(), dtype);
  }
  return dequant_;
}

void QuantLinearImpl::set_train_cache(bool on) {
  train_cache_on_ = on;
  train_cache_.reset();
  train_cache_key_ = {nullptr, nullptr, -1};
}

std::shared_ptr<const TrainWeightCache> QuantLinearImpl::train_cache() {
  // The data-parallel E2E-QP step calls forward on the same module from several threads: one builds or refreshes,
  // the others then find it current. A refresh makes a new Ŵᵀ (the backward of a step before holds the old one).
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const std::tuple<const void*, const void*, int64_t> key{scales.unsafeGetTensorImpl(), scales.const_data_ptr(),
                                                          scales._version()};
  if (train_cache_ && key == train_cache_key_) return train_cache_;
  const int64_t group = spec_.group_for(in_features_);
  if (!train_cache_ && !train_cache_applies(packed(), group)) return nullptr;  // the layout the fast path takes
  c10::NoGradGuard g;
  if (!train_cache_) {
    train_cache_ = std::make_shared<const TrainWeightCache>(train_cache_build(packed(), spec_.bits, group));
    release_mapped_bytes(qweight.const_data_ptr(), qweight.nbytes());  // not read again while the cache lives
  } else {
    train_cache_ = std::make_shared<const TrainWeightCache>(
        TrainWeightCache{train_cache_->qmz, train_cache_scaled(train_cache_->qmz, scales, group)});
  }
  train_cache_key_ = key;
  return train_cache_;
}

void QuantLinearImpl::to_fake_quant(const QuantSpec& spec) {
  EQAT_ASSERT(mode_ == LinearMode::kFloat, "to_fake_quant from a non-float linear");
  spec_ = spec;
  auto [s, z] = minmax_init(weight.detach(), spec);
  weight_scale = set_tensor("weight_scale", s, false);
  weight_zero = set_tensor("weight_zero", z, false);
  mode_ = LinearMode::kFakeQuant;
}

void QuantLinearImpl::to_packed(c10::ScalarType scale_dtype) {
  c10::NoGradGuard g;
  EQAT_ASSERT(mode_ == LinearMode::kFakeQuant, "to_packed needs fake-quant mode (call to_fake_quant first)");
  QuantizedWeight qw = quantize_integers(weight, weight_scale, weight_zero, spec_);
  GptqTensors t = pack_gptq(qw.q, qw.zero, qw.scale, spec_.bits, spec_.group_for(in_features_), scale_dtype);
  set_packed(t, spec_);
}

void QuantLinearImpl::set_packed(const GptqTensors& t, const QuantSpec& spec) {
  c10::NoGradGuard g;
  spec_ = spec;
  const int64_t N = out_features_, K = in_features_, G = spec.groups_for(K);
  check_packable(N, K, spec.bits, spec.group_for(K), "linear");
  EQAT_CHECK(t.qweight.sizes() == at::IntArrayRef({packed_words(K, spec.bits), N}) &&
                 t.qzeros.sizes() == at::IntArrayRef({G, packed_words(N, spec.bits)}) &&
                 t.scales.sizes() == at::IntArrayRef({G, N}) && t.g_idx.sizes() == at::IntArrayRef({K}),
             "packed tensors do not match a ", N, "x", K, " linear at ", spec.tag());
  const auto dev = weight.device();
  qweight = set_tensor("qweight", t.qweight.to(dev), true);
  qzeros = set_tensor("qzeros", t.qzeros.to(dev), true);
  g_idx = set_tensor("g_idx", t.g_idx.to(dev), true);
  scales = set_tensor("scales", t.scales.to(dev).detach(), false);
  scales.set_requires_grad(false);
  weight.set_data(at::empty({0}, weight.options()));
  weight.set_requires_grad(false);
  if (weight_scale.defined()) {
    weight_scale.set_data(at::empty({0}, weight_scale.options()));
    weight_zero.set_data(at::empty({0}, weight_zero.options()));
    weight_scale.set_requires_grad(false);
    weight_zero.set_requires_grad(false);
  }
  q_minus_z_ = at::Tensor();
  dequant_ = at::Tensor();
  set_train_cache(false);
  mode_ = LinearMode::kPacked;
}

void QuantLinearImpl::init_packed(const QuantSpec& spec, c10::ScalarType scale_dtype) {
  const int64_t N = out_features_, K = in_features_, G = spec.groups_for(K);
  // Uninitialised (at::empty touches no pages): the loader replaces every one, mostly by aliases of the file.
  GptqTensors t{at::empty({packed_words(K, spec.bits), N}, at::kInt),
                at::empty({G, packed_words(N, spec.bits)}, at::kInt), at::empty({G, N}, scale_dtype),
                at::arange(K, at::kLong).div(spec.group_for(K), "floor").to(at::kInt)};
  set_packed(t, spec);
}

void QuantLinearImpl::set_float_weight(const at::Tensor& W) {
  EQAT_ASSERT(W.sizes() == at::IntArrayRef({out_features_, in_features_}), "set_float_weight shape");
  c10::NoGradGuard g;
  weight.set_data(W);
  mode_ = LinearMode::kFloat;
}

at::Tensor QuantLinearImpl::effective_weight() {
  switch (mode_) {
    case LinearMode::kFloat: return weight;
    case LinearMode::kFakeQuant: return fake_quantize(weight, weight_scale, weight_zero, spec_);
    case LinearMode::kPacked: return packed_weight(at::kFloat);
    case LinearMode::kCount: break;
  }
  EQAT_ASSERT(false, "invalid linear mode");
}

// ---------------------------------------------------------------------------------------------------------------
void QuantLinearImpl::view_packed_columns(const GptqTensors& merged, const at::Tensor& merged_bias, int64_t n0) {
  EQAT_ASSERT(mode_ == LinearMode::kPacked, "view_packed_columns needs packed mode");
  qweight = set_tensor("qweight", merged.qweight.narrow(1, n0, out_features_), true);
  scales = set_tensor("scales", merged.scales.narrow(1, n0, out_features_), false);
  if (bias.defined()) bias = set_tensor("bias", merged_bias.narrow(0, n0, out_features_), false);
  dequant_ = at::Tensor(), q_minus_z_ = at::Tensor();
  set_train_cache(false);
}

MergedPackedLinear MergedPackedLinear::merge(const std::vector<QuantLinear>& parts) {
  MergedPackedLinear m;
  if (parts.size() < 2) return m;
  const QuantLinearImpl& a = *parts.front();
  const int64_t K = a.in_features();
  for (const auto& p : parts) {
    if (p->mode() != LinearMode::kPacked || p->spec().bits != a.spec().bits || p->in_features() != K ||
        p->spec().group_for(K) != a.spec().group_for(K) || p->scales.scalar_type() != a.scales.scalar_type() ||
        p->qweight.device() != a.qweight.device() || p->bias.defined() != a.bias.defined() ||
        !p->qweight.is_contiguous() || !gptq_is_sequential(p->packed(), p->spec().group_for(K)))
      return m;
  }
  c10::NoGradGuard g;
  const int bits = a.spec().bits;
  std::vector<at::Tensor> qw, zeros, sc, bs;
  for (const auto& p : parts) {
    qw.push_back(p->qweight);
    // qzeros pack along N: unpack each part's [G, N_i] zero points and repack the concatenation (a part's N_i·b
    // need not be a whole number of words).
    zeros.push_back(unpack_rows(p->qzeros.cpu().t().contiguous(), bits, p->out_features()));  // [N_i, G]
    sc.push_back(p->scales.detach());
    if (p->bias.defined()) bs.push_back(p->bias.detach());
    m.widths_.push_back(p->out_features());
  }
  m.w_.qweight = at::cat(qw, 1);
  m.w_.qzeros = pack_rows(at::cat(zeros, 0), bits).t().contiguous().to(a.qzeros.device());
  m.w_.scales = at::cat(sc, 1);
  m.w_.g_idx = a.g_idx;
  if (!bs.empty()) m.bias_ = at::cat(bs, 0);
  m.bits_ = bits;
  m.group_size_ = a.spec().group_for(K);
  // The parts' own storages, held here past the views (view_packed_columns swaps each tensor's storage for the
  // merged one): where they alias a checkpoint's mapping (a loaded export), the concatenation above paged them in,
  // and a mapping's pages stay in RSS while it lives (the shard's other tensors keep it alive), so serving held
  // every merged weight twice. Once nothing but this list holds a storage, its pages are dropped.
  std::vector<c10::Storage> originals;
  int64_t n0 = 0;
  for (QuantLinear p : parts) {  // a holder copy shares the module
    originals.push_back(p->qweight.storage());
    originals.push_back(p->scales.storage());
    if (p->bias.defined()) originals.push_back(p->bias.storage());
    p->view_packed_columns(m.w_, m.bias_, n0);
    n0 += p->out_features();
  }
  qw.clear(), sc.clear(), bs.clear();
  for (const c10::Storage& st : originals)
    if (st.use_count() == 1) release_mapped_bytes(st.data(), st.nbytes());
  return m;
}

std::vector<at::Tensor> MergedPackedLinear::forward(const at::Tensor& x) const {
  EQAT_ASSERT(defined(), "MergedPackedLinear::forward on an undefined merge");
  return quant_linear_forward(x, w_, bits_, group_size_, bias_).split_with_sizes(widths_, -1);
}

bool MergedPackedLinear::serves(const at::Tensor& x) const {
  return defined() && !(c10::GradMode::is_enabled() && x.requires_grad());
}

}  // namespace eqat
