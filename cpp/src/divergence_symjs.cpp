// js of all pairs within one sparse matrix (divergence(P, nullptr, js)): its own inverted index,
// built for this loop, and the pair loop over it. The algebra is in divergence_internal.h; the
// per-bin loop is the kernels' js_sym_bin_f64.
//
// Rows are taken in blocks; a block walks the bins in order and, for each bin, hands the kernel
// the block's stretch of the bin's run together with the rest of the run (the partners j > i),
// so the run is read once per block and reused from cache by every row of the block. Each pair
// gets its shared bins in increasing bin order, one thread per output entry, with the
// arithmetic of the posting kernels: blocking and threads never change a result, and the
// result equals divergence(P, P) off the diagonal bit for bit (see js_sym_bin_f64 for the one
// exception, values below 2^-1021).
//
// Why not build_index + sparse_js_kl (the general P-against-R path, which ran this case until
// 2026-12): with its binary searches per (bin, row block), its kernel call per (row, bin), its
// blocks of equal rows (unequal work) and its transposition (latency-bound reads, a cache miss
// per scattered write) the 502 x 502 call took 15-17% more CPU, same bits; see
// docs/perf-notes.md, "JS all pairs vs the log floor".
#include "divergence_internal.h"

#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace loramix {
namespace divergence_impl {

namespace {

// dst[0, n) = src[0, n) with streaming stores where SSE2 has them: the destination lines are
// written without being read first, and not kept in cache.
template <class T>
void stream_copy(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
#if defined(__SSE2__)
  const std::size_t misalign = reinterpret_cast<std::uintptr_t>(d) & 15;
  const std::size_t head = std::min<std::size_t>(bytes, (16 - misalign) & 15);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= 16; bytes -= 16, d += 16, s += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#endif
  std::memcpy(d, s, bytes);
}

// A bin held by at least this share of the rows gets a run over every row (absent rows padded
// with h = 0, skipped by the kernels): contiguous in rows, so the kernel updates the
// accumulators with vector loads / stores instead of gather / scatter, which costs more than
// the padded lanes (measured, 502 x 502: 0.6 to 0.85 within 2%, 0.75 best).
constexpr double kSymDenseShare = 0.75;
constexpr int64_t kMaxBpos = int64_t(1) << 24;  // 64 MB

struct SymIndex {
  int64_t nblocks = 0;
  std::vector<int64_t> bstart;        // nblocks + 1: block b is rows [bstart[b], bstart[b + 1])
  std::vector<int64_t> voff;          // cols + 1: bin v's run is [voff[v], voff[v + 1])
  // (nblocks + 1) x cols: block b's first entry in bin v's run, or empty where that table would
  // pass kMaxBpos entries (very many rows: blocks then find their stretch by binary search)
  std::vector<int32_t> bpos;
  std::vector<unsigned char> dense;   // cols: the run covers every row (position = row)
  Buf<int32_t> row;
  Buf<double> h, w;                   // p / 2 and w of the entry
};

// nblk blocks of rows of about equal work (row i pairs with the N - 1 - i rows after it, so
// the first blocks are short), none longer than max_rows (which may add blocks).
std::vector<int64_t> work_blocks(int64_t N, int64_t nblk, int64_t max_rows) {
  std::vector<int64_t> bstart{0};
  const double total = 0.5 * static_cast<double>(N) * static_cast<double>(N - 1);
  double done = 0.0;
  int64_t k = 1;
  for (int64_t i = 0; i < N; ++i) {
    done += static_cast<double>(N - 1 - i);
    const double next = total * static_cast<double>(k) / static_cast<double>(nblk);
    if (done >= next || i + 1 - bstart.back() >= max_rows || i + 1 == N) {
      bstart.push_back(i + 1);
      while (k < nblk && done >= total * static_cast<double>(k) / static_cast<double>(nblk)) ++k;
    }
  }
  return bstart;
}

SymIndex build_sym_index(const Sparse& S, std::vector<int64_t> bstart, int threads, Cancel* cancel) {
  const int64_t N = S.rows, V = S.cols;
  SymIndex I;
  I.nblocks = static_cast<int64_t>(bstart.size()) - 1;
  I.bstart = std::move(bstart);
  const int nt = std::max(1, threads);
  // entries per bin, counted by ranges of rows, one count array per range
  const int64_t nparts = std::min<int64_t>(nt, N);
  std::vector<std::vector<int32_t>> part(nparts);
  parallel_for(nparts, 1, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t t = b; t < e; ++t) {
      std::vector<int32_t>& c = part[t];
      c.assign(V, 0);
      const int64_t k0 = S.ptr[N * t / nparts], k1 = S.ptr[N * (t + 1) / nparts];
      for (int64_t k = k0; k < k1; ++k) ++c[S.idx[k]];
    }
  });
  I.voff.assign(V + 1, 0);
  I.dense.assign(V, 0);
  for (int64_t v = 0; v < V; ++v) {
    int64_t c = 0;
    for (const auto& p : part) c += p[v];
    if (N >= 8 && c >= kSymDenseShare * static_cast<double>(N)) {
      I.dense[v] = 1;
      c = N;
    }
    I.voff[v + 1] = I.voff[v] + c;
  }
  const int64_t n = I.voff[V];
  I.row.resize(n);
  I.h.resize(n);
  I.w.resize(n);
  if ((I.nblocks + 1) * V <= kMaxBpos) I.bpos.resize((I.nblocks + 1) * V);
  const bool with_bpos = !I.bpos.empty();
  // The transposition writes all over the arrays: split it by ranges of bins of about equal
  // size (~8k entries, ~160 KB: stays in L2 while it is filled; the scattered writes, 502 x
  // 32k, 1 thread: 32k entries a range 20 ms, 16k 14-16, 8k 14.3-14.9, 4k 15.5, 2k 19). A range
  // is filled in a staging copy of its slice, the same buffers range after range (so they stay
  // in L2: no miss per scattered write), then streamed to the arrays in order (no read of the
  // destination lines; measured, 502 x 32k: 19.3-20.5 -> 15.6-17.2 ms against writing the slice
  // in order first, then scattering into it). Each range reads a short stretch of every row,
  // prefetching the next rows' stretches (500 short reads are latency-bound otherwise).
  // Each thread takes a run of consecutive ranges, so where a row's stretch starts is where the
  // previous range's ended (one binary search per row and thread).
  const int64_t nranges = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(4 * nt, n / 8192), V));
  std::vector<int32_t> vcut(nranges + 1, static_cast<int32_t>(V));
  vcut[0] = 0;
  for (int64_t c = 1, v = 0; c < nranges; ++c) {
    while (v < V && I.voff[v] < n * c / nranges) ++v;
    vcut[c] = static_cast<int32_t>(v);
  }
  const int32_t* sidx = S.idx.data();
  const double* sv1 = S.v1.data();
  const double* sv2 = S.v2.data();
  int32_t* irow = I.row.data();
  double* ih = I.h.data();
  double* iw = I.w.data();
  const int64_t* voff = I.voff.data();
  const unsigned char* dense = I.dense.data();
  const int64_t* bst = I.bstart.data();
  const int64_t ngroups = std::min<int64_t>(nt, nranges);
  parallel_for(ngroups, 1, threads, cancel, [&](std::size_t gb, std::size_t ge, int) {
    std::vector<int64_t> fill, step, pos(N);
    std::vector<int32_t> srow;  // staging: the range's slice of row, h, w
    std::vector<double> sh, sw;
    for (std::size_t g = gb; g < ge; ++g) {
      const int64_t c0 = nranges * static_cast<int64_t>(g) / ngroups;
      const int64_t c1 = nranges * static_cast<int64_t>(g + 1) / ngroups;
      for (int64_t j = 0; j < N; ++j)
        pos[j] = std::lower_bound(sidx + S.ptr[j], sidx + S.ptr[j + 1], vcut[c0]) - sidx;
      for (int64_t c = c0; c < c1; ++c) {
        if (cancel && cancel->requested()) return;
        const int32_t va = vcut[c], vb = vcut[c + 1];
        if (va >= vb) continue;
        // positions within the range's slice, which starts at base
        const int64_t base = voff[va], len = voff[vb] - base;
        fill.assign(voff + va, voff + vb);
        for (int64_t& f : fill) f -= base;
        // an entry goes to fill[v] + (j & (step[v] - 1)), then fill[v] += step[v]: step 1 in a
        // sparse run (the next free slot), 0 in a dense run (slot: the run's start + j). Branch-free: the
        // dense entries (~20%) come at random (measured: 14.3 -> 12.0 ms, 1 thread).
        step.resize(vb - va);
        for (int32_t v = va; v < vb; ++v) step[v - va] = dense[v] ? 0 : 1;
        if (static_cast<int64_t>(sh.size()) < len) {
          srow.resize(len);
          sh.resize(len);
          sw.resize(len);
        }
        int32_t* srow_s = srow.data();
        double* sh_s = sh.data();
        double* sw_s = sw.data();
        // dense runs: every row, h = w = 0 (absent) until the rows that hold the bin write it
        // (sparse runs are written whole by the loop below)
        for (int32_t v = va; v < vb; ++v)
          if (dense[v])
            for (int64_t j = 0, at = voff[v] - base; j < N; ++j, ++at) {
              srow_s[at] = static_cast<int32_t>(j);
              sh_s[at] = 0.0;
              sw_s[at] = 0.0;
            }
        // a stretch is ~nnz(row) / nranges entries; the next range's follow it in memory
        const int64_t ahead = std::max<int64_t>(8, 2 * n / (N * nranges) + 8);
        int64_t nextb = 0;
        for (int64_t j = 0; j < N; ++j) {
          if (j + 8 < N) {
            const int64_t k0 = pos[j + 8], k1 = std::min(S.ptr[j + 9], k0 + ahead);
            for (int64_t k = k0; k < k1; k += 8) {
              __builtin_prefetch(sv1 + k);
              __builtin_prefetch(sv2 + k);
              if ((k & 15) < 8) __builtin_prefetch(sidx + k);
            }
          }
          if (with_bpos && j == bst[nextb]) {
            int32_t* bp = I.bpos.data() + (nextb++) * V;
            for (int32_t v = va; v < vb; ++v)
              bp[v] = static_cast<int32_t>(dense[v] ? j : fill[v - va] - (voff[v] - base));
          }
          int64_t k = pos[j];
          for (const int64_t kend = S.ptr[j + 1]; k < kend && sidx[k] < vb; ++k) {
            const int32_t v = sidx[k];
            const int64_t st = step[v - va];
            const int64_t at = fill[v - va] + (j & (st - 1));
            fill[v - va] += st;
            srow_s[at] = static_cast<int32_t>(j);
            sh_s[at] = 0.5 * sv1[k];
            sw_s[at] = sv2[k];
          }
          pos[j] = k;
        }
        stream_copy(irow + base, srow.data(), len);
        stream_copy(ih + base, sh.data(), len);
        stream_copy(iw + base, sw.data(), len);
        if (with_bpos) {
          int32_t* bp = I.bpos.data() + I.nblocks * V;
          for (int32_t v = va; v < vb; ++v) bp[v] = static_cast<int32_t>(voff[v + 1] - voff[v]);
        }
      }
    }
#if defined(__SSE2__)
    _mm_sfence();  // the streamed stores are ordered before the join
#endif
  });
  return I;
}

}  // namespace

void symmetric_js(const Sparse& P, const DivergenceKernels& K, int threads, Cancel* cancel, double* out) {
  const int64_t N = P.rows, V = P.cols;
  if (N < 2) return;
  const int nt = std::max(1, threads);
  // Every block streams the index once (tens of MB), so blocks are as large as keeps a thread's
  // accumulators (block rows x N) within 1 MB (L2), or 64 rows where N is large (within 32 MB),
  // three per thread of equal work (measured, 502 x 502, 2 threads: 2 and 3 per thread within
  // 1% CPU, 6 per thread +7%; 9 blocks of equal rows +4%).
  const int64_t max_rows = std::max<int64_t>(
      1, std::min<int64_t>(std::max<int64_t>(64, (int64_t(1) << 17) / N), (int64_t(1) << 22) / N));
  std::vector<int64_t> bstart = work_blocks(N, std::min<int64_t>(3 * nt, N), max_rows);
  int64_t brows = 0;
  for (std::size_t b = 0; b + 1 < bstart.size(); ++b) brows = std::max(brows, bstart[b + 1] - bstart[b]);
  const SymIndex I = build_sym_index(P, std::move(bstart), threads, cancel);
  const int64_t per = brows * N;
  Buf<double> accs;  // one pooled allocation for every thread's accumulators (no page faults per call)
  accs.resize(std::max<int64_t>(nt * per, static_cast<int64_t>(kHuge / sizeof(double))));
  parallel_for(I.nblocks, 1, threads, cancel, [&](std::size_t b, std::size_t e, int wk) {
    double* acc = accs.data() + wk * per;
    for (std::size_t blk = b; blk < e; ++blk) {
      const int64_t i0 = I.bstart[blk], i1 = I.bstart[blk + 1];
      std::fill(acc, acc + (i1 - i0) * N, 0.0);
      const int32_t* bs = I.bpos.empty() ? nullptr : I.bpos.data() + blk * V;
      const int32_t* be = bs ? bs + V : nullptr;
      for (int64_t v = 0; v < V; ++v) {
        const int64_t o = I.voff[v], len = I.voff[v + 1] - o;
        int64_t zs, ze;
        if (bs) {
          zs = bs[v];
          ze = be[v];
        } else if (I.dense[v]) {
          zs = i0;
          ze = i1;
        } else {
          const int32_t* r = I.row.data() + o;
          zs = std::lower_bound(r, r + len, static_cast<int32_t>(i0)) - r;
          ze = std::lower_bound(r + zs, r + len, static_cast<int32_t>(i1)) - r;
        }
        if (zs == ze) continue;
        K.js_sym_bin_f64(I.h.data() + o, I.w.data() + o, I.row.data() + o, static_cast<std::size_t>(zs),
                         static_cast<std::size_t>(ze), static_cast<std::size_t>(len), I.dense[v] != 0, i0,
                         static_cast<std::size_t>(N), acc);
      }
      if (cancel && cancel->requested()) return;
      for (int64_t i = i0; i < i1; ++i) {
        const double* A = acc + (i - i0) * N;
        double* o = out + i * N;
        for (int64_t j = i + 1; j < N; ++j) {
          const double d = (P.c1[i] + P.c1[j]) + A[j];
          o[j] = d;
          out[j * N + i] = d;
        }
      }
    }
  });
}

}  // namespace divergence_impl
}  // namespace loramix
