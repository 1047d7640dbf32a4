#include "quant/cpu_half_gemv.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EQAT_X86 1
#endif

#include "data/error.h"

namespace eqat {

namespace {

// Up to this many activation rows share one pass over a weight row (their accumulators stay in registers); more rows
// take further passes over the same row, which the first pass left in L1 (a row is 2·K bytes).
constexpr int64_t kRowsPerPass = 4;

inline float half_to_float(uint16_t h, bool bf16) {
  return bf16 ? static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits()))
              : static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

void scalar_rows(const float* x, int64_t M, int64_t K, const uint16_t* w, bool bf16, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * half_to_float(row[k], bf16);
      y[m * ldy + n] = acc;
    }
  }
}

#ifdef EQAT_X86
#define EQAT_AVX2 __attribute__((target("avx2,fma,f16c")))

template <bool BF16>
EQAT_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

EQAT_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MB activation rows (x, row stride K) against one weight row: two accumulators per activation row (16 weights per
// iteration), then the ragged end of K in scalar code.
template <bool BF16, int MB>
EQAT_AVX2 void avx2_row(const float* x, int64_t K, const uint16_t* row, float* y, int64_t ldy) {
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = load8<BF16>(row + k), w1 = load8<BF16>(row + k + 8);
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8), w1, acc[m][1]);
    }
  }
  if (k + 8 <= K) {
    const __m256 w0 = load8<BF16>(row + k);
    for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), w0, acc[m][0]);
    k += 8;
  }
  for (int m = 0; m < MB; ++m) {
    float s = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
    for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * half_to_float(row[kk], BF16);
    y[m * ldy] = s;
  }
}

template <bool BF16>
EQAT_AVX2 void avx2_rows(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, float* y,
                         int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    int64_t m = 0;
    for (; m + kRowsPerPass <= M; m += kRowsPerPass) avx2_row<BF16, 4>(x + m * K, K, row, y + m * ldy + n, ldy);
    switch (M - m) {
      case 3: avx2_row<BF16, 3>(x + m * K, K, row, y + m * ldy + n, ldy); break;
      case 2: avx2_row<BF16, 2>(x + m * K, K, row, y + m * ldy + n, ldy); break;
      case 1: avx2_row<BF16, 1>(x + m * K, K, row, y + m * ldy + n, ldy); break;
      default: break;
    }
  }
}

#endif

}  // namespace

CpuIsa cpu_half_gemv_isa() {
  // The same AVX2+FMA+F16C test as the packed kernels' (cpu_qgemv.cpp).
  static const CpuIsa isa = cpu_kernel_cap() != CpuKernelCap::kScalar && cpu_isa_supported(CpuIsa::kAvx2)
                                ? CpuIsa::kAvx2
                                : CpuIsa::kScalar;
  return isa;
}

void cpu_half_gemv(const float* x, int64_t M, int64_t K, const uint16_t* w, bool bf16, int64_t n0, int64_t n1,
                   float* y, int64_t ldy, CpuIsa isa) {
  EQAT_ASSERT(M >= 0 && K > 0 && 0 <= n0 && n0 <= n1, "cpu_half_gemv: M ", M, " K ", K, " n ", n0, "..", n1);
#ifdef EQAT_X86
  if (isa != CpuIsa::kScalar) {
    EQAT_ASSERT(cpu_isa_supported(CpuIsa::kAvx2), "cpu_half_gemv: AVX2 requested on a CPU without it");
    if (bf16)
      avx2_rows<true>(x, M, K, w, n0, n1, y, ldy);
    else
      avx2_rows<false>(x, M, K, w, n0, n1, y, ldy);
    return;
  }
#endif
  scalar_rows(x, M, K, w, bf16, n0, n1, y, ldy);
}

}  // namespace eqat
