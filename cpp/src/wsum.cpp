// Driver for wsum.h: splits the element range into chunks, hands them to threads, picks the
// per-ISA kernels once per call, and routes each output row to memory or a file.
#include "loramix/wsum.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "loramix/cpu.h"
#include "loramix/safetensors.h"
#include "wsum_kernels.h"

namespace loramix {
namespace {

const WsumKernels& kernels() {
  switch (active_isa()) {
#if defined(LORAMIX_HAVE_X86)
    case Isa::avx512: return avx512::wsum_kernels();
    case Isa::avx2: return avx2::wsum_kernels();
#endif
    default: return scalar::wsum_kernels();
  }
}

std::size_t round_up(std::size_t x, std::size_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned float scratch.
struct Scratch {
  std::unique_ptr<float[]> raw;
  float* p = nullptr;
  std::size_t cap = 0;
  float* get(std::size_t n) {
    if (n > cap) {
      raw.reset(new float[n + 16]);
      p = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
      cap = n;
    }
    return p;
  }
};

// True when no element is NaN or +-inf (exponent bits all ones). Branch-free so it vectorizes.
bool all_finite(const float* x, std::size_t n) {
  std::uint32_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t b;
    std::memcpy(&b, x + i, sizeof b);
    bad |= static_cast<std::uint32_t>((b & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

// The streaming kernels read and write F32, F16 and BF16 only (DType also names F64, which
// only the divergence kernels take).
void check_dtype(DType d, const char* what) {
  if (d != DType::F32 && d != DType::F16 && d != DType::BF16)
    throw std::invalid_argument(std::string(what) + ": dtype " + dtype_name(d) +
                                " is not streamed (F32, F16 or BF16)");
}

const char* at(const SrcView& s, std::size_t i) {
  return static_cast<const char*>(s.data) + i * dtype_size(s.dtype);
}

// The bytes of source `s` for elements [c0, c0 + cnt): in place for a source in memory, else
// one pread of that span into `buf` (room for cnt f32).
const void* fetch(const SrcView& s, std::size_t c0, std::size_t cnt, float* buf) {
  if (s.fd < 0) return at(s, c0);
  const std::size_t es = dtype_size(s.dtype);
  pread_all(s.fd, buf, cnt * es, s.offset + c0 * es, s.path ? *s.path : std::string("?"));
  return buf;
}

// The same test on a source's bytes as read (F32, F16 or BF16: exponent bits all ones).
bool all_finite_raw(const void* p, DType dt, std::size_t n) {
  if (dt == DType::F32) return all_finite(static_cast<const float*>(p), n);
  const std::uint16_t mask = dt == DType::F16 ? 0x7c00u : 0x7f80u;
  const auto* h = static_cast<const std::uint16_t*>(p);
  std::uint32_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t b;
    std::memcpy(&b, h + i, sizeof b);
    bad |= static_cast<std::uint32_t>((b & mask) == mask);
  }
  return bad == 0;
}

// GEMM panel blocking (see weighted_sum): sources staged as read per block (bytes), the most
// sources per block, and the widened slab (floats; Kc x S in L1). Measured flat from 3072 to
// 24576 slab floats, 0.5 to 2 MB of stage and 128k to 256k accumulator floats at Q = 16.
constexpr std::size_t kPanelStageBytes = std::size_t(1) << 20;
constexpr std::size_t kPanelMaxKc = 64;
constexpr std::size_t kPanelSlabFloats = 6144;

constexpr std::size_t kBatch = 8;  // per-row sources fetched per step (staging slots)
// Below this many bytes read from files, a call runs on one thread (see weighted_sum).
constexpr std::size_t kSmallFileCallBytes = std::size_t(4) << 20;

// One weighted_sum call, planned: its sources classified (panel / per row / never read), its
// chunking chosen. run_chunk computes one chunk of it; weighted_sum runs a plan's chunks on its
// threads, WsumPass runs the chunks of many plans in a row on one set of threads.
struct WsumPlan {
  std::vector<SrcView> src;
  std::vector<OutTarget> out;
  std::size_t K = 0, Q = 0, n = 0;
  std::vector<std::size_t> dense;
  std::vector<char> dense_has_zero;                  // per panel source: some weight is zero
  std::vector<std::vector<std::size_t>> row_k;       // per row: sources handled by axpy
  std::vector<std::size_t> act;                      // sources used by some row's axpy, in order
  std::vector<float> wpack;                          // wpack[d*Q + q] = W[q][dense[d]]
  std::vector<std::vector<float>> row_w;
  std::vector<std::vector<DType>> row_dt;
  std::size_t C = 0, Kc = 1, S = 0, es_max = 2, nchunks = 0;
  int threads = 1;  // threads the call uses on its own (1 for a small call read from files)
};

// Per-thread scratch, reused from chunk to chunk and from call to call.
struct WsumWorker {
  Scratch acc, panel, stage, obuf, raw;
  const void* slot[kBatch];
  const void* rows[kPanelMaxKc];
  std::vector<const void*> ptrs;
  std::vector<std::size_t> pos;       // per row: next entry of row_k[q]
  std::vector<std::size_t> fallback;  // panel sources of this block holding a non-finite value
};

WsumPlan plan_call(const SrcView* src, std::size_t K, const float* W, std::size_t Q, std::size_t n,
                   const OutTarget* out, int threads, const WsumKernels& kr) {
  for (std::size_t k = 0; k < K; ++k) check_dtype(src[k].dtype, "weighted_sum source");
  for (std::size_t q = 0; q < Q; ++q) check_dtype(out[q].dtype, "weighted_sum output");
  WsumPlan p;
  p.src.assign(src, src + K);
  p.out.assign(out, out + Q);
  p.K = K;
  p.Q = Q;
  p.n = n;
  std::vector<std::size_t>& dense = p.dense;
  std::vector<char>& dense_has_zero = p.dense_has_zero;
  std::vector<std::vector<std::size_t>>& row_k = p.row_k;
  std::vector<std::size_t>& act = p.act;
  row_k.resize(Q);
  // Classify sources: all weights zero (never read); used by most rows (GEMM panel, zero weights
  // kept in the packed weights); used by few rows (per-row axpy over the rows whose weight is
  // non-zero). A panel source with some zero weights must not let 0 * NaN (or 0 * inf) reach a
  // row: each of its converted chunks is checked, and a chunk holding a non-finite value leaves
  // the panel (zeroed there) and is added by axpy to the rows that use it. A leave-one-out
  // batch (one zero per row) thus runs as a GEMM instead of Q separate axpy passes.
  const bool use_panel = Q >= 4;
  for (std::size_t k = 0; k < K; ++k) {
    std::size_t nz = 0;
    for (std::size_t q = 0; q < Q; ++q) nz += W[q * K + k] != 0.f;
    if (nz == 0) continue;
    if (use_panel && 2 * nz >= Q) {
      dense.push_back(k);
      dense_has_zero.push_back(nz < Q);
    } else {
      act.push_back(k);
      for (std::size_t q = 0; q < Q; ++q)
        if (W[q * K + k] != 0.f) row_k[q].push_back(k);
    }
  }
  std::vector<float>& wpack = p.wpack;
  wpack.resize(dense.size() * Q);
  for (std::size_t d = 0; d < dense.size(); ++d)
    for (std::size_t q = 0; q < Q; ++q) wpack[d * Q + q] = W[q * K + dense[d]];
  auto& row_w = p.row_w;
  auto& row_dt = p.row_dt;
  row_w.resize(Q);
  row_dt.resize(Q);
  for (std::size_t q = 0; q < Q; ++q)
    for (std::size_t k : row_k[q]) {
      row_w[q].push_back(W[q * K + k]);
      row_dt[q].push_back(src[k].dtype);
    }

  // A small call read from files runs on one thread: its few 64 KB preads per thread do not
  // scale -- the kernel's page-cache copies contend -- and the second thread only adds its own
  // start. Measured (one q_proj A of the 502-member bf16 bank, 50 calls, 2 alternated runs):
  // 16 sources (2 MB) 0.59-0.63 ms on 1 thread vs 0.66-0.68 on 2; 32 (4 MB) 0.87-0.91 vs
  // 0.81-0.83; 64 (8 MB) 1.37-1.41 vs 1.13. Results do not depend on the thread count.
  {
    std::size_t file_bytes = 0;
    for (std::size_t k : dense) file_bytes += src[k].fd >= 0 ? n * dtype_size(src[k].dtype) : 0;
    for (std::size_t k : act) file_bytes += src[k].fd >= 0 ? n * dtype_size(src[k].dtype) : 0;
    if (file_bytes > 0 && file_bytes < kSmallFileCallBytes) threads = 1;
  }
  // Chunk width C. One row: one chunk per thread up to 32768 elements (long preads and
  // streams; the accumulators and 8 staged sources stay in L2). Several rows: the Q x C
  // accumulators (1 MB at Q = 16) and the panel's stage (1 MB) in L2, C as wide as that allows: each pread
  // has a fixed cost in the kernel (16 KB preads cost Q = 16 twice the read ceiling's CPU).
  // Each source's span of a chunk is fetched once per chunk, whatever Q, so C no longer
  // shrinks with the number of sources.
  const std::size_t tile = kr.tile;
  std::size_t& C = p.C;
  if (Q == 1) {
    const std::size_t per_thread = (n + static_cast<std::size_t>(threads) - 1) / static_cast<std::size_t>(threads);
    C = std::min<std::size_t>(32768, std::max(4 * tile, round_up(per_thread, tile)));
  } else {
    // Equal chunks, a multiple of the thread count while there are few of them, up to 1/8
    // over the accumulator budget: 65,536 elements at Q = 16 were 4 chunks of 16,368 and one
    // of 64 (its own 502 preads), 16,384 were one chunk and 16 elements (one thread busy).
    const std::size_t cap = std::min<std::size_t>(16384, std::max(4 * tile, 262144 / Q / tile * tile));
    const std::size_t nt = static_cast<std::size_t>(std::max(threads, 1));
    std::size_t nc = std::max<std::size_t>(1, (n + cap + cap / 8 - 1) / (cap + cap / 8));
    if (nc < 4 * nt) nc = round_up(nc, nt);
    C = std::max(4 * tile, (n + nc - 1) / nc);
  }
  C = round_up(C, tile);
  // Panel sources are staged as read (bf16 stays 2 bytes), Kc of them per block, in a stage of
  // ~kPanelStageBytes; each slab of S columns of the block is then widened into a small f32
  // panel (Kc x S, in L1/L2) just before the micro-kernel uses it. The accumulators are loaded
  // and stored once per block of Kc sources: Kc = 32 for bf16 at Q = 16 (it was 8 when the whole
  // block was widened first, and the accumulator tile's loads and stores were the bound).
  std::size_t& es_max = p.es_max;
  for (std::size_t k : dense) es_max = std::max(es_max, dtype_size(src[k].dtype));
  p.Kc = dense.empty() ? 1 : std::min<std::size_t>(dense.size(),
      std::min<std::size_t>(kPanelMaxKc, std::max<std::size_t>(8, kPanelStageBytes / (C * es_max))));
  p.S = std::min(round_up(C, tile), std::max(tile, kPanelSlabFloats / p.Kc / tile * tile));
  p.nchunks = (n + C - 1) / C;
  p.threads = threads;
  return p;
}

// Chunk ci of plan p: elements [ci * C, ci * C + C) of every output row.
void run_chunk(const WsumPlan& p, std::size_t ci, WsumWorker& w, const WsumKernels& kr) {
  const SrcView* src = p.src.data();
  const OutTarget* out = p.out.data();
  const std::size_t Q = p.Q, n = p.n, C = p.C, Kc = p.Kc, S = p.S, es_max = p.es_max, tile = kr.tile;
  const auto& dense = p.dense;
  const auto& dense_has_zero = p.dense_has_zero;
  const auto& act = p.act;
  const auto& row_k = p.row_k;
  const auto& wpack = p.wpack;
  const auto& row_w = p.row_w;
  const auto& row_dt = p.row_dt;
  float* acc = w.acc.get(Q * C);
  float* stage = w.stage.get(kBatch * C);
  const std::size_t c0 = ci * C, cnt = std::min(C, n - c0);
  std::memset(acc, 0, sizeof(float) * Q * C);
  if (!dense.empty()) {
    // room for Kc rows of C elements of the widest dtype (row stride C * es_max bytes)
    char* raw = reinterpret_cast<char*>(w.raw.get(Kc * C * es_max / sizeof(float)));
    float* panel = w.panel.get(Kc * S);
    for (std::size_t d0 = 0; d0 < dense.size(); d0 += Kc) {
      const std::size_t kc = std::min(Kc, dense.size() - d0);
      w.fallback.clear();
      for (std::size_t j = 0; j < kc; ++j) {
        const SrcView& s = src[dense[d0 + j]];
        w.rows[j] = fetch(s, c0, cnt, reinterpret_cast<float*>(raw + j * C * es_max));
        if (dense_has_zero[d0 + j] && !all_finite_raw(w.rows[j], s.dtype, cnt)) w.fallback.push_back(d0 + j);
      }
      for (std::size_t s0 = 0; s0 < cnt; s0 += S) {
        const std::size_t scnt = std::min(S, cnt - s0), sp = round_up(scnt, tile);
        std::size_t f = 0;  // next fallback source
        for (std::size_t j = 0; j < kc; ++j) {
          float* row = panel + j * S;
          if (f < w.fallback.size() && w.fallback[f] == d0 + j) {
            ++f;  // never read by the GEMM (it runs around it)
            continue;
          }
          const DType dt = src[dense[d0 + j]].dtype;
          kr.to_f32(static_cast<const char*>(w.rows[j]) + s0 * dtype_size(dt), dt, scnt, row);
          std::memset(row + scnt, 0, sizeof(float) * (sp - scnt));
        }
        // The GEMM runs up to each fallback source, which is added in its place (rows with
        // a non-zero weight get w * T, NaN included): every element's terms stay in source
        // order.
        std::size_t j0 = d0;
        for (std::size_t d : w.fallback) {
          if (d > j0) kr.gemm(acc + s0, C, panel + (j0 - d0) * S, S, wpack.data() + j0 * Q, Q, d - j0, sp);
          const DType dt = src[dense[d]].dtype;
          const void* ptr = static_cast<const char*>(w.rows[d - d0]) + s0 * dtype_size(dt);
          for (std::size_t q = 0; q < Q; ++q) {
            const float wq = wpack[d * Q + q];
            if (wq != 0.f) kr.axpy(acc + q * C + s0, &ptr, &dt, &wq, 1, scnt);
          }
          j0 = d + 1;
        }
        if (d0 + kc > j0) kr.gemm(acc + s0, C, panel + (j0 - d0) * S, S, wpack.data() + j0 * Q, Q, d0 + kc - j0, sp);
      }
    }
  }
  // Per-row sources, kBatch at a time in source order: each fetched once, then every row
  // that uses it adds it (its sources stay in order, so its chain of terms is unchanged).
  w.pos.assign(Q, 0);
  for (std::size_t a0 = 0; a0 < act.size(); a0 += kBatch) {
    const std::size_t nb = std::min(kBatch, act.size() - a0);
    for (std::size_t j = 0; j < nb; ++j) w.slot[j] = fetch(src[act[a0 + j]], c0, cnt, stage + j * C);
    const std::size_t last = act[a0 + nb - 1];
    for (std::size_t q = 0; q < Q; ++q) {
      if (out[q].discard) continue;  // rows are independent here: nothing else depends on it
      const auto& ks = row_k[q];
      const std::size_t p0 = w.pos[q];
      std::size_t p = p0, j = 0;
      w.ptrs.clear();
      for (; p < ks.size() && ks[p] <= last; ++p) {
        while (act[a0 + j] != ks[p]) ++j;
        w.ptrs.push_back(w.slot[j]);
      }
      w.pos[q] = p;
      if (p > p0) kr.axpy(acc + q * C, w.ptrs.data(), row_dt[q].data() + p0, row_w[q].data() + p0, p - p0, cnt);
    }
  }
  for (std::size_t q = 0; q < Q; ++q) {
    const OutTarget& o = out[q];
    if (o.discard) continue;
    const std::size_t es = dtype_size(o.dtype);
    if (o.mem) {
      kr.from_f32(acc + q * C, cnt, static_cast<char*>(o.mem) + c0 * es, o.dtype);
    } else {
      void* buf = w.obuf.get(C);
      kr.from_f32(acc + q * C, cnt, buf, o.dtype);
      pwrite_all(o.fd, buf, cnt * es, o.offset + c0 * es, o.path ? *o.path : std::string("?"));
    }
  }
}

}  // namespace

void weighted_sum(const SrcView* src, std::size_t K, const float* W, std::size_t Q, std::size_t n,
                  const OutTarget* out, int threads, Cancel* cancel) {
  const WsumKernels& kr = kernels();
  const WsumPlan p = plan_call(src, K, W, Q, n, out, resolve_threads(threads), kr);
  std::vector<WsumWorker> ws(static_cast<std::size_t>(std::max(p.threads, 1)));
  parallel_for(p.nchunks, 1, p.threads, cancel, [&](std::size_t b, std::size_t e, int wid) {
    for (std::size_t ci = b; ci < e; ++ci) run_chunk(p, ci, ws[static_cast<std::size_t>(wid)], kr);
  });
}

struct WsumPass::State {
  int threads = 1;
  const WsumKernels* kr = nullptr;
  mutable std::mutex mu;
  std::condition_variable cv;  // a call added, or the pass closed
  std::vector<std::unique_ptr<WsumPlan>> calls;
  std::vector<std::size_t> left;  // per call: chunks not yet finished
  std::size_t cur = 0, next_chunk = 0;  // the next chunk handed out
  std::size_t done = 0;                 // calls [0, done) finished
  bool closed = false, over = false;    // over: run() has returned

  // Under mu: moves `done` past every finished call.
  void advance() {
    while (done < calls.size() && left[done] == 0) ++done;
  }
};

WsumPass::WsumPass(int threads) : s_(std::make_unique<State>()) {
  s_->threads = std::max(1, resolve_threads(threads));
  s_->kr = &kernels();
}

WsumPass::~WsumPass() = default;

std::size_t WsumPass::add(const SrcView* src, std::size_t K, const float* W, std::size_t Q, std::size_t n,
                          const OutTarget* out) {
  auto p = std::make_unique<WsumPlan>(plan_call(src, K, W, Q, n, out, s_->threads, *s_->kr));
  std::lock_guard<std::mutex> lk(s_->mu);
  if (s_->closed || s_->over) throw std::logic_error("WsumPass: a call was added after close() or after run() returned");
  s_->left.push_back(p->nchunks);
  s_->calls.push_back(std::move(p));
  s_->advance();  // a call with no elements is done at once
  s_->cv.notify_all();
  return s_->calls.size() - 1;
}

void WsumPass::close() {
  std::lock_guard<std::mutex> lk(s_->mu);
  s_->closed = true;
  s_->cv.notify_all();
}

std::size_t WsumPass::done() const {
  std::lock_guard<std::mutex> lk(s_->mu);
  return s_->done;
}

std::size_t WsumPass::size() const {
  std::lock_guard<std::mutex> lk(s_->mu);
  return s_->calls.size();
}

int WsumPass::threads() const { return s_->threads; }

void WsumPass::run(Cancel* cancel) {
  State& s = *s_;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.over) throw std::logic_error("WsumPass: run() called twice");
  }
  Cancel local_cancel;
  Cancel* c = cancel ? cancel : &local_cancel;
  std::exception_ptr first_error;
  std::mutex err_mu;
  auto worker = [&] {
    WsumWorker w;
    try {
      for (;;) {
        const WsumPlan* p = nullptr;
        std::size_t idx = 0, ci = 0;
        {
          std::unique_lock<std::mutex> lk(s.mu);
          while (!p) {
            if (c->requested()) return;
            if (s.cur < s.calls.size()) {
              if (s.next_chunk < s.calls[s.cur]->nchunks) {
                idx = s.cur;
                ci = s.next_chunk++;
                p = s.calls[idx].get();
              } else {
                ++s.cur;
                s.next_chunk = 0;
              }
            } else if (s.closed) {
              return;
            } else {  // the feeder has not added the next call yet (or a cancel is on its way)
              s.cv.wait_for(lk, std::chrono::milliseconds(20));
            }
          }
        }
        run_chunk(*p, ci, w, *s.kr);
        std::lock_guard<std::mutex> lk(s.mu);
        if (--s.left[idx] == 0) s.advance();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu);
      if (!first_error) first_error = std::current_exception();
      c->request();
    }
  };
  {
    std::vector<std::thread> pool;
    pool.reserve(static_cast<std::size_t>(s.threads - 1));
    try {
      for (int t = 1; t < s.threads; ++t) pool.emplace_back(worker);
    } catch (...) {  // could not start a thread: the ones started stop, then the error is raised
      c->request();
      for (auto& th : pool) th.join();
      std::lock_guard<std::mutex> lk(s.mu);
      s.over = true;
      throw;
    }
    worker();
    for (auto& th : pool) th.join();
  }
  {
    std::lock_guard<std::mutex> lk(s.mu);
    s.over = true;
  }
  if (first_error) std::rethrow_exception(first_error);
  if (c->requested()) throw Cancelled();
}

void gram(const SrcView* src, std::size_t K, std::size_t n, double* G, int threads, Cancel* cancel) {
  for (std::size_t k = 0; k < K; ++k) check_dtype(src[k].dtype, "gram source");
  const WsumKernels& kr = kernels();
  threads = resolve_threads(threads);
  const std::size_t Kp = round_up(std::max<std::size_t>(K, 1), 4);
  // Wide chunks amortize the horizontal reductions; narrower ones keep a large panel in L2.
  const std::size_t C = std::min(kr.gram_cols, std::max(kr.tile, 131072 / Kp / kr.tile * kr.tile));
  const std::size_t nchunks = (n + C - 1) / C;
  // Static partition into contiguous parts: deterministic summation order per thread count.
  const std::size_t parts = std::max<std::size_t>(1, std::min<std::size_t>(threads, nchunks));
  std::vector<std::vector<double>> partial(parts);
  parallel_for(parts, 1, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t pi = b; pi < e; ++pi) {
      std::vector<double>& g = partial[pi];
      g.assign(Kp * Kp, 0.0);
      Scratch sp, st;
      float* panel = sp.get(Kp * C);
      float* stage = st.get(C);
      std::memset(panel, 0, sizeof(float) * Kp * C);
      const std::size_t ch0 = nchunks * pi / parts, ch1 = nchunks * (pi + 1) / parts;
      for (std::size_t ci = ch0; ci < ch1; ++ci) {
        if (cancel && cancel->requested()) throw Cancelled();
        const std::size_t c0 = ci * C, cnt = std::min(C, n - c0), cp = round_up(cnt, kr.tile);
        for (std::size_t k = 0; k < K; ++k) {
          kr.to_f32(fetch(src[k], c0, cnt, stage), src[k].dtype, cnt, panel + k * C);
          std::memset(panel + k * C + cnt, 0, sizeof(float) * (cp - cnt));
        }
        kr.gram(panel, C, Kp, cp, g.data(), Kp);
      }
    }
  });
  for (std::size_t i = 0; i < K; ++i)
    for (std::size_t j = 0; j <= i; ++j) {
      double s = 0.0;
      for (std::size_t pi = 0; pi < parts; ++pi) s += partial[pi][i * Kp + j];
      G[i * K + j] = s;
      G[j * K + i] = s;
    }
}

void convert_to_f32(const void* in, DType from, float* out, std::size_t n) {
  check_dtype(from, "convert_to_f32");
  kernels().to_f32(in, from, n, out);
}

void convert_from_f32(const float* in, void* out, DType to, std::size_t n) {
  check_dtype(to, "convert_from_f32");
  kernels().from_f32(in, n, out, to);
}

}  // namespace loramix
