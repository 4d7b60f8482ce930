// mc2_matmul_ffi: the local (per-rank) part of matmul + all-reduce,
//   out[m, n] = round(x1[m, k] @ w (+ bias[n]) (+ x3[m, n]))
// computed in fp32 with one rounding to the output dtype. x2 is (k, n), or
// (n, k) when transpose_x2. The all-reduce itself is XLA's collective, run
// on `out` after this call.
//
// w is x2 itself (x1's dtype), or, with `antiquant`, the int8 x2 dequantized
// to x1's dtype: w = (x2 + offset) * scale, per tensor, per channel (n) or
// per group of `antiquant_group_size` rows of k, with the Ascend weight-quant
// arithmetic: float16 in fp16 steps (each add and multiply rounded to fp16),
// bfloat16 in fp32 then rounded once to bf16, float32 in fp32.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "blas.h"
#include "ffi_common.h"
#include "mc2_ffi.h"

namespace jax_mc2 {
namespace {

constexpr char kOp[] = "mc2_matmul_ffi";
// The fp32 tiles of x1 and of the output hold at most this many elements
// each (64 MiB). Below that the whole matmul is one sgemm call: OpenBLAS
// packs x2 once per call, and splitting m costs up to 15 % at the per-device
// shapes of a sharded matmul.
constexpr int64_t kMaxTileElements = int64_t{1} << 24;

struct Antiquant {
  const void* scale = nullptr;
  const void* offset = nullptr;  // optional
  int64_t scale_rows = 1;        // 1, or ceil(k / antiquant_group_size) per group
  int64_t scale_cols = 1;        // 1 (pertensor) or n
  int64_t antiquant_group_size = 0;
};

// Dequantizes the int8 x2 (as stored: (k, n), or (n, k) transposed) into
// fp32 values of w, already rounded to `dtype`.
void DequantizeWeights(ffi::DataType dtype, const int8_t* x2, int64_t k, int64_t n,
                       bool transpose_x2, const Antiquant& aq, float* w) {
  std::vector<float> scale = MakeVector<float>(aq.scale_rows * aq.scale_cols);
  std::vector<float> offset = MakeVector<float>(aq.offset ? scale.size() : 0);
  LoadAsFloat(dtype, aq.scale, 0, scale.size(), scale.data());
  if (aq.offset) LoadAsFloat(dtype, aq.offset, 0, offset.size(), offset.data());
  const int64_t rows = transpose_x2 ? n : k, cols = transpose_x2 ? k : n;
  std::vector<float> row = MakeVector<float>(cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t kk = transpose_x2 ? c : r, j = transpose_x2 ? r : c;
      const int64_t group = aq.antiquant_group_size > 0 ? kk / aq.antiquant_group_size : 0;
      const int64_t idx =
          (aq.scale_rows > 1 ? group * aq.scale_cols : 0) + (aq.scale_cols > 1 ? j : 0);
      float v = static_cast<float>(x2[r * cols + c]);
      if (dtype == ffi::DataType::F16) {
        // fp16 arithmetic: each step rounded to fp16.
        if (aq.offset) v = Fp16ToFloat(FloatToFp16(v + offset[idx]));
        v = Fp16ToFloat(FloatToFp16(v * scale[idx]));
      } else {
        if (aq.offset) v += offset[idx];
        v *= scale[idx];
      }
      row[c] = v;
    }
    RoundInPlace(dtype, row.data(), cols);  // bf16: one rounding of the fp32 result
    std::copy(row.begin(), row.end(), w + r * cols);
  }
}

// One call's checked operands.
struct MatmulArgs {
  ffi::DataType dtype;
  MatmulShape shape;
  bool transpose_x2;
  bool antiquant;
  Antiquant aq;
  const void* x1;
  const void* x2;
  const void* bias = nullptr;  // optional
  const void* x3 = nullptr;    // optional
  void* out;
};

// The antiquant scale and offset (the first optional operands).
ffi::Error ReadAntiquant(OptionalOperands& operands, ffi::DataType dtype, int64_t k, int64_t n,
                         bool has_offset, int64_t antiquant_group_size, Antiquant& aq) {
  std::optional<ffi::AnyBuffer> scale, offset;
  if (antiquant_group_size < 0) {
    return InvalidArgument(
        kOp, "antiquant_group_size must be >= 0, got " + std::to_string(antiquant_group_size));
  }
  aq.antiquant_group_size = antiquant_group_size;
  aq.scale_rows = antiquant_group_size > 0 ? CeilDiv(k, antiquant_group_size) : 1;
  int64_t count = 0;
  auto scale_message = [&] {
    return "antiquant scale must have x1's dtype and " +
           std::to_string(aq.scale_rows * aq.scale_cols) + " elements, got " +
           DimsToString(scale->dimensions());
  };
  // The scale's own size decides between pertensor and per channel.
  MC2_RETURN_IF_ERROR(operands.Next(true, scale));
  count = static_cast<int64_t>(scale->element_count());
  aq.scale_cols = (count == 1 && antiquant_group_size == 0) ? 1 : n;
  MC2_RETURN_IF_ERROR(
      CheckBuffer(kOp, *scale, BufferSpec{dtype, aq.scale_rows * aq.scale_cols}, scale_message));
  aq.scale = scale->untyped_data();
  MC2_RETURN_IF_ERROR(operands.Next(
      has_offset, BufferSpec{dtype, count},
      [&] {
        return "antiquant offset must match the scale, got " + DimsToString(offset->dimensions());
      },
      offset));
  aq.offset = DataOrNull(offset);
  return ffi::Error::Success();
}

// Checks the operands of one call and fills `args`.
ffi::Error ParseMatmulArgs(const ffi::AnyBuffer& x1, const ffi::AnyBuffer& x2,
                           ffi::RemainingArgs extra, ffi::AnyBuffer& out, bool transpose_x2,
                           bool has_bias, bool has_x3, bool antiquant, bool has_offset,
                           int64_t antiquant_group_size, MatmulArgs& args) {
  const ffi::DataType dtype = x1.element_type();
  const ffi::DataType w_type = antiquant ? ffi::DataType::S8 : dtype;
  if (!IsFloatType(dtype) || x2.element_type() != w_type || out.element_type() != dtype) {
    return InvalidArgument(kOp, antiquant ? "x1 and out must share one float dtype, x2 int8"
                                          : "x1, x2 and out must share one float dtype");
  }
  MC2_RETURN_IF_ERROR(ParseMatmul(kOp, x1, x2, out, transpose_x2, args.shape));
  const int64_t m = args.shape.m, k = args.shape.k, n = args.shape.n;
  OptionalOperands operands(kOp, extra);
  MC2_RETURN_IF_ERROR(operands.ExpectCount((antiquant ? 1 + size_t{has_offset} : 0) +
                                           size_t{has_bias} + size_t{has_x3}));
  if (antiquant) {
    MC2_RETURN_IF_ERROR(
        ReadAntiquant(operands, dtype, k, n, has_offset, antiquant_group_size, args.aq));
  }
  std::optional<ffi::AnyBuffer> bias, x3;
  MC2_RETURN_IF_ERROR(operands.Next(
      has_bias, BufferSpec{dtype, n},
      [&] {
        return "bias must be (n,) = (" + std::to_string(n) + ",) of the x1 dtype, got " +
               DimsToString(bias->dimensions());
      },
      bias));
  MC2_RETURN_IF_ERROR(operands.Next(
      has_x3, BufferSpec{dtype, m * n},
      [&] {
        return "x3 must have the output shape " + DimsToString(out.dimensions()) + ", got " +
               DimsToString(x3->dimensions());
      },
      x3));
  args.dtype = dtype;
  args.transpose_x2 = transpose_x2;
  args.antiquant = antiquant;
  args.x1 = x1.untyped_data();
  args.x2 = x2.untyped_data();
  args.bias = DataOrNull(bias);
  args.x3 = DataOrNull(x3);
  args.out = out.untyped_data();
  return ffi::Error::Success();
}

// The matmul itself, on checked operands with m, n, k >= 1.
void RunMatmul(const MatmulArgs& p) {
  const ffi::DataType dtype = p.dtype;
  const int64_t m = p.shape.m, k = p.shape.k, n = p.shape.n;
  const bool transpose_x2 = p.transpose_x2;
  std::vector<float> bias_f = MakeVector<float>(p.bias ? n : 0);
  if (p.bias) LoadAsFloat(dtype, p.bias, 0, n, bias_f.data());

  // The weights are read whole by every row block: convert them once.
  Scratch scratch;
  float* w = scratch.Get(ScratchSlot::kRhs, static_cast<size_t>(k) * n);
  if (p.antiquant) {
    DequantizeWeights(dtype, static_cast<const int8_t*>(p.x2), k, n, transpose_x2, p.aq, w);
  } else {
    LoadAsFloat(dtype, p.x2, 0, k * n, w);
  }
  const int64_t rows = std::min(m, std::max<int64_t>(64, kMaxTileElements / std::max(n, k)));
  // Uninitialized: every element is written before it is read.
  float* a = scratch.Get(ScratchSlot::kLhs, static_cast<size_t>(rows) * k);
  float* c = scratch.Get(ScratchSlot::kOut, static_cast<size_t>(rows) * n);
  std::vector<float> x3_row = MakeVector<float>(p.x3 ? n : 0);
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t r = std::min(rows, m - r0);
    LoadAsFloat(dtype, p.x1, r0 * k, r * k, a);
    Sgemm(false, transpose_x2, r, n, k, a, k, w, transpose_x2 ? k : n, c, n);
    if (!p.bias && !p.x3) {
      StoreFromFloat(dtype, c, r * n, p.out, r0 * n);
      continue;
    }
    // Epilogue, one row at a time while it is in cache: + bias, + x3, one
    // rounding to the dtype.
    for (int64_t i = 0; i < r; ++i) {
      float* row = c + i * n;
      if (p.bias) {
        AddInPlace(row, bias_f.data(), n);
      }
      if (p.x3) {
        LoadAsFloat(dtype, p.x3, (r0 + i) * n, n, x3_row.data());
        AddInPlace(row, x3_row.data(), n);
      }
      StoreFromFloat(dtype, row, n, p.out, (r0 + i) * n);
    }
  }
}

ffi::Error Mc2MatmulImpl(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::RemainingArgs extra,
                         ffi::Result<ffi::AnyBuffer> out, bool transpose_x2, bool has_bias,
                         bool has_x3, bool antiquant, bool has_offset, int64_t antiquant_group_size,
                         int64_t parallelism) {
  return CatchAtBoundary(kOp, [&]() -> ffi::Error {
    MatmulArgs args;
    MC2_RETURN_IF_ERROR(ParseMatmulArgs(x1, x2, extra, *out, transpose_x2, has_bias, has_x3,
                                        antiquant, has_offset, antiquant_group_size, args));
    bool work = false;
    MC2_RETURN_IF_ERROR(CheckMatmulWork(kOp, args.shape, x1, &work));
    if (!work) return ffi::Error::Success();
    BlasThreadsScope blas_threads(BlasThreads(parallelism));
    RunMatmul(args);
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2MatmulHandler, Mc2MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x1
                                  .Arg<ffi::AnyBuffer>()  // x2
                                  .RemainingArgs()        // [scale, offset?], bias?, x3?
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<bool>("transpose_x2")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("has_x3")
                                  .Attr<bool>("antiquant")
                                  .Attr<bool>("has_offset")
                                  .Attr<int64_t>("antiquant_group_size")
                                  .Attr<int64_t>("parallelism"));

}  // namespace jax_mc2
