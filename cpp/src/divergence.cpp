// Batched divergences, the driver: the ISA table, the bank side kept by PreparedHistograms,
// and which path (sparse index, gather, dense, wd) each call takes. The paths live in
// divergence_{rows,index,dense,wd}.cpp (see divergence_internal.h); the per-ISA loops in
// divergence_{scalar,avx2,avx512}.cpp; the contract in divergence.h.
#include "loramix/divergence.h"

#include <cmath>
#include <cstring>
#include <limits>
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
  // from_js_index: R has no values; js on `stored_isa` only, through `stored_index` (borrowed).
  bool stored = false;
  Isa stored_isa = Isa::scalar;
  std::unique_ptr<std::vector<Postings>> stored_index;

  void check_stored(Metric metric) const {
    if (!stored) return;
    if (metric != Metric::js)
      throw std::invalid_argument("divergence: this prepared bank is a stored js index; it cannot answer " +
                                  std::string(metric == Metric::kl ? "kl" : "wd"));
    if (active_isa() != stored_isa)
      throw std::invalid_argument(std::string("divergence: this stored js index was built with the ") +
                                  isa_name(stored_isa) + " kernels but " + isa_name(active_isa()) +
                                  " is active (its values would differ in the last bits)");
  }

  const Sparse& sparse_for(Metric metric, const DivergenceKernels& K, int threads, Cancel* cancel) {
    check_stored(metric);
    std::lock_guard<std::mutex> lk(mu);
    auto& slot = sparse[{static_cast<int>(metric), static_cast<int>(active_isa())}];
    if (!slot) slot = std::make_unique<Sparse>(build_sparse(R, "R", metric, eps, K, threads, cancel));
    return *slot;
  }
  const std::vector<Postings>& index_for(Metric metric, const Sparse& SR,
                                         const std::vector<std::pair<int64_t, int64_t>>& tiles,
                                         int threads, Cancel* cancel) {
    check_stored(metric);
    if (stored) return *stored_index;  // any tiling gives the same bits
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
  B.check_stored(metric);
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
    sparse_js_kl(SP, SR, post, metric, eps, K, nt, cancel, out);
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
      sparse_js_kl(SP, SP, post, metric, eps, K, nt, cancel, out);
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

PreparedHistograms* PreparedHistograms::from_js_index(const JsIndexView& x, const std::string& isa) {
  check_eps(x.eps);
  const Isa want = parse_isa(isa);
  auto bad = [](const std::string& what) { throw std::invalid_argument("stored js index: " + what); };
  if (x.rows < 1 || x.cols < 1 || x.tiles < 1 || x.tiles > x.rows)
    bad("rows " + std::to_string(x.rows) + ", cols " + std::to_string(x.cols) + ", tiles " +
        std::to_string(x.tiles) + " (need rows >= tiles >= 1, cols >= 1)");
  if (x.cols > std::numeric_limits<int32_t>::max()) bad("more bins than int32 can number");
  if (!x.tile_rows || !x.tile_offset || !x.voff || !x.row || !x.x1 || !x.x2 || !x.c1) bad("an array is missing");
  if (x.tile_rows[0] != 0 || x.tile_rows[x.tiles] != x.rows || x.tile_offset[0] != 0)
    bad("tile tables do not start at 0 or do not end at the row count");
  for (int64_t t = 0; t < x.tiles; ++t) {
    if (x.tile_rows[t + 1] <= x.tile_rows[t]) bad("tile " + std::to_string(t) + " has no rows");
    if (x.tile_offset[t + 1] < x.tile_offset[t]) bad("tile offsets decrease at tile " + std::to_string(t));
  }
  auto impl = std::make_unique<Impl>();
  impl->eps = x.eps;
  impl->stored = true;
  impl->stored_isa = want;
  impl->R.sparse = true;
  impl->R.rows = x.rows;
  impl->R.cols = x.cols;
  auto post = std::make_unique<std::vector<Postings>>(static_cast<std::size_t>(x.tiles));
  for (int64_t t = 0; t < x.tiles; ++t) {
    const int64_t j0 = x.tile_rows[t], j1 = x.tile_rows[t + 1];
    const int64_t base = x.tile_offset[t], n = x.tile_offset[t + 1] - base;
    const int64_t* vo = x.voff + t * (x.cols + 1);
    if (vo[0] != 0 || vo[x.cols] != n) bad("tile " + std::to_string(t) + ": bin offsets do not span its entries");
    for (int64_t v = 0; v < x.cols; ++v)
      if (vo[v + 1] < vo[v]) bad("tile " + std::to_string(t) + ": bin offsets decrease at bin " + std::to_string(v));
    const int32_t* rw = x.row + base;
    int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
    for (int64_t k = 0; k < n; ++k) {
      lo = std::min(lo, rw[k]);
      hi = std::max(hi, rw[k]);
    }
    if (n && (lo < j0 || hi >= j1))
      bad("tile " + std::to_string(t) + ": a row number lies outside its rows [" + std::to_string(j0) + ", " +
          std::to_string(j1) + ")");
    Postings& P = (*post)[t];
    P.j0 = j0;
    P.j1 = j1;
    P.voff.borrow(vo, static_cast<std::size_t>(x.cols + 1));
    P.row.borrow(rw, static_cast<std::size_t>(n));
    P.x1.borrow(x.x1 + base, static_cast<std::size_t>(n));
    P.x2.borrow(x.x2 + base, static_cast<std::size_t>(n));
  }
  auto sr = std::make_unique<Sparse>();
  sr->rows = x.rows;
  sr->cols = x.cols;
  sr->c1.assign(x.c1, x.c1 + x.rows);
  impl->sparse[{static_cast<int>(Metric::js), static_cast<int>(want)}] = std::move(sr);
  impl->stored_index = std::move(post);
  auto* out = new PreparedHistograms();
  out->impl_ = impl.release();
  return out;
}

JsIndex PreparedHistograms::export_js_index(int64_t tiles, int threads, Cancel* cancel) const {
  impl_->check_stored(Metric::js);
  const int64_t N = impl_->R.rows, V = impl_->R.cols;
  if (tiles < 1 || tiles > N)
    throw std::invalid_argument("export_js_index: tiles must be in [1, " + std::to_string(N) + "], not " +
                                std::to_string(tiles));
  const int nt = resolve_threads(threads);
  const DivergenceKernels& K = divergence_kernels(active_isa());
  const Sparse& SR = impl_->sparse_for(Metric::js, K, nt, cancel);
  std::vector<std::pair<int64_t, int64_t>> cut;
  for (int64_t k = 0; k < tiles; ++k) cut.emplace_back(N * k / tiles, N * (k + 1) / tiles);
  const std::vector<Postings>& post = impl_->stored ? *impl_->stored_index
                                                    : impl_->index_for(Metric::js, SR, cut, nt, cancel);
  JsIndex x;
  x.rows = N;
  x.cols = V;
  x.tiles = static_cast<int64_t>(post.size());
  x.eps = impl_->eps;
  x.tile_rows.push_back(0);
  x.tile_offset.push_back(0);
  for (const Postings& P : post) {
    x.tile_rows.push_back(P.j1);
    x.tile_offset.push_back(x.tile_offset.back() + static_cast<int64_t>(P.row.size()));
    x.voff.insert(x.voff.end(), P.voff.begin(), P.voff.end());
    x.row.insert(x.row.end(), P.row.begin(), P.row.end());
    x.x1.insert(x.x1.end(), P.x1.begin(), P.x1.end());
    x.x2.insert(x.x2.end(), P.x2.begin(), P.x2.end());
  }
  x.c1 = SR.c1;
  return x;
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
