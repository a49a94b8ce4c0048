// js / kl over dense inputs (at least half the bins non-zero): blocks of P rows x R rows, bins
// in chunks, the per-ISA dense kernels on each.
#include "divergence_internal.h"

namespace loramix {
namespace divergence_impl {

namespace {

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

}  // namespace

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

}  // namespace divergence_impl
}  // namespace loramix
