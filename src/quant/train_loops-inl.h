// The loops of train_loops.h, written once over a vector type S and included by one file per instruction set
// (train_loops.cpp, train_loops_avx2.cpp, train_loops_avx512.cpp), each inside its own namespace and with its own
// target options. S provides:
//   kWidth; V (kWidth floats), M (a lane mask), D (kWidth double accumulators);
//   load/store/set1, add/sub/mul/div/sqrt (IEEE, lane by lane), min(a, b) = a < b ? a : b and
//   max(a, b) = a > b ? a : b (x86's minps/maxps: b when either is NaN), eq(a, b) (ordered a == b),
//   keep(m, x) = m ? x : +0, drop(m, x) = m ? +0 : x, dzero(), dot(acc, a, b) = acc + double(a)·double(b) per lane,
//   and hsum(acc).
// Scalar is the one-lane S; the wide variants run their vector loop and hand the ragged end of a group (or of an
// AdamW range) to Scalar, whose float operations are the same.
// No include guard: each including file compiles it once, into its own namespace.
// NOLINTBEGIN(build/include_what_you_use)

struct Scalar {
  static constexpr int64_t kWidth = 1;
  using V = float;
  using M = bool;
  using D = double;
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V sqrt(V a) { return std::sqrt(a); }
  static V min(V a, V b) { return a < b ? a : b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static M eq(V a, V b) { return a == b; }
  static V keep(M m, V x) { return m ? x : 0.0f; }
  static V drop(M m, V x) { return m ? 0.0f : x; }
  static D dzero() { return 0.0; }
  static D dot(D acc, V a, V b) { return acc + static_cast<double>(a) * static_cast<double>(b); }
  static double hsum(D acc) { return acc; }
};

// Round half to even for |u| ≤ 2^22 by adding and subtracting 1.5·2^23 (in float's default rounding mode; the
// compiler may not fold the pair under IEEE rules). Larger |u| is first clamped to ±2^22: the zero point is at
// most 255 (8 bits), so such a u lands on 0 or qmax after the clamp either way, exactly where torch.round's
// integer would.
template <class S>
struct FakeQuantLanes {
  typename S::V s1, z1, qmax, zero, lo, hi, magic;
  FakeQuantLanes(float s, float z, float q)
      : s1(S::set1(s)), z1(S::set1(z)), qmax(S::set1(q)), zero(S::set1(0.0f)), lo(S::set1(-4194304.0f)),
        hi(S::set1(4194304.0f)), magic(S::set1(12582912.0f)) {}
  typename S::V round(typename S::V u) const {
    const typename S::V c = S::min(hi, S::max(lo, u));
    return S::sub(S::add(c, magic), magic);
  }
  // q = clamp(round(u) + z', 0, qmax), with round(u) + z' in *pre.
  typename S::V integer(typename S::V u, typename S::V* pre) const {
    *pre = S::add(round(u), z1);
    return S::min(qmax, S::max(zero, *pre));
  }
};

// Ŵ over w[k0, k1) of one group; returns where the vector loop stopped.
template <class S>
int64_t fake_quant_span(const float* w, float* out, int64_t k0, int64_t k1, const FakeQuantGroup& grp, float qmax) {
  const FakeQuantLanes<S> l(grp.s1, grp.z1, qmax);
  int64_t k = k0;
  for (; k + S::kWidth <= k1; k += S::kWidth) {
    typename S::V pre;
    const typename S::V q = l.integer(S::div(S::load(w + k), l.s1), &pre);
    S::store(out + k, S::mul(S::sub(q, l.z1), l.s1));
  }
  return k;
}

// The STE backward over one group's [k0, k1): rewrites grad, adds to the two double sums; returns where it stopped.
template <class S>
int64_t fake_quant_backward_span(const float* w, float* grad, int64_t k0, int64_t k1, const FakeQuantGroup& grp,
                                 float qmax, double* sum_s, double* sum_out) {
  const FakeQuantLanes<S> l(grp.s1, grp.z1, qmax);
  typename S::D acc_s = S::dzero(), acc_out = S::dzero();
  int64_t k = k0;
  for (; k + S::kWidth <= k1; k += S::kWidth) {
    const typename S::V u = S::div(S::load(w + k), l.s1);
    typename S::V pre;
    const typename S::V q = l.integer(u, &pre);
    const typename S::M in = S::eq(pre, q);
    const typename S::V gk = S::load(grad + k);
    acc_s = S::dot(acc_s, gk, S::sub(S::sub(q, l.z1), S::keep(in, u)));
    acc_out = S::dot(acc_out, S::drop(in, gk), l.s1);
    S::store(grad + k, S::keep(in, gk));
  }
  *sum_s += S::hsum(acc_s);
  *sum_out += S::hsum(acc_out);
  return k;
}

template <class S>
void fake_quant_rows(const FakeQuantRows& r, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t gi = 0; gi < r.G; ++gi) {
      const FakeQuantGroup grp(r.s[n * r.G + gi], r.z[n * r.G + gi], r.zero_min, r.qmax, r.scale_min, r.scale_max);
      const int64_t k0 = n * r.K + gi * r.g, k1 = n * r.K + std::min(r.K, (gi + 1) * r.g);
      fake_quant_span<Scalar>(r.w, out, fake_quant_span<S>(r.w, out, k0, k1, grp, r.qmax), k1, grp, r.qmax);
    }
}

template <class S>
void fake_quant_backward_rows(const FakeQuantRows& r, int64_t n0, int64_t n1, float* grad, float* gs, float* gz) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t gi = 0; gi < r.G; ++gi) {
      const FakeQuantGroup grp(r.s[n * r.G + gi], r.z[n * r.G + gi], r.zero_min, r.qmax, r.scale_min, r.scale_max);
      const int64_t k0 = n * r.K + gi * r.g, k1 = n * r.K + std::min(r.K, (gi + 1) * r.g);
      double sum_s = 0, sum_out = 0;
      const int64_t k = fake_quant_backward_span<S>(r.w, grad, k0, k1, grp, r.qmax, &sum_s, &sum_out);
      fake_quant_backward_span<Scalar>(r.w, grad, k, k1, grp, r.qmax, &sum_s, &sum_out);
      gs[n * r.G + gi] = static_cast<float>(sum_s);
      gz[n * r.G + gi] = static_cast<float>(0.0 - sum_out);  // +0 when nothing clipped, as a running 0 − … gives
    }
}

template <class S>
int64_t adamw_span(float* p, const float* g, float* m, float* v, int64_t i0, int64_t n, const AdamWStep& c) {
  const typename S::V b1 = S::set1(c.b1), b2 = S::set1(c.b2), c1 = S::set1(c.c1), c2 = S::set1(c.c2),
                      decay = S::set1(c.decay), sqrt_bc2 = S::set1(c.sqrt_bc2), eps = S::set1(c.eps),
                      step = S::set1(c.step);
  int64_t i = i0;
  for (; i + S::kWidth <= n; i += S::kWidth) {
    const typename S::V gi = S::load(g + i);
    const typename S::V mi = S::add(S::mul(S::load(m + i), b1), S::mul(gi, c1));
    const typename S::V vi = S::add(S::mul(S::load(v + i), b2), S::mul(S::mul(gi, gi), c2));
    const typename S::V denom = S::add(S::div(S::sqrt(vi), sqrt_bc2), eps);
    S::store(p + i, S::add(S::mul(S::load(p + i), decay), S::mul(step, S::div(mi, denom))));
    S::store(m + i, mi);
    S::store(v + i, vi);
  }
  return i;
}

template <class S>
void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& c) {
  adamw_span<Scalar>(p, g, m, v, adamw_span<S>(p, g, m, v, 0, n, c), n, c);
}

template <class S>
TrainLoops make_train_loops(const char* isa) {
  return TrainLoops{isa, &fake_quant_rows<S>, &fake_quant_backward_rows<S>, &adamw<S>};
}

// NOLINTEND(build/include_what_you_use)
