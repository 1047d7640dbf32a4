#include "quant/linear.h"

#include <ATen/ATen.h>

#include "data/error.h"

namespace eqat {

QuantLinearImpl::QuantLinearImpl(int64_t in_features, int64_t out_features, bool with_bias)
    : in_features_(in_features), out_features_(out_features) {
  EQAT_ASSERT(in_features > 0 && out_features > 0, "linear dims ", in_features, "x", out_features);
  weight = register_parameter("weight", at::empty({out_features, in_features}));
  if (with_bias) bias = register_parameter("bias", at::empty({out_features}));
}

at::Tensor QuantLinearImpl::forward(const at::Tensor& x) {
  switch (mode_) {
    case LinearMode::kFloat:
      return at::linear(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
    case LinearMode::kCount:
      break;
  }
  EQAT_ASSERT(false, "invalid linear mode");
}

}  // namespace eqat
