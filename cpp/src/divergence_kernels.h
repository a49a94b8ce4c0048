// The per-ISA kernel table behind divergence.h (internal: not installed, not part of the API).
// Each ISA file (divergence_{scalar,avx2,avx512}.cpp) fills one table with its own copies of
// the kernels; the driver (divergence.cpp and the files it is split into) picks the table once
// per call with divergence_kernels(active_isa()). Included by the ISA files, so it holds no STL
// and no non-static inline code (see STYLE.md: an ISA-flagged copy must never reach baseline
// code).
#pragma once
#include <cstddef>
#include <cstdint>

namespace loramix {

enum class Isa : int;  // cpu.h

// y[k] = log(x[k]) for positive finite x (including subnormals).
using LogF64Fn = void (*)(const double* x, double* y, std::size_t n);
// log_abs_f64: the log the sparse js loop uses, for 0 < x <= 1: 2 ulp, or 2.5e-16 absolute
// where |log x| < 1 (divergence.h, Accuracy). Same signature as LogF64Fn.
// Sparse js, one bin shared by P-row value p (with eps) and a run of R rows from the inverted
// index: acc[rows[k]] += wp + wq[k] - m log m,  m = (p + q[k]) / 2, for every k with q[k] > 0
// (q[k] == 0 marks padding in runs that cover consecutive rows). Rows increase within a call.
using JsPostingF64Fn = void (*)(double p, double wp, const double* q, const double* wq,
                                const int32_t* rows, std::size_t n, double* acc);
// Symmetric js (all pairs within one matrix), one bin: its run of n entries of the inverted
// index (rows increasing, h = p / 2, w), of which [zs, ze) are the rows of the current block,
// rows from i0 on. For each z in [zs, ze) with h[z] > 0 and each k in (z, n) with h[k] > 0:
//   acc[(rows[z] - i0) * N + rows[k]] += (w[z] + w[k]) - m log m,  m = h[z] + h[k]
// (= (p + q) / 2 exactly unless p or q < 2^-1021). contiguous: the run covers every row,
// rows[k] = k, absent rows padded with h = w = 0.
using JsSymBinF64Fn = void (*)(const double* h, const double* w, const int32_t* rows, std::size_t zs,
                               std::size_t ze, std::size_t n, bool contiguous, int64_t i0,
                               std::size_t N, double* acc);
// The same per-term values, one (P bin, R bin) pair per k, with exactly the arithmetic of the
// posting kernels above (so the few-rows path and the index agree bit for bit):
//   js: val[k] = wp[k] + wq[k] - m log m, m = (p[k] + q[k]) / 2;   kl: val[k] = c[k] - a[k] y[k].
using JsTermsF64Fn = void (*)(const double* p, const double* wp, const double* q, const double* wq,
                              std::size_t n, double* val);
using KlTermsF64Fn = void (*)(const double* c, const double* a, const double* y, std::size_t n,
                              double* val);
// Sparse kl: acc[rows[k]] += c - a * y[k]. Rows distinct within a call.
using KlPostingF64Fn = void (*)(double c, double a, const double* y, const int32_t* rows,
                                std::size_t n, double* acc);
// Sparse js, the per-entry values of one row (build_sparse) from its n non-zero values x and
// their sum: with a = x / sum, p = a + eps, d = a + 2 eps,
//   p[k] = p,   u[k] = 0.5 (p log(2p / d) + eps log(2 eps / d)),   w[k] = (0.5 p) log p - u[k]
// (2 eps / d read as 1 where eps == 0), the logs by this table's log_f64, every operation
// rounded as written (vector divisions are IEEE divisions: all ISAs round each step the same).
using JsRowF64Fn = void (*)(const double* x, std::size_t n, double sum, double eps, double* p,
                            double* w, double* u);
// Dense js over n bins, nb rows of P against one row of R:
//   sums[b] += sum_k (hp[b][k] + hq[k] - m log m), m = (p[b][k] + q[k]) / 2, terms with m == 0
//   contribute 0. hp = p log p / 2 with 0 log 0 = 0.
using JsDenseF64Fn = void (*)(const double* const* p, const double* const* hp, int nb,
                              const double* q, const double* hq, std::size_t n, double* sums);
// Dense kl over n bins, nb rows of P against one row of R:
//   sums[b] += sum_k (p[b][k] > 0 ? p[b][k] * (lp[b][k] - lq[k]) : 0).
using KlDenseF64Fn = void (*)(const double* const* p, const double* const* lp, int nb,
                              const double* lq, std::size_t n, double* sums);

// Dense wd piece over n bins, nb rows of P against one row of R, CDFs given as hi + lo parts:
//   sums[b] += sum_k |(phi[b][k] - qhi[k]) + (plo[b][k] - qlo[k])|.
using WdDenseF64Fn = void (*)(const double* const* phi, const double* const* plo, int nb,
                              const double* qhi, const double* qlo, std::size_t n, double* sums);

// One CSR row of float64 values (build_sparse's first pass): true when every column index is in
// [0, cols) and above the one before it and every value is >= 0 and finite (NaN fails);
// *npos = the number of values > 0. (false: the caller's scalar reader names the fault.)
using CheckRowF64Fn = bool (*)(const int32_t* idx, const double* x, std::size_t n, int64_t cols,
                               int64_t* npos);

struct DivergenceKernels {
  LogF64Fn log_f64;
  LogF64Fn log_abs_f64;
  JsPostingF64Fn js_posting_f64;
  JsSymBinF64Fn js_sym_bin_f64;
  KlPostingF64Fn kl_posting_f64;
  JsTermsF64Fn js_terms_f64;
  JsRowF64Fn js_row_f64;
  CheckRowF64Fn check_row_f64;
  KlTermsF64Fn kl_terms_f64;
  JsDenseF64Fn js_dense_f64;
  KlDenseF64Fn kl_dense_f64;
  WdDenseF64Fn wd_dense_f64;
};

namespace scalar { const DivergenceKernels& divergence_kernels(); }
namespace avx2 { const DivergenceKernels& divergence_kernels(); }    // x86-64 builds only
namespace avx512 { const DivergenceKernels& divergence_kernels(); }  // x86-64 builds only

// The table of `isa` (scalar's where `isa` is not compiled in).
const DivergenceKernels& divergence_kernels(Isa isa);

}  // namespace loramix
