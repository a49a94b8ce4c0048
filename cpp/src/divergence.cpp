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
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "divergence_kernels.h"
#include "loramix/cpu.h"
#include "loramix/parallel.h"

namespace loramix {

const DivergenceKernels& divergence_kernels(Isa isa) {
  switch (isa) {
#if defined(LORAMIX_HAVE_X86)
    case Isa::avx512: return avx512::divergence_kernels();
    case Isa::avx2: return avx2::divergence_kernels();
#endif
    default: return scalar::divergence_kernels();
  }
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
  Buf(Buf&& o) noexcept : p_(o.p_), n_(o.n_), bytes_(o.bytes_) { o.p_ = nullptr; o.n_ = 0; o.bytes_ = 0; }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_;
      n_ = o.n_;
      bytes_ = o.bytes_;
      o.p_ = nullptr;
      o.n_ = 0;
      o.bytes_ = 0;
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
    if (p_ && bytes_) BlockPool::get().give(p_, bytes_);
    else std::free(p_);
    p_ = nullptr;
    n_ = 0;
    bytes_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
  std::size_t bytes_ = 0;  // non-zero: a huge block, returned to the pool
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
  const bool keep_a = metric != Metric::js;  // js needs a only to derive p, w and U
  if (keep_a) S.a.resize(nnz);
  if (metric != Metric::wd) {
    S.v1.resize(nnz);
    S.v2.resize(nnz);
    S.c1.resize(M.rows);
    S.c2.resize(M.rows);
  }
  int64_t max_row = 0;
  for (int64_t r = 0; r < M.rows; ++r) max_row = std::max(max_row, count[r]);
  const int nt = std::max(1, threads);
  std::vector<std::vector<double>> scratch(nt, std::vector<double>(metric == Metric::wd ? 0 : 5 * max_row));

  parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int w) {
    double* t0 = scratch[w].data();
    for (std::size_t rr = b; rr < e; ++rr) {
      const int64_t r = static_cast<int64_t>(rr);
      const int64_t o = S.ptr[r], n = count[r];
      const double sum = sums[r];
      double* an = keep_a ? S.a.data() + o : t0 + 4 * n;
      int32_t* ix = S.idx.data() + o;
      int64_t k = 0;
      auto put = [&](int64_t col, double x) {
        ix[k] = static_cast<int32_t>(col);
        an[k] = x / sum;
        ++k;
      };
      if (M.dtype == DType::F32) each_nonzero<float>(M, r, put);
      else each_nonzero<double>(M, r, put);
      if (metric == Metric::wd) continue;
      const double* a = an;
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
        for (int64_t k2 = 0; k2 < n; ++k2)  // (a + eps)/eps overflows for eps below ~1e-308
          if (!(x0[k2] <= std::numeric_limits<double>::max())) v1[k2] = std::log(a[k2] + eps) - std::log(eps);
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
  Buf<int32_t> row;
  Buf<double> x1, x2;
};

// dense_runs (js only): a bin held by at least kDenseRunShare of the tile's rows gets a run over
// every row of the tile, absent rows padded with x1 = 0 (kernels skip q == 0). Such runs are
// contiguous in rows, so the kernel updates the accumulators with plain vector loads/stores
// instead of gather/scatter, which costs more than the few padded lanes. (Measured, 502 x 502
// js, AVX-512: 0.75 beats 0.6 by ~3% and 0.5 by ~7%; each padded lane costs a full log.)
constexpr double kDenseRunShare = 0.75;

Postings build_postings(const Sparse& R, int64_t j0, int64_t j1, const double* src1,
                        const double* src2, bool dense_runs, int threads, Cancel* cancel) {
  const bool need_x2 = src2 != nullptr;
  Postings P;
  P.j0 = j0;
  P.j1 = j1;
  P.voff.assign(R.cols + 1, 0);
  for (int64_t k = R.ptr[j0]; k < R.ptr[j1]; ++k) ++P.voff[R.idx[k] + 1];
  std::vector<char> dense;
  if (dense_runs) {
    dense.assign(R.cols, 0);
    const int64_t rows = j1 - j0;
    for (int64_t v = 0; v < R.cols; ++v)
      if (rows >= 8 && P.voff[v + 1] >= kDenseRunShare * static_cast<double>(rows)) {
        dense[v] = 1;
        P.voff[v + 1] = rows;
      }
  }
  for (int64_t v = 0; v < R.cols; ++v) P.voff[v + 1] += P.voff[v];
  const int64_t n = P.voff[R.cols];
  P.row.resize(n);
  P.x1.resize(n);
  if (need_x2) P.x2.resize(n);
  // The transposition writes all over the arrays: split it by ranges of bins of about equal
  // size, one range per task, each task taking its slice of every row (rows are sorted). A
  // range's slice of the arrays (~32k entries, ~640 KB) stays in L2 while it is filled; one
  // range for the whole index made every write a cache miss.
  const int64_t nranges = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(4 * threads, n / 32768), R.cols));
  std::vector<int64_t> vcut(nranges + 1, R.cols);
  vcut[0] = 0;
  for (int64_t c = 1, v = 0; c < nranges; ++c) {
    while (v < R.cols && P.voff[v] < n * c / nranges) ++v;
    vcut[c] = v;
  }
  parallel_for(nranges, 1, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t c = b; c < e; ++c) {
      const int32_t va = static_cast<int32_t>(vcut[c]), vb = static_cast<int32_t>(vcut[c + 1]);
      if (va >= vb) continue;
      std::vector<int64_t> fill(P.voff.begin() + va, P.voff.begin() + vb);
      if (dense_runs)
        for (int32_t v = va; v < vb; ++v)
          if (dense[v])
            for (int64_t j = j0, at = P.voff[v]; j < j1; ++j, ++at) {
              P.row[at] = static_cast<int32_t>(j);
              P.x1[at] = 0.0;
              if (need_x2) P.x2[at] = 0.0;
            }
      for (int64_t j = j0; j < j1; ++j) {
        const int32_t* first = R.idx.data() + R.ptr[j];
        const int32_t* last = R.idx.data() + R.ptr[j + 1];
        for (const int32_t* q = std::lower_bound(first, last, va); q != last && *q < vb; ++q) {
          const int64_t k = q - R.idx.data();
          const int64_t at = dense_runs && dense[*q] ? P.voff[*q] + (j - j0) : fill[*q - va]++;
          P.row[at] = static_cast<int32_t>(j);
          P.x1[at] = src1[k];
          if (need_x2) P.x2[at] = src2[k];
        }
      }
    }
  });
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

// The inverted index of R for js / kl, in tiles of R rows (one tile when symmetric).
std::vector<Postings> build_index(const Sparse& R, Metric metric,
                                  const std::vector<std::pair<int64_t, int64_t>>& tiles, int threads,
                                  Cancel* cancel) {
  const bool js = metric == Metric::js;
  std::vector<Postings> post(tiles.size());
  for (std::size_t t = 0; t < tiles.size(); ++t)
    post[t] = build_postings(R, tiles[t].first, tiles[t].second, R.v1.data(),
                             js ? R.v2.data() : nullptr, js, threads, cancel);
  return post;
}

// post: build_index(R, metric, tiles) (symmetric: of P itself, one tile).
void sparse_js_kl(const Sparse& P, const Sparse& R, const std::vector<Postings>& post, bool symmetric,
                  Metric metric, double eps, const DivergenceKernels& K, int threads, Cancel* cancel,
                  double* out) {
  const int64_t Q = P.rows, N = R.rows;
  const bool js = metric == Metric::js;
  // symmetric (js with R = none): P's own index serves both sides and a pair (i, j), i < j, is
  // met once, at i's entry in the run of each bin they share, against the entries after it.
  Postings pown;
  // P's side of each bin: js (p, w); kl (c, a).
  if (!symmetric)
    pown = build_postings(P, 0, Q, js ? P.v1.data() : P.v2.data(), js ? P.v2.data() : P.a.data(),
                          false, threads, cancel);
  const Postings& PP = symmetric ? post[0] : pown;
  // Rows of P are taken in blocks and, within a block, bin by bin: the run of a bin in R's index
  // is loaded once and reused from L1 by every row of the block that holds the bin (those rows
  // are one contiguous stretch of the bin's run in P's index). Each pair still gets its shared
  // bins in increasing bin order, so blocking, tiles and threads never change a result.
  // Each block streams the whole index once (tens of MB, from L3), so blocks are as large as
  // keeps the accumulators in L2: up to 256 rows while they stay <= 1 MB (N <= 512), 64 rows
  // otherwise; fewer when that would leave threads without blocks to take (measured, 502 x
  // 502 js, 1 thread: 125-row blocks -5% CPU time against 64).
  const int64_t max_rows = std::max<int64_t>(64, std::min<int64_t>(256, (int64_t(1) << 17) / std::max<int64_t>(1, N)));
  int64_t kBlockRows = std::max<int64_t>(8, std::min<int64_t>(max_rows, Q / (4 * std::max(1, threads))));
  kBlockRows = std::max<int64_t>(1, std::min<int64_t>(kBlockRows, (int64_t(1) << 22) / N));  // <= 32 MB/thread
  const int64_t nblocks = (Q + kBlockRows - 1) / kBlockRows;
  const int64_t ntiles = static_cast<int64_t>(post.size());
  const int nt = std::max(1, threads);
  const bool count_shared = !js && eps == 0.0;
  struct Scratch {
    std::vector<double> acc, cnt;
  };
  std::vector<Scratch> scr(nt);
  parallel_for(nblocks * ntiles, 1, threads, cancel, [&](std::size_t b, std::size_t e, int w) {
    Scratch& S = scr[w];
    if (S.acc.empty()) {
      S.acc.resize(kBlockRows * N);
      if (count_shared) S.cnt.resize(kBlockRows * N);
    }
    for (std::size_t it = b; it < e; ++it) {
      const int64_t i0 = static_cast<int64_t>(it) / ntiles * kBlockRows;
      const int64_t i1 = std::min(Q, i0 + kBlockRows);
      const Postings& T = post[static_cast<int64_t>(it) % ntiles];
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j0 = symmetric ? i + 1 : T.j0;
        if (j0 < T.j1) {
          std::fill(S.acc.begin() + (i - i0) * N + j0, S.acc.begin() + (i - i0) * N + T.j1, 0.0);
          if (count_shared)
            std::fill(S.cnt.begin() + (i - i0) * N + j0, S.cnt.begin() + (i - i0) * N + T.j1, 0.0);
        }
      }
      const int32_t* prow = PP.row.data();
      for (int64_t v = 0; v < P.cols; ++v) {
        const int64_t s = T.voff[v], f = T.voff[v + 1];
        if (s == f) continue;
        int64_t zs = PP.voff[v], ze = PP.voff[v + 1];
        if (zs == ze) continue;
        if (prow[zs] < i0) zs = std::lower_bound(prow + zs, prow + ze, static_cast<int32_t>(i0)) - prow;
        if (zs == ze || prow[zs] >= i1) continue;
        if (prow[ze - 1] >= i1) ze = std::lower_bound(prow + zs, prow + ze, static_cast<int32_t>(i1)) - prow;
        for (int64_t z = zs; z < ze; ++z) {
          if (symmetric && PP.x1[z] == 0.0) continue;  // padding of a dense run: row lacks v
          const int64_t st = symmetric ? z + 1 : s;
          if (st >= f) break;
          const std::size_t len = static_cast<std::size_t>(f - st);
          const int64_t il = prow[z] - i0;
          double* A = S.acc.data() + il * N;
          if (js) {
            K.js_posting_f64(PP.x1[z], PP.x2[z], T.x1.data() + st, T.x2.data() + st,
                             T.row.data() + st, len, A);
          } else {
            K.kl_posting_f64(PP.x1[z], PP.x2[z], T.x1.data() + st, T.row.data() + st, len, A);
            if (count_shared) {
              double* C = S.cnt.data() + il * N;
              for (int64_t y = st; y < f; ++y) C[T.row[y]] += 1.0;
            }
          }
        }
      }
      if (cancel && cancel->requested()) return;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j0 = symmetric ? i + 1 : T.j0;
        const double* A = S.acc.data() + (i - i0) * N;
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
          const double* C = S.cnt.data() + (i - i0) * N;
          const double need = static_cast<double>(P.nnz(i));
          for (int64_t j = j0; j < T.j1; ++j) o[j] = C[j] == need ? A[j] : kInf;
        }
      }
    }
  });
}

// A few rows of P against a bank that is not prepared: building R's inverted index would cost
// more than the pairs. Instead each P row is spread over a dense array of bins, and every R row
// gathers its shared bins from it into short buffers. The terms are computed by the *_terms
// kernels (the posting kernels' arithmetic) and summed one by one in bin order, as the index
// path sums them, so both paths -- and so a prepared bank and a one-off call -- agree bit for bit.
constexpr int64_t kDirectMaxRows = 2;  // measured: the index wins from 3 rows on (502 x 32k bank)

void direct_js_kl(const Sparse& P, const Sparse& R, Metric metric, double eps,
                  const DivergenceKernels& K, int threads, Cancel* cancel, double* out) {
  const int64_t Q = P.rows, N = R.rows, V = P.cols;
  const bool js = metric == Metric::js;
  // Per P row, as its side of the index holds them: js x1 = p, x2 = w (x1 > 0 marks a held
  // bin); kl x1 = c, x2 = a (x2 > 0 marks it).
  std::vector<double> d1(V), d2(V);
  int64_t max_r = 0;
  for (int64_t j = 0; j < N; ++j) max_r = std::max(max_r, R.nnz(j));
  const int nt = std::max(1, threads);
  std::vector<std::vector<double>> buf(nt);
  for (int64_t i = 0; i < Q; ++i) {
    for (int64_t k = P.ptr[i]; k < P.ptr[i + 1]; ++k) {
      d1[P.idx[k]] = js ? P.v1[k] : P.v2[k];
      d2[P.idx[k]] = js ? P.v2[k] : P.a[k];
    }
    parallel_for(N, 16, threads, cancel, [&](std::size_t b, std::size_t e, int w) {
      std::vector<double>& B = buf[w];
      if (B.empty()) B.resize(5 * static_cast<std::size_t>(max_r));
      double* b1 = B.data();
      double* b2 = b1 + max_r;
      double* by = b2 + max_r;
      double* bv = by + max_r;
      double* val = bv + max_r;
      for (std::size_t jj = b; jj < e; ++jj) {
        const int64_t j = static_cast<int64_t>(jj);
        std::size_t n = 0;
        for (int64_t k = R.ptr[j]; k < R.ptr[j + 1]; ++k) {
          const int32_t v = R.idx[k];
          if (js ? d1[v] > 0.0 : d2[v] > 0.0) {  // shared bin
            b1[n] = d1[v];
            b2[n] = d2[v];
            by[n] = R.v1[k];
            if (js) bv[n] = R.v2[k];
            ++n;
          }
        }
        if (js) K.js_terms_f64(b1, b2, by, bv, n, val);
        else K.kl_terms_f64(b1, b2, by, n, val);
        double acc = 0.0;
        for (std::size_t k = 0; k < n; ++k) acc += val[k];
        double& o = out[i * N + j];
        if (js) o = (P.c1[i] + R.c1[j]) + acc;
        else if (eps > 0.0) o = (P.c1[i] + R.c2[j]) + acc;
        else o = static_cast<int64_t>(n) == P.nnz(i) ? acc : kInf;
      }
    });
    for (int64_t k = P.ptr[i]; k < P.ptr[i + 1]; ++k) d1[P.idx[k]] = d2[P.idx[k]] = 0.0;
  }
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

// ---- wd through CDF chunks: for inputs that are not very sparse, sum |A_v - B_v| as a dense
// loop over bins (a few vector ops per bin) instead of merging index lists (a branchy step per
// support entry). The bins go in chunks; per chunk every row's CDF piece is built once
// (compensated: hi + lo, so the difference of two CDFs near 1 keeps full precision), then all
// pairs accumulate their chunk sums in a fixed order.
constexpr int64_t kWdChunk = 256;  // 8 rows x 256 bins x (hi, lo) = 32 KB: the P block stays in L1

void cdf_wd(const Sparse& P, const Sparse& R, bool symmetric, const DivergenceKernels& K,
            int threads, Cancel* cancel, double* out) {
  const int64_t Q = P.rows, N = R.rows, V = P.cols;
  // chunk width: <= 64 MB for the CDF pieces of all rows
  const int64_t C = std::min({kWdChunk, V, std::max<int64_t>(16, (int64_t(1) << 22) / (Q + N))});
  std::vector<double> phi(Q * C), plo(Q * C), rhi, rlo;
  if (!symmetric) {
    rhi.resize(N * C);
    rlo.resize(N * C);
  }
  std::vector<double> pc_hi(Q, 0.0), pc_lo(Q, 0.0), rc_hi(N, 0.0), rc_lo(N, 0.0);
  std::vector<int64_t> pcur(P.ptr.begin(), P.ptr.end() - 1), rcur(R.ptr.begin(), R.ptr.end() - 1);
  std::fill(out, out + Q * N, 0.0);
  // One row's CDF over bins [c0, c0 + n), continuing from its carry.
  auto piece = [&](const Sparse& S, int64_t r, int64_t c0, int64_t n, int64_t* cur, double* chi,
                   double* clo, double* hi, double* lo) {
    std::fill(hi, hi + n, 0.0);
    int64_t k = cur[r];
    const int64_t e = S.ptr[r + 1];
    for (; k < e && S.idx[k] < c0 + n; ++k) hi[S.idx[k] - c0] = S.a[k];
    cur[r] = k;
    double sh = chi[r], sl = clo[r];
    for (int64_t t = 0; t < n; ++t) {
      const double x = hi[t], u = sh + x, bp = u - sh;
      sl += (sh - (u - bp)) + (x - bp);
      sh = u;
      hi[t] = sh;
      lo[t] = sl;
    }
    chi[r] = sh;
    clo[r] = sl;
  };
  constexpr int kB = 8;
  const int64_t nbi = (Q + kB - 1) / kB;
  for (int64_t c0 = 0; c0 < V; c0 += C) {
    const int64_t n = std::min(C, V - c0);
    parallel_for(Q, 16, threads, cancel, [&](std::size_t b, std::size_t e, int) {
      for (std::size_t r = b; r < e; ++r)
        piece(P, r, c0, n, pcur.data(), pc_hi.data(), pc_lo.data(), phi.data() + r * C, plo.data() + r * C);
    });
    if (!symmetric)
      parallel_for(N, 16, threads, cancel, [&](std::size_t b, std::size_t e, int) {
        for (std::size_t r = b; r < e; ++r)
          piece(R, r, c0, n, rcur.data(), rc_hi.data(), rc_lo.data(), rhi.data() + r * C, rlo.data() + r * C);
      });
    const double* qh = symmetric ? phi.data() : rhi.data();
    const double* ql = symmetric ? plo.data() : rlo.data();
    // the last bin never counts: both CDFs are 1 there
    const std::size_t m = static_cast<std::size_t>(c0 + n == V ? n - 1 : n);
    if (m == 0) continue;
    parallel_for(nbi, 1, threads, cancel, [&](std::size_t b, std::size_t e, int) {
      for (std::size_t blk = b; blk < e; ++blk) {
        const int64_t i0 = static_cast<int64_t>(blk) * kB, i1 = std::min(Q, i0 + kB);
        const int nb = static_cast<int>(i1 - i0);
        const double* hp[kB];
        const double* lp[kB];
        for (int t = 0; t < nb; ++t) {
          hp[t] = phi.data() + (i0 + t) * C;
          lp[t] = plo.data() + (i0 + t) * C;
        }
        double sums[kB];
        for (int64_t j = symmetric ? i0 + 1 : 0; j < N; ++j) {
          std::fill(sums, sums + kB, 0.0);
          K.wd_dense_f64(hp, lp, nb, qh + j * C, ql + j * C, m, sums);
          for (int t = 0; t < nb; ++t) out[(i0 + t) * N + j] += sums[t];
        }
      }
    });
  }
  if (symmetric)
    for (int64_t i = 0; i < Q; ++i)
      for (int64_t j = i + 1; j < N; ++j) out[j * N + i] = out[i * N + j];
}

// ---- dense js / kl: blocks of BI rows of P x BJ rows of R, bins in chunks of C. ------------
constexpr int kBI = 8;
constexpr int64_t kBJ = 64;
constexpr int64_t kChunk = 1024;

template <class T>
void load_chunk(const HistMatrix& M, int64_t r, int64_t c0, int64_t n, double sum, double eps,
                double* p) {
  const T* x = static_cast<const T*>(M.data) + r * M.row_stride + c0;
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<double>(x[k]) / sum + eps;
}

// p, and h = p log p / 2 (js) or log p (kl), with 0 log 0 = 0 and log 0 = -inf.
void prep_chunk(const HistMatrix& M, int64_t r, int64_t c0, int64_t n, double sum, double eps,
                Metric metric, const DivergenceKernels& K, double* p, double* h) {
  if (M.dtype == DType::F32) load_chunk<float>(M, r, c0, n, sum, eps, p);
  else load_chunk<double>(M, r, c0, n, sum, eps, p);
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
          prep_chunk(P, i0 + bb, c0, n, sp[i0 + bb], eps, metric, K, S.pb.data() + bb * kChunk,
                     S.hb.data() + bb * kChunk);
          pp[bb] = S.pb.data() + bb * kChunk;
          hp[bb] = S.hb.data() + bb * kChunk;
        }
        for (int64_t j = j0; j < j1; ++j) {
          if (half && j <= i0) continue;
          prep_chunk(R, j, c0, n, sr[j], eps, metric, K, S.q.data(), S.hq.data());
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

// Below this share of non-zero bins, dense js/kl inputs take the sparse (inverted-index) path.
constexpr double kDenseFill = 0.5;

template <class T>
int64_t count_nonzero(const T* x, int64_t n) {
  int64_t c = 0;
  for (int64_t k = 0; k < n; ++k) c += x[k] != T(0);
  return c;
}

double nonzero_fraction(const HistMatrix& M, int threads, Cancel* cancel) {
  std::vector<int64_t> cnt(M.rows, 0);
  parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t r = b; r < e; ++r) {
      const int64_t off = static_cast<int64_t>(r) * M.row_stride;
      cnt[r] = M.dtype == DType::F32 ? count_nonzero(static_cast<const float*>(M.data) + off, M.cols)
                                     : count_nonzero(static_cast<const double*>(M.data) + off, M.cols);
    }
  });
  int64_t total = 0;
  for (int64_t c : cnt) total += c;
  return M.rows ? static_cast<double>(total) / (static_cast<double>(M.rows) * static_cast<double>(M.cols)) : 0.0;
}

void check_matrix(const HistMatrix& M, const char* name) {
  if (M.dtype != DType::F32 && M.dtype != DType::F64)
    throw std::invalid_argument(std::string("divergence: ") + name + " values must be F32 or F64, not " +
                                dtype_name(M.dtype));
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

// ---- the bank side of a call, computed once per (metric, ISA) and kept by PreparedHistograms ----
struct PreparedHistograms::Impl {
  HistMatrix R;  // the caller's arrays (a call's own Impl) or the copies below
  double eps = 0.0;
  bool one_off = false;  // divergence(P, &R)'s own: nothing it builds is used again
  std::vector<int64_t> own_indptr;
  std::vector<int32_t> own_indices;
  std::vector<unsigned char> own_data;
  std::mutex mu;
  std::map<std::pair<int, int>, std::unique_ptr<Sparse>> sparse;  // (metric, isa)
  // (metric, isa, tile count) -> index in tiles of R rows
  std::map<std::tuple<int, int, int64_t>, std::unique_ptr<std::vector<Postings>>> index;
  double fill = -1.0;  // non-zero fraction of a dense R, once computed

  const Sparse& sparse_for(Metric metric, const DivergenceKernels& K, int threads, Cancel* cancel) {
    std::lock_guard<std::mutex> lk(mu);
    auto& slot = sparse[{static_cast<int>(metric), static_cast<int>(active_isa())}];
    if (!slot) slot = std::make_unique<Sparse>(build_sparse(R, "R", metric, eps, K, threads, cancel));
    return *slot;
  }
  const std::vector<Postings>& index_for(Metric metric, const Sparse& SR,
                                         const std::vector<std::pair<int64_t, int64_t>>& tiles,
                                         int threads, Cancel* cancel) {
    std::lock_guard<std::mutex> lk(mu);
    auto& slot = index[{static_cast<int>(metric), static_cast<int>(active_isa()),
                        static_cast<int64_t>(tiles.size())}];
    if (!slot) slot = std::make_unique<std::vector<Postings>>(build_index(SR, metric, tiles, threads, cancel));
    return *slot;
  }
  double fill_for(int threads, Cancel* cancel) {
    std::lock_guard<std::mutex> lk(mu);
    if (fill < 0.0) fill = nonzero_fraction(R, threads, cancel);
    return fill;
  }
};

namespace {

// P against a bank; both divergence(P, &R) (with a throwaway Impl over the caller's R) and
// PreparedHistograms::divergence come here, so the two give bit-identical results.
void divergence_vs_bank(const HistMatrix& P, PreparedHistograms::Impl& B, Metric metric, int threads,
                        Cancel* cancel, double* out) {
  const HistMatrix& R = B.R;
  const double eps = B.eps;
  check_matrix(P, "P");
  if (R.cols != P.cols)
    throw std::invalid_argument("divergence: P has " + std::to_string(P.cols) + " columns but R has " +
                                std::to_string(R.cols) + " (histograms must share one vocabulary)");
  const int nt = resolve_threads(threads);
  const DivergenceKernels& K = divergence_kernels(active_isa());  // once per call
  const int64_t Q = P.rows, N = R.rows;
  if (Q == 0 || N == 0) return;
  // Dense inputs that are mostly zeros (token histograms usually are) go through the sparse
  // algorithm too: its cost is the shared bins, the dense loop's is every bin of every pair.
  bool use_dense = metric != Metric::wd && !P.sparse && !R.sparse;
  if (use_dense) {
    const double fill = (nonzero_fraction(P, nt, cancel) * static_cast<double>(Q) +
                         B.fill_for(nt, cancel) * static_cast<double>(N)) / static_cast<double>(Q + N);
    use_dense = fill > kDenseFill;
  }
  if (use_dense) {
    dense_js_kl(P, R, false, metric, eps, K, nt, cancel, out);
    return;
  }
  const Sparse SP = build_sparse(P, "P", metric, eps, K, nt, cancel);
  const Sparse& SR = B.sparse_for(metric, K, nt, cancel);
  if (metric == Metric::wd) {
    // merge cost ~ (nnz_i + nnz_j) branchy steps per pair; CDF cost ~ V cheap vector lanes
    const double mean_nnz = static_cast<double>(SP.ptr[Q]) / Q + static_cast<double>(SR.ptr[N]) / N;
    if (static_cast<double>(P.cols) <= 16.0 * mean_nnz) cdf_wd(SP, SR, false, K, nt, cancel, out);
    else sparse_wd(SP, SR, false, nt, cancel, out);
  } else if (B.one_off && Q <= kDirectMaxRows) {
    direct_js_kl(SP, SR, metric, eps, K, nt, cancel, out);
  } else {  // a prepared bank keeps its index: from one row on, walking it beats the gather
    const auto& post = B.index_for(metric, SR, make_tiles(Q, N, nt), nt, cancel);
    sparse_js_kl(SP, SR, post, false, metric, eps, K, nt, cancel, out);
  }
}

void check_eps(double eps) {
  if (!(eps >= 0.0) || !std::isfinite(eps))
    throw std::invalid_argument("divergence: eps must be finite and >= 0, got " + fmt(eps));
}

}  // namespace

void divergence(const HistMatrix& P, const HistMatrix* R, Metric metric, double eps, int threads,
                Cancel* cancel, double* out) {
  check_eps(eps);
  check_matrix(P, "P");
  if (R) {
    check_matrix(*R, "R");
    PreparedHistograms::Impl B;
    B.R = *R;
    B.eps = eps;
    B.one_off = true;
    divergence_vs_bank(P, B, metric, threads, cancel, out);
    return;
  }
  // R = none: all pairs within P.
  const int nt = resolve_threads(threads);
  const DivergenceKernels& K = divergence_kernels(active_isa());  // once per call
  const int64_t Q = P.rows, N = Q;
  if (Q == 0) return;
  bool use_dense = metric != Metric::wd && !P.sparse;
  if (use_dense) use_dense = nonzero_fraction(P, nt, cancel) > kDenseFill;
  if (use_dense) {
    dense_js_kl(P, P, true, metric, eps, K, nt, cancel, out);
  } else {
    const Sparse SP = build_sparse(P, "P", metric, eps, K, nt, cancel);
    if (metric == Metric::wd) {
      const double mean_nnz = 2.0 * static_cast<double>(SP.ptr[Q]) / Q;
      if (static_cast<double>(P.cols) <= 16.0 * mean_nnz) cdf_wd(SP, SP, true, K, nt, cancel, out);
      else sparse_wd(SP, SP, true, nt, cancel, out);
    } else if (metric == Metric::js) {
      // each unordered pair once, through P's own index (one tile)
      const auto post = build_index(SP, metric, {{0, N}}, nt, cancel);
      sparse_js_kl(SP, SP, post, true, metric, eps, K, nt, cancel, out);
    } else {
      // kl is not symmetric: P against P, both directions.
      const auto post = build_index(SP, metric, make_tiles(Q, N, nt), nt, cancel);
      sparse_js_kl(SP, SP, post, false, metric, eps, K, nt, cancel, out);
    }
  }
  for (int64_t i = 0; i < Q; ++i) out[i * N + i] = 0.0;
}

PreparedHistograms::PreparedHistograms(const HistMatrix& R, double eps, int threads, Cancel* cancel)
    : impl_(nullptr) {
  check_eps(eps);
  check_matrix(R, "R");
  auto impl = std::make_unique<Impl>();
  impl->eps = eps;
  HistMatrix& M = impl->R;
  M = R;
  const std::size_t esize = R.dtype == DType::F32 ? sizeof(float) : sizeof(double);
  if (R.sparse) {
    const int64_t nnz = R.indptr[R.rows];
    impl->own_indptr.assign(R.indptr, R.indptr + R.rows + 1);
    impl->own_indices.assign(R.indices, R.indices + nnz);
    const auto* d = static_cast<const unsigned char*>(R.data);
    impl->own_data.assign(d, d + nnz * esize);
    M.indptr = impl->own_indptr.data();
    M.indices = impl->own_indices.data();
  } else {
    impl->own_data.resize(static_cast<std::size_t>(R.rows * R.cols) * esize);
    for (int64_t r = 0; r < R.rows; ++r)
      std::memcpy(impl->own_data.data() + r * R.cols * esize,
                  static_cast<const unsigned char*>(R.data) + r * R.row_stride * esize, R.cols * esize);
    M.row_stride = R.cols;
  }
  M.data = impl->own_data.data();
  // Reject a bad bank now rather than at its first use.
  const int nt = resolve_threads(threads);
  parallel_for(M.rows, 16, nt, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t r = b; r < e; ++r) scan_row(M, "R", static_cast<int64_t>(r), [](int64_t, double) {});
  });
  impl_ = impl.release();
}

PreparedHistograms::~PreparedHistograms() { delete impl_; }

int64_t PreparedHistograms::rows() const { return impl_->R.rows; }
int64_t PreparedHistograms::cols() const { return impl_->R.cols; }
double PreparedHistograms::eps() const { return impl_->eps; }

void PreparedHistograms::divergence(const HistMatrix& P, Metric metric, int threads, Cancel* cancel,
                                    double* out) const {
  divergence_vs_bank(P, *impl_, metric, threads, cancel, out);
}

}  // namespace loramix
