// AVX2 + FMA + F16C kernels for wsum.h. Same algorithms as wsum_avx512.cpp with 8 lanes;
// tails (< 8 elements) go through a zero-padded stack buffer so the same vector code (and
// so the same conversions) handles them. No STL here (see wsum_kernels.h).
#include <immintrin.h>

#include "wsum_kernels.h"

namespace loramix {
namespace avx2 {
namespace {

constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;

template <int DT>
inline __m256 ld(const void* base, std::size_t i) {
  if (DT == kF32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
  if (DT == kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int DT>
constexpr std::size_t esize() {
  return DT == kF32 ? 4 : 2;
}

// Loads r < 8 elements at i, zero-padded.
template <int DT>
inline __m256 ld_tail(const void* base, std::size_t i, std::size_t r) {
  alignas(32) unsigned char buf[32] = {0};
  __builtin_memcpy(buf, static_cast<const unsigned char*>(base) + i * esize<DT>(), r * esize<DT>());
  return ld<DT>(buf, 0);
}

template <int DT, int G>
void axpy_group(float* acc, const void* const* src, const float* w, std::size_t n) {
  __m256 wv[G];
  const void* p[G];
  for (int j = 0; j < G; ++j) {
    wv[j] = _mm256_set1_ps(w[j]);
    p[j] = src[j];
  }
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a0 = _mm256_loadu_ps(acc + i), a1 = _mm256_loadu_ps(acc + i + 8);
    for (int j = 0; j < G; ++j) {
      a0 = _mm256_fmadd_ps(wv[j], ld<DT>(p[j], i), a0);
      a1 = _mm256_fmadd_ps(wv[j], ld<DT>(p[j], i + 8), a1);
    }
    _mm256_storeu_ps(acc + i, a0);
    _mm256_storeu_ps(acc + i + 8, a1);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_loadu_ps(acc + i);
    for (int j = 0; j < G; ++j) a = _mm256_fmadd_ps(wv[j], ld<DT>(p[j], i), a);
    _mm256_storeu_ps(acc + i, a);
  }
  if (i < n) {
    const std::size_t r = n - i;
    alignas(32) float t[8] = {0};
    __builtin_memcpy(t, acc + i, r * 4);
    __m256 a = _mm256_load_ps(t);
    for (int j = 0; j < G; ++j) a = _mm256_fmadd_ps(wv[j], ld_tail<DT>(p[j], i, r), a);
    _mm256_store_ps(t, a);
    __builtin_memcpy(acc + i, t, r * 4);
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
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, ld<DT>(src, i));
  if (i < n) {
    alignas(32) float t[8];
    _mm256_store_ps(t, ld_tail<DT>(src, i, n - i));
    __builtin_memcpy(out + i, t, (n - i) * 4);
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

// halfconv.h f32_to_bf16_bits, 8 lanes.
inline __m128i bf16_rne(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                   _mm256_and_si256(hi, _mm256_set1_epi32(1))));
  r = _mm256_srli_epi32(r, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline __m128i to_half(__m256 x, bool bf) {
  return bf ? bf16_rne(x) : _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

void from_f32(const float* in, std::size_t n, void* out, DType dt) {
  if (dt == DType::F32) {
    __builtin_memcpy(out, in, n * 4);
    return;
  }
  uint16_t* o = static_cast<uint16_t*>(out);
  const bool bf = dt == DType::BF16;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), to_half(_mm256_loadu_ps(in + i), bf));
  if (i < n) {
    alignas(32) float t[8] = {0};
    __builtin_memcpy(t, in + i, (n - i) * 4);
    alignas(16) uint16_t h[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(h), to_half(_mm256_load_ps(t), bf));
    __builtin_memcpy(o + i, h, (n - i) * 2);
  }
}

// QB (<= 4) rows x 24 columns: 12 accumulators + 3 panel vectors + 1 broadcast = 16 ymm.
template <int QB>
void gemm_tile(float* acc, std::size_t lda, const float* panel, std::size_t ldp, const float* wp,
               std::size_t Q, std::size_t kc) {
  __m256 a[QB][3];
  for (int r = 0; r < QB; ++r)
    for (int v = 0; v < 3; ++v) a[r][v] = _mm256_loadu_ps(acc + r * lda + 8 * v);
  // kc >= 1 (gemm is never called without sources): a do-while keeps the accumulators in
  // registers; a for loop made the compiler route them through the stack for kc = 0, and the
  // tile ran at ~0.6 of its speed (129 vs 186 GFLOP per CPU-second, kc = 32, AVX-512)
  std::size_t k = 0;
  do {
    const float* p = panel + k * ldp;
    const __m256 p0 = _mm256_loadu_ps(p), p1 = _mm256_loadu_ps(p + 8), p2 = _mm256_loadu_ps(p + 16);
    const float* w = wp + k * Q;
    for (int r = 0; r < QB; ++r) {
      const __m256 wr = _mm256_broadcast_ss(w + r);
      a[r][0] = _mm256_fmadd_ps(wr, p0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(wr, p1, a[r][1]);
      a[r][2] = _mm256_fmadd_ps(wr, p2, a[r][2]);
    }
  } while (++k < kc);
  for (int r = 0; r < QB; ++r)
    for (int v = 0; v < 3; ++v) _mm256_storeu_ps(acc + r * lda + 8 * v, a[r][v]);
}

void gemm(float* acc, std::size_t lda, const float* panel, std::size_t ldp, const float* wp,
          std::size_t Q, std::size_t kc, std::size_t ncols) {
  for (std::size_t c = 0; c < ncols; c += 24) {
    for (std::size_t q0 = 0; q0 < Q; q0 += 4) {
      float* a = acc + q0 * lda + c;
      const float* p = panel + c;
      const float* w = wp + q0;
      switch (Q - q0 >= 4 ? 4 : Q - q0) {
        case 4: gemm_tile<4>(a, lda, p, ldp, w, Q, kc); break;
        case 3: gemm_tile<3>(a, lda, p, ldp, w, Q, kc); break;
        case 2: gemm_tile<2>(a, lda, p, ldp, w, Q, kc); break;
        default: gemm_tile<1>(a, lda, p, ldp, w, Q, kc); break;
      }
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 4x2 blocks of dot products: 8 accumulators + 6 loads.
void gram(const float* panel, std::size_t ldp, std::size_t K, std::size_t ncols, double* G,
          std::size_t ldg) {
  for (std::size_t i0 = 0; i0 < K; i0 += 4) {
    for (std::size_t j0 = 0; j0 < i0 + 4; j0 += 2) {
      __m256 s[4][2];
      for (int a = 0; a < 4; ++a) s[a][0] = s[a][1] = _mm256_setzero_ps();
      for (std::size_t c = 0; c < ncols; c += 8) {
        const __m256 y0 = _mm256_loadu_ps(panel + j0 * ldp + c);
        const __m256 y1 = _mm256_loadu_ps(panel + (j0 + 1) * ldp + c);
        for (int a = 0; a < 4; ++a) {
          const __m256 x = _mm256_loadu_ps(panel + (i0 + a) * ldp + c);
          s[a][0] = _mm256_fmadd_ps(x, y0, s[a][0]);
          s[a][1] = _mm256_fmadd_ps(x, y1, s[a][1]);
        }
      }
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 2; ++b)
          if (j0 + b <= i0 + a) G[(i0 + a) * ldg + j0 + b] += static_cast<double>(hsum(s[a][b]));
    }
  }
}

const WsumKernels kKernels{24, axpy, to_f32, from_f32, gemm, gram, 504};

}  // namespace

const WsumKernels& wsum_kernels() { return kKernels; }

}  // namespace avx2
}  // namespace loramix
