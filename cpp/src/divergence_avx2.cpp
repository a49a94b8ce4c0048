// AVX2 + FMA divergence kernels, 4 float64 lanes. Compiled with AVX2 flags (by file name); only
// reached through divergence_kernels() when the CPU and OS support AVX2.
// No STL and no shared inline headers here (see divergence_avx512.cpp).
#include <immintrin.h>

#include "divergence_kernels.h"

namespace loramix {
namespace avx2 {
namespace {

// Same method and tables as divergence_avx512.cpp (kept as separate copies on purpose: no
// shared inline code between ISA files). Table lookups are 4-lane gathers.
alignas(32) const double kInvC[16] = {
    0x1.4e5e0a72f0539p+0, 0x1.4141414141414p+0, 0x1.3521cfb2b78c1p+0, 0x1.29e4129e4129ep+0,
    0x1.1f7047dc11f70p+0, 0x1.15b1e5f75270dp+0, 0x1.0c9714fbcda3bp+0, 0x1.0410410410410p+0,
    0x1.f07c1f07c1f08p-1, 0x1.d41d41d41d41dp-1, 0x1.bacf914c1bad0p-1, 0x1.a41a41a41a41ap-1,
    0x1.8f9c18f9c18fap-1, 0x1.7d05f417d05f4p-1, 0x1.6c16c16c16c17p-1, 0x1.5c9882b931057p-1};
alignas(32) const double kLogC[16] = {
    -0x1.1178e8227e47ap-2, -0x1.d1037f2655e7bp-3, -0x1.823c16551a3c0p-3, -0x1.365fcb0159014p-3,
    -0x1.da7276384469ep-4, -0x1.4d3115d207eacp-4, -0x1.894aa149fb34bp-5, -0x1.0205658935837p-6,
    0x1.f829b0e7832f8p-6,  0x1.6f0d28ae56b4ep-4,  0x1.29552f81ff521p-3,  0x1.9525a9cf456b6p-3,
    0x1.fb9186d5e3e29p-3,  0x1.2e8e2bae11d31p-2,  0x1.5d1bdbf5809cap-2,  0x1.89a3386c1425bp-2};

// Natural log of 4 positive finite doubles (subnormals included).
inline __m256d log_f64x4(__m256d x) {
  const __m256d sub = _mm256_cmp_pd(x, _mm256_set1_pd(0x1p-1022), _CMP_LT_OQ);
  x = _mm256_blendv_pd(x, _mm256_mul_pd(x, _mm256_set1_pd(0x1p52)), sub);
  const __m256i bits = _mm256_castpd_si256(x);
  const __m256i tmp = _mm256_sub_epi64(bits, _mm256_set1_epi64x(0x3FE8000000000000LL));
  // Arithmetic shift by 52 without AVX-512: bias into the unsigned range, shift, unbias.
  const __m256i k = _mm256_sub_epi64(
      _mm256_srli_epi64(_mm256_add_epi64(tmp, _mm256_set1_epi64x(0x4000000000000000LL)), 52),
      _mm256_set1_epi64x(1024));
  const __m256i idx = _mm256_and_si256(_mm256_srli_epi64(tmp, 48), _mm256_set1_epi64x(15));
  const __m256d z = _mm256_castsi256_pd(_mm256_sub_epi64(bits, _mm256_slli_epi64(k, 52)));
  // int64 -> double for |k| < 2^51: add the bits of 1.5 * 2^52, subtract it as a double.
  const __m256d magic = _mm256_set1_pd(0x1.8p52);
  __m256d kd = _mm256_sub_pd(
      _mm256_castsi256_pd(_mm256_add_epi64(k, _mm256_castpd_si256(magic))), magic);
  kd = _mm256_sub_pd(kd, _mm256_and_pd(sub, _mm256_set1_pd(52.0)));
  const __m256d invc = _mm256_i64gather_pd(kInvC, idx, 8);
  const __m256d logc = _mm256_i64gather_pd(kLogC, idx, 8);
  const __m256d r = _mm256_fmsub_pd(z, invc, _mm256_set1_pd(1.0));
  // log1p(r) = r + r^2 q(r), q of degree 7 (Chebyshev fit of (log1p(r) - r)/r^2 on |r| <= 0.0304,
  // mpmath; |error of log1p| < 6e-19), in two halves to shorten the dependency chain.
  const __m256d r2 = _mm256_mul_pd(r, r);
  __m256d qa = _mm256_fmadd_pd(_mm256_set1_pd(0x1.9999999a37a20p-3), r, _mm256_set1_pd(-0x1.0000000056ea8p-2));
  qa = _mm256_fmadd_pd(qa, r, _mm256_set1_pd(0x1.555555555554cp-2));
  qa = _mm256_fmadd_pd(qa, r, _mm256_set1_pd(-0x1.ffffffffffff6p-2));
  __m256d qb = _mm256_fmadd_pd(_mm256_set1_pd(0x1.c7ccd3498eb7fp-4), r, _mm256_set1_pd(-0x1.0061020683dd2p-3));
  qb = _mm256_fmadd_pd(qb, r, _mm256_set1_pd(0x1.24923c1922e05p-3));
  qb = _mm256_fmadd_pd(qb, r, _mm256_set1_pd(-0x1.555546fc08723p-3));
  const __m256d q = _mm256_fmadd_pd(_mm256_mul_pd(r2, r2), qb, qa);
  const __m256d hi = _mm256_fmadd_pd(kd, _mm256_set1_pd(0x1.62e42fefa3000p-1), logc);
  const __m256d lo = _mm256_fmadd_pd(r2, q, _mm256_mul_pd(kd, _mm256_set1_pd(0x1.3de6af278ece6p-42)));
  return _mm256_add_pd(_mm256_add_pd(hi, r), lo);
}

// Lanes [0, left) set (left < 4), as a mask for maskload/maskstore.
inline __m256i tail_mask(std::size_t left) {
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(static_cast<long long>(left)), lane);
}

void log_f64_avx2(const double* x, double* y, std::size_t n) {
  std::size_t k = 0;
  for (; k + 4 <= n; k += 4) _mm256_storeu_pd(y + k, log_f64x4(_mm256_loadu_pd(x + k)));
  if (k < n) {
    const __m256i m = tail_mask(n - k);
    const __m256d v = _mm256_blendv_pd(_mm256_set1_pd(1.0), _mm256_maskload_pd(x + k, m),
                                       _mm256_castsi256_pd(m));
    _mm256_maskstore_pd(y + k, m, log_f64x4(v));
  }
}

// Up to 4 lanes of x = q (0 past `left`) and of wx, from k on.
inline void load_lanes(const double* x, const double* wx, std::size_t k, std::size_t left, __m256d* vx,
                       __m256d* vwx, __m256i* m) {
  if (left >= 4) {
    *m = _mm256_set1_epi64x(-1);
    *vx = _mm256_loadu_pd(x + k);
    *vwx = _mm256_loadu_pd(wx + k);
  } else {
    *m = tail_mask(left);
    *vx = _mm256_maskload_pd(x + k, *m);  // 0 in the unused lanes
    *vwx = _mm256_maskload_pd(wx + k, *m);
  }
}

// Adds the terms v of lanes [k, k + min(left, 4)) of a run into the accumulators: at
// base + k for a contiguous run (lanes whose q is 0 are padding: left alone), else at rows[k + l].
inline void add_lanes(__m256d v, __m256d vq, __m256i m, bool contiguous, double* base, double* acc,
                      const int32_t* rows, std::size_t k, std::size_t left) {
  if (contiguous) {
    const __m256i pres = _mm256_and_si256(
        m, _mm256_castpd_si256(_mm256_cmp_pd(vq, _mm256_setzero_pd(), _CMP_GT_OQ)));
    _mm256_maskstore_pd(base + k, pres, _mm256_add_pd(_mm256_maskload_pd(base + k, pres), v));
  } else {
    alignas(32) double val[4];
    _mm256_store_pd(val, v);
    const std::size_t e = left < 4 ? left : 4;
    for (std::size_t l = 0; l < e; ++l) acc[rows[k + l]] += val[l];
  }
}

void js_posting_f64_avx2(double p, double wp, const double* q, const double* wq,
                         const int32_t* rows, std::size_t n, double* acc) {
  if (n == 0) return;
  const __m256d vp = _mm256_set1_pd(p), vwp = _mm256_set1_pd(wp), half = _mm256_set1_pd(0.5);
  const bool contiguous = rows[n - 1] - rows[0] == static_cast<int32_t>(n - 1);
  double* base = acc + rows[0];
  for (std::size_t k = 0; k < n; k += 4) {
    const std::size_t left = n - k;
    __m256d vq, vwq;
    __m256i m;
    load_lanes(q, wq, k, left, &vq, &vwq, &m);  // unused lanes: mid = p / 2 > 0
    const __m256d mid = _mm256_mul_pd(half, _mm256_add_pd(vp, vq));
    const __m256d v = _mm256_fnmadd_pd(mid, log_f64x4(mid), _mm256_add_pd(vwp, vwq));
    add_lanes(v, vq, m, contiguous, base, acc, rows, k, left);
  }
}

void js_sym_bin_f64_avx2(const double* h, const double* w, const int32_t* rows, std::size_t zs,
                         std::size_t ze, std::size_t n, bool contiguous, int64_t i0, std::size_t N,
                         double* acc) {
  for (std::size_t z = zs; z < ze; ++z) {
    if (!(h[z] > 0.0)) continue;  // padding of a contiguous run
    double* a = acc + (rows[z] - i0) * static_cast<int64_t>(N);
    const __m256d vh = _mm256_set1_pd(h[z]), vw = _mm256_set1_pd(w[z]);
    for (std::size_t k = z + 1; k < n; k += 4) {
      const std::size_t left = n - k;
      __m256d vq, vwq;
      __m256i m;
      load_lanes(h, w, k, left, &vq, &vwq, &m);  // unused lanes: mid = h[z] > 0
      const __m256d mid = _mm256_add_pd(vh, vq);
      const __m256d v = _mm256_fnmadd_pd(mid, log_f64x4(mid), _mm256_add_pd(vw, vwq));
      add_lanes(v, vq, m, contiguous, a, a, rows, k, left);
    }
  }
}

void js_terms_f64_avx2(const double* p, const double* wp, const double* q, const double* wq,
                       std::size_t n, double* val) {
  const __m256d half = _mm256_set1_pd(0.5);
  std::size_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const __m256d mid = _mm256_mul_pd(half, _mm256_add_pd(_mm256_loadu_pd(p + k), _mm256_loadu_pd(q + k)));
    _mm256_storeu_pd(val + k, _mm256_fnmadd_pd(mid, log_f64x4(mid), _mm256_add_pd(_mm256_loadu_pd(wp + k),
                                                                                   _mm256_loadu_pd(wq + k))));
  }
  if (k < n) {
    const __m256i m = tail_mask(n - k);
    // unused lanes: p = q = 1 keeps the log's argument positive
    const __m256d one = _mm256_set1_pd(1.0);
    const __m256d vp = _mm256_blendv_pd(one, _mm256_maskload_pd(p + k, m), _mm256_castsi256_pd(m));
    const __m256d vq = _mm256_blendv_pd(one, _mm256_maskload_pd(q + k, m), _mm256_castsi256_pd(m));
    const __m256d mid = _mm256_mul_pd(half, _mm256_add_pd(vp, vq));
    const __m256d v = _mm256_fnmadd_pd(mid, log_f64x4(mid), _mm256_add_pd(_mm256_maskload_pd(wp + k, m),
                                                                         _mm256_maskload_pd(wq + k, m)));
    _mm256_maskstore_pd(val + k, m, v);
  }
}

void js_row_f64_avx2(const double* x, std::size_t n, double sum, double eps, double* p, double* w,
                     double* u) {
  const __m256d vs = _mm256_set1_pd(sum), ve = _mm256_set1_pd(eps), ve2 = _mm256_set1_pd(2.0 * eps);
  const __m256d two = _mm256_set1_pd(2.0), half = _mm256_set1_pd(0.5), one = _mm256_set1_pd(1.0);
  const bool pos = eps > 0.0;
  for (std::size_t k = 0; k < n; k += 4) {
    const __m256i m = n - k >= 4 ? _mm256_set1_epi64x(-1) : tail_mask(n - k);
    // unused lanes: x = sum, a = 1
    const __m256d xv = _mm256_blendv_pd(vs, _mm256_maskload_pd(x + k, m), _mm256_castsi256_pd(m));
    const __m256d a = _mm256_div_pd(xv, vs);
    const __m256d pk = _mm256_add_pd(a, ve), d = _mm256_add_pd(a, ve2);
    const __m256d l1 = log_f64x4(_mm256_div_pd(_mm256_mul_pd(two, pk), d));
    const __m256d l2 = log_f64x4(pos ? _mm256_div_pd(ve2, d) : one);
    const __m256d uk = _mm256_mul_pd(half, _mm256_add_pd(_mm256_mul_pd(pk, l1), _mm256_mul_pd(ve, l2)));
    const __m256d wk = _mm256_sub_pd(_mm256_mul_pd(_mm256_mul_pd(half, pk), log_f64x4(pk)), uk);
    _mm256_maskstore_pd(p + k, m, pk);
    _mm256_maskstore_pd(u + k, m, uk);
    _mm256_maskstore_pd(w + k, m, wk);
  }
}

bool check_row_f64_avx2(const int32_t* idx, const double* x, std::size_t n, int64_t cols,
                        int64_t* npos) {
  // columns: signed > the previous one (the lane before, or the last of the previous vector;
  // -1 before the first) and, as cols - 1 >= col, < cols; col >= 0 follows from col > -1 ... > prev
  const __m128i vmax = _mm_set1_epi32(static_cast<int32_t>(cols - 1));
  const __m256d zero = _mm256_setzero_pd(), inf = _mm256_set1_pd(__builtin_inf());
  __m128i prev = _mm_set1_epi32(-1), badc = _mm_setzero_si128();
  __m256d badv = _mm256_setzero_pd();
  int64_t c = 0;
  std::size_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const __m128i col = _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + k));
    const __m128i before = _mm_alignr_epi8(col, prev, 12);  // [prev[3], col[0..2]]
    badc = _mm_or_si128(badc, _mm_or_si128(_mm_cmpgt_epi32(before, col), _mm_cmpeq_epi32(before, col)));
    badc = _mm_or_si128(badc, _mm_cmpgt_epi32(col, vmax));
    const __m256d v = _mm256_loadu_pd(x + k);
    // not (v >= 0 and v < inf): NaN included
    badv = _mm256_or_pd(badv, _mm256_cmp_pd(v, zero, _CMP_NGE_UQ));
    badv = _mm256_or_pd(badv, _mm256_cmp_pd(v, inf, _CMP_NLT_UQ));
    c += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_pd(_mm256_cmp_pd(v, zero, _CMP_GT_OQ))));
    prev = col;
  }
  bool ok = _mm_movemask_epi8(badc) == 0 && _mm256_movemask_pd(badv) == 0;
  int64_t last = k ? idx[k - 1] : -1;
  for (; k < n; ++k) {
    const int64_t col = idx[k];
    ok &= (col > last) & (col < cols) & (x[k] >= 0.0) & (x[k] < __builtin_inf());
    last = col;
    c += x[k] > 0.0;
  }
  *npos = c;
  return ok;
}

void kl_terms_f64_avx2(const double* c, const double* a, const double* y, std::size_t n, double* val) {
  // fused, as kl_posting_f64_avx2
  for (std::size_t k = 0; k < n; ++k) val[k] = __builtin_fma(-a[k], y[k], c[k]);
}

void kl_posting_f64_avx2(double c, double a, const double* y, const int32_t* rows, std::size_t n,
                         double* acc) {
  if (n == 0) return;
  const bool contiguous = rows[n - 1] - rows[0] == static_cast<int32_t>(n - 1);
  if (contiguous) {
    double* base = acc + rows[0];
    const __m256d vc = _mm256_set1_pd(c), va = _mm256_set1_pd(a);
    std::size_t k = 0;
    for (; k + 4 <= n; k += 4)
      _mm256_storeu_pd(base + k, _mm256_add_pd(_mm256_loadu_pd(base + k),
                                               _mm256_fnmadd_pd(va, _mm256_loadu_pd(y + k), vc)));
    for (; k < n; ++k) base[k] += __builtin_fma(-a, y[k], c);
  } else {
    for (std::size_t k = 0; k < n; ++k) acc[rows[k]] += __builtin_fma(-a, y[k], c);
  }
}

void js_dense_f64_avx2(const double* const* p, const double* const* hp, int nb, const double* q,
                       const double* hq, std::size_t n, double* sums) {
  const __m256d half = _mm256_set1_pd(0.5), one = _mm256_set1_pd(1.0), zero = _mm256_setzero_pd();
  for (int b = 0; b < nb; ++b) {
    const double* pb = p[b];
    const double* hb = hp[b];
    // Two accumulators: the adds of consecutive vectors do not wait on each other.
    __m256d s0 = zero, s1 = zero;
    std::size_t k = 0;
    for (; k + 4 <= n; k += 4) {
      const __m256d mid = _mm256_mul_pd(half, _mm256_add_pd(_mm256_loadu_pd(pb + k), _mm256_loadu_pd(q + k)));
      const __m256d pos = _mm256_cmp_pd(mid, zero, _CMP_GT_OQ);
      const __m256d lm = log_f64x4(_mm256_blendv_pd(one, mid, pos));  // log 1 = 0 where m = 0
      const __m256d v = _mm256_fnmadd_pd(mid, lm, _mm256_add_pd(_mm256_loadu_pd(hb + k), _mm256_loadu_pd(hq + k)));
      if ((k / 4) & 1) s1 = _mm256_add_pd(s1, v); else s0 = _mm256_add_pd(s0, v);
    }
    if (k < n) {
      const __m256i m = tail_mask(n - k);
      const __m256d mid = _mm256_mul_pd(half, _mm256_add_pd(_mm256_maskload_pd(pb + k, m), _mm256_maskload_pd(q + k, m)));
      const __m256d pos = _mm256_cmp_pd(mid, zero, _CMP_GT_OQ);
      const __m256d lm = log_f64x4(_mm256_blendv_pd(one, mid, pos));
      const __m256d v = _mm256_fnmadd_pd(mid, lm, _mm256_add_pd(_mm256_maskload_pd(hb + k, m), _mm256_maskload_pd(hq + k, m)));
      s0 = _mm256_add_pd(s0, v);  // unused lanes: mid = 0, h = 0 -> 0
    }
    alignas(32) double t[4];
    _mm256_store_pd(t, _mm256_add_pd(s0, s1));
    sums[b] += (t[0] + t[1]) + (t[2] + t[3]);
  }
}

void kl_dense_f64_avx2(const double* const* p, const double* const* lp, int nb, const double* lq,
                       std::size_t n, double* sums) {
  const __m256d zero = _mm256_setzero_pd();
  for (int b = 0; b < nb; ++b) {
    const double* pb = p[b];
    const double* lb = lp[b];
    __m256d s0 = zero, s1 = zero;
    std::size_t k = 0;
    for (; k + 4 <= n; k += 4) {
      const __m256d vp = _mm256_loadu_pd(pb + k);
      const __m256d pos = _mm256_cmp_pd(vp, zero, _CMP_GT_OQ);  // 0 log 0 = 0
      const __m256d v = _mm256_and_pd(pos, _mm256_mul_pd(vp, _mm256_sub_pd(_mm256_loadu_pd(lb + k), _mm256_loadu_pd(lq + k))));
      if ((k / 4) & 1) s1 = _mm256_add_pd(s1, v); else s0 = _mm256_add_pd(s0, v);
    }
    alignas(32) double t[4];
    _mm256_store_pd(t, _mm256_add_pd(s0, s1));
    double s = (t[0] + t[1]) + (t[2] + t[3]);
    for (; k < n; ++k)
      if (pb[k] > 0.0) s += pb[k] * (lb[k] - lq[k]);
    sums[b] += s;
  }
}

// As in the AVX-512 file: rows in register-blocked groups (here of up to 4), each vector of the
// R row's CDF loaded once for the group, one accumulator per row.
template <int NB>
inline void wd_rows_f64x4(const double* const* phi, const double* const* plo, const double* qhi,
                          const double* qlo, std::size_t n, double* sums) {
  const __m256d sign = _mm256_set1_pd(-0.0);
  __m256d s[NB];
  for (int b = 0; b < NB; ++b) s[b] = _mm256_setzero_pd();
  std::size_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const __m256d qh = _mm256_loadu_pd(qhi + k), ql = _mm256_loadu_pd(qlo + k);
    for (int b = 0; b < NB; ++b) {
      const __m256d d = _mm256_add_pd(_mm256_sub_pd(_mm256_loadu_pd(phi[b] + k), qh),
                                      _mm256_sub_pd(_mm256_loadu_pd(plo[b] + k), ql));
      s[b] = _mm256_add_pd(s[b], _mm256_andnot_pd(sign, d));
    }
  }
  for (int b = 0; b < NB; ++b) {
    alignas(32) double t[4];
    _mm256_store_pd(t, s[b]);
    double v = (t[0] + t[1]) + (t[2] + t[3]);
    for (std::size_t r = k; r < n; ++r) {
      const double d = (phi[b][r] - qhi[r]) + (plo[b][r] - qlo[r]);
      v += d < 0.0 ? -d : d;
    }
    sums[b] += v;
  }
}

void wd_dense_f64_avx2(const double* const* phi, const double* const* plo, int nb,
                       const double* qhi, const double* qlo, std::size_t n, double* sums) {
  int b = 0;
  for (; b + 4 <= nb; b += 4) wd_rows_f64x4<4>(phi + b, plo + b, qhi, qlo, n, sums + b);
  for (; b < nb; ++b) wd_rows_f64x4<1>(phi + b, plo + b, qhi, qlo, n, sums + b);
}

const DivergenceKernels kKernels{
    log_f64_avx2,  // log_f64
    log_f64_avx2,  // log_abs_f64
    js_posting_f64_avx2,  // js_posting_f64
    js_sym_bin_f64_avx2,  // js_sym_bin_f64
    kl_posting_f64_avx2,  // kl_posting_f64
    js_terms_f64_avx2,  // js_terms_f64
    js_row_f64_avx2,  // js_row_f64
    check_row_f64_avx2,  // check_row_f64
    kl_terms_f64_avx2,  // kl_terms_f64
    js_dense_f64_avx2,  // js_dense_f64
    kl_dense_f64_avx2,  // kl_dense_f64
    wd_dense_f64_avx2,  // wd_dense_f64
};

}  // namespace

const DivergenceKernels& divergence_kernels() { return kKernels; }

}  // namespace avx2
}  // namespace loramix
