// AVX-512 (F/DQ) divergence kernels, 8 float64 lanes. Compiled with AVX-512 flags (by file
// name); only reached through divergence_kernels() when the CPU and OS support AVX-512.
// No STL and no shared inline headers here (an AVX-512 copy of an inline function must never
// be linked into the baseline path).
// GCC 12 reports false -Wmaybe-uninitialized inside its own avx512fintrin.h (the "undefined"
// pass-through operand of unmasked shifts/extracts); nothing in this file is uninitialized.
// (and -Wuninitialized for the same operand once _mm512_reduce_add_pd is inlined into a template)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "divergence_kernels.h"

namespace loramix {
namespace avx512 {
namespace {

// log(x) = k ln2 + log(c_i) + log1p(r), x = z 2^k, z in [0.75, 1.5), c_i the centre of one of 16
// sub-intervals of z picked by the top 4 mantissa bits of bits(x) - bits(0.75), r = z/c_i - 1
// (|r| <= 0.0303, one FMA), log1p by a degree-9 polynomial (Chebyshev fit, error < 6e-19).
// Tables generated with mpmath (logc correctly rounded from the rounded 1/c).
alignas(64) const double kInvC[16] = {
    0x1.4e5e0a72f0539p+0, 0x1.4141414141414p+0, 0x1.3521cfb2b78c1p+0, 0x1.29e4129e4129ep+0,
    0x1.1f7047dc11f70p+0, 0x1.15b1e5f75270dp+0, 0x1.0c9714fbcda3bp+0, 0x1.0410410410410p+0,
    0x1.f07c1f07c1f08p-1, 0x1.d41d41d41d41dp-1, 0x1.bacf914c1bad0p-1, 0x1.a41a41a41a41ap-1,
    0x1.8f9c18f9c18fap-1, 0x1.7d05f417d05f4p-1, 0x1.6c16c16c16c17p-1, 0x1.5c9882b931057p-1};
alignas(64) const double kLogC[16] = {
    -0x1.1178e8227e47ap-2, -0x1.d1037f2655e7bp-3, -0x1.823c16551a3c0p-3, -0x1.365fcb0159014p-3,
    -0x1.da7276384469ep-4, -0x1.4d3115d207eacp-4, -0x1.894aa149fb34bp-5, -0x1.0205658935837p-6,
    0x1.f829b0e7832f8p-6,  0x1.6f0d28ae56b4ep-4,  0x1.29552f81ff521p-3,  0x1.9525a9cf456b6p-3,
    0x1.fb9186d5e3e29p-3,  0x1.2e8e2bae11d31p-2,  0x1.5d1bdbf5809cap-2,  0x1.89a3386c1425bp-2};

struct LogTables {
  __m512d invc_lo, invc_hi, logc_lo, logc_hi;
};

inline LogTables load_tables() {
  return {_mm512_load_pd(kInvC), _mm512_load_pd(kInvC + 8), _mm512_load_pd(kLogC),
          _mm512_load_pd(kLogC + 8)};
}

// Natural log of 8 positive finite doubles (subnormals included: vgetexp/vgetmant normalize them).
inline __m512d log_f64x8(__m512d x, const LogTables& t) {
  const __m512d z = _mm512_getmant_pd(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);  // [0.75, 1.5)
  __m512d kd = _mm512_getexp_pd(x);                                                   // floor(log2 x)
  // z < 1 means the [1, 2) mantissa was >= 1.5 and got halved: x = z 2^(e + 1).
  kd = _mm512_mask_add_pd(kd, _mm512_cmp_pd_mask(z, _mm512_set1_pd(1.0), _CMP_LT_OQ), kd,
                          _mm512_set1_pd(1.0));
  // Top 4 mantissa bits of bits(z) - bits(0.75); vpermt2pd reads only the low 4 index bits.
  const __m512i idx = _mm512_srli_epi64(
      _mm512_sub_epi64(_mm512_castpd_si512(z), _mm512_set1_epi64(0x3FE8000000000000LL)), 48);
  const __m512d invc = _mm512_permutex2var_pd(t.invc_lo, idx, t.invc_hi);
  const __m512d logc = _mm512_permutex2var_pd(t.logc_lo, idx, t.logc_hi);
  const __m512d r = _mm512_fmsub_pd(z, invc, _mm512_set1_pd(1.0));
  // log1p(r) = r + r^2 q(r), q of degree 7 (Chebyshev fit of (log1p(r) - r)/r^2 on |r| <= 0.0304,
  // mpmath; |error of log1p| < 6e-19), in two halves to shorten the dependency chain.
  const __m512d r2 = _mm512_mul_pd(r, r);
  __m512d qa = _mm512_fmadd_pd(_mm512_set1_pd(0x1.9999999a37a20p-3), r, _mm512_set1_pd(-0x1.0000000056ea8p-2));
  qa = _mm512_fmadd_pd(qa, r, _mm512_set1_pd(0x1.555555555554cp-2));
  qa = _mm512_fmadd_pd(qa, r, _mm512_set1_pd(-0x1.ffffffffffff6p-2));
  __m512d qb = _mm512_fmadd_pd(_mm512_set1_pd(0x1.c7ccd3498eb7fp-4), r, _mm512_set1_pd(-0x1.0061020683dd2p-3));
  qb = _mm512_fmadd_pd(qb, r, _mm512_set1_pd(0x1.24923c1922e05p-3));
  qb = _mm512_fmadd_pd(qb, r, _mm512_set1_pd(-0x1.555546fc08723p-3));
  const __m512d q = _mm512_fmadd_pd(_mm512_mul_pd(r2, r2), qb, qa);
  const __m512d hi = _mm512_fmadd_pd(kd, _mm512_set1_pd(0x1.62e42fefa3000p-1), logc);
  const __m512d lo = _mm512_fmadd_pd(r2, q, _mm512_mul_pd(kd, _mm512_set1_pd(0x1.3de6af278ece6p-42)));
  return _mm512_add_pd(_mm512_add_pd(hi, r), lo);
}

// m log m needs log m to a small ABSOLUTE error only (js sums m log m with m <= 1 over the
// shared bins, sum m <= 1): a cheaper variant for the js inner loop, 16 vector uops instead of
// 23. x = z 2^e with z in [1, 2) (vgetmant/vgetexp), c_i the centre of one of 16
// sub-intervals of z picked by its top 4 mantissa bits (no sign/offset arithmetic needed:
// vpermt2pd reads only the low 4 index bits), r = z/c_i - 1 (|r| <= 0.0304, one FMA),
// log1p(r) = r + r^2 q(r), q of degree 6 by Horner (Chebyshev fit, mpmath: |error| < 4e-17).
// Error on 0 < x <= 1: < 1.5 ulp of the result, or < 2.5e-16 absolute where |log x| < 1;
// relative accuracy is lost just below x = 1, where log x -> 0 (why log_f64 keeps the other form).
alignas(64) const double kInvC1[16] = {
    0x1.f07c1f07c1f08p-1, 0x1.d41d41d41d41dp-1, 0x1.bacf914c1bad0p-1, 0x1.a41a41a41a41ap-1,
    0x1.8f9c18f9c18fap-1, 0x1.7d05f417d05f4p-1, 0x1.6c16c16c16c17p-1, 0x1.5c9882b931057p-1,
    0x1.4e5e0a72f0539p-1, 0x1.4141414141414p-1, 0x1.3521cfb2b78c1p-1, 0x1.29e4129e4129ep-1,
    0x1.1f7047dc11f70p-1, 0x1.15b1e5f75270dp-1, 0x1.0c9714fbcda3bp-1, 0x1.0410410410410p-1};
// -log(kInvC1[i]) correctly rounded (mpmath).
alignas(64) const double kLogC1[16] = {
    0x1.f829b0e7832f8p-6, 0x1.6f0d28ae56b4ep-4, 0x1.29552f81ff521p-3, 0x1.9525a9cf456b6p-3,
    0x1.fb9186d5e3e29p-3, 0x1.2e8e2bae11d31p-2, 0x1.5d1bdbf5809cap-2, 0x1.89a3386c1425bp-2,
    0x1.b44f77bcc8f64p-2, 0x1.dd46a04c1c4a1p-2, 0x1.02552a5a5d0ffp-1, 0x1.154c3d2f4d5eap-1,
    0x1.2795e1289b11bp-1, 0x1.393e0d3562a1ap-1, 0x1.4a4f85db03ebbp-1, 0x1.5ad404c359f2dp-1};

inline LogTables load_tables1() {
  return {_mm512_load_pd(kInvC1), _mm512_load_pd(kInvC1 + 8), _mm512_load_pd(kLogC1),
          _mm512_load_pd(kLogC1 + 8)};
}

// log of 8 positive finite doubles in (0, 1] (see above for the error).
inline __m512d log_abs_f64x8(__m512d x, const LogTables& t) {
  const __m512d z = _mm512_getmant_pd(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
  const __m512d kd = _mm512_getexp_pd(x);
  const __m512i idx = _mm512_srli_epi64(_mm512_castpd_si512(z), 48);
  const __m512d invc = _mm512_permutex2var_pd(t.invc_lo, idx, t.invc_hi);
  const __m512d logc = _mm512_permutex2var_pd(t.logc_lo, idx, t.logc_hi);
  const __m512d r = _mm512_fmsub_pd(z, invc, _mm512_set1_pd(1.0));
  __m512d q = _mm512_fmadd_pd(_mm512_set1_pd(-0x1.0054dfade7a97p-3), r, _mm512_set1_pd(0x1.24f09696038d8p-3));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(-0x1.55554b4a5ea90p-3));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0x1.99998e7109f14p-3));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(-0x1.000000002604fp-2));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0x1.555555557f937p-2));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(-0x1.0000000000000p-1));
  // log x = (e ln2_hi + log c) + (r + r^2 q + e ln2_lo); e ln2_hi is exact (ln2_hi has 42 bits).
  const __m512d hi = _mm512_fmadd_pd(kd, _mm512_set1_pd(0x1.62e42fefa3000p-1), logc);
  const __m512d lo = _mm512_fmadd_pd(kd, _mm512_set1_pd(0x1.3de6af278ece6p-42),
                                     _mm512_fmadd_pd(_mm512_mul_pd(r, r), q, r));
  return _mm512_add_pd(hi, lo);
}

inline __mmask8 tail_mask(std::size_t left) {
  return static_cast<__mmask8>(left >= 8 ? 0xFF : ((1u << left) - 1u));
}

void log_f64_avx512(const double* x, double* y, std::size_t n) {
  const LogTables t = load_tables();
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) _mm512_storeu_pd(y + k, log_f64x8(_mm512_loadu_pd(x + k), t));
  if (k < n) {
    const __mmask8 m = tail_mask(n - k);
    const __m512d v = _mm512_mask_loadu_pd(_mm512_set1_pd(1.0), m, x + k);
    _mm512_mask_storeu_pd(y + k, m, log_f64x8(v, t));
  }
}

void log_abs_f64_avx512(const double* x, double* y, std::size_t n) {
  const LogTables t = load_tables1();
  std::size_t k = 0;
  for (; k + 8 <= n; k += 8) _mm512_storeu_pd(y + k, log_abs_f64x8(_mm512_loadu_pd(x + k), t));
  if (k < n) {
    const __mmask8 m = tail_mask(n - k);
    const __m512d v = _mm512_mask_loadu_pd(_mm512_set1_pd(1.0), m, x + k);
    _mm512_mask_storeu_pd(y + k, m, log_abs_f64x8(v, t));
  }
}

void js_posting_f64_avx512(double p, double wp, const double* q, const double* wq,
                           const int32_t* rows, std::size_t n, double* acc) {
  if (n == 0) return;
  const LogTables t = load_tables1();
  const __m512d vp = _mm512_set1_pd(p), vwp = _mm512_set1_pd(wp), half = _mm512_set1_pd(0.5);
  // Inverted-index runs of frequent bins cover consecutive rows: plain loads/stores then.
  const bool contiguous = rows[n - 1] - rows[0] == static_cast<int32_t>(n - 1);
  if (contiguous) {
    double* base = acc + rows[0];
    for (std::size_t k = 0; k < n; k += 8) {
      const __mmask8 m = tail_mask(n - k);
      const __m512d vq = _mm512_maskz_loadu_pd(m, q + k);
      const __m512d vwq = _mm512_maskz_loadu_pd(m, wq + k);
      const __m512d mid = _mm512_mul_pd(half, _mm512_add_pd(vp, vq));  // > 0 in every lane
      const __m512d val = _mm512_fnmadd_pd(mid, log_abs_f64x8(mid, t), _mm512_add_pd(vwp, vwq));
      // may hold padding (q == 0): those lanes are left alone
      const __mmask8 pres = _mm512_mask_cmp_pd_mask(m, vq, _mm512_setzero_pd(), _CMP_GT_OQ);
      const __m512d a = _mm512_maskz_loadu_pd(pres, base + k);
      _mm512_mask_storeu_pd(base + k, pres, _mm512_add_pd(a, val));
    }
    return;
  }
  for (std::size_t k = 0; k < n; k += 8) {
    const __mmask8 m = tail_mask(n - k);
    const __m512d vq = _mm512_maskz_loadu_pd(m, q + k);
    const __m512d vwq = _mm512_maskz_loadu_pd(m, wq + k);
    const __m512d mid = _mm512_mul_pd(half, _mm512_add_pd(vp, vq));
    const __m512d val = _mm512_fnmadd_pd(mid, log_abs_f64x8(mid, t), _mm512_add_pd(vwp, vwq));
    const __m256i idx = _mm256_maskz_loadu_epi32(m, rows + k);
    const __m512d a = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m, idx, acc, 8);
    _mm512_mask_i32scatter_pd(acc, m, idx, _mm512_add_pd(a, val), 8);
  }
}

// One vector of js terms of the row with (vh, vw) against entries [k, k + 8) & m of a run.
inline __m512d js_sym_terms_f64x8(__m512d vh, __m512d vw, const double* h, const double* w,
                                  std::size_t k, __mmask8 m, const LogTables& t) {
  const __m512d mid = _mm512_add_pd(vh, _mm512_maskz_loadu_pd(m, h + k));  // > 0 in every lane
  return _mm512_fnmadd_pd(mid, log_abs_f64x8(mid, t), _mm512_add_pd(vw, _mm512_maskz_loadu_pd(m, w + k)));
}

inline void scatter_add_f64x8(double* a, const int32_t* rows, std::size_t k, __mmask8 m, __m512d val) {
  const __m256i idx = _mm256_maskz_loadu_epi32(m, rows + k);
  const __m512d s = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m, idx, a, 8);
  _mm512_mask_i32scatter_pd(a, m, idx, _mm512_add_pd(s, val), 8);
}

void js_sym_bin_f64_avx512(const double* h, const double* w, const int32_t* rows, std::size_t zs,
                           std::size_t ze, std::size_t n, bool contiguous, int64_t i0, std::size_t N,
                           double* acc) {
  const LogTables t = load_tables1();
  if (contiguous) {
    for (std::size_t z = zs; z < ze; ++z) {
      if (!(h[z] > 0.0)) continue;  // padding
      double* a = acc + (static_cast<int64_t>(z) - i0) * static_cast<int64_t>(N);  // row z
      const __m512d vh = _mm512_set1_pd(h[z]), vw = _mm512_set1_pd(w[z]);
      // Full vectors without a tail mask, then the tail (measured, 502 x 32k: -6 ms of ~180 against
      // one masked loop: the mask arithmetic took scalar uops from the vector ports).
      // Padding (h == 0) is left alone.
      std::size_t k = z + 1;
      for (; k + 8 <= n; k += 8) {
        const __m512d hk = _mm512_loadu_pd(h + k);
        const __mmask8 pres = _mm512_cmp_pd_mask(hk, _mm512_setzero_pd(), _CMP_GT_OQ);
        const __m512d mid = _mm512_add_pd(vh, hk);  // > 0 in every lane
        const __m512d val = _mm512_fnmadd_pd(mid, log_abs_f64x8(mid, t), _mm512_add_pd(vw, _mm512_loadu_pd(w + k)));
        _mm512_mask_storeu_pd(a + k, pres, _mm512_add_pd(_mm512_maskz_loadu_pd(pres, a + k), val));
      }
      if (k < n) {
        const __mmask8 m = tail_mask(n - k);
        const __mmask8 pres = _mm512_mask_cmp_pd_mask(m, _mm512_maskz_loadu_pd(m, h + k), _mm512_setzero_pd(), _CMP_GT_OQ);
        const __m512d val = js_sym_terms_f64x8(vh, vw, h, w, k, m, t);
        _mm512_mask_storeu_pd(a + k, pres, _mm512_add_pd(_mm512_maskz_loadu_pd(pres, a + k), val));
      }
    }
    return;
  }
  // Two rows at a time (z and z + 1, whose tails differ by one entry), interleaved: the loop
  // control is shared and each row's gather / scatter overlaps the other's log.
  std::size_t z = zs;
  for (; z + 1 < ze; z += 2) {
    double* a1 = acc + (rows[z] - i0) * static_cast<int64_t>(N);
    double* a2 = acc + (rows[z + 1] - i0) * static_cast<int64_t>(N);
    const __m512d vh1 = _mm512_set1_pd(h[z]), vw1 = _mm512_set1_pd(w[z]);
    const __m512d vh2 = _mm512_set1_pd(h[z + 1]), vw2 = _mm512_set1_pd(w[z + 1]);
    std::size_t k = z + 1;
    for (; k + 9 <= n; k += 8) {  // both full
      const __m512d v1 = js_sym_terms_f64x8(vh1, vw1, h, w, k, 0xFF, t);
      const __m512d v2 = js_sym_terms_f64x8(vh2, vw2, h, w, k + 1, 0xFF, t);
      scatter_add_f64x8(a1, rows, k, 0xFF, v1);
      scatter_add_f64x8(a2, rows, k + 1, 0xFF, v2);
    }
    if (k < n) {
      const __mmask8 m1 = tail_mask(n - k);
      scatter_add_f64x8(a1, rows, k, m1, js_sym_terms_f64x8(vh1, vw1, h, w, k, m1, t));
      if (k + 1 < n) {
        const __mmask8 m2 = tail_mask(n - k - 1);
        scatter_add_f64x8(a2, rows, k + 1, m2, js_sym_terms_f64x8(vh2, vw2, h, w, k + 1, m2, t));
      }
    }
  }
  if (z < ze) {
    double* a = acc + (rows[z] - i0) * static_cast<int64_t>(N);
    const __m512d vh = _mm512_set1_pd(h[z]), vw = _mm512_set1_pd(w[z]);
    std::size_t k = z + 1;
    for (; k + 8 <= n; k += 8) scatter_add_f64x8(a, rows, k, 0xFF, js_sym_terms_f64x8(vh, vw, h, w, k, 0xFF, t));
    if (k < n) {
      const __mmask8 m = tail_mask(n - k);
      scatter_add_f64x8(a, rows, k, m, js_sym_terms_f64x8(vh, vw, h, w, k, m, t));
    }
  }
}

void js_terms_f64_avx512(const double* p, const double* wp, const double* q, const double* wq,
                         std::size_t n, double* val) {
  const LogTables t = load_tables1();
  const __m512d half = _mm512_set1_pd(0.5), one = _mm512_set1_pd(1.0);
  for (std::size_t k = 0; k < n; k += 8) {
    const __mmask8 m = tail_mask(n - k);
    // unused lanes: p = q = 1 keeps the log's argument positive
    const __m512d mid = _mm512_mul_pd(
        half, _mm512_add_pd(_mm512_mask_loadu_pd(one, m, p + k), _mm512_mask_loadu_pd(one, m, q + k)));
    const __m512d w = _mm512_add_pd(_mm512_maskz_loadu_pd(m, wp + k), _mm512_maskz_loadu_pd(m, wq + k));
    _mm512_mask_storeu_pd(val + k, m, _mm512_fnmadd_pd(mid, log_abs_f64x8(mid, t), w));
  }
}

void js_row_f64_avx512(const double* x, std::size_t n, double sum, double eps, double* p, double* w,
                       double* u) {
  const LogTables t = load_tables();
  const __m512d vs = _mm512_set1_pd(sum), ve = _mm512_set1_pd(eps), ve2 = _mm512_set1_pd(2.0 * eps);
  const __m512d two = _mm512_set1_pd(2.0), half = _mm512_set1_pd(0.5), one = _mm512_set1_pd(1.0);
  const bool pos = eps > 0.0;
  for (std::size_t k = 0; k < n; k += 8) {
    const __mmask8 m = tail_mask(n - k);
    const __m512d a = _mm512_div_pd(_mm512_mask_loadu_pd(vs, m, x + k), vs);  // unused lanes: a = 1
    const __m512d pk = _mm512_add_pd(a, ve), d = _mm512_add_pd(a, ve2);
    const __m512d l1 = log_f64x8(_mm512_div_pd(_mm512_mul_pd(two, pk), d), t);
    const __m512d l2 = log_f64x8(pos ? _mm512_div_pd(ve2, d) : one, t);
    const __m512d uk = _mm512_mul_pd(half, _mm512_add_pd(_mm512_mul_pd(pk, l1), _mm512_mul_pd(ve, l2)));
    const __m512d wk = _mm512_sub_pd(_mm512_mul_pd(_mm512_mul_pd(half, pk), log_f64x8(pk, t)), uk);
    _mm512_mask_storeu_pd(p + k, m, pk);
    _mm512_mask_storeu_pd(u + k, m, uk);
    _mm512_mask_storeu_pd(w + k, m, wk);
  }
}

bool check_row_f64_avx512(const int32_t* idx, const double* x, std::size_t n, int64_t cols,
                          int64_t* npos) {
  // columns: signed > the previous one (the lane before, or the last of the previous vector;
  // -1 before the first), unsigned < cols (negative ones fail too)
  const __m256i vcols = _mm256_set1_epi32(static_cast<int32_t>(cols));
  const __m512d zero = _mm512_setzero_pd(), inf = _mm512_set1_pd(__builtin_inf());
  __m256i prev = _mm256_set1_epi32(-1);
  __mmask8 bad = 0;
  int64_t c = 0;
  for (std::size_t k = 0; k < n; k += 8) {
    const __mmask8 m = tail_mask(n - k);
    const __m256i col = _mm256_maskz_loadu_epi32(m, idx + k);
    const __m256i before = _mm256_alignr_epi32(col, prev, 7);  // [prev[7], col[0..6]]
    const __m512d v = _mm512_maskz_loadu_pd(m, x + k);
    const __mmask8 ok = _mm256_cmpgt_epi32_mask(col, before) & _mm256_cmplt_epu32_mask(col, vcols) &
                        _mm512_cmp_pd_mask(v, zero, _CMP_GE_OQ) & _mm512_cmp_pd_mask(v, inf, _CMP_LT_OQ);
    bad |= static_cast<__mmask8>(m & ~ok);
    c += __builtin_popcount(_mm512_mask_cmp_pd_mask(m, v, zero, _CMP_GT_OQ));
    prev = col;
  }
  *npos = c;
  return bad == 0;
}

void kl_terms_f64_avx512(const double* c, const double* a, const double* y, std::size_t n, double* val) {
  for (std::size_t k = 0; k < n; k += 8) {
    const __mmask8 m = tail_mask(n - k);
    const __m512d v = _mm512_fnmadd_pd(_mm512_maskz_loadu_pd(m, a + k), _mm512_maskz_loadu_pd(m, y + k),
                                       _mm512_maskz_loadu_pd(m, c + k));
    _mm512_mask_storeu_pd(val + k, m, v);
  }
}

void kl_posting_f64_avx512(double c, double a, const double* y, const int32_t* rows, std::size_t n,
                           double* acc) {
  if (n == 0) return;
  const __m512d vc = _mm512_set1_pd(c), va = _mm512_set1_pd(a);
  const bool contiguous = rows[n - 1] - rows[0] == static_cast<int32_t>(n - 1);
  double* base = acc + rows[0];
  for (std::size_t k = 0; k < n; k += 8) {
    const __mmask8 m = tail_mask(n - k);
    const __m512d val = _mm512_fnmadd_pd(va, _mm512_maskz_loadu_pd(m, y + k), vc);
    if (contiguous) {
      const __m512d s = _mm512_maskz_loadu_pd(m, base + k);
      _mm512_mask_storeu_pd(base + k, m, _mm512_add_pd(s, val));
    } else {
      const __m256i idx = _mm256_maskz_loadu_epi32(m, rows + k);
      const __m512d s = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m, idx, acc, 8);
      _mm512_mask_i32scatter_pd(acc, m, idx, _mm512_add_pd(s, val), 8);
    }
  }
}

void js_dense_f64_avx512(const double* const* p, const double* const* hp, int nb, const double* q,
                         const double* hq, std::size_t n, double* sums) {
  const LogTables t = load_tables();
  const __m512d half = _mm512_set1_pd(0.5), one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd();
  for (int b = 0; b < nb; ++b) {
    const double* pb = p[b];
    const double* hb = hp[b];
    // Two accumulators: the adds of consecutive vectors do not wait on each other.
    __m512d s0 = zero, s1 = zero;
    for (std::size_t k = 0; k < n; k += 8) {
      const __mmask8 m = tail_mask(n - k);
      const __m512d mid = _mm512_mul_pd(
          half, _mm512_add_pd(_mm512_maskz_loadu_pd(m, pb + k), _mm512_maskz_loadu_pd(m, q + k)));
      const __mmask8 pos = _mm512_cmp_pd_mask(mid, zero, _CMP_GT_OQ);
      const __m512d lm = log_f64x8(_mm512_mask_blend_pd(pos, one, mid), t);  // log 1 = 0 where m = 0
      const __m512d h = _mm512_add_pd(_mm512_maskz_loadu_pd(m, hb + k), _mm512_maskz_loadu_pd(m, hq + k));
      const __m512d val = _mm512_fnmadd_pd(mid, lm, h);
      if ((k / 8) & 1) s1 = _mm512_add_pd(s1, val); else s0 = _mm512_add_pd(s0, val);
    }
    sums[b] += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  }
}

void kl_dense_f64_avx512(const double* const* p, const double* const* lp, int nb,
                         const double* lq, std::size_t n, double* sums) {
  const __m512d zero = _mm512_setzero_pd();
  for (int b = 0; b < nb; ++b) {
    const double* pb = p[b];
    const double* lb = lp[b];
    __m512d s0 = zero, s1 = zero;
    for (std::size_t k = 0; k < n; k += 8) {
      const __mmask8 m = tail_mask(n - k);
      const __m512d vp = _mm512_maskz_loadu_pd(m, pb + k);
      const __mmask8 pos = _mm512_cmp_pd_mask(vp, zero, _CMP_GT_OQ);  // 0 log 0 = 0
      const __m512d d = _mm512_sub_pd(_mm512_maskz_loadu_pd(pos, lb + k), _mm512_maskz_loadu_pd(pos, lq + k));
      const __m512d val = _mm512_maskz_mul_pd(pos, vp, d);
      if ((k / 8) & 1) s1 = _mm512_add_pd(s1, val); else s0 = _mm512_add_pd(s0, val);
    }
    sums[b] += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  }
}

// Rows in register-blocked groups of up to 8: each vector of the R row's CDF is loaded once and
// used by every row of the group (one accumulator per row: the group's independent adds hide
// each other's latency). The loads, not the 5 vector ops per 8 bins, were the limit.
template <int NB>
inline void wd_rows_f64x8(const double* const* phi, const double* const* plo, const double* qhi,
                          const double* qlo, std::size_t n, double* sums) {
  __m512d s[NB];
  for (int b = 0; b < NB; ++b) s[b] = _mm512_setzero_pd();
  for (std::size_t k = 0; k < n; k += 8) {
    const __mmask8 m = tail_mask(n - k);
    const __m512d qh = _mm512_maskz_loadu_pd(m, qhi + k), ql = _mm512_maskz_loadu_pd(m, qlo + k);
    for (int b = 0; b < NB; ++b) {
      const __m512d d = _mm512_add_pd(_mm512_sub_pd(_mm512_maskz_loadu_pd(m, phi[b] + k), qh),
                                      _mm512_sub_pd(_mm512_maskz_loadu_pd(m, plo[b] + k), ql));
      s[b] = _mm512_add_pd(s[b], _mm512_abs_pd(d));
    }
  }
  for (int b = 0; b < NB; ++b) sums[b] += _mm512_reduce_add_pd(s[b]);
}

void wd_dense_f64_avx512(const double* const* phi, const double* const* plo, int nb,
                         const double* qhi, const double* qlo, std::size_t n, double* sums) {
  int b = 0;
  for (; b + 8 <= nb; b += 8) wd_rows_f64x8<8>(phi + b, plo + b, qhi, qlo, n, sums + b);
  for (; b + 4 <= nb; b += 4) wd_rows_f64x8<4>(phi + b, plo + b, qhi, qlo, n, sums + b);
  for (; b < nb; ++b) wd_rows_f64x8<1>(phi + b, plo + b, qhi, qlo, n, sums + b);
}

const DivergenceKernels kKernels{
    log_f64_avx512,  // log_f64
    log_abs_f64_avx512,  // log_abs_f64
    js_posting_f64_avx512,  // js_posting_f64
    js_sym_bin_f64_avx512,  // js_sym_bin_f64
    kl_posting_f64_avx512,  // kl_posting_f64
    js_terms_f64_avx512,  // js_terms_f64
    js_row_f64_avx512,  // js_row_f64
    check_row_f64_avx512,  // check_row_f64
    kl_terms_f64_avx512,  // kl_terms_f64
    js_dense_f64_avx512,  // js_dense_f64
    kl_dense_f64_avx512,  // kl_dense_f64
    wd_dense_f64_avx512,  // wd_dense_f64
};

}  // namespace

const DivergenceKernels& divergence_kernels() { return kKernels; }

}  // namespace avx512
}  // namespace loramix
