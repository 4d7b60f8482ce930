// Helpers shared by the CPU handlers: element-type dispatch to fp32 tiles,
// operand checks that return FFI errors, the exception boundary of a
// handler, and per-thread scratch memory.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "blas.h"
#include "dtypes.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mc2 {

namespace ffi = xla::ffi;

// Returns the ffi::Error of `expr` from the enclosing function if it is a
// failure.
#define MC2_RETURN_IF_ERROR(expr)                                      \
  do {                                                                 \
    if (::xla::ffi::Error mc2_error_ = (expr); mc2_error_.failure()) { \
      return mc2_error_;                                               \
    }                                                                  \
  } while (false)

// Thrown by the dtype dispatch helpers for a dtype they do not handle; the
// handler boundary (CatchAtBoundary) turns it into an invalid-argument
// error. Handlers check dtypes before converting, so this signals a bug.
class UnsupportedDtype : public std::invalid_argument {
 public:
  UnsupportedDtype(const char* where, ffi::DataType type)
      : std::invalid_argument(std::string(where) + ": unsupported dtype (XLA FFI DataType " +
                              std::to_string(static_cast<int>(type)) + ")") {}
};

// std::bad_alloc with the number of bytes asked.
class AllocationFailure : public std::bad_alloc {
 public:
  explicit AllocationFailure(size_t bytes)
      : message_("could not allocate " + std::to_string(bytes) + " bytes") {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

// A vector of `count` value-initialized elements; an allocation failure is
// rethrown as AllocationFailure with the size.
template <typename T>
std::vector<T> MakeVector(size_t count) {
  try {
    return std::vector<T>(count);
  } catch (const std::bad_alloc&) {
    throw AllocationFailure(count * sizeof(T));
  }
}

// Runs a handler's body and turns any exception into an ffi::Error, so
// that none crosses the C ABI of the FFI call: allocation failures are
// kResourceExhausted (with the size where known), an unsupported dtype
// kInvalidArgument, anything else kInternal with its what().
template <typename Body>
ffi::Error CatchAtBoundary(const char* op, Body&& body) noexcept {
  try {
    try {
      return body();
    } catch (const std::bad_alloc& e) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        std::string(op) + ": out of memory: " + e.what());
    } catch (const UnsupportedDtype& e) {
      return ffi::Error::InvalidArgument(std::string(op) + ": " + e.what());
    } catch (const std::exception& e) {
      return ffi::Error::Internal(std::string(op) + ": " + e.what());
    } catch (...) {
      return ffi::Error::Internal(std::string(op) + ": unknown exception");
    }
  } catch (...) {
    // Building the message itself failed (out of memory).
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, op);
  }
}

// Whether the CPU has AVX2 and F16C (the vectorized kernel paths).
bool HasAvx2F16c();
// True where JAX_MC2_FFI_PORTABLE is set (and not "0"): HasAvx2F16c() is then false.
bool ForcePortable();

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
      throw UnsupportedDtype("LoadAsFloat", type);
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
      throw UnsupportedDtype("StoreFromFloat", type);
  }
}

// values[i] = float(round_to_dtype(values[i])): the rounding a kernel step
// applies when it writes an intermediate in the dtype and reads it back.
// Throws UnsupportedDtype for a dtype other than float16/bfloat16/float32.
void RoundInPlace(ffi::DataType type, float* values, int64_t count);

// A result rounded to `type` and stored in a buffer of `stored`: the same
// dtype, or float32 holding the bfloat16-rounded values (the handlers'
// `bf16_as_f32`: a bfloat16 result that an all-reduce sums in float32,
// docs/semantics.md §10.5). Rounds `src` in place when the two differ.
inline void StoreRounded(ffi::DataType type, ffi::DataType stored, float* src, int64_t count,
                         void* data, int64_t offset) {
  if (stored != type) RoundInPlace(type, src, count);
  StoreFromFloat(stored, src, count, data, offset);
}

// int8 -> fp32 (exact) and fp32 holding exact integers -> int32 (+=).
void LoadInt8(const int8_t* src, int64_t count, float* dst);
void AccumulateInt32(const float* src, int64_t count, bool first, int32_t* acc);

// a[i] += b[i] for `count` elements (a and b must not overlap), vectorized:
// the bias / x3 / residual additions of the kernels' row epilogues.
void AddInPlace(float* a, const float* b, int64_t count);

// ceil(a / b) for a >= 0, b >= 1, without the overflow of (a + b - 1) / b
// (an attribute near INT64_MAX would wrap to a negative or zero count).
inline int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

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

// The dtype a handler stores a result rounded to `type` in (see
// StoreRounded): `type`, or float32 with `bf16_as_f32`, which only a
// bfloat16 result may ask for.
inline ffi::Error StoredType(const std::string& op, ffi::DataType type, bool bf16_as_f32,
                             ffi::DataType* stored) {
  if (bf16_as_f32 && type != ffi::DataType::BF16) {
    return InvalidArgument(op, "bf16_as_f32 needs a bfloat16 result");
  }
  *stored = bf16_as_f32 ? ffi::DataType::F32 : type;
  return ffi::Error::Success();
}

// A set of dtypes.
class DtypeSet {
 public:
  constexpr DtypeSet(std::initializer_list<ffi::DataType> types) {
    for (ffi::DataType t : types) bits_ |= Bit(t);
  }
  constexpr DtypeSet(ffi::DataType type) : bits_(Bit(type)) {}  // NOLINT: one dtype
  constexpr bool Contains(ffi::DataType type) const { return (bits_ & Bit(type)) != 0; }

 private:
  static constexpr uint64_t Bit(ffi::DataType t) {
    const auto i = static_cast<uint64_t>(t);
    return i < 64 ? uint64_t{1} << i : 0;
  }
  uint64_t bits_ = 0;
};

inline constexpr DtypeSet kFloatTypes = {ffi::DataType::F32, ffi::DataType::F16,
                                         ffi::DataType::BF16};

// What an operand must be: a dtype of `dtypes`; with `rank` >= 0, that rank;
// each of `dims` (the first `rank` entries) that is >= 0, that size; with
// `count` >= 0, that many elements; with `rows_of`, the leading dimensions
// of `rows_of` and a last dimension of `last` (see RowsBy).
struct BufferSpec {
  DtypeSet dtypes;
  int64_t count = -1;
  int rank = -1;
  std::array<int64_t, 4> dims = {-1, -1, -1, -1};
  const ffi::AnyBuffer* rows_of = nullptr;
  int64_t last = -1;
};

// An operand [..., n] of a dtype of `dtypes` with the leading dimensions of
// x1 [..., k]: the shape of a matmul's output (an x3). The same element
// count in another shape is an error.
inline BufferSpec RowsBy(DtypeSet dtypes, const ffi::AnyBuffer& x1, int64_t n) {
  return BufferSpec{dtypes, -1, -1, {-1, -1, -1, -1}, &x1, n};
}

// Whether dims [..., last] has the leading dimensions of x1_dims [..., k].
template <typename A, typename B>
bool SameRows(const A& x1_dims, const B& dims, int64_t last) {
  if (x1_dims.size() != dims.size() || dims.size() == 0 || dims.back() != last) return false;
  for (size_t i = 0; i + 1 < dims.size(); ++i) {
    if (x1_dims[i] != dims[i]) return false;
  }
  return true;
}

inline bool Matches(const ffi::AnyBuffer& b, const BufferSpec& spec) {
  if (!spec.dtypes.Contains(b.element_type())) return false;
  if (spec.count >= 0 && static_cast<int64_t>(b.element_count()) != spec.count) return false;
  if (spec.rows_of != nullptr && !SameRows(spec.rows_of->dimensions(), b.dimensions(), spec.last)) {
    return false;
  }
  if (spec.rank < 0) return true;
  auto dims = b.dimensions();
  if (static_cast<int64_t>(dims.size()) != spec.rank) return false;
  for (size_t i = 0; i < dims.size() && i < spec.dims.size(); ++i) {
    if (spec.dims[i] >= 0 && dims[i] != spec.dims[i]) return false;
  }
  return true;
}

// An invalid-argument error with the text message() unless `b` matches
// `spec` (the message is built only on failure).
template <typename Message>
ffi::Error CheckBuffer(const char* op, const ffi::AnyBuffer& b, const BufferSpec& spec,
                       Message&& message) {
  if (Matches(b, spec)) return ffi::Error::Success();
  return InvalidArgument(op, message());
}

// Checks that every size handed to BLAS fits its integer type blasint
// (32-bit in scipy-openblas32): {name, value} pairs, e.g. {{"k", k}, {"n", n}}.
inline ffi::Error CheckBlasDims(const char* op,
                                std::initializer_list<std::pair<const char*, int64_t>> dims) {
  constexpr int64_t kMax = std::numeric_limits<blasint>::max();
  bool fits = true;
  for (const auto& d : dims) fits = fits && d.second >= 0 && d.second <= kMax;
  if (fits) return ffi::Error::Success();
  std::string names, values;
  size_t i = 0;
  for (const auto& d : dims) {
    names += i == 0 ? "" : (i + 1 == dims.size() ? " and " : ", ");
    values += (i == 0 ? "" : ", ") + std::string(d.first) + " = " + std::to_string(d.second);
    names += d.first;
    ++i;
  }
  return InvalidArgument(op, names + " must be below 2^31, got " + values);
}

// Reads the optional operands (ffi::RemainingArgs) that follow a handler's
// fixed operands, each present or not by an attribute, in order.
class OptionalOperands {
 public:
  OptionalOperands(const char* op, ffi::RemainingArgs args) : op_(op), args_(args) {}

  // An error unless exactly `expected` optional operands were passed.
  ffi::Error ExpectCount(size_t expected) const {
    if (args_.size() == expected) return ffi::Error::Success();
    return InvalidArgument(op_, "expected " + std::to_string(expected) +
                                    " optional operands, got " + std::to_string(args_.size()));
  }

  // Operand `index`, unchecked.
  ffi::Error At(size_t index, std::optional<ffi::AnyBuffer>& out) const {
    auto b = args_.get<ffi::AnyBuffer>(index);
    if (b.has_error()) return b.error();
    out = *b;
    return ffi::Error::Success();
  }

  // Operand `index`, checked against `spec` (message() on a mismatch).
  template <typename Message>
  ffi::Error At(size_t index, const BufferSpec& spec, Message&& message,
                std::optional<ffi::AnyBuffer>& out) const {
    MC2_RETURN_IF_ERROR(At(index, out));
    return CheckBuffer(op_, *out, spec, message);
  }

  // When `present`, the next operand in order, unchecked; otherwise `out`
  // is left empty and no operand is consumed.
  ffi::Error Next(bool present, std::optional<ffi::AnyBuffer>& out) {
    return present ? At(next_++, out) : ffi::Error::Success();
  }

  // Next(), checked against `spec` (message() on a mismatch).
  template <typename Message>
  ffi::Error Next(bool present, const BufferSpec& spec, Message&& message,
                  std::optional<ffi::AnyBuffer>& out) {
    return present ? At(next_++, spec, message, out) : ffi::Error::Success();
  }

 private:
  const char* op_;
  ffi::RemainingArgs args_;
  size_t next_ = 0;
};

// The untyped data of an optional operand, or nullptr.
inline const void* DataOrNull(const std::optional<ffi::AnyBuffer>& b) {
  return b ? b->untyped_data() : nullptr;
}

// The dimensions of a matmul x1 [..., k] @ x2 -> out [..., n], with x2
// (k, n), or (n, k) when transpose_x2.
struct MatmulShape {
  int64_t m = 1, k = 0, n = 0;
};

// Whether a matmul of `shape` has work to do (*work false for an empty
// output); a contraction of k == 0 into a non-empty output is an error, and
// k and n must fit the BLAS integer.
inline ffi::Error CheckMatmulWork(const char* op, const MatmulShape& shape,
                                  const ffi::AnyBuffer& x1, bool* work) {
  *work = shape.m != 0 && shape.n != 0;
  if (!*work) return ffi::Error::Success();
  if (shape.k == 0) {
    return InvalidArgument(op, "k must be at least 1, got x1 " + DimsToString(x1.dimensions()));
  }
  return CheckBlasDims(op, {{"k", shape.k}, {"n", shape.n}});
}

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
  if (x2_k != shape.k || !SameRows(x1_dims, out_dims, shape.n)) {
    return InvalidArgument(op, "shapes do not form a matmul: x1 " + DimsToString(x1_dims) +
                                   ", x2 " + DimsToString(x2_dims) + ", out " +
                                   DimsToString(out_dims));
  }
  return ffi::Error::Success();
}

// The scratch buffers of a kernel, by role. Each role is one per-thread
// buffer, reused by every handler that gives a tile that role.
enum class ScratchSlot : size_t {
  kLhs,            // the fp32 tile of the left operand (x1, x, a row block)
  kRhs,            // the fp32 tile of the right operand (weights, dy, a k-chunk of x2)
  kOut,            // the fp32 (or int32) output tile
  kBlockProducts,  // perblock: one k-block's product tile before it is scaled
  kCount,
};

// Scratch memory kept by the calling thread between calls, one buffer per
// slot. A fresh multi-megabyte allocation is mmap'ed and every 4 KiB page
// of it faults and is zeroed by the kernel on first touch, which costs about
// as much as a pass over the memory; the kernels' fp32 tiles are reused
// instead. Requests above 64 MiB are not kept. An allocation failure throws
// AllocationFailure with the size asked.
template <typename T>
class ScratchOf {
 public:
  static constexpr size_t kSlots = static_cast<size_t>(ScratchSlot::kCount);
  static constexpr size_t kMaxCachedBytes = size_t{1} << 26;

  // `count` elements, uninitialized (stale values of earlier calls).
  T* Get(ScratchSlot slot, size_t count) {
    const size_t i = static_cast<size_t>(slot);
    try {
      if (count * sizeof(T) > kMaxCachedBytes) {
        owned_[i].reset(new T[count]);
        return owned_[i].get();
      }
      std::vector<T>& b = ThreadBuffers()[i];
      if (b.size() < count) b.resize(count);
      return b.data();
    } catch (const std::bad_alloc&) {
      throw AllocationFailure(count * sizeof(T));
    }
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
