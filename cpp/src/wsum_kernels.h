// The per-ISA kernel table behind wsum.h (internal: not installed, not part of the API; the
// divergence kernels use the same style, divergence_kernels.h). Included by the ISA files, so
// it holds no STL and no non-static inline code (see STYLE.md: an ISA-flagged copy must never
// reach baseline code).
#pragma once
#include <cstddef>
#include <cstdint>

#include "loramix/dtype.h"

namespace loramix {

// Per-ISA kernels (one table per ISA file; the driver in wsum.cpp does chunking/threads).
struct WsumKernels {
  std::size_t tile;  // gemm/gram column tile (floats); panel widths are padded to it
  // acc[0..n) += sum_{j<m} w[j] * src[j][0..n)   (src pointers already at the chunk start)
  void (*axpy)(float* acc, const void* const* src, const DType* dt, const float* w, std::size_t m,
               std::size_t n);
  void (*to_f32)(const void* src, DType dt, std::size_t n, float* out);
  void (*from_f32)(const float* in, std::size_t n, void* out, DType dt);
  // acc[q*lda + c] += sum_{k<kc} wp[k*Q + q] * panel[k*ldp + c], q < Q, c < ncols (a
  // multiple of tile), kc >= 1.
  void (*gemm)(float* acc, std::size_t lda, const float* panel, std::size_t ldp, const float* wp,
               std::size_t Q, std::size_t kc, std::size_t ncols);
  // G[i*ldg + j] += sum_{c<ncols} panel[i][c] * panel[j][c] for j <= i < K; K a multiple of
  // 4, ncols a multiple of tile and <= gram_cols, padding zero. Each f32 partial sum holds at
  // most 64 products (then a log2(lanes)-deep f32 reduction) before it is added in f64.
  void (*gram)(const float* panel, std::size_t ldp, std::size_t K, std::size_t ncols, double* G,
               std::size_t ldg);
  std::size_t gram_cols;  // 64 x lanes, rounded down to tile
};

namespace scalar { const WsumKernels& wsum_kernels(); }
namespace avx2 { const WsumKernels& wsum_kernels(); }
namespace avx512 { const WsumKernels& wsum_kernels(); }

}  // namespace loramix
