// The sparse js / kl algorithm: the inverted index of a bank (postings per bin) and the pair
// loops over it, plus the gather path for a few rows against an unindexed bank.
#include "divergence_internal.h"

namespace loramix {
namespace divergence_impl {

namespace {

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
  P.voff.resize(R.cols + 1);
  std::fill(P.voff.begin(), P.voff.end(), int64_t(0));
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

}  // namespace

// Tiles of R rows: few enough that index building stays cheap, enough that a call with few
// P rows still spreads over the threads.
std::vector<std::pair<int64_t, int64_t>> make_tiles(int64_t Q, int64_t N, int threads) {
  int64_t ntiles = 1;
  if (threads > 1 && Q < 4 * threads) ntiles = std::min<int64_t>(N, 2 * threads);
  std::vector<std::pair<int64_t, int64_t>> t;
  for (int64_t k = 0; k < ntiles; ++k) t.emplace_back(N * k / ntiles, N * (k + 1) / ntiles);
  return t;
}

// The inverted index of R for js / kl, in tiles of R rows.
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

// post: build_index(R, metric, tiles). (js of P against itself has its own loop: divergence_symjs.cpp.)
void sparse_js_kl(const Sparse& P, const Sparse& R, const std::vector<Postings>& post,
                  Metric metric, double eps, const DivergenceKernels& K, int threads, Cancel* cancel,
                  double* out) {
  const int64_t Q = P.rows, N = R.rows;
  const bool js = metric == Metric::js;
  // P's side of each bin: js (p, w); kl (c, a).
  const Postings PP = build_postings(P, 0, Q, js ? P.v1.data() : P.v2.data(), js ? P.v2.data() : P.a.data(),
                                     false, threads, cancel);
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
        const int64_t j0 = T.j0;
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
          const int64_t st = s;
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
        const int64_t j0 = T.j0;
        const double* A = S.acc.data() + (i - i0) * N;
        double* o = out + i * N;
        if (js) {
          for (int64_t j = j0; j < T.j1; ++j) {
            const double d = (P.c1[i] + R.c1[j]) + A[j];
            o[j] = d;
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

}  // namespace divergence_impl
}  // namespace loramix
