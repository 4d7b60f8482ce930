// mc2_int8_matmul_ffi: the local (per-rank) part of an int8 x int8 matmul +
// dequant, shared by the quantized matmul + all-reduce operators:
//   acc[m, n] = x1[m, k] @ x2 (+ bias[n])            exact, int32
//   y         = round(float32(acc) * scale[n or 1] (* pertoken[m]))
//   out       = round(y + x3)                         when x3 is given
//   q         = int8(fp16(out / comm_scale))          with a comm scale: the
//               quantization of the int8 low-bit communication, int8 output
// x2 is (k, n), or (n, k) when transpose_x2. The GEMM core is BLAS sgemm on
// fp32 tiles over k-chunks of at most 1024: every partial sum is an integer
// of magnitude <= 1024 * 128 * 128 = 2^24, exact in fp32, and the chunks are
// added in int32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "blas.h"
#include "ffi_common.h"
#include "mc2_ffi.h"

namespace jax_mc2 {
namespace {

constexpr char kOp[] = "mc2_int8_matmul_ffi";
constexpr int64_t kChunkK = 1024;
constexpr int64_t kMaxTileElements = int64_t{1} << 24;

__attribute__((target_clones("avx2", "default"))) void DivideRow(float* __restrict row,
                                                                 const float* __restrict scale,
                                                                 int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] /= scale[j];
}

// Values already rounded to fp16 -> int8: half to even, saturated to
// [-128, 127], NaN -> 0.
__attribute__((target_clones("avx2", "default"))) void SaturateToInt8(const float* __restrict h,
                                                                      int64_t n,
                                                                      int8_t* __restrict q) {
  for (int64_t j = 0; j < n; ++j) {
    const float r = __builtin_roundevenf(std::min(127.0f, std::max(-128.0f, h[j])));
    q[j] = h[j] != h[j] ? 0 : static_cast<int8_t>(r);
  }
}

// q = int8(fp16(c / scale)) in place on the fp32 row c: a correctly rounded
// fp32 division rounded to fp16, then rounded half to even and saturated to
// [-128, 127]; NaN -> 0. Vectorized passes over the row.
void QuantizeForComm(float* c, const float* scale, int64_t n, int8_t* q) {
  DivideRow(c, scale, n);
  RoundInPlace(ffi::DataType::F16, c, n);
  SaturateToInt8(c, n, q);
}

// One row of the dequantization, y = float(acc + bias) * scale (* token),
// in place on the fp32 row: from the int32 accumulator `acc`, or (acc null,
// a single k-chunk) from the row itself, the sgemm result, an exact integer
// in fp32 whose int32 conversion is exact. Small loops on restrict
// pointers, so that they vectorize.
__attribute__((target_clones("avx2", "default"))) void DequantRow(float* row,
                                                                  const int32_t* __restrict acc,
                                                                  const int32_t* __restrict bias,
                                                                  const float* __restrict scale,
                                                                  const float* token, int64_t n) {
  // The int32 sum acc + bias (wrapping like the hardware's, no signed
  // overflow) is converted to fp32 once: an int32 accumulator beyond 2^24 is
  // never rounded before the bias is added.
  if (acc && bias) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t sum = static_cast<uint32_t>(acc[j]) + static_cast<uint32_t>(bias[j]);
      row[j] = static_cast<float>(static_cast<int32_t>(sum)) * scale[j];
    }
  } else if (acc) {
    for (int64_t j = 0; j < n; ++j) row[j] = static_cast<float>(acc[j]) * scale[j];
  } else if (bias) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t sum =
          static_cast<uint32_t>(static_cast<int32_t>(row[j])) + static_cast<uint32_t>(bias[j]);
      row[j] = static_cast<float>(static_cast<int32_t>(sum)) * scale[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] *= scale[j];
  }
  if (token) {
    const float t = *token;
    for (int64_t j = 0; j < n; ++j) row[j] *= t;
  }
}

ffi::Error Mc2Int8MatmulImpl(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::AnyBuffer scale,
                             ffi::RemainingArgs extra, ffi::Result<ffi::AnyBuffer> out,
                             bool transpose_x2, bool has_pertoken, bool has_bias, bool has_x3,
                             bool has_comm_scale, int64_t parallelism) {
  // With a comm scale the result is rounded to the comm scale's dtype (the
  // operator's output dtype) and then quantized to int8.
  if (x1.element_type() != ffi::DataType::S8 || x2.element_type() != ffi::DataType::S8) {
    return InvalidArgument(kOp, "x1 and x2 must be int8");
  }
  if (has_comm_scale != (out->element_type() == ffi::DataType::S8) ||
      (!has_comm_scale && !IsFloatType(out->element_type()))) {
    return InvalidArgument(kOp, "out must be int8 with a comm scale, a float dtype without");
  }
  if (scale.element_type() != ffi::DataType::F32) {
    return InvalidArgument(kOp, "scale must be float32");
  }
  MatmulShape shape;
  if (ffi::Error e = ParseMatmul(kOp, x1, x2, *out, transpose_x2, shape); e.failure()) return e;
  const int64_t m = shape.m, k = shape.k, n = shape.n;
  auto x1_dims = x1.dimensions();
  auto out_dims = out->dimensions();
  const int64_t scale_len = static_cast<int64_t>(scale.element_count());
  if (scale_len != 1 && scale_len != n) {
    return InvalidArgument(kOp, "scale must have 1 or n = " + std::to_string(n) +
                                    " elements, got " + DimsToString(scale.dimensions()));
  }
  const size_t expected =
      size_t{has_pertoken} + size_t{has_bias} + size_t{has_x3} + size_t{has_comm_scale};
  if (extra.size() != expected) {
    return InvalidArgument(kOp, "expected " + std::to_string(expected) +
                                    " optional operands, got " + std::to_string(extra.size()));
  }
  ffi::DataType out_type = out->element_type();
  std::vector<float> comm_scale;
  if (has_comm_scale) {
    auto cs = extra.get<ffi::AnyBuffer>(expected - 1);  // the last operand
    if (cs.has_error()) return cs.error();
    if (!IsFloatType(cs->element_type()) || cs->element_type() == ffi::DataType::F32 ||
        static_cast<int64_t>(cs->element_count()) != n) {
      return InvalidArgument(kOp, "comm scale must be float16/bfloat16 (n,) = (" +
                                      std::to_string(n) + ",), got " +
                                      DimsToString(cs->dimensions()));
    }
    out_type = cs->element_type();
    comm_scale.resize(n);
    LoadAsFloat(out_type, cs->untyped_data(), 0, n, comm_scale.data());
  }
  size_t next = 0;
  const float* pertoken = nullptr;
  const int32_t* bias = nullptr;
  const void* x3_data = nullptr;
  if (has_pertoken) {
    auto p = extra.get<ffi::AnyBuffer>(next++);
    if (p.has_error()) return p.error();
    if (p->element_type() != ffi::DataType::F32 || static_cast<int64_t>(p->element_count()) != m) {
      return InvalidArgument(kOp, "pertoken scale must be float32 (m,) = (" + std::to_string(m) +
                                      ",), got " + DimsToString(p->dimensions()));
    }
    pertoken = static_cast<const float*>(p->untyped_data());
  }
  if (has_bias) {
    auto b = extra.get<ffi::AnyBuffer>(next++);
    if (b.has_error()) return b.error();
    if (b->element_type() != ffi::DataType::S32 || static_cast<int64_t>(b->element_count()) != n) {
      return InvalidArgument(kOp, "bias must be int32 (n,) = (" + std::to_string(n) + ",), got " +
                                      DimsToString(b->dimensions()));
    }
    bias = static_cast<const int32_t*>(b->untyped_data());
  }
  if (has_x3) {
    auto x3 = extra.get<ffi::AnyBuffer>(next++);
    if (x3.has_error()) return x3.error();
    if (x3->element_type() != out_type || static_cast<int64_t>(x3->element_count()) != m * n) {
      return InvalidArgument(kOp, "x3 must have the output shape " + DimsToString(out_dims) +
                                      " and dtype, got " + DimsToString(x3->dimensions()));
    }
    x3_data = x3->untyped_data();
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    return InvalidArgument(kOp, "k must be at least 1, got x1 " + DimsToString(x1_dims));
  }

  BlasThreadsScope blas_threads(BlasThreads(parallelism));
  const int8_t* a8 = static_cast<const int8_t*>(x1.untyped_data());
  const int8_t* b8 = static_cast<const int8_t*>(x2.untyped_data());
  const float* s = static_cast<const float*>(scale.untyped_data());
  void* out_data = out->untyped_data();
  const int64_t kc_max = std::min(k, kChunkK);
  const int64_t rows = std::min(m, std::max<int64_t>(64, kMaxTileElements / std::max(n, kc_max)));
  Scratch scratch;
  float* a = scratch.Get(0, static_cast<size_t>(rows) * kc_max);
  float* b = scratch.Get(1, static_cast<size_t>(kc_max) * n);
  float* c = scratch.Get(2, static_cast<size_t>(rows) * n);
  // One k-chunk: the sgemm result itself is the exact accumulator.
  const bool single_chunk = k <= kc_max;
  ScratchOf<int32_t> int_scratch;
  int32_t* acc = single_chunk ? nullptr : int_scratch.Get(0, static_cast<size_t>(rows) * n);
  std::vector<float> x3_row(has_x3 ? n : 0);
  std::vector<float> col_scale(n);
  for (int64_t j = 0; j < n; ++j) col_scale[j] = s[scale_len == 1 ? 0 : j];
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t r = std::min(rows, m - r0);
    for (int64_t k0 = 0; k0 < k; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, k - k0);
      for (int64_t i = 0; i < r; ++i) LoadInt8(a8 + (r0 + i) * k + k0, kc, a + i * kc);
      // x2's chunk: rows k0..k0+kc of (k, n), or columns of (n, k).
      if (transpose_x2) {
        for (int64_t j = 0; j < n; ++j) LoadInt8(b8 + j * k + k0, kc, b + j * kc);
      } else {
        LoadInt8(b8 + k0 * n, kc * n, b);
      }
      Sgemm(false, transpose_x2, r, n, kc, a, kc, b, transpose_x2 ? kc : n, c, n);
      if (!single_chunk) AccumulateInt32(c, r * n, k0 == 0, acc);
    }
    // Epilogue per row: + bias (int32), dequant in fp32, round, + x3, round.
    for (int64_t i = 0; i < r; ++i) {
      float* row = c + i * n;
      const float* token = pertoken ? pertoken + r0 + i : nullptr;
      DequantRow(row, single_chunk ? nullptr : acc + i * n, bias, col_scale.data(), token, n);
      if (has_x3) {
        RoundInPlace(out_type, row, n);
        LoadAsFloat(out_type, x3_data, (r0 + i) * n, n, x3_row.data());
        AddInPlace(row, x3_row.data(), n);
      }
      if (has_comm_scale) {
        RoundInPlace(out_type, row, n);
        QuantizeForComm(row, comm_scale.data(), n, static_cast<int8_t*>(out_data) + (r0 + i) * n);
      } else {
        StoreFromFloat(out_type, row, n, out_data, (r0 + i) * n);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2Int8MatmulHandler, Mc2Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x1 int8
                                  .Arg<ffi::AnyBuffer>()  // x2 int8
                                  .Arg<ffi::AnyBuffer>()  // scale f32 (1,) or (n,)
                                  .RemainingArgs()        // pertoken?, bias?, x3?, comm scale?
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<bool>("transpose_x2")
                                  .Attr<bool>("has_pertoken")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("has_x3")
                                  .Attr<bool>("has_comm_scale")
                                  .Attr<int64_t>("parallelism"));

}  // namespace jax_mc2
