// The training loops (train_loops.h) on AVX2: 8 floats per vector. The whole file is compiled for AVX2 (and not
// FMA, so that no multiply-add is contracted); it only runs when the CPU reports AVX2.
#include "quant/train_loops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2")
#include <immintrin.h>

namespace eqat {
namespace train_loops_avx2 {
#include "quant/train_loops-inl.h"

struct Avx2 {
  static constexpr int64_t kWidth = 8;
  using V = __m256;
  using M = __m256;
  struct D {
    __m256d lo, hi;
  };
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static M eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static V keep(M m, V x) { return _mm256_and_ps(m, x); }
  static V drop(M m, V x) { return _mm256_andnot_ps(m, x); }
  static D dzero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static D dot(D acc, V a, V b) {
    const __m128 alo = _mm256_castps256_ps128(a), ahi = _mm256_extractf128_ps(a, 1);
    const __m128 blo = _mm256_castps256_ps128(b), bhi = _mm256_extractf128_ps(b, 1);
    return {_mm256_add_pd(acc.lo, _mm256_mul_pd(_mm256_cvtps_pd(alo), _mm256_cvtps_pd(blo))),
            _mm256_add_pd(acc.hi, _mm256_mul_pd(_mm256_cvtps_pd(ahi), _mm256_cvtps_pd(bhi)))};
  }
  static double hsum(D acc) {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(acc.lo, acc.hi));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  }
};
}  // namespace train_loops_avx2

const TrainLoops* avx2_train_loops() {
  static const TrainLoops loops = train_loops_avx2::make_train_loops<train_loops_avx2::Avx2>("avx2");
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? &loops : nullptr;
}
}  // namespace eqat

#else
namespace eqat {
const TrainLoops* avx2_train_loops() { return nullptr; }
}  // namespace eqat
#endif
