#include "quant/cpu_qgemv.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <algorithm>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EQAT_X86 1
#endif

#include "data/error.h"

namespace eqat {

namespace {

constexpr int kChunk = 32;  // input rows per chunk = `bits` whole words per column

// Where value kk (0..31) of a chunk lies: word i, bit offset off; `straddle` when it continues in word i+1.
struct Field {
  int word, off;
  bool straddle, top;  // top: off + bits == 32 (needs a logical shift, not an AND, to stay non-negative)
};
constexpr Field field(int bits, int kk) {
  const int bit = kk * bits, i = bit / 32, off = bit % 32;
  return {i, off, off + bits > 32, off + bits == 32};
}

inline float scale_at(const CpuQWeight& w, int64_t idx) {
  const uint16_t h = w.scales[idx];
  if (w.scales_bf16) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

inline uint32_t zero_at(const CpuQWeight& w, int64_t g, int64_t n) {
  const uint32_t* row = w.qzeros + g * ((w.N * w.bits + 31) / 32);
  const int64_t bit = n * w.bits, i = bit / 32;
  const int off = static_cast<int>(bit % 32);
  uint32_t v = row[i] >> off;
  if (off + w.bits > 32) v |= row[i + 1] << (32 - off);
  return v & ((1u << w.bits) - 1u);
}

// Per-call activation preparation shared by both implementations: xsum[m][c] = Σ of chunk c's 32 values of row m,
// and (AVX2 only) xp = x pre-scaled by 2^-off for the fields that are isolated in place with an AND.
struct Prepared {
  std::vector<float> xp, xsum;
};

Prepared prepare(const CpuQWeight& w, const float* x, int64_t M, bool prescale) {
  Prepared p;
  const int64_t chunks = w.K / kChunk;
  p.xsum.assign(M * chunks, 0.f);
  if (prescale) p.xp.resize(M * w.K);
  float mult[kChunk];
  for (int kk = 0; kk < kChunk; ++kk) {
    const Field f = field(w.bits, kk);
    mult[kk] = (f.straddle || f.top) ? 1.f : std::ldexp(1.f, -f.off);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const float* xc = x + m * w.K + c * kChunk;
      float s = 0.f;
      for (int kk = 0; kk < kChunk; ++kk) {
        s += xc[kk];
        if (prescale) p.xp[m * w.K + c * kChunk + kk] = xc[kk] * mult[kk];
      }
      p.xsum[m * chunks + c] = s;
    }
  return p;
}

// ---- scalar ------------------------------------------------------------------------------------------------------

void scalar_tile(const CpuQWeight& w, const float* x, const float* xsum, int64_t M, float* y, int64_t n0,
                 int64_t n1) {
  const int64_t chunks = w.K / kChunk;
  const uint32_t mask = (1u << w.bits) - 1u;
  std::vector<float> part(M), acc(M);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t g = c * kChunk / w.group_size;
      const float s = scale_at(w, g * w.N + n), z = static_cast<float>(zero_at(w, g, n));
      uint32_t words[8];
      for (int i = 0; i < w.bits; ++i) words[i] = w.qweight[(c * w.bits + i) * w.N + n];
      std::fill(part.begin(), part.end(), 0.f);
      for (int kk = 0; kk < kChunk; ++kk) {
        const Field f = field(w.bits, kk);
        uint32_t v = words[f.word] >> f.off;
        if (f.straddle) v |= words[f.word + 1] << (32 - f.off);
        const float q = static_cast<float>(v & mask);
        for (int64_t m = 0; m < M; ++m) part[m] += x[m * w.K + c * kChunk + kk] * q;
      }
      for (int64_t m = 0; m < M; ++m) acc[m] += s * (part[m] - z * xsum[m * chunks + c]);
    }
    for (int64_t m = 0; m < M; ++m) y[m * w.N + n] = acc[m];
  }
}

// ---- AVX2 --------------------------------------------------------------------------------------------------------
#ifdef EQAT_X86

#define EQAT_AVX2 __attribute__((target("avx2,fma,f16c")))

template <int BITS, int KK>
EQAT_AVX2 inline __m256 avx2_field(const __m256i* words) {
  constexpr Field f = field(BITS, KK);
  constexpr uint32_t mask = (1u << BITS) - 1u;
  __m256i v;
  if constexpr (f.straddle) {
    v = _mm256_or_si256(_mm256_srli_epi32(words[f.word], f.off), _mm256_slli_epi32(words[f.word + 1], 32 - f.off));
    v = _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(mask)));
  } else if constexpr (f.top) {
    v = _mm256_srli_epi32(words[f.word], f.off);
  } else {
    v = _mm256_and_si256(words[f.word], _mm256_set1_epi32(static_cast<int>(mask << f.off)));  // q·2^off
  }
  return _mm256_cvtepi32_ps(v);
}

EQAT_AVX2 inline __m256 load_scales8(const CpuQWeight& w, int64_t idx) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scales + idx));
  if (w.scales_bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// C independent partial sums per (row, column vector), used round-robin over kk: FMA latency (4 cycles) × 2 ports
// needs ≥ 8 chains in flight, and MR·U alone is only 1–4.
template <int MR, int U>
constexpr int chains() { return MR * U >= 8 ? 1 : 8 / (MR * U); }

template <int BITS, int MR, int U, int KK>
EQAT_AVX2 inline void avx2_step(const __m256i (&words)[U][BITS], const float* const (&xr)[MR],
                                __m256 (&part)[MR][U][chains<MR, U>()]) {
  if constexpr (KK < kChunk) {
    constexpr int ch = KK % chains<MR, U>();
    __m256 q[U];
    for (int u = 0; u < U; ++u) q[u] = avx2_field<BITS, KK>(words[u]);
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(xr[m] + KK);
      for (int u = 0; u < U; ++u) part[m][u][ch] = _mm256_fmadd_ps(xb, q[u], part[m][u][ch]);
    }
    avx2_step<BITS, MR, U, KK + 1>(words, xr, part);
  }
}

// Zero points of columns n..n+7 (n % 8 == 0) of group row g as floats: their 8·b bits are contiguous in the row.
template <int BITS>
EQAT_AVX2 inline __m256 load_zeros8(const CpuQWeight& w, int64_t g, int64_t n) {
  const int64_t row_words = (w.N * BITS + 31) / 32;
  const uint32_t* row = w.qzeros + g * row_words;
  const int64_t bit = n * BITS, i = bit / 32;
  const int off = static_cast<int>(bit % 32);
  uint64_t v = row[i];
  if (i + 1 < row_words) v |= static_cast<uint64_t>(row[i + 1]) << 32;
  v >>= off;
  __m256i lanes;
  if constexpr (BITS * 8 <= 32) {
    lanes = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(v))),
                              _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS));
  } else {  // 8-bit: 64 bits, lanes 0..3 from the low word, 4..7 from the high word
    const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(v)));
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(v >> 32)));
    lanes = _mm256_srlv_epi32(_mm256_blend_epi32(lo, hi, 0xF0), _mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24));
  }
  return _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32((1 << BITS) - 1)));
}

// Output columns [n, n + 8U) for rows m0 .. m0+MR-1.
template <int BITS, int MR, int U>
EQAT_AVX2 void avx2_tile(const CpuQWeight& w, const float* xp, const float* xsum, int64_t m0, float* y, int64_t n) {
  const int64_t chunks = w.K / kChunk;
  __m256 acc[MR][U], s[U], z[U];
  for (int u = 0; u < U; ++u) s[u] = z[u] = _mm256_setzero_ps();
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  const int64_t chunks_per_group = w.group_size / kChunk;  // no integer division inside the chunk loop
  int64_t g = -1, left = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    if (left-- == 0) {  // new group: scales and zero points of these columns
      ++g;
      left = chunks_per_group - 1;
      for (int u = 0; u < U; ++u) {
        s[u] = load_scales8(w, g * w.N + n + 8 * u);
        z[u] = load_zeros8<BITS>(w, g, n + 8 * u);
      }
    }
    __m256i words[U][BITS];
    for (int u = 0; u < U; ++u)
      for (int i = 0; i < BITS; ++i)
        words[u][i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.qweight + (c * BITS + i) * w.N + n + 8 * u));
    constexpr int C = chains<MR, U>();
    __m256 part[MR][U][C];
    const float* xr[MR];
    for (int m = 0; m < MR; ++m) {
      xr[m] = xp + (m0 + m) * w.K + c * kChunk;
      for (int u = 0; u < U; ++u)
        for (int h = 0; h < C; ++h) part[m][u][h] = _mm256_setzero_ps();
    }
    avx2_step<BITS, MR, U, 0>(words, xr, part);
    for (int m = 0; m < MR; ++m) {
      const __m256 xs = _mm256_broadcast_ss(xsum + (m0 + m) * chunks + c);
      for (int u = 0; u < U; ++u) {
        __m256 p = part[m][u][0];
        for (int h = 1; h < C; ++h) p = _mm256_add_ps(p, part[m][u][h]);
        acc[m][u] = _mm256_fmadd_ps(s[u], _mm256_fnmadd_ps(z[u], xs, p), acc[m][u]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) _mm256_storeu_ps(y + (m0 + m) * w.N + n + 8 * u, acc[m][u]);
}

template <int BITS>
void avx2_range(const CpuQWeight& w, const float* xp, const float* xsum, int64_t M, float* y, int64_t n0,
                int64_t n1) {
  // n0..n1 are multiples of 8 (N % 8 == 0 is checked by the caller). Row blocks of 4, then 2, then 1.
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    for (int64_t n = n0; n < n1; n += 8) avx2_tile<BITS, 4, 1>(w, xp, xsum, m, y, n);
  for (; m + 2 <= M; m += 2) {
    int64_t n = n0;
    for (; n + 16 <= n1; n += 16) avx2_tile<BITS, 2, 2>(w, xp, xsum, m, y, n);
    for (; n < n1; n += 8) avx2_tile<BITS, 2, 1>(w, xp, xsum, m, y, n);
  }
  for (; m < M; ++m) {
    int64_t n = n0;
    for (; n + 16 <= n1; n += 16) avx2_tile<BITS, 1, 2>(w, xp, xsum, m, y, n);
    for (; n < n1; n += 8) avx2_tile<BITS, 1, 1>(w, xp, xsum, m, y, n);
  }
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// ---- AVX-512 VNNI (int8 activations) -----------------------------------------------------------------------------
// GCC 12 flags the `_mm512_undefined` pass-through operand inside its own AVX-512 intrinsics as maybe-uninitialized
// (GCC bug 105593); the warning says nothing about this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define EQAT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// x quantized per chunk of 32 values (llama.cpp's Q8_0 scheme): dx = max|x|/127, xi = round(x/dx) ∈ [−127, 127].
// xi is stored as the 8 int32 words the kernel broadcasts, in its order: for word i of the chunk (32/b values) and
// sub-field s (P = 8/b of them), the bytes of values j = s, s+P, s+2P, s+3P of that word, the same positions that
// (word >> s·b) & mask-per-byte isolates in each byte of a packed word. xs = dx·Σxi, the chunk's quantized sum.
struct VnniX {
  std::vector<int32_t> words;  // [M, chunks, 8]
  std::vector<float> dx, xs;   // [M, chunks]
};

VnniX vnni_prepare(const float* x, int64_t M, int64_t K, int bits) {
  const int64_t chunks = K / kChunk;
  const int P = 8 / bits, per_word = 32 / bits;
  VnniX v;
  v.words.resize(M * chunks * 8);
  v.dx.resize(M * chunks);
  v.xs.resize(M * chunks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const float* xc = x + m * K + c * kChunk;
      float amax = 0.f;
      bool finite = true;
      for (int kk = 0; kk < kChunk; ++kk) {
        amax = std::max(amax, std::fabs(xc[kk]));
        finite = finite && std::isfinite(xc[kk]);
      }
      // A non-finite activation makes the chunk's outputs NaN, as the fp32 kernels would (and no float → int8 cast
      // of a NaN or an infinity happens).
      const float dx = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
      const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
      int8_t xi[kChunk];
      int32_t sum = 0;
      for (int kk = 0; kk < kChunk; ++kk) {
        xi[kk] = static_cast<int8_t>(finite ? std::nearbyint(xc[kk] * inv) : 0.f);
        sum += xi[kk];
      }
      int8_t* out = reinterpret_cast<int8_t*>(v.words.data() + (m * chunks + c) * 8);
      for (int i = 0; i < bits; ++i)
        for (int sub = 0; sub < P; ++sub)
          for (int byte = 0; byte < 4; ++byte) *out++ = xi[i * per_word + sub + byte * P];
      v.dx[m * chunks + c] = dx;
      v.xs[m * chunks + c] = dx * static_cast<float>(sum);
    }
  return v;
}

EQAT_VNNI inline __m512 vnni_scales16(const CpuQWeight& w, int64_t idx) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scales + idx));
  if (w.scales_bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Zero points of columns n..n+15 (n % 16 == 0) of group row g: their 16·b bits start on a word boundary (b = 2, 4, 8)
// and fill b/2 words; each lane picks its word and shifts its field down.
template <int BITS>
EQAT_VNNI inline __m512 vnni_zeros16(const CpuQWeight& w, int64_t g, int64_t n) {
  const uint32_t* row = w.qzeros + g * ((w.N * BITS + 31) / 32) + n * BITS / 32;
  const __m128i words = _mm_maskz_loadu_epi32(static_cast<__mmask8>((1u << (BITS / 2)) - 1u), row);
  __m512i word_of, shift;
  if constexpr (BITS == 2) {
    word_of = _mm512_setzero_si512();
    shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  } else if constexpr (BITS == 4) {
    word_of = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    shift = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  } else {
    word_of = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    shift = _mm512_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24);
  }
  const __m512i lanes = _mm512_srlv_epi32(_mm512_permutexvar_epi32(word_of, _mm512_castsi128_si512(words)), shift);
  return _mm512_cvtepi32_ps(_mm512_and_si512(lanes, _mm512_set1_epi32((1 << BITS) - 1)));
}

// Output columns [n, n + 32) for rows m0 .. m0+MR−1, chunks [c0, c1): per chunk, the packed words of 16 columns
// per vector are split into bytes (shift + AND per sub-field), multiplied with the broadcast activation bytes and
// summed in int32 by vpdpbusd (u8 × s8, 4 products per lane); the chunk's int sum becomes dx·Σq·xi, and
// s·(dx·Σq·xi − z·xs) is added to the fp32 outputs, which carry the sum from one pass over chunks to the next.
template <int BITS, int MR>
EQAT_VNNI void vnni_tile(const CpuQWeight& w, const VnniX& xv, int64_t m0, float* y, int64_t n, int64_t c0,
                         int64_t c1) {
  constexpr int U = 2, P = 8 / BITS;
  constexpr uint32_t lane_mask = BITS == 8 ? 0xFFFFFFFFu : 0x01010101u * ((1u << BITS) - 1u);
  const int64_t chunks = w.K / kChunk, chunks_per_group = w.group_size / kChunk;
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(lane_mask));
  __m512 acc[MR][U], s[U], z[U];
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_loadu_ps(y + (m0 + m) * w.N + n + 16 * u);
  // The first chunk of the next group, tracked without a division per chunk.
  int64_t next_group = c0;
  for (int64_t c = c0; c < c1; ++c) {
    if (c == next_group) {  // a new group (or the range's first chunk): scales and zero points of these columns
      const int64_t g = c / chunks_per_group;
      next_group = (g + 1) * chunks_per_group;
      for (int u = 0; u < U; ++u) {
        s[u] = vnni_scales16(w, g * w.N + n + 16 * u);
        z[u] = vnni_zeros16<BITS>(w, g, n + 16 * u);
      }
    }
    __m512i ia[MR][U];
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < U; ++u) ia[m][u] = _mm512_setzero_si512();
    for (int i = 0; i < BITS; ++i) {
      __m512i wv[U];
      for (int u = 0; u < U; ++u) wv[u] = _mm512_loadu_si512(w.qweight + (c * BITS + i) * w.N + n + 16 * u);
      for (int sub = 0; sub < P; ++sub) {
        __m512i q[U];
        for (int u = 0; u < U; ++u) {
          const __m512i shifted = sub == 0 ? wv[u] : _mm512_srli_epi32(wv[u], static_cast<unsigned>(sub * BITS));
          q[u] = BITS == 8 ? shifted : _mm512_and_si512(shifted, mask);
        }
        for (int m = 0; m < MR; ++m) {
          const __m512i xb = _mm512_set1_epi32(xv.words[((m0 + m) * chunks + c) * 8 + i * P + sub]);
          for (int u = 0; u < U; ++u) ia[m][u] = _mm512_dpbusd_epi32(ia[m][u], q[u], xb);
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 dx = _mm512_set1_ps(xv.dx[(m0 + m) * chunks + c]);
      const __m512 xs = _mm512_set1_ps(xv.xs[(m0 + m) * chunks + c]);
      for (int u = 0; u < U; ++u) {
        const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(ia[m][u]), dx);
        acc[m][u] = _mm512_fmadd_ps(s[u], _mm512_fnmadd_ps(z[u], xs, p), acc[m][u]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) _mm512_storeu_ps(y + (m0 + m) * w.N + n + 16 * u, acc[m][u]);
}

// Columns [n0, n1) (multiples of 32). Chunk-outer: a pass takes 8/b chunks (8 rows of packed words) across all the
// columns, so each row is read as one sequential run and each 4-KiB page is entered once per pass, where a
// column-outer walk changes page at every row (N = 11008: rows 43 KiB apart). Measured (`eqat bench kernels --m 1`,
// 1 thread, 11008x4096 and 4096x11008, W4g128 and W2g64): passes of 8 rows beat 16 (e.g. W4g128 11008x4096
// 1437 against 2914 µs), 32, 64 (up to 3× slower), 4 and 2; the machine is noisy (±40 % between repeats).
// Row blocks of 4, then 2, then 1.
template <int BITS>
void vnni_range(const CpuQWeight& w, const VnniX& xv, int64_t M, float* y, int64_t n0, int64_t n1) {
  constexpr int64_t kPass = BITS >= 8 ? 1 : 8 / BITS;
  const int64_t chunks = w.K / kChunk;
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * w.N + n0, y + m * w.N + n1, 0.f);
  for (int64_t c0 = 0; c0 < chunks; c0 += kPass) {
    const int64_t c1 = std::min(chunks, c0 + kPass);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      for (int64_t n = n0; n < n1; n += 32) vnni_tile<BITS, 4>(w, xv, m, y, n, c0, c1);
    for (; m + 2 <= M; m += 2)
      for (int64_t n = n0; n < n1; n += 32) vnni_tile<BITS, 2>(w, xv, m, y, n, c0, c1);
    for (; m < M; ++m)
      for (int64_t n = n0; n < n1; n += 32) vnni_tile<BITS, 1>(w, xv, m, y, n, c0, c1);
  }
}
#pragma GCC diagnostic pop
bool cpu_has_bf16_dot_impl() {
  __builtin_cpu_init();
  return cpu_has_vnni() && __builtin_cpu_supports("avx512bf16");
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_vnni() { return false; }
bool cpu_has_bf16_dot_impl() { return false; }
#endif

}  // namespace

namespace {
inline void store(float* o, float v) { *o = v; }
// bf16 by round to nearest even: c10::BFloat16's rounding without its NaN branch, so that the loops below vectorise
// (a dequantized weight is finite; an infinite or quiet-NaN scale still gives inf or NaN).
inline void store(uint16_t* o, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *o = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Rows [32·c0, 32·c1) of Wᵀ: (q − z)·s, or (q − z) alone when with_scale is false (× 1 is exact either way); Out is
// float or bf16 bits (the fp32 value rounded once). AVX-512 and AVX2 clones of the inner loops measured no faster
// in prefill (M = 624, 7B shapes, 1 thread: 0.99–1.39× the baseline build's time), so they are not built.
template <typename Out>
void dequant_rows(const CpuQWeight& w, int64_t c_begin, int64_t c_end, bool with_scale, Out* out) {
  const int64_t N = w.N;
  const uint32_t mask = (1u << w.bits) - 1u;
  at::parallel_for(c_begin, c_end, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> z(N), sc(N, 1.0f);
    int64_t g_loaded = -1;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = c * kChunk / w.group_size;
      if (g != g_loaded) {
        for (int64_t n = 0; n < N; ++n) {
          z[n] = static_cast<float>(zero_at(w, g, n));
          if (with_scale) sc[n] = scale_at(w, g * N + n);
        }
        g_loaded = g;
      }
      for (int kk = 0; kk < kChunk; ++kk) {
        const Field f = field(w.bits, kk);
        const uint32_t* wi = w.qweight + (c * w.bits + f.word) * N;
        const uint32_t* wn = f.straddle ? wi + N : wi;
        const int off = f.off, back = f.straddle ? 32 - f.off : 0;
        Out* o = out + ((c - c_begin) * kChunk + kk) * N;
        const float* zp = z.data();
        const float* sp = sc.data();
        if (f.straddle) {
          for (int64_t n = 0; n < N; ++n)
            store(o + n, (static_cast<float>(((wi[n] >> off) | (wn[n] << back)) & mask) - zp[n]) * sp[n]);
        } else {
          for (int64_t n = 0; n < N; ++n) store(o + n, (static_cast<float>((wi[n] >> off) & mask) - zp[n]) * sp[n]);
        }
      }
    }
  });
}
}  // namespace

namespace {
// All of Wᵀ, fp32 or bf16 (cpu_dequant_t, cpu_dequant_t_bf16).
template <typename Out>
void dequant_all(const CpuQWeight& w, Out* out) {
  EQAT_ASSERT(w.group_size % kChunk == 0 && w.K % w.group_size == 0, "cpu_dequant_t: K ", w.K, " g ", w.group_size);
  dequant_rows(w, 0, w.K / kChunk, true, out);
}
}  // namespace

void cpu_dequant_t(const CpuQWeight& w, float* out) { dequant_all(w, out); }
void cpu_dequant_t_bf16(const CpuQWeight& w, uint16_t* out) { dequant_all(w, out); }

bool cpu_has_bf16_dot() {
  static const bool has = cpu_has_bf16_dot_impl();
  return has;
}

void cpu_unpack_t(const CpuQWeight& w, int64_t k0, int64_t k1, float* out) {
  EQAT_ASSERT(w.group_size % kChunk == 0 && w.K % w.group_size == 0 && k0 % kChunk == 0 && k1 % kChunk == 0 &&
                  0 <= k0 && k0 <= k1 && k1 <= w.K,
              "cpu_unpack_t: K ", w.K, " g ", w.group_size, " rows ", k0, "..", k1);
  dequant_rows(w, k0 / kChunk, k1 / kChunk, false, out);
}

CpuKernelCap cpu_kernel_cap() {
  static const CpuKernelCap cap = [] {
    const char* env = std::getenv("EQAT_CPU_KERNEL");
    const std::string want = env ? env : "";
    return want == "scalar" ? CpuKernelCap::kScalar : want == "avx2" ? CpuKernelCap::kAvx2 : CpuKernelCap::kNone;
  }();
  return cap;
}

CpuIsa cpu_qgemm_isa() {
  static const CpuIsa isa = [] {
    const CpuKernelCap cap = cpu_kernel_cap();
    if (cap == CpuKernelCap::kScalar) return CpuIsa::kScalar;
    if (cap == CpuKernelCap::kAvx2) return cpu_has_avx2() ? CpuIsa::kAvx2 : CpuIsa::kScalar;
    return cpu_has_vnni() ? CpuIsa::kVnni : cpu_has_avx2() ? CpuIsa::kAvx2 : CpuIsa::kScalar;
  }();
  return isa;
}

namespace {
thread_local int exact_activation_scopes = 0;
}
ExactCpuActivations::ExactCpuActivations() { ++exact_activation_scopes; }
ExactCpuActivations::~ExactCpuActivations() { --exact_activation_scopes; }
bool ExactCpuActivations::active() { return exact_activation_scopes > 0; }

bool cpu_isa_supported(CpuIsa isa) {
  return isa == CpuIsa::kScalar || (isa == CpuIsa::kAvx2 && cpu_has_avx2()) || (isa == CpuIsa::kVnni && cpu_has_vnni());
}

const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kVnni ? "avx512-vnni" : isa == CpuIsa::kAvx2 ? "avx2" : "scalar";
}

void cpu_qgemm(const CpuQWeight& w, const float* x, int64_t M, float* y, CpuIsa isa) {
  EQAT_ASSERT(w.bits == 2 || w.bits == 3 || w.bits == 4 || w.bits == 8, "cpu_qgemm: bits ", w.bits);
  EQAT_ASSERT(w.group_size % kChunk == 0 && w.K % w.group_size == 0 && w.N % 8 == 0, "cpu_qgemm: K ", w.K, " N ",
              w.N, " g ", w.group_size);
#ifdef EQAT_X86
  // int8 activations cover 2-, 4- and 8-bit words (3-bit fields straddle words) and widths of whole 32-column tiles;
  // other shapes take the fp32 AVX2 kernel.
  if (isa == CpuIsa::kVnni && (w.bits == 2 || w.bits == 4 || w.bits == 8) && w.N % 32 == 0) {
    EQAT_ASSERT(cpu_has_vnni(), "cpu_qgemm: AVX-512 VNNI requested on a CPU without it");
    const VnniX xv = vnni_prepare(x, M, w.K, w.bits);
    // Tasks of whole 32-column tiles; each thread takes one contiguous range of columns.
    at::parallel_for(0, w.N / 32, 8, [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * 32, n1 = t1 * 32;
      switch (w.bits) {
        case 2: vnni_range<2>(w, xv, M, y, n0, n1); break;
        case 4: vnni_range<4>(w, xv, M, y, n0, n1); break;
        case 8: vnni_range<8>(w, xv, M, y, n0, n1); break;
      }
    });
    return;
  }
  if (isa == CpuIsa::kAvx2 || isa == CpuIsa::kVnni) {
    EQAT_ASSERT(cpu_has_avx2(), "cpu_qgemm: AVX2 requested on a CPU without it");
    const Prepared p = prepare(w, x, M, /*prescale=*/true);
    // Tiles of 64 columns per task: enough tasks for 2+ threads at N = 4096, and a tile's words of one chunk
    // (64 columns × bits × 4 B) stay in L1 across the row blocks.
    const int64_t tiles = (w.N + 63) / 64;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * 64, n1 = std::min(w.N, t1 * 64);
      switch (w.bits) {
        case 2: avx2_range<2>(w, p.xp.data(), p.xsum.data(), M, y, n0, n1); break;
        case 3: avx2_range<3>(w, p.xp.data(), p.xsum.data(), M, y, n0, n1); break;
        case 4: avx2_range<4>(w, p.xp.data(), p.xsum.data(), M, y, n0, n1); break;
        case 8: avx2_range<8>(w, p.xp.data(), p.xsum.data(), M, y, n0, n1); break;
      }
    });
    return;
  }
#endif
  const Prepared p = prepare(w, x, M, /*prescale=*/false);
  at::parallel_for(0, w.N, 16, [&](int64_t n0, int64_t n1) { scalar_tile(w, x, p.xsum.data(), M, y, n0, n1); });
}

}  // namespace eqat
