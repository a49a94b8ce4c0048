// Portable scalar divergence kernels: the reference every SIMD variant is compared with (through
// the float64 oracle in tests). std::log, one bin at a time, fixed summation order.
#include <math.h>

#include "divergence_kernels.h"

namespace loramix {
namespace scalar {
namespace {

void log_f64_scalar(const double* x, double* y, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) y[k] = ::log(x[k]);
}

void js_posting_f64_scalar(double p, double wp, const double* q, const double* wq,
                           const int32_t* rows, std::size_t n, double* acc) {
  for (std::size_t k = 0; k < n; ++k) {
    if (!(q[k] > 0.0)) continue;  // padding of a dense run
    const double m = 0.5 * (p + q[k]);
    acc[rows[k]] += (wp + wq[k]) - m * ::log(m);
  }
}

void js_sym_bin_f64_scalar(const double* h, const double* w, const int32_t* rows, std::size_t zs,
                           std::size_t ze, std::size_t n, bool contiguous, int64_t i0, std::size_t N,
                           double* acc) {
  for (std::size_t z = zs; z < ze; ++z) {
    if (!(h[z] > 0.0)) continue;  // padding of a contiguous run
    double* a = acc + (rows[z] - i0) * static_cast<int64_t>(N);
    for (std::size_t k = z + 1; k < n; ++k) {
      if (!(h[k] > 0.0)) continue;
      const double m = h[z] + h[k];
      a[contiguous ? static_cast<int64_t>(k) : rows[k]] += (w[z] + w[k]) - m * ::log(m);
    }
  }
}

void js_terms_f64_scalar(const double* p, const double* wp, const double* q, const double* wq,
                         std::size_t n, double* val) {
  for (std::size_t k = 0; k < n; ++k) {
    const double m = 0.5 * (p[k] + q[k]);
    val[k] = (wp[k] + wq[k]) - m * ::log(m);
  }
}

void js_row_f64_scalar(const double* x, std::size_t n, double sum, double eps, double* p, double* w,
                       double* u) {
  for (std::size_t k = 0; k < n; ++k) {
    const double a = x[k] / sum;
    const double pk = a + eps, d = a + 2.0 * eps;
    const double l1 = ::log(2.0 * pk / d), l2 = ::log(eps > 0.0 ? 2.0 * eps / d : 1.0);
    const double uk = 0.5 * (pk * l1 + eps * l2);
    p[k] = pk;
    u[k] = uk;
    w[k] = 0.5 * pk * ::log(pk) - uk;
  }
}

bool check_row_f64_scalar(const int32_t* idx, const double* x, std::size_t n, int64_t cols,
                          int64_t* npos) {
  int64_t prev = -1, c = 0;
  for (std::size_t k = 0; k < n; ++k) {
    const int64_t col = idx[k];
    if (col <= prev || col >= cols || !(x[k] >= 0.0) || !(x[k] < HUGE_VAL)) return false;
    prev = col;
    c += x[k] > 0.0;
  }
  *npos = c;
  return true;
}

void kl_terms_f64_scalar(const double* c, const double* a, const double* y, std::size_t n, double* val) {
  for (std::size_t k = 0; k < n; ++k) val[k] = c[k] - a[k] * y[k];
}

void kl_posting_f64_scalar(double c, double a, const double* y, const int32_t* rows, std::size_t n,
                           double* acc) {
  for (std::size_t k = 0; k < n; ++k) acc[rows[k]] += c - a * y[k];
}

void js_dense_f64_scalar(const double* const* p, const double* const* hp, int nb, const double* q,
                         const double* hq, std::size_t n, double* sums) {
  for (int b = 0; b < nb; ++b) {
    const double* pb = p[b];
    const double* hb = hp[b];
    double s = 0.0;
    for (std::size_t k = 0; k < n; ++k) {
      const double m = 0.5 * (pb[k] + q[k]);
      if (m > 0.0) s += (hb[k] + hq[k]) - m * ::log(m);
    }
    sums[b] += s;
  }
}

void kl_dense_f64_scalar(const double* const* p, const double* const* lp, int nb,
                         const double* lq, std::size_t n, double* sums) {
  for (int b = 0; b < nb; ++b) {
    const double* pb = p[b];
    const double* lb = lp[b];
    double s = 0.0;
    for (std::size_t k = 0; k < n; ++k)
      if (pb[k] > 0.0) s += pb[k] * (lb[k] - lq[k]);
    sums[b] += s;
  }
}

void wd_dense_f64_scalar(const double* const* phi, const double* const* plo, int nb,
                         const double* qhi, const double* qlo, std::size_t n, double* sums) {
  for (int b = 0; b < nb; ++b) {
    double s = 0.0;
    for (std::size_t k = 0; k < n; ++k) s += ::fabs((phi[b][k] - qhi[k]) + (plo[b][k] - qlo[k]));
    sums[b] += s;
  }
}

const DivergenceKernels kKernels{
    log_f64_scalar,  // log_f64
    log_f64_scalar,  // log_abs_f64
    js_posting_f64_scalar,  // js_posting_f64
    js_sym_bin_f64_scalar,  // js_sym_bin_f64
    kl_posting_f64_scalar,  // kl_posting_f64
    js_terms_f64_scalar,  // js_terms_f64
    js_row_f64_scalar,  // js_row_f64
    check_row_f64_scalar,  // check_row_f64
    kl_terms_f64_scalar,  // kl_terms_f64
    js_dense_f64_scalar,  // js_dense_f64
    kl_dense_f64_scalar,  // kl_dense_f64
    wd_dense_f64_scalar,  // wd_dense_f64
};

}  // namespace

const DivergenceKernels& divergence_kernels() { return kKernels; }

}  // namespace scalar
}  // namespace loramix
