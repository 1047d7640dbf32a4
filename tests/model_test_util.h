// Shared helpers for the model-level golden tests (fixtures from tools/make_fixtures.py).
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/safetensors.h"
#include "test_util.h"

namespace eqat_test {

inline std::string fixture(const std::string& rel) { return data_path("fixtures/" + rel); }

inline nlohmann::json load_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

inline std::vector<int64_t> to_ids(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous().view({-1});
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

inline double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

// fp32 tolerance for logits vs transformers: both sides are fp32 with different reduction orders (BLAS blocking,
// SDPA vs eager softmax). Each dot product of length K ≤ 160 carries a relative error ≲ K·ε₃₂ ≈ 2e-5 in the worst
// case (≈ √K·ε ≈ 1.5e-6 typically) on values of magnitude ≤ ~8, compounded over 3 layers: a few 1e-5 at worst.
// The bar, 1e-4, holds with margin; an actual bug (wrong RoPE pairing, eps, mask) moves logits by ≥ 1e-2.
constexpr double kLogitTol = 1e-4;

}  // namespace eqat_test
