// The training loops (train_loops.h) on AVX-512F: 16 floats per vector. The whole file is compiled for AVX-512F
// (and not FMA, so that no multiply-add is contracted); it only runs when the CPU reports AVX-512F.
#include "quant/train_loops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f")
#include <immintrin.h>
// GCC 12 flags the `_mm512_undefined` pass-through operand inside its own AVX-512 intrinsics as maybe-uninitialized
// (GCC bug 105593); the warning says nothing about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace eqat {
namespace train_loops_avx512 {
#include "quant/train_loops-inl.h"

struct Avx512 {
  static constexpr int64_t kWidth = 16;
  using V = __m512;
  using M = __mmask16;
  struct D {
    __m512d lo, hi;
  };
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static M eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static V keep(M m, V x) { return _mm512_maskz_mov_ps(m, x); }
  static V drop(M m, V x) { return _mm512_maskz_mov_ps(static_cast<M>(~m), x); }
  static D dzero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static D dot(D acc, V a, V b) {
    const __m256 alo = _mm512_castps512_ps256(a), blo = _mm512_castps512_ps256(b);
    const __m256 ahi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    const __m256 bhi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1));
    return {_mm512_add_pd(acc.lo, _mm512_mul_pd(_mm512_cvtps_pd(alo), _mm512_cvtps_pd(blo))),
            _mm512_add_pd(acc.hi, _mm512_mul_pd(_mm512_cvtps_pd(ahi), _mm512_cvtps_pd(bhi)))};
  }
  static double hsum(D acc) {
    alignas(64) double lanes[8];
    _mm512_store_pd(lanes, _mm512_add_pd(acc.lo, acc.hi));
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
};
}  // namespace train_loops_avx512

const TrainLoops* avx512_train_loops() {
  static const TrainLoops loops = train_loops_avx512::make_train_loops<train_loops_avx512::Avx512>("avx512");
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? &loops : nullptr;
}
}  // namespace eqat

#else
namespace eqat {
const TrainLoops* avx512_train_loops() { return nullptr; }
}  // namespace eqat
#endif
