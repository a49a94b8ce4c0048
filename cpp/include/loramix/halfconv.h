// bf16 / f16 <-> f32 conversion: the one scalar source of truth.
//
// Contract (every SIMD variant must match these bit for bit; tests check all 65536 half
// patterns and special/random f32 values on every ISA):
//  - f32 -> bf16 and f32 -> f16 round to nearest, ties to even (IEEE 754 default). Values
//    beyond the target's range become +-inf; values below its smallest subnormal become
//    +-0 (f16 keeps subnormals; f32 subnormals are converted like any other value).
//  - NaN in -> quiet NaN out: the sign and the top payload bits are kept, the quiet bit is
//    set (bf16: bit 6, f16: bit 9). This equals what F16C (vcvtps2ph) does for f16.
//  - bf16 -> f32 is exact (a 16-bit shift; NaNs keep their payload).
//  - f16 -> f32 is exact for all non-NaN values; NaN -> quiet NaN with the payload kept
//    (what vcvtph2ps does).
// Functions are `static inline` on purpose: every translation unit, including the ones
// compiled with AVX flags, gets its own internal copy, so an ISA-flagged copy can never be
// picked by the linker for baseline code.
#pragma once
#include <cstdint>
#include <cstring>

namespace loramix {

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);  // RNE on the 16 dropped bits; a carry may reach inf
  return static_cast<uint16_t>(u >> 16);
}

static inline float bf16_bits_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

static inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (ax >= 0x38800000u) {                                               // normal half
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
    r -= 0x38000000u;  // rebias exponent 127 -> 15
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  // Half subnormal (or zero): q = value / 2^-24, rounded to nearest even.
  const uint32_t e = ax >> 23;
  const uint32_t shift = 126u - e;  // >= 14 here
  if (shift >= 25u) return static_cast<uint16_t>(sign);
  const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

static inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return bits_f32(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
  if (e == 0) {
    if (m == 0) return bits_f32(sign);
    uint32_t k = 0;
    while (!(m & 0x400u)) {
      m <<= 1;
      ++k;
    }
    return bits_f32(sign | ((113u - k) << 23) | ((m & 0x3ffu) << 13));
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

}  // namespace loramix
