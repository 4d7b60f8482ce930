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
//
// Where XLA's int8 GEMM is the faster one (docs/semantics.md §12), the ffi
// implementation does not call this handler: it emits XLA's dot_general and
// the same epilogue in lax ops, which give the same bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "blas.h"
#include "ffi_common.h"
#include "mc2_ffi.h"
#include "parallel_rows.h"

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

// One call's checked operands.
struct Int8MatmulArgs {
  MatmulShape shape;
  bool transpose_x2;
  const int8_t* x1;
  const int8_t* x2;
  std::vector<float> col_scale;  // scale broadcast to n
  // The dtype the result is rounded to: out's, or the comm scale's.
  ffi::DataType out_type;
  const float* pertoken = nullptr;  // optional
  const int32_t* bias = nullptr;    // optional
  const void* x3 = nullptr;         // optional
  std::vector<float> comm_scale;    // empty without a comm scale
  void* out;
  ffi::DataType stored;  // out's dtype: out_type, or float32 (bf16_as_f32)
};

// The scale, float32 with 1 or n elements, broadcast to n.
ffi::Error ReadScale(const ffi::AnyBuffer& scale, Int8MatmulArgs& args) {
  const int64_t n = args.shape.n;
  if (scale.element_type() != ffi::DataType::F32) {
    return InvalidArgument(kOp, "scale must be float32");
  }
  const int64_t len = static_cast<int64_t>(scale.element_count());
  if (len != 1 && len != n) {
    return InvalidArgument(kOp, "scale must have 1 or n = " + std::to_string(n) +
                                    " elements, got " + DimsToString(scale.dimensions()));
  }
  const float* data = static_cast<const float*>(scale.untyped_data());
  args.col_scale = MakeVector<float>(n);
  for (int64_t j = 0; j < n; ++j) args.col_scale[j] = data[len == 1 ? 0 : j];
  return ffi::Error::Success();
}

// The output's dtype: int8 with a comm scale (the result is rounded to the
// comm scale's dtype, the operator's output dtype, then quantized), a float
// dtype without.
ffi::Error CheckOutType(const ffi::AnyBuffer& out, bool has_comm_scale) {
  if (has_comm_scale != (out.element_type() == ffi::DataType::S8) ||
      (!has_comm_scale && !IsFloatType(out.element_type()))) {
    return InvalidArgument(kOp, "out must be int8 with a comm scale, a float dtype without");
  }
  return ffi::Error::Success();
}

// The optional operands: pertoken?, bias?, x3?, comm scale? (in that order).
ffi::Error ReadInt8Optionals(ffi::RemainingArgs extra, bool has_pertoken, bool has_bias,
                             bool has_x3, bool has_comm_scale, const ffi::AnyBuffer& out,
                             Int8MatmulArgs& args) {
  const int64_t m = args.shape.m, n = args.shape.n;
  OptionalOperands operands(kOp, extra);
  const size_t expected =
      size_t{has_pertoken} + size_t{has_bias} + size_t{has_x3} + size_t{has_comm_scale};
  MC2_RETURN_IF_ERROR(operands.ExpectCount(expected));
  std::optional<ffi::AnyBuffer> cs, pertoken, bias, x3;
  if (has_comm_scale) {
    // The last operand, read first: it sets the dtype x3 must have.
    MC2_RETURN_IF_ERROR(operands.At(
        expected - 1, BufferSpec{{ffi::DataType::F16, ffi::DataType::BF16}, n},
        [&] {
          return "comm scale must be float16/bfloat16 (n,) = (" + std::to_string(n) + ",), got " +
                 DimsToString(cs->dimensions());
        },
        cs));
    args.out_type = cs->element_type();
    args.comm_scale = MakeVector<float>(n);
    LoadAsFloat(args.out_type, cs->untyped_data(), 0, n, args.comm_scale.data());
  }
  MC2_RETURN_IF_ERROR(operands.Next(
      has_pertoken, BufferSpec{ffi::DataType::F32, m},
      [&] {
        return "pertoken scale must be float32 (m,) = (" + std::to_string(m) + ",), got " +
               DimsToString(pertoken->dimensions());
      },
      pertoken));
  MC2_RETURN_IF_ERROR(operands.Next(
      has_bias, BufferSpec{ffi::DataType::S32, n, 1},
      [&] {
        return "bias must be int32 (n,) = (" + std::to_string(n) + ",), got " +
               DimsToString(bias->dimensions());
      },
      bias));
  MC2_RETURN_IF_ERROR(operands.Next(
      has_x3, RowsBy(args.out_type, out, n),
      [&] {
        return "x3 must have the output shape " + DimsToString(out.dimensions()) +
               " and dtype, got " + DimsToString(x3->dimensions());
      },
      x3));
  args.pertoken = static_cast<const float*>(DataOrNull(pertoken));
  args.bias = static_cast<const int32_t*>(DataOrNull(bias));
  args.x3 = DataOrNull(x3);
  return ffi::Error::Success();
}

// Checks the operands of one call and fills `args`.
ffi::Error ParseInt8MatmulArgs(const ffi::AnyBuffer& x1, const ffi::AnyBuffer& x2,
                               const ffi::AnyBuffer& scale, ffi::RemainingArgs extra,
                               ffi::AnyBuffer& out, bool transpose_x2, bool has_pertoken,
                               bool has_bias, bool has_x3, bool has_comm_scale, bool bf16_as_f32,
                               Int8MatmulArgs& args) {
  if (x1.element_type() != ffi::DataType::S8 || x2.element_type() != ffi::DataType::S8) {
    return InvalidArgument(kOp, "x1 and x2 must be int8");
  }
  MC2_RETURN_IF_ERROR(CheckOutType(out, has_comm_scale));
  MC2_RETURN_IF_ERROR(ParseMatmul(kOp, x1, x2, out, transpose_x2, args.shape));
  MC2_RETURN_IF_ERROR(ReadScale(scale, args));
  // With bf16_as_f32 the float32 out holds bfloat16 values (never with a comm scale).
  args.out_type = bf16_as_f32 && !has_comm_scale ? ffi::DataType::BF16 : out.element_type();
  MC2_RETURN_IF_ERROR(StoredType(kOp, args.out_type, bf16_as_f32, &args.stored));
  if (out.element_type() != (has_comm_scale ? ffi::DataType::S8 : args.stored)) {
    return InvalidArgument(kOp, "bf16_as_f32 needs a float32 out and no comm scale");
  }
  MC2_RETURN_IF_ERROR(
      ReadInt8Optionals(extra, has_pertoken, has_bias, has_x3, has_comm_scale, out, args));
  args.transpose_x2 = transpose_x2;
  args.x1 = static_cast<const int8_t*>(x1.untyped_data());
  args.x2 = static_cast<const int8_t*>(x2.untyped_data());
  args.out = out.untyped_data();
  return ffi::Error::Success();
}

// The epilogue of output row `i` in the fp32 scratch row `row`: + bias
// (int32), dequant in fp32, round, + x3, round, then the store or the comm
// quantization. The exact accumulator is `acc` (n int32), or with acc null
// the row itself (an sgemm result of a single k-chunk). x3_row: n floats of
// scratch when x3 is given.
void FinishRow(const Int8MatmulArgs& p, int64_t i, float* row, const int32_t* acc, float* x3_row) {
  const int64_t n = p.shape.n;
  const float* token = p.pertoken ? p.pertoken + i : nullptr;
  DequantRow(row, acc, p.bias, p.col_scale.data(), token, n);
  if (p.x3) {
    RoundInPlace(p.out_type, row, n);
    LoadAsFloat(p.out_type, p.x3, i * n, n, x3_row);
    AddInPlace(row, x3_row, n);
  }
  if (!p.comm_scale.empty()) {
    RoundInPlace(p.out_type, row, n);
    QuantizeForComm(row, p.comm_scale.data(), n, static_cast<int8_t*>(p.out) + i * n);
  } else {
    StoreRounded(p.out_type, p.stored, row, n, p.out, i * n);
  }
}

// The matmul itself, on checked operands with m, n, k >= 1. The passes
// around each sgemm (int8 to fp32, the int32 sums, the epilogue) are split by
// rows over `parallel`.
void RunInt8Matmul(const Int8MatmulArgs& p, const RowParallel& parallel) {
  const int64_t m = p.shape.m, k = p.shape.k, n = p.shape.n;
  const bool transpose_x2 = p.transpose_x2;
  const int8_t* a8 = p.x1;
  const int8_t* b8 = p.x2;
  const int64_t kc_max = std::min(k, kChunkK);
  const int64_t rows = std::min(m, std::max<int64_t>(64, kMaxTileElements / std::max(n, kc_max)));
  Scratch scratch;
  float* a = scratch.Get(ScratchSlot::kLhs, static_cast<size_t>(rows) * kc_max);
  float* b = scratch.Get(ScratchSlot::kRhs, static_cast<size_t>(kc_max) * n);
  float* c = scratch.Get(ScratchSlot::kOut, static_cast<size_t>(rows) * n);
  // One k-chunk: the sgemm result itself is the exact accumulator.
  const bool single_chunk = k <= kc_max;
  ScratchOf<int32_t> int_scratch;
  int32_t* acc =
      single_chunk ? nullptr : int_scratch.Get(ScratchSlot::kOut, static_cast<size_t>(rows) * n);
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t r = std::min(rows, m - r0);
    for (int64_t k0 = 0; k0 < k; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, k - k0);
      parallel.Run(r, kc, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) LoadInt8(a8 + (r0 + i) * k + k0, kc, a + i * kc);
      });
      // x2's chunk: rows k0..k0+kc of (k, n), or columns of (n, k).
      if (transpose_x2) {
        parallel.Run(n, kc, [&](int64_t begin, int64_t end) {
          for (int64_t j = begin; j < end; ++j) LoadInt8(b8 + j * k + k0, kc, b + j * kc);
        });
      } else {
        parallel.Run(kc, n, [&](int64_t begin, int64_t end) {
          LoadInt8(b8 + (k0 + begin) * n, (end - begin) * n, b + begin * n);
        });
      }
      Sgemm(false, transpose_x2, r, n, kc, a, kc, b, transpose_x2 ? kc : n, c, n);
      if (!single_chunk) {
        parallel.Run(r, n, [&](int64_t begin, int64_t end) {
          AccumulateInt32(c + begin * n, (end - begin) * n, k0 == 0, acc + begin * n);
        });
      }
    }
    parallel.Run(r, n, [&](int64_t begin, int64_t end) {
      std::vector<float> x3_row = MakeVector<float>(p.x3 ? n : 0);
      for (int64_t i = begin; i < end; ++i) {
        FinishRow(p, r0 + i, c + i * n, single_chunk ? nullptr : acc + i * n, x3_row.data());
      }
    });
  }
}

ffi::Error Mc2Int8MatmulImpl(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::AnyBuffer scale,
                             ffi::RemainingArgs extra, ffi::Result<ffi::AnyBuffer> out,
                             bool transpose_x2, bool has_pertoken, bool has_bias, bool has_x3,
                             bool has_comm_scale, bool bf16_as_f32, int64_t parallelism) {
  return CatchAtBoundary(kOp, [&]() -> ffi::Error {
    Int8MatmulArgs args;
    MC2_RETURN_IF_ERROR(ParseInt8MatmulArgs(x1, x2, scale, extra, *out, transpose_x2, has_pertoken,
                                            has_bias, has_x3, has_comm_scale, bf16_as_f32, args));
    bool work = false;
    MC2_RETURN_IF_ERROR(CheckMatmulWork(kOp, args.shape, x1, &work));
    if (!work) return ffi::Error::Success();
    const int threads = BlasThreads(parallelism);
    BlasThreadsScope blas_threads(threads);
    RunInt8Matmul(args, RowParallel(threads));
    return ffi::Error::Success();
  });
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
                                  .Attr<bool>("bf16_as_f32")
                                  .Attr<int64_t>("parallelism"));

}  // namespace jax_mc2
