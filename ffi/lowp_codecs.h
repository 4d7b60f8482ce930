// Scalar decoders of the 8-bit float formats (float8_e4m3fn, float8_e5m2,
// HiFloat8, float8_e8m0fnu): the fp32 value of one code byte (0..255); and
// the fp8 encoder of the pertile communication.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dtypes.h"

namespace jax_mc2 {

// float8_e4m3fn: bias 7, 3 mantissa bits, no Inf, 0x7F / 0xFF NaN.
inline float DecodeE4m3fn(uint32_t b) {
  const float sign = (b & 0x80) ? -1.0f : 1.0f;
  const int e = (b >> 3) & 0xF, m = b & 0x7;
  if (e == 15 && m == 7) return std::nanf("");
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -9);
  return sign * std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
}

// float8_e5m2: bias 15, 2 mantissa bits, IEEE Inf / NaN.
inline float DecodeE5m2(uint32_t b) {
  const float sign = (b & 0x80) ? -1.0f : 1.0f;
  const int e = (b >> 2) & 0x1F, m = b & 0x3;
  if (e == 31) return m == 0 ? sign * INFINITY : std::nanf("");
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -16);
  return sign * std::ldexp(1.0f + static_cast<float>(m) / 4.0f, e - 15);
}

// HiFloat8 (docs/semantics.md §2.1): S | Dot | Exp | Mant. The Dot prefix
// after the sign selects the exponent and mantissa widths (4+1, 3+2, 2+3,
// 1+3, 0+3 bits); 0000 + 3 bits are the denormals 2^(M - 23). The exponent
// field's top bit is its sign, the rest |E| without its leading 1. 0x80 NaN,
// 0x6F / 0xEF Inf, 0x00 zero.
inline float DecodeHif8(uint32_t b) {
  if (b == 0x80) return std::nanf("");
  const float sign = (b & 0x80) ? -1.0f : 1.0f;
  const int a = static_cast<int>(b & 0x7F);
  if (a == 0x6F) return sign * INFINITY;
  if (a == 0) return 0.0f;
  if (a < 0x08) return sign * std::ldexp(1.0f, a - 23);
  int d, mw;
  if ((a >> 5) == 3) {
    d = 4, mw = 1;
  } else if ((a >> 5) == 2) {
    d = 3, mw = 2;
  } else if ((a >> 5) == 1) {
    d = 2, mw = 3;
  } else if ((a >> 4) == 1) {
    d = 1, mw = 3;
  } else {
    d = 0, mw = 3;
  }
  const int m = a & ((1 << mw) - 1);
  const int field = (a >> mw) & ((1 << d) - 1);
  int e = 0;
  if (d > 0) {
    const int magnitude = (1 << (d - 1)) | (field & ((1 << (d - 1)) - 1));
    e = (field >> (d - 1)) ? -magnitude : magnitude;
  }
  return sign * std::ldexp(1.0f + static_cast<float>(m) / static_cast<float>(1 << mw), e);
}

// float8_e8m0fnu: 2^(e - 127); 0xFF NaN; no sign, no zero.
inline float DecodeE8m0(uint32_t b) {
  if (b == 0xFF) return std::nanf("");
  return std::ldexp(1.0f, static_cast<int>(b) - 127);
}

// fp32 -> fp8 (mant_bits mantissa bits, exponent bias `bias`), round half to
// even, saturating at `max_value`; NaN -> 0x7F with the sign.
inline uint8_t EncodeFp8(float x, int mant_bits, int bias, float max_value) {
  const uint32_t bits = FloatToBits(x);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  if (std::isnan(x)) return sign | 0x7F;
  const float a = std::min(std::fabs(x), max_value);
  if (a < std::ldexp(1.0f, 1 - bias)) {
    // Subnormal: multiples of 2^(1 - bias - mant_bits); the scaling is exact
    // and nearbyint rounds half to even.
    const float q = std::nearbyint(std::ldexp(a, bias - 1 + mant_bits));
    return sign | static_cast<uint8_t>(q);
  }
  const uint32_t ab = FloatToBits(a);
  const int shift = 23 - mant_bits;
  const uint32_t rounded = (ab + ((1u << (shift - 1)) - 1) + ((ab >> shift) & 1u)) >> shift;
  return sign | static_cast<uint8_t>(rounded - (static_cast<uint32_t>(127 - bias) << mant_bits));
}

}  // namespace jax_mc2
