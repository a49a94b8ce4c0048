// 1-D Wasserstein between normalized histograms: support-list merge for very sparse rows,
// compensated CDF chunks with the per-ISA dense kernel for the rest.
#include "divergence_internal.h"

namespace loramix {
namespace divergence_impl {

namespace {

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

// ---- wd through CDF chunks: for inputs that are not very sparse, sum |A_v - B_v| as a dense
// loop over bins (a few vector ops per bin) instead of merging index lists (a branchy step per
// support entry). The bins go in chunks; per chunk every row's CDF piece is built once
// (compensated: hi + lo, so the difference of two CDFs near 1 keeps full precision), then all
// pairs accumulate their chunk sums in a fixed order.
constexpr int64_t kWdChunk = 256;  // 8 rows x 256 bins x (hi, lo) = 32 KB: the P block stays in L1

}  // namespace

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

}  // namespace divergence_impl
}  // namespace loramix
