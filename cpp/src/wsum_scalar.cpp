// Portable kernels for wsum.h: plain C++, no intrinsics. Also the reference the SIMD files
// are tested against (through the same float64 oracle).
#include <cstring>

#include "loramix/halfconv.h"
#include "wsum_kernels.h"

namespace loramix {
namespace scalar {
namespace {

inline float load_f32(const void* p, DType dt, std::size_t i) {
  const char* b = static_cast<const char*>(p);
  if (dt == DType::F32) {
    float f;
    std::memcpy(&f, b + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, b + 2 * i, 2);
  return dt == DType::BF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

void axpy(float* acc, const void* const* src, const DType* dt, const float* w, std::size_t m,
          std::size_t n) {
  for (std::size_t j = 0; j < m; ++j) {
    const void* s = src[j];
    const DType d = dt[j];
    const float wj = w[j];
    for (std::size_t i = 0; i < n; ++i) acc[i] += wj * load_f32(s, d, i);
  }
}

void to_f32(const void* src, DType dt, std::size_t n, float* out) {
  if (dt == DType::F32) {
    std::memcpy(out, src, 4 * n);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) out[i] = load_f32(src, dt, i);
}

void from_f32(const float* in, std::size_t n, void* out, DType dt) {
  if (dt == DType::F32) {
    std::memcpy(out, in, 4 * n);
    return;
  }
  char* o = static_cast<char*>(out);
  for (std::size_t i = 0; i < n; ++i) {
    const uint16_t h = dt == DType::BF16 ? f32_to_bf16_bits(in[i]) : f32_to_f16_bits(in[i]);
    std::memcpy(o + 2 * i, &h, 2);
  }
}

void gemm(float* acc, std::size_t lda, const float* panel, std::size_t ldp, const float* wp,
          std::size_t Q, std::size_t kc, std::size_t ncols) {
  for (std::size_t q = 0; q < Q; ++q) {
    float* a = acc + q * lda;
    for (std::size_t k = 0; k < kc; ++k) {
      const float w = wp[k * Q + q];
      const float* p = panel + k * ldp;
      for (std::size_t c = 0; c < ncols; ++c) a[c] += w * p[c];
    }
  }
}

void gram(const float* panel, std::size_t ldp, std::size_t K, std::size_t ncols, double* G,
          std::size_t ldg) {
  for (std::size_t i = 0; i < K; ++i)
    for (std::size_t j = 0; j <= i; ++j) {
      const float* a = panel + i * ldp;
      const float* b = panel + j * ldp;
      float s = 0.f;
      for (std::size_t c = 0; c < ncols; ++c) s += a[c] * b[c];
      G[i * ldg + j] += static_cast<double>(s);
    }
}

}  // namespace

const WsumKernels& wsum_kernels() {
  static const WsumKernels k{16, axpy, to_f32, from_f32, gemm, gram, 64};
  return k;
}

}  // namespace scalar
}  // namespace loramix
