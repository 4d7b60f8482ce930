// Bulk conversions between fp32 and the 16-bit float formats (round half to
// even). float16 uses the F16C instructions when the CPU has them; the
// scalar fallbacks in dtypes.h give the same bits.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "ffi_common.h"

namespace jax_mc2 {

// JAX_MC2_FFI_PORTABLE=1 in the environment (read once, at the first call)
// forces the portable C++ paths even where the CPU has AVX2 and F16C, so
// that the tests run every kernel's portable path too (the hand-written AVX2
// add + RMSNorm kernel and the F16C float16 conversions; the
// target_clones("avx2", "default") loops are compiler clones of one source
// and are not switched).
bool ForcePortable() {
  static const bool force = [] {
    const char* v = std::getenv("JAX_MC2_FFI_PORTABLE");
    return v != nullptr && v[0] != '\0' && std::string(v) != "0";
  }();
  return force;
}

bool HasAvx2F16c() {
  static const bool has =
      !ForcePortable() && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
  return has;
}

namespace {

__attribute__((target("avx2,f16c"))) void LoadFp16F16c(const uint16_t* src, int64_t count,
                                                       float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) dst[i] = Fp16ToFloat(src[i]);
}

__attribute__((target("avx2,f16c"))) void StoreFp16F16c(const float* src, int64_t count,
                                                        uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < count; ++i) dst[i] = FloatToFp16(src[i]);
}

}  // namespace

void LoadFp16(const uint16_t* src, int64_t count, float* dst) {
  if (HasAvx2F16c()) return LoadFp16F16c(src, count, dst);
  for (int64_t i = 0; i < count; ++i) dst[i] = Fp16ToFloat(src[i]);
}

void StoreFp16(const float* src, int64_t count, uint16_t* dst) {
  if (HasAvx2F16c()) return StoreFp16F16c(src, count, dst);
  for (int64_t i = 0; i < count; ++i) dst[i] = FloatToFp16(src[i]);
}

__attribute__((target_clones("avx2", "default"))) void LoadBf16(const uint16_t* src, int64_t count,
                                                                float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = BitsToFloat(uint32_t{src[i]} << 16);
}

__attribute__((target_clones("avx2", "default"))) void StoreBf16(const float* src, int64_t count,
                                                                 uint16_t* dst) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits = FloatToBits(src[i]);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (bits >> 16) | 0x0040u;
    dst[i] = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
}

__attribute__((target_clones("avx2", "default"))) void LoadInt8(const int8_t* src, int64_t count,
                                                                float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target_clones("avx2", "default"))) void AddInPlace(float* __restrict a,
                                                                  const float* __restrict b,
                                                                  int64_t count) {
  for (int64_t i = 0; i < count; ++i) a[i] += b[i];
}

__attribute__((target_clones("avx2", "default"))) void AccumulateInt32(const float* src,
                                                                       int64_t count, bool first,
                                                                       int32_t* acc) {
  if (first) {
    for (int64_t i = 0; i < count; ++i) acc[i] = static_cast<int32_t>(src[i]);
  } else {
    // Wrapping int32 addition (as XLA's int32 dot), without signed overflow.
    for (int64_t i = 0; i < count; ++i) {
      acc[i] = static_cast<int32_t>(static_cast<uint32_t>(acc[i]) +
                                    static_cast<uint32_t>(static_cast<int32_t>(src[i])));
    }
  }
}

namespace {

// fp32 -> bf16 -> fp32 in registers: round the upper 16 bits half to even.
__attribute__((target_clones("avx2", "default"))) void RoundBf16InPlace(float* values,
                                                                        int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits = FloatToBits(values[i]);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    uint32_t quiet_nan = (bits | 0x00400000u) & 0xffff0000u;
    values[i] = BitsToFloat((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
}

// fp32 -> fp16 -> fp32 in registers with F16C.
__attribute__((target("avx2,f16c"))) void RoundFp16InPlaceF16c(float* values, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(values + i), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_ps(values + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) values[i] = Fp16ToFloat(FloatToFp16(values[i]));
}

}  // namespace

void RoundInPlace(ffi::DataType type, float* values, int64_t count) {
  if (type == ffi::DataType::F32) return;
  if (type == ffi::DataType::BF16) return RoundBf16InPlace(values, count);
  if (type != ffi::DataType::F16) throw UnsupportedDtype("RoundInPlace", type);
  if (HasAvx2F16c()) return RoundFp16InPlaceF16c(values, count);
  constexpr int64_t kChunk = 1024;
  uint16_t tmp[kChunk];
  for (int64_t i = 0; i < count; i += kChunk) {
    const int64_t c = std::min(kChunk, count - i);
    StoreFromFloat(type, values + i, c, tmp, 0);
    LoadAsFloat(type, tmp, 0, c, values + i);
  }
}

}  // namespace jax_mc2
