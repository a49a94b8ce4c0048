// Batched divergences, the driver: the ISA table, the bank side kept by PreparedHistograms,
// and which path (sparse index, gather, dense, wd) each call takes. The paths live in
// divergence_{rows,index,dense,wd}.cpp (see divergence_internal.h); the per-ISA loops in
// divergence_{scalar,avx2,avx512}.cpp; the contract in divergence.h.
#include "loramix/divergence.h"

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "divergence_internal.h"
#include "divergence_kernels.h"
#include "loramix/cpu.h"
#include "loramix/parallel.h"

namespace loramix {

using namespace divergence_impl;

const DivergenceKernels& divergence_kernels(Isa isa) {
  switch (isa) {
#if defined(LORAMIX_HAVE_X86)
    case Isa::avx512: return avx512::divergence_kernels();
    case Isa::avx2: return avx2::divergence_kernels();
#endif
    default: return scalar::divergence_kernels();
  }
}

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
      symmetric_js(SP, K, nt, cancel, out);  // each unordered pair once, through an index of P
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
