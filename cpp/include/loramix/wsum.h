// Streamed weighted sums (`W (QxK) @ Bank (KxP)`) and Gram matrices over tensor sources.
//
// Numerical contract
//  - Sources are F32, F16 or BF16 (each may differ); they are widened to f32 exactly.
//  - weighted_sum: out[q][i] = sum_k W[q][k] * T_k[i], weights given in f32 (a caller holding
//    f64 weights rounds them once to f32), products and sums in f32 (FMA or multiply-add),
//    k in increasing order within each code path (the SIMD paths may group sources, so the
//    order differs between ISAs). Error bound before the output rounding:
//        |out - exact| <= (K + 1) * 2^-24 * sum_k |W[q][k]| |T_k[i]|
//    then one rounding to the output dtype (round to nearest even; NaN stays NaN, quiet;
//    overflow -> inf), see halfconv.h.
//  - A term with W[q][k] == 0 contributes nothing, even if T_k holds inf or NaN, and a
//    source whose weights are all zero is never read.
//  - Memory: per thread O(Q x C + Kc x C) floats with C <= 8192, whatever K and P.
//  - gram: G[i][j] = <T_i, T_j>; f32 products summed in f32 over blocks of at most 256
//    elements, block sums accumulated in f64 (per thread, threads' partials then summed in a
//    fixed order: results are deterministic for a given thread count). Bound:
//        |G - exact| <= 260 * 2^-24 * sum_c |T_i[c] T_j[c]|   (SIMD paths: ~20 * 2^-24 * ...)
//    G is exactly symmetric.
//  - Cancellation: work stops between chunks once `cancel` is requested (throws Cancelled).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "loramix/dtype.h"
#include "loramix/parallel.h"
#include "loramix/wsum_kernels.h"

namespace loramix {

struct SrcView {
  const void* data;  // n elements of `dtype`; no alignment required
  DType dtype;
};

// Where row q of a weighted sum goes: memory (mem != nullptr) or a file at byte `offset`
// through pwrite (fd >= 0; `path` for messages).
struct OutTarget {
  void* mem = nullptr;
  int fd = -1;
  uint64_t offset = 0;
  DType dtype = DType::F32;
  const std::string* path = nullptr;
};

// W is Q x K row-major (float32). out has Q entries.
void weighted_sum(const SrcView* src, std::size_t K, const float* W, std::size_t Q, std::size_t n,
                  const OutTarget* out, int threads, Cancel* cancel);

// G is K x K row-major (float64), overwritten.
void gram(const SrcView* src, std::size_t K, std::size_t n, double* G, int threads, Cancel* cancel);

// Element-wise conversions with the active ISA (bit-identical to halfconv.h on every ISA).
void convert_to_f32(const void* in, DType from, float* out, std::size_t n);
void convert_from_f32(const float* in, void* out, DType to, std::size_t n);

}  // namespace loramix
