// Batched divergences: validation, per-row precomputation, the inverted-index (sparse) algorithm,
// the dense blocked algorithm, 1-D Wasserstein, threading and ISA dispatch. The per-ISA loops are
// in divergence_{scalar,avx2,avx512}.cpp; the contract is in divergence.h.
//
// Sparse js (eps >= 0). With p = a + eps, q = b + eps, m = (p + q)/2 and
//   t(p, q) = 1/2 [p log(p/m) + q log(q/m)]  (the per-bin js term),
// a bin held by P-row i alone contributes u(a) = t(a + eps, eps), a function of a only, a bin held
// by neither contributes t(eps, eps) = 0. Hence
//   js(i, j) = U_i + U_j + sum_{v shared} (w_i,v + w_j,v - m log m),
//   U = sum_v u(a_v),  w = p log p / 2 - u(a)   (per row, precomputed once),
// with one log per shared bin. All terms are O(p), so nothing large cancels: the absolute error
// is a few ulp of (ln 2 + entropy).
// Sparse kl (eps > 0): KL(p||q) = F_i + G_j - sum_{v shared} a_v log(q_v/eps), with
//   F = sum_v (a_v + eps) log((a_v + eps)/eps),  G = -eps sum_v log((b_v + eps)/eps),
// no log per pair at all. eps = 0: KL = sum_v a log a - a log b if supp a is inside supp b, else +inf.
#include "loramix/divergence.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "loramix/cpu.h"
#include "loramix/parallel.h"

namespace loramix {

const DivergenceKernels& divergence_kernels(Isa isa) {
  static const DivergenceKernels k_scalar{scalar::log_f64_scalar, scalar::js_posting_f64_scalar,
                                          scalar::kl_posting_f64_scalar, scalar::js_dense_f64_scalar,
                                          scalar::kl_dense_f64_scalar};
#if defined(LORAMIX_HAVE_X86)
  static const DivergenceKernels k_avx2{avx2::log_f64_avx2, avx2::js_posting_f64_avx2,
                                        avx2::kl_posting_f64_avx2, avx2::js_dense_f64_avx2,
                                        avx2::kl_dense_f64_avx2};
  static const DivergenceKernels k_avx512{avx512::log_f64_avx512, avx512::js_posting_f64_avx512,
                                          avx512::kl_posting_f64_avx512,
                                          avx512::js_dense_f64_avx512, avx512::kl_dense_f64_avx512};
  switch (isa) {
    case Isa::avx512: return k_avx512;
    case Isa::avx2: return k_avx2;
    case Isa::scalar: return k_scalar;
  }
#else
  (void)isa;
#endif
  return k_scalar;
}

namespace {

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kInf = std::numeric_limits<double>::infinity();

// Neumaier-compensated sum: per-row constants are sums of thousands of terms whose total is
// later combined with per-pair corrections; keep them to ~1 ulp.
struct CompSum {
  double s = 0.0, c = 0.0;
  void add(double x) {
    const double t = s + x;
    c += (std::fabs(s) >= std::fabs(x)) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  double value() const { return s + c; }
};

[[noreturn]] void bad_row(const char* name, int64_t r, const std::string& what) {
  std::ostringstream os;
  os << "divergence: row " << r << " of " << name << " " << what;
  throw std::invalid_argument(os.str());
}

std::string fmt(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// One row of a HistMatrix as a list of (column, value) pairs, validated.
template <class T>
struct RowReader {
  const HistMatrix& M;
  const char* name;

  // Calls f(col, value) for every non-zero of row r in increasing column order; returns the
  // row sum. Throws for NaN/inf/negative values, unsorted/duplicate/out-of-range CSR indices,
  // an all-zero row or a row sum that overflows.
  template <class F>
  double scan(int64_t r, F&& f) const {
    double sum = 0.0;
    auto check = [&](int64_t col, double x) {
      if (!(x >= 0.0) || x == kInf) {
        if (std::isnan(x)) bad_row(name, r, "holds NaN at column " + std::to_string(col));
        if (x < 0.0) bad_row(name, r, "holds a negative value (" + fmt(x) + ") at column " + std::to_string(col));
        bad_row(name, r, "holds an infinite value at column " + std::to_string(col));
      }
    };
    if (M.sparse) {
      const T* data = static_cast<const T*>(M.data);
      const int64_t b = M.indptr[r], e = M.indptr[r + 1];
      int64_t prev = -1;
      for (int64_t k = b; k < e; ++k) {
        const int64_t col = M.indices[k];
        if (col < 0 || col >= M.cols)
          bad_row(name, r, "has column index " + std::to_string(col) + " outside [0, " + std::to_string(M.cols) + ")");
        if (col <= prev)
          bad_row(name, r, "has unsorted or duplicate column indices (canonicalize the CSR matrix: sum_duplicates())");
        prev = col;
        const double x = static_cast<double>(data[k]);
        check(col, x);
        if (x > 0.0) {
          sum += x;
          f(col, x);
        }
      }
    } else {
      const T* row = static_cast<const T*>(M.data) + r * M.row_stride;
      for (int64_t col = 0; col < M.cols; ++col) {
        const double x = static_cast<double>(row[col]);
        check(col, x);
        if (x > 0.0) {
          sum += x;
          f(col, x);
        }
      }
    }
    if (sum == 0.0) bad_row(name, r, "is all zero (cannot be normalized)");
    if (sum == kInf) bad_row(name, r, "sums to infinity (scale the counts down)");
    return sum;
  }
};

template <class F>
double scan_row(const HistMatrix& M, const char* name, int64_t r, F&& f) {
  if (M.dtype == DType::f32) return RowReader<float>{M, name}.scan(r, f);
  return RowReader<double>{M, name}.scan(r, f);
}

// Normalized sparse rows plus the per-entry / per-row values each metric needs.
struct Sparse {
  int64_t rows = 0, cols = 0;
  std::vector<int64_t> ptr;
  std::vector<int32_t> idx;
  std::vector<double> a;       // normalized value (no eps)
  std::vector<double> v1, v2;  // js: p, w.   kl: y = log(q/eps) (or log b), c = a log a (eps = 0)
  std::vector<double> c1, c2;  // js: U.      kl: F, G
  int64_t nnz(int64_t r) const { return ptr[r + 1] - ptr[r]; }
};

Sparse build_sparse(const HistMatrix& M, const char* name, Metric metric, double eps,
                    const DivergenceKernels& K, int threads, Cancel* cancel) {
  Sparse S;
  S.rows = M.rows;
  S.cols = M.cols;
  std::vector<int64_t> count(M.rows);
  std::vector<double> sums(M.rows);
  parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t r = b; r < e; ++r) {
      int64_t c = 0;
      sums[r] = scan_row(M, name, static_cast<int64_t>(r), [&](int64_t, double) { ++c; });
      count[r] = c;
    }
  });
  S.ptr.assign(M.rows + 1, 0);
  for (int64_t r = 0; r < M.rows; ++r) S.ptr[r + 1] = S.ptr[r] + count[r];
  const int64_t nnz = S.ptr[M.rows];
  S.idx.resize(nnz);
  S.a.resize(nnz);
  if (metric != Metric::wd) {
    S.v1.resize(nnz);
    S.v2.resize(nnz);
    S.c1.resize(M.rows);
    S.c2.resize(M.rows);
  }
  int64_t max_row = 0;
  for (int64_t r = 0; r < M.rows; ++r) max_row = std::max(max_row, count[r]);
  const int nt = std::max(1, threads);
  std::vector<std::vector<double>> scratch(nt, std::vector<double>(metric == Metric::wd ? 0 : 4 * max_row));

  parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int w) {
    double* t0 = scratch[w].data();
    for (std::size_t rr = b; rr < e; ++rr) {
      const int64_t r = static_cast<int64_t>(rr);
      const int64_t o = S.ptr[r], n = count[r];
      const double inv = 1.0 / sums[r];
      int64_t k = o;
      scan_row(M, name, r, [&](int64_t col, double x) {
        S.idx[k] = static_cast<int32_t>(col);
        S.a[k] = x * inv;
        ++k;
      });
      if (metric == Metric::wd) continue;
      const double* a = S.a.data() + o;
      double* v1 = S.v1.data() + o;
      double* v2 = S.v2.data() + o;
      double* x0 = t0;
      double* x1 = t0 + n;
      double* x2 = t0 + 2 * n;
      double* x3 = t0 + 3 * n;
      if (metric == Metric::js) {
        // u(a) = 1/2 [p log(2p/(a + 2eps)) + eps log(2eps/(a + 2eps))], p = a + eps.
        for (int64_t k2 = 0; k2 < n; ++k2) {
          const double p = a[k2] + eps, d = a[k2] + 2.0 * eps;
          x0[k2] = p;
          x1[k2] = 2.0 * p / d;
          x2[k2] = eps > 0.0 ? 2.0 * eps / d : 1.0;
        }
        K.log_f64(x0, x3, n);   // log p
        K.log_f64(x1, x1, n);   // log(2p/d)
        K.log_f64(x2, x2, n);   // log(2eps/d)
        CompSum U;
        for (int64_t k2 = 0; k2 < n; ++k2) {
          const double p = x0[k2];
          const double u = 0.5 * (p * x1[k2] + eps * x2[k2]);
          v1[k2] = p;
          v2[k2] = 0.5 * p * x3[k2] - u;
          U.add(u);
        }
        S.c1[r] = U.value();
      } else {  // kl
        for (int64_t k2 = 0; k2 < n; ++k2) x0[k2] = eps > 0.0 ? (a[k2] + eps) / eps : a[k2];
        K.log_f64(x0, v1, n);
        CompSum F, G;
        for (int64_t k2 = 0; k2 < n; ++k2) {
          if (eps > 0.0) {
            v2[k2] = 0.0;
            F.add((a[k2] + eps) * v1[k2]);
            G.add(v1[k2]);
          } else {
            v2[k2] = a[k2] * v1[k2];
          }
        }
        S.c1[r] = F.value();
        S.c2[r] = -eps * G.value();
      }
    }
  });
  return S;
}

// Inverted index of the rows [j0, j1) of R: for every bin v, the rows holding it (increasing)
// with their per-entry values, stored contiguously so a run is one vector loop.
struct Postings {
  int64_t j0 = 0, j1 = 0;
  std::vector<int64_t> voff;  // cols + 1
  std::vector<int32_t> row;
  std::vector<double> x1, x2;
};

Postings build_postings(const Sparse& R, int64_t j0, int64_t j1, bool need_x2) {
  Postings P;
  P.j0 = j0;
  P.j1 = j1;
  P.voff.assign(R.cols + 1, 0);
  for (int64_t k = R.ptr[j0]; k < R.ptr[j1]; ++k) ++P.voff[R.idx[k] + 1];
  for (int64_t v = 0; v < R.cols; ++v) P.voff[v + 1] += P.voff[v];
  const int64_t n = P.voff[R.cols];
  P.row.resize(n);
  P.x1.resize(n);
  if (need_x2) P.x2.resize(n);
  std::vector<int64_t> fill(P.voff.begin(), P.voff.end() - 1);
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t k = R.ptr[j]; k < R.ptr[j + 1]; ++k) {
      const int64_t at = fill[R.idx[k]]++;
      P.row[at] = static_cast<int32_t>(j);
      P.x1[at] = R.v1[k];
      if (need_x2) P.x2[at] = R.v2[k];
    }
  return P;
}

// Tiles of R rows: few enough that index building stays cheap, enough that a call with few
// P rows still spreads over the threads.
std::vector<std::pair<int64_t, int64_t>> make_tiles(int64_t Q, int64_t N, int threads) {
  int64_t ntiles = 1;
  if (threads > 1 && Q < 4 * threads) ntiles = std::min<int64_t>(N, 2 * threads);
  std::vector<std::pair<int64_t, int64_t>> t;
  for (int64_t k = 0; k < ntiles; ++k) t.emplace_back(N * k / ntiles, N * (k + 1) / ntiles);
  return t;
}

void sparse_js_kl(const Sparse& P, const Sparse& R, bool symmetric, Metric metric, double eps,
                  const DivergenceKernels& K, int threads, Cancel* cancel, double* out) {
  const int64_t Q = P.rows, N = R.rows;
  const auto tiles = make_tiles(Q, N, threads);
  const bool js = metric == Metric::js;
  std::vector<Postings> post(tiles.size());
  parallel_for(tiles.size(), 1, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t t = b; t < e; ++t) post[t] = build_postings(R, tiles[t].first, tiles[t].second, js);
  });
  const int nt = std::max(1, threads);
  std::vector<std::vector<double>> acc(nt, std::vector<double>(N)), cnt(nt);
  const bool count_shared = !js && eps == 0.0;
  if (count_shared)
    for (auto& c : cnt) c.assign(N, 0.0);
  const int64_t items = Q * static_cast<int64_t>(tiles.size());
  parallel_for(items, 1, threads, cancel, [&](std::size_t b, std::size_t e, int w) {
    double* A = acc[w].data();
    double* C = count_shared ? cnt[w].data() : nullptr;
    for (std::size_t it = b; it < e; ++it) {
      const int64_t i = static_cast<int64_t>(it) / static_cast<int64_t>(tiles.size());
      const Postings& T = post[it % tiles.size()];
      const int64_t j0 = symmetric ? std::max(T.j0, i + 1) : T.j0;
      if (j0 >= T.j1) continue;
      std::fill(A + j0, A + T.j1, 0.0);
      if (C) std::fill(C + j0, C + T.j1, 0.0);
      for (int64_t k = P.ptr[i]; k < P.ptr[i + 1]; ++k) {
        const int64_t v = P.idx[k];
        int64_t s = T.voff[v];
        const int64_t f = T.voff[v + 1];
        if (s == f) continue;
        if (j0 > T.j0)  // skip rows <= i (symmetric: each pair once)
          s = std::upper_bound(T.row.begin() + s, T.row.begin() + f, static_cast<int32_t>(i)) - T.row.begin();
        const std::size_t len = static_cast<std::size_t>(f - s);
        if (len == 0) continue;
        if (js) {
          K.js_posting_f64(P.v1[k], P.v2[k], T.x1.data() + s, T.x2.data() + s, T.row.data() + s, len, A);
        } else {
          K.kl_posting_f64(P.v2[k], P.a[k], T.x1.data() + s, T.row.data() + s, len, A);
          if (C)
            for (int64_t z = s; z < f; ++z) C[T.row[z]] += 1.0;
        }
      }
      double* o = out + i * N;
      if (js) {
        for (int64_t j = j0; j < T.j1; ++j) {
          const double d = (P.c1[i] + R.c1[j]) + A[j];
          o[j] = d;
          if (symmetric) out[j * N + i] = d;
        }
      } else if (eps > 0.0) {
        for (int64_t j = j0; j < T.j1; ++j) o[j] = (P.c1[i] + R.c2[j]) + A[j];
      } else {
        const double need = static_cast<double>(P.nnz(i));
        for (int64_t j = j0; j < T.j1; ++j) o[j] = C[j] == need ? A[j] : kInf;
      }
    }
  });
}

// sum_v |A_v - B_v| over the union of the two supports (the CDF difference is constant between
// consecutive support bins; after the last one both CDFs are 1).
double wd_pair(const Sparse& P, int64_t i, const Sparse& R, int64_t j) {
  int64_t x = P.ptr[i], xe = P.ptr[i + 1], y = R.ptr[j], ye = R.ptr[j + 1];
  // d = A_v - B_v is a running sum over up to V bins: carried compensated (TwoSum), or its
  // rounding error would grow with V and be multiplied by the gaps.
  double d = 0.0, dc = 0.0;
  CompSum s;
  int64_t prev = 0;
  auto add = [&](double t) {
    const double u = d + t;
    const double bp = u - d;
    dc += (d - (u - bp)) + (t - bp);
    d = u;
  };
  while (x < xe || y < ye) {
    const int64_t vx = x < xe ? P.idx[x] : std::numeric_limits<int64_t>::max();
    const int64_t vy = y < ye ? R.idx[y] : std::numeric_limits<int64_t>::max();
    const int64_t v = std::min(vx, vy);
    s.add(std::fabs(d + dc) * static_cast<double>(v - prev));
    prev = v;
    if (vx == v) add(P.a[x++]);
    if (vy == v) add(-R.a[y++]);
  }
  return s.value();
}

void sparse_wd(const Sparse& P, const Sparse& R, bool symmetric, int threads, Cancel* cancel,
               double* out) {
  const int64_t Q = P.rows, N = R.rows;
  parallel_for(Q, 1, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t ii = b; ii < e; ++ii) {
      const int64_t i = static_cast<int64_t>(ii);
      for (int64_t j = symmetric ? i + 1 : 0; j < N; ++j) {
        const double d = wd_pair(P, i, R, j);
        out[i * N + j] = d;
        if (symmetric) out[j * N + i] = d;
      }
    }
  });
}

// ---- dense js / kl: blocks of BI rows of P x BJ rows of R, bins in chunks of C. ------------
constexpr int kBI = 8;
constexpr int64_t kBJ = 64;
constexpr int64_t kChunk = 1024;

template <class T>
void load_chunk(const HistMatrix& M, int64_t r, int64_t c0, int64_t n, double inv, double eps,
                double* p) {
  const T* x = static_cast<const T*>(M.data) + r * M.row_stride + c0;
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<double>(x[k]) * inv + eps;
}

// p, and h = p log p / 2 (js) or log p (kl), with 0 log 0 = 0 and log 0 = -inf.
void prep_chunk(const HistMatrix& M, int64_t r, int64_t c0, int64_t n, double inv, double eps,
                Metric metric, const DivergenceKernels& K, double* p, double* h) {
  if (M.dtype == DType::f32) load_chunk<float>(M, r, c0, n, inv, eps, p);
  else load_chunk<double>(M, r, c0, n, inv, eps, p);
  if (eps > 0.0) {
    K.log_f64(p, h, n);
  } else {
    for (int64_t k = 0; k < n; ++k) h[k] = p[k] > 0.0 ? p[k] : 1.0;
    K.log_f64(h, h, n);
    for (int64_t k = 0; k < n; ++k)
      if (p[k] == 0.0) h[k] = -kInf;
  }
  if (metric == Metric::js)
    for (int64_t k = 0; k < n; ++k) h[k] = p[k] > 0.0 ? 0.5 * p[k] * h[k] : 0.0;
}

std::vector<double> dense_row_sums(const HistMatrix& M, const char* name, int threads, Cancel* cancel) {
  std::vector<double> s(M.rows);
  parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t r = b; r < e; ++r) s[r] = scan_row(M, name, static_cast<int64_t>(r), [](int64_t, double) {});
  });
  return s;
}

void dense_js_kl(const HistMatrix& P, const HistMatrix& R, bool symmetric, Metric metric,
                 double eps, const DivergenceKernels& K, int threads, Cancel* cancel, double* out) {
  const int64_t Q = P.rows, N = R.rows, V = P.cols;
  const auto sp = dense_row_sums(P, "P", threads, cancel);
  const auto sr = symmetric ? sp : dense_row_sums(R, "R", threads, cancel);
  const bool js = metric == Metric::js;
  const bool half = symmetric && js;  // js symmetric: each pair once, mirrored
  const int64_t nbi = (Q + kBI - 1) / kBI, nbj = (N + kBJ - 1) / kBJ;
  const int nt = std::max(1, threads);
  struct Scratch {
    std::vector<double> pb, hb, q, hq, sums;
  };
  std::vector<Scratch> scr(nt);
  for (auto& s : scr) {
    s.pb.resize(kBI * kChunk);
    s.hb.resize(kBI * kChunk);
    s.q.resize(kChunk);
    s.hq.resize(kChunk);
    s.sums.resize(kBJ * kBI);
  }
  parallel_for(nbi * nbj, 1, threads, cancel, [&](std::size_t b, std::size_t e, int w) {
    Scratch& S = scr[w];
    for (std::size_t it = b; it < e; ++it) {
      const int64_t i0 = static_cast<int64_t>(it) / nbj * kBI, i1 = std::min(Q, i0 + kBI);
      int64_t j0 = static_cast<int64_t>(it) % nbj * kBJ;
      const int64_t j1 = std::min(N, j0 + kBJ);
      if (half) {
        if (j1 <= i0 + 1) continue;
      }
      const int nb = static_cast<int>(i1 - i0);
      std::fill(S.sums.begin(), S.sums.end(), 0.0);
      const double* pp[kBI];
      const double* hp[kBI];
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        if (cancel && cancel->requested()) return;
        const int64_t n = std::min(kChunk, V - c0);
        for (int bb = 0; bb < nb; ++bb) {
          prep_chunk(P, i0 + bb, c0, n, 1.0 / sp[i0 + bb], eps, metric, K, S.pb.data() + bb * kChunk,
                     S.hb.data() + bb * kChunk);
          pp[bb] = S.pb.data() + bb * kChunk;
          hp[bb] = S.hb.data() + bb * kChunk;
        }
        for (int64_t j = j0; j < j1; ++j) {
          if (half && j <= i0) continue;
          prep_chunk(R, j, c0, n, 1.0 / sr[j], eps, metric, K, S.q.data(), S.hq.data());
          double* sums = S.sums.data() + (j - j0) * kBI;
          if (js) K.js_dense_f64(pp, hp, nb, S.q.data(), S.hq.data(), static_cast<std::size_t>(n), sums);
          else K.kl_dense_f64(pp, hp, nb, S.hq.data(), static_cast<std::size_t>(n), sums);
        }
      }
      for (int64_t j = j0; j < j1; ++j)
        for (int bb = 0; bb < nb; ++bb) {
          const int64_t i = i0 + bb;
          if (half && j <= i) continue;
          const double d = S.sums[(j - j0) * kBI + bb];
          out[i * N + j] = d;
          if (half) out[j * N + i] = d;
        }
    }
  });
}

void check_matrix(const HistMatrix& M, const char* name) {
  if (M.rows < 0 || M.cols < 1)
    throw std::invalid_argument(std::string("divergence: ") + name + " must have at least one column");
  if (M.cols > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument(std::string("divergence: ") + name + " has more than 2^31-1 columns");
  if (M.sparse) {
    if (!M.indptr || (M.rows > 0 && M.indptr[0] != 0))
      throw std::invalid_argument(std::string("divergence: ") + name + " CSR indptr must start at 0");
    for (int64_t r = 0; r < M.rows; ++r)
      if (M.indptr[r + 1] < M.indptr[r])
        throw std::invalid_argument(std::string("divergence: ") + name + " CSR indptr must be non-decreasing");
  }
}

}  // namespace

void divergence(const HistMatrix& P, const HistMatrix* R, Metric metric, double eps, int threads,
                Cancel* cancel, double* out) {
  if (!(eps >= 0.0) || !std::isfinite(eps))
    throw std::invalid_argument("divergence: eps must be finite and >= 0, got " + fmt(eps));
  check_matrix(P, "P");
  if (R) {
    check_matrix(*R, "R");
    if (R->cols != P.cols)
      throw std::invalid_argument("divergence: P has " + std::to_string(P.cols) + " columns but R has " +
                                  std::to_string(R->cols) + " (histograms must share one vocabulary)");
  }
  const int nt = resolve_threads(threads);
  const DivergenceKernels& K = divergence_kernels(active_isa());  // once per call
  const bool symmetric = R == nullptr;
  const HistMatrix& RR = symmetric ? P : *R;
  const int64_t Q = P.rows, N = RR.rows;
  if (Q == 0 || N == 0) return;

  if (metric != Metric::wd && !P.sparse && !RR.sparse) {
    dense_js_kl(P, RR, symmetric, metric, eps, K, nt, cancel, out);
  } else {
    const Sparse SP = build_sparse(P, "P", metric, eps, K, nt, cancel);
    Sparse SR_own;
    if (!symmetric) SR_own = build_sparse(RR, "R", metric, eps, K, nt, cancel);
    const Sparse& SR = symmetric ? SP : SR_own;
    if (metric == Metric::wd) sparse_wd(SP, SR, symmetric, nt, cancel, out);
    // kl is not symmetric: with R = none it runs as P against P, both directions.
    else sparse_js_kl(SP, SR, symmetric && metric == Metric::js, metric, eps, K, nt, cancel, out);
  }
  if (symmetric)
    for (int64_t i = 0; i < Q; ++i) out[i * N + i] = 0.0;
}

}  // namespace loramix
