// Streamed weighted sums (`W (QxK) @ Bank (KxP)`) and Gram matrices over tensor sources.
//
// Numerical contract
//  - Sources are F32, F16 or BF16 (each may differ); they are widened to f32 exactly.
//  - weighted_sum: out[q][i] = sum_k W[q][k] * T_k[i], weights given in f32 (a caller holding
//    f64 weights rounds them once to f32), products and sums in f32 (FMA or multiply-add),
//    summation order fixed per ISA and path (results do not depend on the thread count).
//    Error bound before the output rounding:
//        |out - exact| <= (K + 1) * 2^-24 * sum_k |W[q][k]| |T_k[i]|
//    then one rounding to the output dtype (round to nearest even; NaN stays NaN, quiet;
//    overflow -> inf), see halfconv.h.
//  - A term with W[q][k] == 0 contributes nothing, even if T_k holds inf or NaN, and a
//    source whose weights are all zero is never read.
//  - Order of terms: each element's sum is one sequential chain of f32 multiply-adds (FMA on
//    AVX2/AVX-512): first the panel sources in source order, then the per-row sources in source
//    order. The chain does not depend on the chunk width, the thread count or how a source is
//    read (memory or pread), so outputs are the same bytes for a given ISA and path. A panel
//    source's chunk holding NaN/inf is added by axpy in its place in that chain.
//  - Memory: besides the outputs, per thread Q x C accumulators + a staging area of 8 sources
//    x C elements + (Q >= 4) the panel's stage of Kc sources x C elements as read (~1 MB) and
//    its widened slab of Kc x S floats (~24 KB) (C <= 32768 for Q = 1, else equal chunks of
//    at most ~1.125 x min(16384, 262144/Q), at least 4 tiles; Kc = 8..64, ~1 MB / (C x the
//    widest source dtype's size)),
//    whatever K and P: nothing of size K x P is ever allocated.
//  - Reading: a source in memory (fd < 0) is read in place. A source in a file (fd >= 0) is
//    read with one pread per chunk of the output (its span of that chunk, into the staging
//    area, then converted or multiplied from L2): the file is never mapped, so its pages do not
//    enter the process (bounded memory without MADV_DONTNEED), and each source's chunk is read
//    once per call whatever Q. A short read (file truncated) throws OsError. A call that reads
//    under 4 MB from files runs on one thread (two were slower there: the preads contend).
//  - Paths: Q < 4 (or sources used by fewer than half the rows): per row, fused widen+FMA over
//    groups of up to 4 sources. Q >= 4: sources used by at least half the rows (zero weights
//    kept; a chunk of such a source holding NaN/inf leaves the panel and is added per row to the
//    rows that use it, so a zero weight still adds nothing) are staged as read, Kc sources x C
//    elements (in L2), and widened a slab of S columns at a time into an f32 panel (in L1) on
//    which a register-blocked micro-kernel (AVX-512: 8 rows x 48 columns, AVX2: 4 x 24) runs
//    W(Q x Kc) @ panel; the accumulators are loaded and stored once per Kc sources. A row of
//    this path is bit for bit the single-row call with its weights when every source is used
//    by at least half the rows.
//  - gram: G[i][j] = <T_i, T_j>; f32 products summed in f32 partial sums of at most 64
//    products each (then at most a 4-level f32 reduction over SIMD lanes), partials added in
//    f64 (per thread; threads' totals then summed in a fixed order: results are deterministic
//    for a given thread count). Bound:
//        |G - exact| <= 72 * 2^-24 * sum_c |T_i[c] T_j[c]|  (+ f64 terms, negligible)
//    G is exactly symmetric.
//  - Cancellation: work stops between chunks once `cancel` is requested (throws Cancelled).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "loramix/dtype.h"
#include "loramix/parallel.h"

namespace loramix {

// One source: n elements of `dtype`, in memory at `data` (no alignment required) or, when
// fd >= 0, in the file `fd` at byte `offset` (read with pread; `data` is then not read).
struct SrcView {
  const void* data;
  DType dtype;
  int fd = -1;
  uint64_t offset = 0;
  const std::string* path = nullptr;  // for messages
};

// Where row q of a weighted sum goes: memory (mem != nullptr) or a file at byte `offset`
// through pwrite (fd >= 0; `path` for messages). `discard`: the row is not wanted (a worker of
// a distributed batch that owns other rows): it is not written, and not computed where rows
// are independent (the per-row path); it still counts in how the call's sources are
// classified, so the other rows are the bytes of the call with every row wanted.
struct OutTarget {
  void* mem = nullptr;
  int fd = -1;
  uint64_t offset = 0;
  DType dtype = DType::F32;
  const std::string* path = nullptr;
  bool discard = false;
};

// W is Q x K row-major (float32). out has Q entries.
void weighted_sum(const SrcView* src, std::size_t K, const float* W, std::size_t Q, std::size_t n,
                  const OutTarget* out, int threads, Cancel* cancel);

// Many weighted_sum calls run as one pass on one set of threads. The calls' chunks are handed
// out in call order, one at a time, so a thread that has finished its share of one call goes on
// with the next instead of waiting for the other threads at the end of each call (a mix of 192
// tensors paid that wait 192 times: half of its threads' sleeps). Each call's outputs are the
// bytes weighted_sum writes for the same arguments (every element's chain of terms is the
// same). Calls may be added from another thread while run() goes on, until close().
//  - add() copies the views, the weights and the targets; the sources' bytes (or files), the
//    output memory and the output files must stay valid until run() returns.
//  - done(): the number of calls finished in call order (calls [0, done()) are written).
//  - Errors: a chunk that throws stops the pass (no chunk is handed out after it; chunks already
//    running finish); run() rethrows the first error, or throws Cancelled once `cancel` is
//    requested. add() after close() or after run() has returned throws std::logic_error.
//  - Memory: one set of weighted_sum's per-thread scratch for the whole pass (sized by its
//    largest call), plus each call's plan (O(K Q)).
class WsumPass {
 public:
  explicit WsumPass(int threads);
  ~WsumPass();
  WsumPass(const WsumPass&) = delete;
  WsumPass& operator=(const WsumPass&) = delete;
  std::size_t add(const SrcView* src, std::size_t K, const float* W, std::size_t Q, std::size_t n,
                  const OutTarget* out);
  void close();
  void run(Cancel* cancel);
  std::size_t done() const;
  std::size_t size() const;  // calls added so far
  int threads() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// G is K x K row-major (float64), overwritten.
void gram(const SrcView* src, std::size_t K, std::size_t n, double* G, int threads, Cancel* cancel);

// Element-wise conversions with the active ISA (bit-identical to halfconv.h on every ISA).
void convert_to_f32(const void* in, DType from, float* out, std::size_t n);
void convert_from_f32(const float* in, void* out, DType to, std::size_t n);

}  // namespace loramix
