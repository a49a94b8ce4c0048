// AVX-512 (F/BW/VL/DQ) kernels for wsum.h. bf16/f16 are widened to f32 in registers; the
// f32 -> bf16 rounding is the integer form of halfconv.h (bit-identical, subnormals kept,
// which vcvtneps2bf16 would flush); f32 <-> f16 use vcvtps2ph/vcvtph2ps (IEEE RNE, the same
// NaN quieting as halfconv.h). No STL here (see wsum_kernels.h).
// GCC 12 reports false -Wmaybe-uninitialized inside its own AVX-512 headers (_mm512_undefined).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "wsum_kernels.h"

namespace loramix {
namespace avx512 {
namespace {

constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;

template <int DT>
inline __m512 ld(const void* base, std::size_t i) {
  if (DT == kF32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  if (DT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int DT>
inline __m512 ld_mask(const void* base, std::size_t i, __mmask16 m) {
  if (DT == kF32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i);
  if (DT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 tail_mask(std::size_t r) { return static_cast<__mmask16>((1u << r) - 1u); }

// acc += sum_j w[j] * src[j] for G sources of one dtype. The G FMAs per vector form one
// dependency chain; consecutive vectors are independent, which keeps the FMA units busy.
template <int DT, int G>
void axpy_group(float* acc, const void* const* src, const float* w, std::size_t n) {
  __m512 wv[G];
  const void* p[G];
  for (int j = 0; j < G; ++j) {
    wv[j] = _mm512_set1_ps(w[j]);
    p[j] = src[j];
  }
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 a0 = _mm512_loadu_ps(acc + i), a1 = _mm512_loadu_ps(acc + i + 16);
    for (int j = 0; j < G; ++j) {
      a0 = _mm512_fmadd_ps(wv[j], ld<DT>(p[j], i), a0);
      a1 = _mm512_fmadd_ps(wv[j], ld<DT>(p[j], i + 16), a1);
    }
    _mm512_storeu_ps(acc + i, a0);
    _mm512_storeu_ps(acc + i + 16, a1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    __m512 a = _mm512_maskz_loadu_ps(m, acc + i);
    for (int j = 0; j < G; ++j) a = _mm512_fmadd_ps(wv[j], ld_mask<DT>(p[j], i, m), a);
    _mm512_mask_storeu_ps(acc + i, m, a);
  }
}

template <int DT>
void axpy_dt(float* acc, const void* const* src, const float* w, std::size_t g, std::size_t n) {
  switch (g) {
    case 4: axpy_group<DT, 4>(acc, src, w, n); break;
    case 3: axpy_group<DT, 3>(acc, src, w, n); break;
    case 2: axpy_group<DT, 2>(acc, src, w, n); break;
    default: axpy_group<DT, 1>(acc, src, w, n); break;
  }
}

void axpy(float* acc, const void* const* src, const DType* dt, const float* w, std::size_t m,
          std::size_t n) {
  std::size_t j = 0;
  while (j < m) {
    std::size_t g = 1;
    while (g < 4 && j + g < m && dt[j + g] == dt[j]) ++g;
    switch (dt[j]) {
      case DType::F32: axpy_dt<kF32>(acc, src + j, w + j, g, n); break;
      case DType::F16: axpy_dt<kF16>(acc, src + j, w + j, g, n); break;
      case DType::BF16: axpy_dt<kBF16>(acc, src + j, w + j, g, n); break;
      case DType::F64: break;  // never here: wsum.cpp refuses it
    }
    j += g;
  }
}

template <int DT>
void to_f32_dt(const void* src, std::size_t n, float* out) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, ld<DT>(src, i));
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(out + i, m, ld_mask<DT>(src, i, m));
  }
}

void to_f32(const void* src, DType dt, std::size_t n, float* out) {
  switch (dt) {
    case DType::F32: to_f32_dt<kF32>(src, n, out); break;
    case DType::F16: to_f32_dt<kF16>(src, n, out); break;
    case DType::BF16: to_f32_dt<kBF16>(src, n, out); break;
    case DType::F64: break;  // never here: wsum.cpp refuses it
  }
}

// halfconv.h f32_to_bf16_bits, 16 lanes.
inline __m256i bf16_rne(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                   _mm512_and_si512(hi, _mm512_set1_epi32(1))));
  r = _mm512_srli_epi32(r, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

void from_f32(const float* in, std::size_t n, void* out, DType dt) {
  std::size_t i = 0;
  if (dt == DType::F32) {
    float* o = static_cast<float*>(out);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_loadu_ps(in + i));
    if (i < n) {
      const __mmask16 m = tail_mask(n - i);
      _mm512_mask_storeu_ps(o + i, m, _mm512_maskz_loadu_ps(m, in + i));
    }
    return;
  }
  uint16_t* o = static_cast<uint16_t*>(out);
  const bool bf = dt == DType::BF16;
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, in + i);
    const __m256i h = bf ? bf16_rne(x) : _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(o + i, m, h);
  }
}

// QB rows x 48 columns of accumulators (QB*3 <= 24 zmm), over kc panel rows.
template <int QB>
void gemm_tile(float* acc, std::size_t lda, const float* panel, std::size_t ldp, const float* wp,
               std::size_t Q, std::size_t kc) {
  __m512 a[QB][3];
  for (int r = 0; r < QB; ++r)
    for (int v = 0; v < 3; ++v) a[r][v] = _mm512_loadu_ps(acc + r * lda + 16 * v);
  // kc >= 1 (gemm is never called without sources): a do-while keeps the accumulators in
  // registers; a for loop made the compiler route them through the stack for kc = 0, and the
  // tile ran at ~0.6 of its speed (129 vs 186 GFLOP per CPU-second, kc = 32, AVX-512)
  std::size_t k = 0;
  do {
    const float* p = panel + k * ldp;
    const __m512 p0 = _mm512_loadu_ps(p), p1 = _mm512_loadu_ps(p + 16), p2 = _mm512_loadu_ps(p + 32);
    const float* w = wp + k * Q;
    for (int r = 0; r < QB; ++r) {
      const __m512 wr = _mm512_set1_ps(w[r]);
      a[r][0] = _mm512_fmadd_ps(wr, p0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(wr, p1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(wr, p2, a[r][2]);
    }
  } while (++k < kc);
  for (int r = 0; r < QB; ++r)
    for (int v = 0; v < 3; ++v) _mm512_storeu_ps(acc + r * lda + 16 * v, a[r][v]);
}

void gemm(float* acc, std::size_t lda, const float* panel, std::size_t ldp, const float* wp,
          std::size_t Q, std::size_t kc, std::size_t ncols) {
  for (std::size_t c = 0; c < ncols; c += 48) {  // panel tile (kc x 48) stays in L1 across q
    for (std::size_t q0 = 0; q0 < Q; q0 += 8) {
      float* a = acc + q0 * lda + c;
      const float* p = panel + c;
      const float* w = wp + q0;
      switch (Q - q0 >= 8 ? 8 : Q - q0) {
        case 8: gemm_tile<8>(a, lda, p, ldp, w, Q, kc); break;
        case 7: gemm_tile<7>(a, lda, p, ldp, w, Q, kc); break;
        case 6: gemm_tile<6>(a, lda, p, ldp, w, Q, kc); break;
        case 5: gemm_tile<5>(a, lda, p, ldp, w, Q, kc); break;
        case 4: gemm_tile<4>(a, lda, p, ldp, w, Q, kc); break;
        case 3: gemm_tile<3>(a, lda, p, ldp, w, Q, kc); break;
        case 2: gemm_tile<2>(a, lda, p, ldp, w, Q, kc); break;
        default: gemm_tile<1>(a, lda, p, ldp, w, Q, kc); break;
      }
    }
  }
}

// 4x4 blocks of dot products: 16 accumulators, 8 loads per 16 FMAs.
void gram(const float* panel, std::size_t ldp, std::size_t K, std::size_t ncols, double* G,
          std::size_t ldg) {
  for (std::size_t i0 = 0; i0 < K; i0 += 4) {
    for (std::size_t j0 = 0; j0 <= i0; j0 += 4) {
      __m512 s[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) s[a][b] = _mm512_setzero_ps();
      for (std::size_t c = 0; c < ncols; c += 16) {
        __m512 x[4], y[4];
        for (int a = 0; a < 4; ++a) x[a] = _mm512_loadu_ps(panel + (i0 + a) * ldp + c);
        for (int b = 0; b < 4; ++b) y[b] = _mm512_loadu_ps(panel + (j0 + b) * ldp + c);
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) s[a][b] = _mm512_fmadd_ps(x[a], y[b], s[a][b]);
      }
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          if (j0 + b <= i0 + a) G[(i0 + a) * ldg + j0 + b] += static_cast<double>(_mm512_reduce_add_ps(s[a][b]));
    }
  }
}

const WsumKernels kKernels{48, axpy, to_f32, from_f32, gemm, gram, 1008};

}  // namespace

const WsumKernels& wsum_kernels() { return kKernels; }

}  // namespace avx512
}  // namespace loramix
