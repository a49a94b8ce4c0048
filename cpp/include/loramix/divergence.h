// Batched divergences between token histograms (JS, KL, 1-D Wasserstein).
//
// Numerical contract
// ------------------
//  - Inputs are rows of non-negative, finite counts (or weights) over V ordered bins. A row
//    holding NaN, +-inf or a negative value, or summing to zero (or to +inf), is rejected
//    with std::invalid_argument (ValueError in Python).
//  - Each row x is normalized to a = x / sum(x) (in float64, whatever the input dtype), then
//    `eps` is added to every one of the V bins: p = a + eps. There is NO renormalization
//    after adding eps (the paper's profile: "normalize, then + 1e-10").
//  - Logs are natural: results are in nats.
//      js(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2        (0 <= js <= ln 2 + O(V eps))
//      kl(p, q) = KL(p || q) = sum_v p_v log(p_v / q_v)                     (row of P against row of R)
//      wd(p, q) = sum_{v=0}^{V-2} |A_v - B_v|, A, B the cumulative sums of a, b (eps NOT added):
//                 the 1-D Wasserstein-1 distance between the two normalized histograms with unit
//                 bin spacing, i.e. scipy.stats.wasserstein_distance(ids, ids, a, b).
//  - eps = 0 gives the unsmoothed definitions with 0 log 0 = 0; then kl = +inf whenever some bin
//    has p > 0 = q, and js stays finite. eps must be finite and >= 0.
//  - R = none (symmetric call): out[i][j] for all i, j of P; js and wd are computed once per
//    unordered pair and mirrored; the diagonal is exactly 0 for every metric.
//
// Accuracy (all ISAs): every quantity is computed in float64, whatever the input dtype. Logs use
// std::log (scalar) or a 16-entry table + degree-9 polynomial log (AVX2/AVX-512) with error
// < 2 ulp, or < 2e-17 absolute near x = 1 (positive finite arguments, subnormals included);
// the AVX-512 sparse js loop, the hot one, uses a shorter log (reduction to [1, 2), 16-entry
// table, degree-8 polynomial) whose error on 0 < x <= 1 is < 1.5 ulp of the result, or
// < 2.5e-16 absolute where |log x| < 1 (no relative bound just below 1): it only ever takes
// log m with m <= 1 and weighs it by m, sum m <= 1, so a pair's error stays a few ulp of
// (ln 2 + entropies) as before. Per
// pair the absolute error against a float64 oracle of the same formula is a few ulp of the
// magnitudes summed: about 1e-15 (ln 2 + entropies) for js, 1e-15 log(1/eps) for kl (its
// one-sided sums F, G are ~log(1/eps) and cancel for nearly identical rows), 1e-16 V for wd
// (compensated CDFs). So results are within 1e-12 relative unless the divergence itself is
// below ~1e-3 (nearly identical rows), where the bound is ~1e-14 absolute -- for float32 and
// float64 inputs alike. Threads, blocking and tiling never change results: each output entry is
// accumulated by one thread in a fixed order.
//
// Algorithm (why it is fast): for sparse inputs, only bins both rows share cost a log. With eps
// smoothing a bin held by only one row contributes a term of that row alone and a bin held by
// neither contributes exactly 0 to js and kl, so each row carries the sum of its one-sided terms
// and each pair adds corrections over the bins it shares. The shared bins of row i with every row
// j are found through an inverted index (per bin, the rows of R that hold it), so a pair costs
// O(|supp p ∩ supp q|) logs (js) or multiply-adds (kl) and no work on bins it does not share.
// Paths, chosen per call:
//   js / kl, any CSR input, or dense inputs under 50% non-zero  -> inverted index (sparse);
//   js / kl, dense inputs at least 50% non-zero                  -> dense blocked SIMD loop;
//   wd, V <= 16 x (mean support of a P row + of an R row)         -> CDF chunks, dense SIMD loop;
//   wd, otherwise (very sparse rows)                              -> merge of the two index lists.
//   js / kl, P of 1-2 rows against an unprepared R                -> gather of the shared bins
//                                                                   per R row (no index built);
//   js / kl against a PreparedHistograms bank                     -> its kept index, any Q;
//   js, R = none, sparse (as above)                               -> an index of P built for the
//                                                                   all-pairs loop, each unordered
//                                                                   pair once.
// The gather path and the index compute every term with the same arithmetic and add a pair's
// terms in the same (bin) order, so all paths of a sparse js / kl call agree bit for bit; the
// R = none js loop does too, so off the diagonal divergence(P, none, js) equals
// divergence(P, &P, js) bit for bit (it forms m = p/2 + q/2, which is (p + q)/2 exactly unless
// p or q is below 2^-1021).
// kl with R = none runs as P against P (both directions). A CSR side is never densified; a dense
// side of a mixed call is read as sparse rows.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "loramix/dtype.h"

// The per-ISA kernels behind this interface are internal (cpp/src/divergence_kernels.h).
namespace loramix {

class Cancel;  // parallel.h

enum class Metric : int { js = 0, kl = 1, wd = 2 };

// A Q x V histogram matrix: dense row-major (row_stride elements between rows) or CSR with
// int64 indptr (rows + 1), int32 column indices strictly increasing within each row, and
// values of `dtype` (DType::F32 or DType::F64; any other is rejected). Explicit zeros in CSR
// are allowed (ignored).
struct HistMatrix {
  bool sparse = false;
  DType dtype = DType::F64;
  int64_t rows = 0, cols = 0;
  const void* data = nullptr;
  int64_t row_stride = 0;            // dense only
  const int64_t* indptr = nullptr;   // sparse only
  const int32_t* indices = nullptr;  // sparse only
};

// out: Q x N row-major float64 (N = R ? R->rows : P.rows). R == nullptr: all pairs within P.
// threads <= 0: default_threads(). Polls `cancel` (may be null) between blocks of rows.
// Throws std::invalid_argument for invalid input, Cancelled when cancelled.
void divergence(const HistMatrix& P, const HistMatrix* R, Metric metric, double eps, int threads,
                Cancel* cancel, double* out);

// A bank R (N x V) prepared once for many calls `P against R`: it keeps a copy of R and, built at
// first use for each (metric, active ISA) and then kept, R's normalized rows with their
// per-row sums and its inverted index -- the part of divergence(P, &R) that grows with N.
// divergence(P, &R) itself runs through the same code on a throwaway bank, so
// bank.divergence(P, m, ...) equals divergence(P, &R, m, bank.eps(), ...) bit for bit.
// The constructor validates every row of R (std::invalid_argument). Queries may run
// concurrently (lazy builds are serialized). Not copyable.
// A prepared bank's js index in a flat, thread-count-independent form, to be kept outside the
// process (loramix stores it in the bank's `bank.index` at `bank build`) and given back to
// PreparedHistograms::from_js_index. R's rows are cut into `tiles` contiguous tiles
// (tile_rows: tiles + 1 boundaries, 0 .. rows); tile t's entries are [tile_offset[t],
// tile_offset[t + 1]) of row / x1 / x2, and voff + t * (cols + 1) holds, per bin, the offsets of
// the bin's run within the tile. c1: the per-row one-sided sums (rows). The values depend on eps
// and on the ISA whose kernels computed them (isa_name of active_isa() at export).
struct JsIndexView {
  int64_t rows = 0, cols = 0, tiles = 0;
  double eps = 0.0;
  const int64_t* tile_rows = nullptr;    // tiles + 1
  const int64_t* tile_offset = nullptr;  // tiles + 1
  const int64_t* voff = nullptr;         // tiles x (cols + 1)
  const int32_t* row = nullptr;          // tile_offset[tiles]
  const double* x1 = nullptr;            // tile_offset[tiles]
  const double* x2 = nullptr;            // tile_offset[tiles]
  const double* c1 = nullptr;            // rows
};

// The owning arrays behind a JsIndexView (what PreparedHistograms::export_js_index returns).
struct JsIndex {
  int64_t rows = 0, cols = 0, tiles = 0;
  double eps = 0.0;
  std::vector<int64_t> tile_rows, tile_offset, voff;
  std::vector<int32_t> row;
  std::vector<double> x1, x2, c1;
};

class PreparedHistograms {
 public:
  PreparedHistograms(const HistMatrix& R, double eps, int threads, Cancel* cancel);
  // A bank that answers js only, on the ISA it was exported on, from an index kept elsewhere.
  // The memory behind `index` is borrowed, not copied: the caller keeps it alive and unchanged
  // for this object's lifetime. Every offset and row number is checked first (a damaged index
  // throws std::invalid_argument, it is never followed out of bounds); values are not.
  // Queries give bit for bit what the bank it was exported from gives. A query for another
  // metric, or while another ISA is active, throws std::invalid_argument.
  static PreparedHistograms* from_js_index(const JsIndexView& index, const std::string& isa);
  // This bank's js index in `tiles` tiles (1 <= tiles <= rows), built with the active ISA.
  JsIndex export_js_index(int64_t tiles, int threads, Cancel* cancel) const;
  ~PreparedHistograms();
  PreparedHistograms(const PreparedHistograms&) = delete;
  PreparedHistograms& operator=(const PreparedHistograms&) = delete;
  int64_t rows() const;
  int64_t cols() const;
  double eps() const;
  // out: Q x rows() row-major float64, as divergence(P, &R, metric, eps(), ...).
  void divergence(const HistMatrix& P, Metric metric, int threads, Cancel* cancel, double* out) const;

  struct Impl;

 private:
  PreparedHistograms() : impl_(nullptr) {}
  Impl* impl_;
};

}  // namespace loramix
