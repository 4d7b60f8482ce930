// Helpers shared by the CPU handlers: element-type dispatch to fp32 tiles,
// size checks that return FFI errors, and per-thread scratch memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtypes.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mc2 {

namespace ffi = xla::ffi;

// Whether the CPU has AVX2 and F16C (the vectorized kernel paths).
bool HasAvx2F16c();

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

// a[i] += b[i] for `count` elements (a and b must not overlap), vectorized:
// the bias / x3 / residual additions of the kernels' row epilogues.
void AddInPlace(float* a, const float* b, int64_t count);

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

// The dimensions of a matmul x1 [..., k] @ x2 -> out [..., n], with x2
// (k, n), or (n, k) when transpose_x2.
struct MatmulShape {
  int64_t m = 1, k = 0, n = 0;
};

// Checks that x1, x2 and out form a matmul and fills `shape`.
inline ffi::Error ParseMatmul(const std::string& op, const ffi::AnyBuffer& x1,
                              const ffi::AnyBuffer& x2, const ffi::AnyBuffer& out,
                              bool transpose_x2, MatmulShape& shape) {
  auto x1_dims = x1.dimensions();
  auto x2_dims = x2.dimensions();
  auto out_dims = out.dimensions();
  if (x1_dims.size() < 2 || x2_dims.size() != 2 || out_dims.size() != x1_dims.size()) {
    return InvalidArgument(op, "x1 must be at least 2-D and x2 2-D, got x1 " +
                                   DimsToString(x1_dims) + ", x2 " + DimsToString(x2_dims));
  }
  shape.k = x1_dims.back();
  shape.m = 1;
  for (size_t i = 0; i + 1 < x1_dims.size(); ++i) shape.m *= x1_dims[i];
  shape.n = transpose_x2 ? x2_dims[0] : x2_dims[1];
  const int64_t x2_k = transpose_x2 ? x2_dims[1] : x2_dims[0];
  if (x2_k != shape.k || static_cast<int64_t>(out.element_count()) != shape.m * shape.n ||
      out_dims.back() != shape.n) {
    return InvalidArgument(op, "shapes do not form a matmul: x1 " + DimsToString(x1_dims) +
                                   ", x2 " + DimsToString(x2_dims) + ", out " +
                                   DimsToString(out_dims));
  }
  return ffi::Error::Success();
}

// Scratch memory kept by the calling thread between calls, one buffer per
// `slot`. A fresh multi-megabyte allocation is mmap'ed and every 4 KiB page
// of it faults and is zeroed by the kernel on first touch, which costs about
// as much as a pass over the memory; the kernels' fp32 tiles are reused
// instead. Requests above 64 MiB are not kept.
template <typename T>
class ScratchOf {
 public:
  static constexpr size_t kSlots = 4;
  static constexpr size_t kMaxCachedBytes = size_t{1} << 26;

  // `count` elements, uninitialized (stale values of earlier calls).
  T* Get(size_t slot, size_t count) {
    if (count * sizeof(T) > kMaxCachedBytes) {
      owned_[slot].reset(new T[count]);
      return owned_[slot].get();
    }
    std::vector<T>& b = ThreadBuffers()[slot];
    if (b.size() < count) b.resize(count);
    return b.data();
  }

 private:
  static std::vector<T>* ThreadBuffers() {
    thread_local std::vector<T> buffers[kSlots];
    return buffers;
  }
  std::unique_ptr<T[]> owned_[kSlots];
};
using Scratch = ScratchOf<float>;

}  // namespace jax_mc2
