// Scalar conversions between fp32 and the 16-bit float formats, with the
// rounding the Ascend kernels use: round-half-to-even, NaN kept quiet.
#pragma once

#include <cstdint>
#include <cstring>

namespace jax_mc2 {

inline float BitsToFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float Bf16ToFloat(uint16_t h) { return BitsToFloat(uint32_t{h} << 16); }

inline uint16_t FloatToBf16(float f) {
  uint32_t bits = FloatToBits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep sign, force quiet
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

inline float Fp16ToFloat(uint16_t h) {
  uint32_t sign = uint32_t{h & 0x8000u} << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    // Zero or subnormal: value = man * 2^-24, exact in fp32.
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return BitsToFloat(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t FloatToFp16(float f) {
  uint32_t bits = FloatToBits(f);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) {  // NaN: quiet, payload truncated (as F16C's vcvtps2ph)
    return sign | 0x7e00u | static_cast<uint16_t>((abs >> 13) & 0x3ffu);
  }
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: Inf
  if (abs < 0x38800000u) {                        // below 2^-14: subnormal
    // Add 0.5 so that the mantissa lands in the low bits; the FPU rounds
    // half-to-even at this step, which is exactly fp16's subnormal rounding.
    float shifted = BitsToFloat(abs) + 0.5f;
    return sign | static_cast<uint16_t>(FloatToBits(shifted) - 0x3f000000u);
  }
  uint32_t odd = (abs >> 13) & 1u;
  abs += 0xc8000fffu + odd;  // rebias exponent (-112 << 23) and round to even
  return sign | static_cast<uint16_t>(abs >> 13);
}

}  // namespace jax_mc2
