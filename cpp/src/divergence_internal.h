// Internals of the divergence driver (not installed, not part of the API), shared by the files
// it is split into, one job each:
//   divergence.cpp        ISA table, PreparedHistograms, which path a call takes
//   divergence_rows.cpp   input validation, normalization and per-row precomputation
//   divergence_index.cpp  the inverted index and the sparse js / kl pair loops
//   divergence_symjs.cpp  js of all pairs within one sparse matrix (its own index and loop)
//   divergence_dense.cpp  the dense blocked js / kl loop
//   divergence_wd.cpp     1-D Wasserstein (support merge, CDF chunks)
// The per-ISA loops are in divergence_{scalar,avx2,avx512}.cpp (divergence_kernels.h); the
// contract is in divergence.h. Holds STL: never included by the ISA kernel files.
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
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "divergence_kernels.h"
#include "loramix/divergence.h"
#include "loramix/parallel.h"

namespace loramix {
namespace divergence_impl {

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

// Compensated sums of two sequences side by side: two dependency chains instead of one, each
// sum adding its own values in its own order, as CompSum::add one at a time would.
// Positive: only the values > 0 are added.
template <bool Positive>
void comp_sum2(const double* x1, int64_t n1, const double* x2, int64_t n2, CompSum* s1, CompSum* s2) {
  const int64_t n = std::min(n1, n2);
  for (int64_t k = 0; k < n; ++k) {
    if (!Positive || x1[k] > 0.0) s1->add(x1[k]);
    if (!Positive || x2[k] > 0.0) s2->add(x2[k]);
  }
  for (int64_t k = n; k < n1; ++k)
    if (!Positive || x1[k] > 0.0) s1->add(x1[k]);
  for (int64_t k = n; k < n2; ++k)
    if (!Positive || x2[k] > 0.0) s2->add(x2[k]);
}

// Throws std::invalid_argument "divergence: row r of name what".
[[noreturn]] void bad_row(const char* name, int64_t r, const std::string& what);
// v as text, for messages.
std::string fmt(double v);

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
    CompSum sum;  // compensated: a row's normalized CDF must end at 1 to ~1 ulp (wd sums V of them)
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
          sum.add(x);
          f(col, x);
        }
      }
    } else {
      const T* row = static_cast<const T*>(M.data) + r * M.row_stride;
      for (int64_t col = 0; col < M.cols; ++col) {
        const double x = static_cast<double>(row[col]);
        check(col, x);
        if (x > 0.0) {
          sum.add(x);
          f(col, x);
        }
      }
    }
    const double total = sum.value();
    if (total == 0.0) bad_row(name, r, "is all zero (cannot be normalized)");
    if (!(total < kInf)) bad_row(name, r, "sums to infinity (scale the counts down)");
    return total;
  }
};

// The non-zeros of a row already validated by scan_row: f(col, value), no checks.
template <class T, class F>
void each_nonzero(const HistMatrix& M, int64_t r, F&& f) {
  const T* data = static_cast<const T*>(M.data);
  if (M.sparse) {
    for (int64_t k = M.indptr[r], e = M.indptr[r + 1]; k < e; ++k)
      if (data[k] > T(0)) f(static_cast<int64_t>(M.indices[k]), static_cast<double>(data[k]));
  } else {
    const T* row = data + r * M.row_stride;
    for (int64_t col = 0; col < M.cols; ++col)
      if (row[col] > T(0)) f(col, static_cast<double>(row[col]));
  }
}

template <class F>
double scan_row(const HistMatrix& M, const char* name, int64_t r, F&& f) {
  if (M.dtype == DType::F32) return RowReader<float>{M, name}.scan(r, f);
  return RowReader<double>{M, name}.scan(r, f);
}

// Large blocks (>= 2 MiB, on transparent huge pages) freed by one call are kept for the next
// one, up to kPoolCap bytes in all: a 502 x 502 js uses ~120 MB of such arrays, and the
// allocator handing them back to the OS made every call fault them in and zero them anew
// (~7% of a call's CPU time in steady state).
constexpr std::size_t kHuge = std::size_t(1) << 21;
constexpr std::size_t kPoolCap = std::size_t(192) << 20;

class BlockPool {
 public:
  static BlockPool& get() {
    static BlockPool* p = new BlockPool;  // never destroyed: no order-of-exit issues
    return *p;
  }
  // A block of at least `bytes` and at most twice that, or nullptr; *got = its size.
  void* take(std::size_t bytes, std::size_t* got) {
    std::lock_guard<std::mutex> lk(mu_);
    std::size_t best = blocks_.size();
    for (std::size_t k = 0; k < blocks_.size(); ++k)
      if (blocks_[k].second >= bytes && blocks_[k].second <= 2 * bytes &&
          (best == blocks_.size() || blocks_[k].second < blocks_[best].second))
        best = k;
    if (best == blocks_.size()) return nullptr;
    void* p = blocks_[best].first;
    *got = blocks_[best].second;
    held_ -= *got;
    blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
    return p;
  }
  void give(void* p, std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (held_ + bytes <= kPoolCap) {
        blocks_.emplace_back(p, bytes);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<void*, std::size_t>> blocks_;
  std::size_t held_ = 0;
};

// A large array that is never value-initialized (every element is written before it is read)
// and, from 2 MiB up, sits on transparent huge pages, recycled through BlockPool.
template <class T>
class Buf {
 public:
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p_(o.p_), n_(o.n_), bytes_(o.bytes_), borrowed_(o.borrowed_) {
    o.p_ = nullptr;
    o.n_ = 0;
    o.bytes_ = 0;
    o.borrowed_ = false;
  }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_;
      n_ = o.n_;
      bytes_ = o.bytes_;
      borrowed_ = o.borrowed_;
      o.p_ = nullptr;
      o.n_ = 0;
      o.bytes_ = 0;
      o.borrowed_ = false;
    }
    return *this;
  }
  ~Buf() { release(); }
  // Discards the contents; the new elements are uninitialized.
  void resize(std::size_t n) {
    release();
    n_ = n;
    if (n == 0) return;
    std::size_t bytes = n * sizeof(T);
    if (bytes >= kHuge) {
      bytes = (bytes + kHuge - 1) / kHuge * kHuge;
      std::size_t got = 0;
      if (void* q = BlockPool::get().take(bytes, &got)) {
        p_ = static_cast<T*>(q);
        bytes_ = got;
        return;
      }
      p_ = static_cast<T*>(std::aligned_alloc(kHuge, bytes));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (p_) madvise(p_, bytes, MADV_HUGEPAGE);
#endif
      bytes_ = bytes;
    } else {
      p_ = static_cast<T*>(std::malloc(bytes));
    }
    if (!p_) throw std::bad_alloc();
  }
  // A read-only view of memory someone else owns and keeps alive for this Buf's lifetime (a
  // stored index mapped from a file): never written through, never freed here.
  void borrow(const T* p, std::size_t n) {
    release();
    p_ = const_cast<T*>(p);
    n_ = n;
    borrowed_ = true;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  T& operator[](std::size_t k) { return p_[k]; }
  const T& operator[](std::size_t k) const { return p_[k]; }
  T* begin() { return p_; }
  const T* begin() const { return p_; }
  T* end() { return p_ + n_; }
  const T* end() const { return p_ + n_; }

 private:
  void release() {
    if (borrowed_) {
      borrowed_ = false;
    } else if (p_ && bytes_) {
      BlockPool::get().give(p_, bytes_);
    } else {
      std::free(p_);
    }
    p_ = nullptr;
    n_ = 0;
    bytes_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
  std::size_t bytes_ = 0;  // non-zero: a huge block, returned to the pool
  bool borrowed_ = false;  // borrow(): not ours
};

// Normalized sparse rows plus the per-entry / per-row values each metric needs.
struct Sparse {
  int64_t rows = 0, cols = 0;
  std::vector<int64_t> ptr;
  Buf<int32_t> idx;
  Buf<double> a;       // normalized value (no eps)
  Buf<double> v1, v2;  // js: p, w.   kl: y = log(q/eps) (or log b), c = a log a (eps = 0)
  std::vector<double> c1, c2;  // js: U.      kl: F, G
  int64_t nnz(int64_t r) const { return ptr[r + 1] - ptr[r]; }
};

// Inverted index of the rows [j0, j1) of R: for every bin v, the rows holding it (increasing)
// with their per-entry values, stored contiguously so a run is one vector loop.
struct Postings {
  int64_t j0 = 0, j1 = 0;
  Buf<int64_t> voff;  // cols + 1
  Buf<int32_t> row;
  Buf<double> x1, x2;
};

// ---- divergence_rows.cpp ----
// std::invalid_argument unless eps is finite and >= 0.
void check_eps(double eps);
// std::invalid_argument for a matrix without columns, a bad dtype or a malformed CSR indptr.
void check_matrix(const HistMatrix& M, const char* name);
// Validated, normalized rows of M with the per-entry / per-row values `metric` needs.
Sparse build_sparse(const HistMatrix& M, const char* name, Metric metric, double eps,
                    const DivergenceKernels& K, int threads, Cancel* cancel);
// Below this share of non-zero bins, dense js/kl inputs take the sparse (inverted-index) path.
constexpr double kDenseFill = 0.5;
// Share of non-zero bins of a dense M.
double nonzero_fraction(const HistMatrix& M, int threads, Cancel* cancel);

// ---- divergence_index.cpp ----
// Tiles of R rows for an index (make_tiles) and the index itself (build_index).
std::vector<std::pair<int64_t, int64_t>> make_tiles(int64_t Q, int64_t N, int threads);
std::vector<Postings> build_index(const Sparse& R, Metric metric,
                                  const std::vector<std::pair<int64_t, int64_t>>& tiles, int threads,
                                  Cancel* cancel);
// js / kl of P against R through R's index `post` (kl of P against itself: R = P, both directions).
void sparse_js_kl(const Sparse& P, const Sparse& R, const std::vector<Postings>& post,
                  Metric metric, double eps, const DivergenceKernels& K, int threads, Cancel* cancel,
                  double* out);
// ---- divergence_symjs.cpp ----
// js of all pairs within P (its own index, built here); out: P.rows x P.rows, diagonal untouched.
void symmetric_js(const Sparse& P, const DivergenceKernels& K, int threads, Cancel* cancel, double* out);
// js / kl of a few P rows (up to kDirectMaxRows) against an R without index (gather of the
// shared bins); bit-identical to sparse_js_kl.
constexpr int64_t kDirectMaxRows = 2;  // measured: the index wins from 3 rows on (502 x 32k bank)
void direct_js_kl(const Sparse& P, const Sparse& R, Metric metric, double eps,
                  const DivergenceKernels& K, int threads, Cancel* cancel, double* out);

// ---- divergence_dense.cpp ----
// js / kl over dense inputs, blocked; symmetric: P against itself, js pairs once and mirrored.
void dense_js_kl(const HistMatrix& P, const HistMatrix& R, bool symmetric, Metric metric,
                 double eps, const DivergenceKernels& K, int threads, Cancel* cancel, double* out);

// ---- divergence_wd.cpp ----
// wd by merging the support lists (very sparse rows) or through CDF chunks (the rest).
void sparse_wd(const Sparse& P, const Sparse& R, bool symmetric, int threads, Cancel* cancel,
               double* out);
void cdf_wd(const Sparse& P, const Sparse& R, bool symmetric, const DivergenceKernels& K,
            int threads, Cancel* cancel, double* out);

}  // namespace divergence_impl
}  // namespace loramix
