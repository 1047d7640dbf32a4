#include "quant/cpu_bf16_gemm.h"

#include <ATen/cpu/Utils.h>
#include <c10/core/ScalarType.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>

#include "data/error.h"
#include "quant/cpu_qgemv.h"

namespace eqat {

namespace {

// oneMKL's CBLAS constants and signature (mkl_cblas.h; MKL_INT is 32-bit in the LP64 interface LibTorch links).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using GemmBf16 = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);

GemmBf16 lookup() {
  static const GemmBf16 fn = [] {
    if (!cpu_has_bf16_dot()) return GemmBf16{nullptr};  // AVX512-BF16, which every CPU with AMX has
    at::cpu::init_amx();  // asks the kernel for the AMX tile state; false where there is none (AVX512-BF16 serves)
    return reinterpret_cast<GemmBf16>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  }();
  return fn;
}

// A 2-D operand as CBLAS sees it in row-major order: not transposed with leading dimension stride(0), or a transposed
// view (column-major) with leading dimension stride(1).
struct Operand {
  int trans, ld;
};
Operand operand(const at::Tensor& t, const char* name) {
  EQAT_ASSERT(t.dim() == 2 && t.scalar_type() == at::kBFloat16 && t.is_cpu(), "mm_bf16_f32: ", name,
              " is not a 2-D bf16 CPU tensor");
  if (t.stride(1) == 1 || t.size(1) == 1) return {kNoTrans, static_cast<int>(std::max<int64_t>(t.stride(0), t.size(1)))};
  EQAT_ASSERT(t.stride(0) == 1 || t.size(0) == 1, "mm_bf16_f32: ", name, " has strides ", t.strides());
  return {kTrans, static_cast<int>(std::max<int64_t>(t.stride(1), t.size(0)))};
}

}  // namespace

bool cpu_bf16_gemm_available() { return lookup() != nullptr; }

void mm_bf16_f32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const GemmBf16 fn = lookup();
  EQAT_ASSERT(fn != nullptr, "mm_bf16_f32: no bf16 GEMM on this CPU");
  EQAT_ASSERT(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_cpu() &&
                  (out.stride(1) == 1 || out.size(1) == 1) && a.size(0) == out.size(0) && b.size(1) == out.size(1) &&
                  a.size(1) == b.size(0),
              "mm_bf16_f32: out ", out.sizes(), " = a ", a.sizes(), " · b ", b.sizes());
  const int64_t M = out.size(0), N = out.size(1), K = a.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const Operand oa = operand(a, "a"), ob = operand(b, "b");
  const int ldc = static_cast<int>(std::max<int64_t>(out.stride(0), N));
  fn(kRowMajor, oa.trans, ob.trans, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1.0f,
     reinterpret_cast<const uint16_t*>(a.const_data_ptr<at::BFloat16>()), oa.ld,
     reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>()), ob.ld, 0.0f,
     out.data_ptr<float>(), ldc);
}

}  // namespace eqat
