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

// Converts `count` elements of a float16/bfloat16/float32 buffer starting at
// element `offset` into fp32.
inline void LoadAsFloat(ffi::DataType type, const void* data, int64_t offset,
                        int64_t count, float* dst) {
  switch (type) {
    case ffi::DataType::F32: {
      const float* src = static_cast<const float*>(data) + offset;
      std::copy(src, src + count, dst);
      return;
    }
    case ffi::DataType::F16: {
      const uint16_t* src = static_cast<const uint16_t*>(data) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = Fp16ToFloat(src[i]);
      return;
    }
    case ffi::DataType::BF16: {
      const uint16_t* src = static_cast<const uint16_t*>(data) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = Bf16ToFloat(src[i]);
      return;
    }
    default:
      return;
  }
}

// Rounds `count` fp32 values half-to-even into a float16/bfloat16/float32
// buffer at element `offset`.
inline void StoreFromFloat(ffi::DataType type, const float* src, int64_t count,
                           void* data, int64_t offset) {
  switch (type) {
    case ffi::DataType::F32: {
      std::copy(src, src + count, static_cast<float*>(data) + offset);
      return;
    }
    case ffi::DataType::F16: {
      uint16_t* dst = static_cast<uint16_t*>(data) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = FloatToFp16(src[i]);
      return;
    }
    case ffi::DataType::BF16: {
      uint16_t* dst = static_cast<uint16_t*>(data) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = FloatToBf16(src[i]);
      return;
    }
    default:
      return;
  }
}

inline bool IsFloatType(ffi::DataType type) {
  return type == ffi::DataType::F32 || type == ffi::DataType::F16 ||
         type == ffi::DataType::BF16;
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

inline ffi::Error InvalidArgument(const std::string& op,
                                  const std::string& what) {
  return ffi::Error::InvalidArgument(op + ": " + what);
}

// Threads for one BLAS call: the cores shared by the `parallelism` programs
// that XLA runs at once (one per simulated device in the mesh).
inline int BlasThreads(int64_t parallelism) {
  int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return static_cast<int>(std::max<int64_t>(1, cores / std::max<int64_t>(1, parallelism)));
}

}  // namespace jax_mc2
