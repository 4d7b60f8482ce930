// Helpers shared by the CPU handlers: element-type dispatch to fp32 tiles,
// size checks that return FFI errors, and the BLAS thread policy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <thread>

#include "dtypes.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mc2 {

namespace ffi = xla::ffi;

// The conversion loops: an F16C/AVX2 path for float16 chosen at run time,
// and loops written so the compiler vectorizes the bfloat16 ones.
void LoadFp16(const uint16_t* src, int64_t count, float* dst);
void StoreFp16(const float* src, int64_t count, uint16_t* dst);
void LoadBf16(const uint16_t* src, int64_t count, float* dst);
void StoreBf16(const float* src, int64_t count, uint16_t* dst);

// Converts `count` elements of a float16/bfloat16/float32 buffer starting at
// element `offset` into fp32.
inline void LoadAsFloat(ffi::DataType type, const void* data, int64_t offset, int64_t count,
                        float* dst) {
  switch (type) {
    case ffi::DataType::F32: {
      const float* src = static_cast<const float*>(data) + offset;
      std::copy(src, src + count, dst);
      return;
    }
    case ffi::DataType::F16:
      LoadFp16(static_cast<const uint16_t*>(data) + offset, count, dst);
      return;
    case ffi::DataType::BF16:
      LoadBf16(static_cast<const uint16_t*>(data) + offset, count, dst);
      return;
    default:
      return;
  }
}

// Rounds `count` fp32 values half-to-even into a float16/bfloat16/float32
// buffer at element `offset`.
inline void StoreFromFloat(ffi::DataType type, const float* src, int64_t count, void* data,
                           int64_t offset) {
  switch (type) {
    case ffi::DataType::F32:
      std::copy(src, src + count, static_cast<float*>(data) + offset);
      return;
    case ffi::DataType::F16:
      StoreFp16(src, count, static_cast<uint16_t*>(data) + offset);
      return;
    case ffi::DataType::BF16:
      StoreBf16(src, count, static_cast<uint16_t*>(data) + offset);
      return;
    default:
      return;
  }
}

// int8 -> fp32 (exact) and fp32 holding exact integers -> int32 (+=).
void LoadInt8(const int8_t* src, int64_t count, float* dst);
void AccumulateInt32(const float* src, int64_t count, bool first, int32_t* acc);

// values[i] = float(round_to_dtype(values[i])): the rounding a kernel step
// applies when it writes an intermediate in the dtype and reads it back.
void RoundInPlace(ffi::DataType type, float* values, int64_t count);

inline bool IsFloatType(ffi::DataType type) {
  return type == ffi::DataType::F32 || type == ffi::DataType::F16 || type == ffi::DataType::BF16;
}

inline std::string DimsToString(ffi::Span<const int64_t> dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  if (dims.size() == 1) s += ",";
  return s + ")";
}

inline ffi::Error InvalidArgument(const std::string& op, const std::string& what) {
  return ffi::Error::InvalidArgument(op + ": " + what);
}

// Threads for one BLAS call: the cores shared by the `parallelism` programs
// that XLA runs at once (one per simulated device in the mesh).
inline int BlasThreads(int64_t parallelism) {
  int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return static_cast<int>(std::max<int64_t>(1, cores / std::max<int64_t>(1, parallelism)));
}

}  // namespace jax_mc2
