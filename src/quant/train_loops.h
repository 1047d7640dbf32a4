// The elementwise loops of CPU training (Block-AP's fused fake quantizer and its STE backward, AdamW's one-pass
// update), written once (train_loops-inl.h) and compiled per instruction set:
//   scalar   portable C++ (train_loops.cpp), the fallback and the reference;
//   avx2     x86-64 AVX2, 8 floats per vector (train_loops_avx2.cpp);
//   avx512   x86-64 AVX-512F, 16 floats per vector (train_loops_avx512.cpp).
// Every variant does the same IEEE float operations per element in the same order (division, square root and the
// round-half-even trick are exact in SIMD as in scalar code; none of the files enables FMA, so nothing is
// contracted): Ŵ, dL/dW and AdamW's new p, m, v are bit-identical across variants. Only the per-group sums of the
// step-size and zero-point gradients (in double) are added in another order, which moves them by a few 2⁻⁵³ of
// their absolute sum, far below the float they are rounded to.
// best_train_loops() picks the widest variant the CPU has, once; EQAT_CPU_KERNEL=scalar or =avx2 caps it (as for
// the quantized GEMV, cpu_qgemv.h).
// Measured on Block-AP of the default model (2 vCPU AMD EPYC, one thread): the scalar loops were 39 % of a
// training iteration (fake quant 15 %, its backward 11 %, AdamW 13 %); see models/SOURCES.md.
// Legend: N rows (out_features), K columns (in_features), g group size, G = ⌈K/g⌉ groups per row.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace eqat {

// One group's fake-quant constants, in fake_quantize's float operations: s' = clamp(s) as its straight-through form
// computes it, s + (clamp(s) − s) (outside the clamp range that sum can differ from clamp(s) in the last bit), and
// z' = clamp(round(z), zero_min, qmax).
struct FakeQuantGroup {
  float s1, z1;
  FakeQuantGroup(float s, float z, float zero_min, float qmax, float scale_min, float scale_max) {
    s1 = s + (std::min(std::max(s, scale_min), scale_max) - s);
    z1 = std::min(std::max(std::nearbyint(z), zero_min), qmax);
  }
};

// W [N, K] row-major with s, z [N, G]: the fake quantizer's inputs for rows [n0, n1).
struct FakeQuantRows {
  const float* w;
  const float* s;
  const float* z;
  int64_t K, g, G;
  float zero_min, qmax, scale_min, scale_max;
};

// AdamW's per-step constants (optim.cpp): p = p·decay; m = b1·m + c1·g; v = b2·v + c2·g²;
// p += step · m / (√v / sqrt_bc2 + eps).
struct AdamWStep {
  float b1, b2, c1, c2, decay, sqrt_bc2, eps, step;
};

struct TrainLoops {
  const char* isa;
  // out[n, k] = Ŵ[n, k] for rows [n0, n1): u = W/s', q = clamp(round_half_even(u) + z', 0, qmax), Ŵ = (q − z')·s'.
  void (*fake_quant)(const FakeQuantRows& r, int64_t n0, int64_t n1, float* out);
  // STE backward for rows [n0, n1): grad holds dL/dŴ and becomes dL/dW = dL/dŴ·in (in = [round(u) + z' in
  // [0, qmax]]); gs[n, gi] = Σ_group dL/dŴ·((q − z') − in·u) and gz[n, gi] = −Σ_group dL/dŴ·s'·(1 − in), the
  // products and sums in double.
  void (*fake_quant_backward)(const FakeQuantRows& r, int64_t n0, int64_t n1, float* grad, float* gs, float* gz);
  // Elements [0, n) of p, m, v with gradient g.
  void (*adamw)(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& c);
};

// How the loops share the threads: parts of `sizes` elements laid end to end, that range split by at::parallel_for
// with this grain, and fn(j, b, e) called for each piece [b, e) of part j (offsets within the part). A share may end
// inside a part; each element is in exactly one piece.
void parallel_over_parts(const std::vector<int64_t>& sizes, int64_t grain,
                         const std::function<void(size_t j, int64_t b, int64_t e)>& fn);

const TrainLoops& best_train_loops();
const TrainLoops& scalar_train_loops();
// nullptr when the CPU (or the build's target) lacks the instruction set.
const TrainLoops* avx2_train_loops();
const TrainLoops* avx512_train_loops();

}  // namespace eqat
