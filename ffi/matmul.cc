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
#include "parallel_rows.h"

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
// fp32 values of w, already rounded to `dtype`, a range of stored rows at a
// time.
class WeightDequantizer {
 public:
  WeightDequantizer(ffi::DataType dtype, const int8_t* x2, int64_t k, int64_t n, bool transpose_x2,
                    const Antiquant& aq)
      : dtype_(dtype),
        x2_(x2),
        transpose_x2_(transpose_x2),
        cols_(transpose_x2 ? k : n),
        aq_(aq),
        scale_(MakeVector<float>(aq.scale_rows * aq.scale_cols)),
        offset_(MakeVector<float>(aq.offset ? scale_.size() : 0)) {
    LoadAsFloat(dtype, aq.scale, 0, scale_.size(), scale_.data());
    if (aq.offset) LoadAsFloat(dtype, aq.offset, 0, offset_.size(), offset_.data());
  }

  // Stored rows [begin, end) into w (the whole dequantized matrix).
  void Rows(int64_t begin, int64_t end, float* w) const {
    for (int64_t r = begin; r < end; ++r) {
      float* row = w + r * cols_;
      for (int64_t c = 0; c < cols_; ++c) {
        const int64_t kk = transpose_x2_ ? c : r, j = transpose_x2_ ? r : c;
        const int64_t group = aq_.antiquant_group_size > 0 ? kk / aq_.antiquant_group_size : 0;
        const int64_t idx =
            (aq_.scale_rows > 1 ? group * aq_.scale_cols : 0) + (aq_.scale_cols > 1 ? j : 0);
        float v = static_cast<float>(x2_[r * cols_ + c]);
        if (dtype_ == ffi::DataType::F16) {
          // fp16 arithmetic: each step rounded to fp16.
          if (aq_.offset) v = Fp16ToFloat(FloatToFp16(v + offset_[idx]));
          v = Fp16ToFloat(FloatToFp16(v * scale_[idx]));
        } else {
          if (aq_.offset) v += offset_[idx];
          v *= scale_[idx];
        }
        row[c] = v;
      }
      RoundInPlace(dtype_, row, cols_);  // bf16: one rounding of the fp32 result
    }
  }

 private:
  ffi::DataType dtype_;
  const int8_t* x2_;
  bool transpose_x2_;
  int64_t cols_;
  const Antiquant& aq_;
  std::vector<float> scale_, offset_;
};

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
  ffi::DataType stored;  // out's dtype: dtype, or float32 (bf16_as_f32)
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
                           int64_t antiquant_group_size, bool bf16_as_f32, MatmulArgs& args) {
  const ffi::DataType dtype = x1.element_type();
  const ffi::DataType w_type = antiquant ? ffi::DataType::S8 : dtype;
  MC2_RETURN_IF_ERROR(StoredType(kOp, dtype, bf16_as_f32, &args.stored));
  if (bf16_as_f32 && out.element_type() != args.stored) {
    return InvalidArgument(kOp, "bf16_as_f32 needs a float32 out");
  }
  if (!IsFloatType(dtype) || x2.element_type() != w_type || out.element_type() != args.stored) {
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
      has_bias, BufferSpec{dtype, n, 1},
      [&] {
        return "bias must be (n,) = (" + std::to_string(n) + ",) of the x1 dtype, got " +
               DimsToString(bias->dimensions());
      },
      bias));
  MC2_RETURN_IF_ERROR(operands.Next(
      has_x3, RowsBy(dtype, x1, n),
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

// The fp32 weights: x2 itself for float32, else converted (or dequantized)
// once into scratch, since every row block reads them whole.
const float* Fp32Weights(const MatmulArgs& p, const RowParallel& parallel, Scratch& scratch) {
  const int64_t k = p.shape.k, n = p.shape.n;
  if (!p.antiquant && p.dtype == ffi::DataType::F32) return static_cast<const float*>(p.x2);
  float* w = scratch.Get(ScratchSlot::kRhs, static_cast<size_t>(k) * n);
  const int64_t rows = p.transpose_x2 ? n : k, cols = p.transpose_x2 ? k : n;
  if (p.antiquant) {
    const WeightDequantizer dequantize(p.dtype, static_cast<const int8_t*>(p.x2), k, n,
                                       p.transpose_x2, p.aq);
    parallel.Run(rows, cols, [&](int64_t begin, int64_t end) { dequantize.Rows(begin, end, w); });
  } else {
    parallel.Run(rows, cols, [&](int64_t begin, int64_t end) {
      LoadAsFloat(p.dtype, p.x2, begin * cols, (end - begin) * cols, w + begin * cols);
    });
  }
  return w;
}

// The matmul itself, on checked operands with m, n, k >= 1. The passes
// around the sgemm (conversions, epilogue) are split by rows over
// `parallel`; float32 operands and outputs are used in place.
void RunMatmul(const MatmulArgs& p, const RowParallel& parallel) {
  const ffi::DataType dtype = p.dtype;
  const bool in_place = dtype == ffi::DataType::F32;
  const int64_t m = p.shape.m, k = p.shape.k, n = p.shape.n;
  std::vector<float> bias_f = MakeVector<float>(p.bias ? n : 0);
  if (p.bias) LoadAsFloat(dtype, p.bias, 0, n, bias_f.data());

  Scratch scratch;
  const float* w = Fp32Weights(p, parallel, scratch);
  const int64_t rows = std::min(m, std::max<int64_t>(64, kMaxTileElements / std::max(n, k)));
  // Uninitialized: every element is written before it is read.
  float* a_tile =
      in_place ? nullptr : scratch.Get(ScratchSlot::kLhs, static_cast<size_t>(rows) * k);
  float* c_tile =
      in_place ? nullptr : scratch.Get(ScratchSlot::kOut, static_cast<size_t>(rows) * n);
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t r = std::min(rows, m - r0);
    const float* a = in_place ? static_cast<const float*>(p.x1) + r0 * k : a_tile;
    float* c = in_place ? static_cast<float*>(p.out) + r0 * n : c_tile;
    if (!in_place) {
      parallel.Run(r, k, [&](int64_t begin, int64_t end) {
        LoadAsFloat(dtype, p.x1, (r0 + begin) * k, (end - begin) * k, a_tile + begin * k);
      });
    }
    Sgemm(false, p.transpose_x2, r, n, k, a, k, w, p.transpose_x2 ? k : n, c, n);
    if (in_place && !p.bias && !p.x3) continue;
    // Epilogue, one row at a time while it is in cache: + bias, + x3, one
    // rounding to the dtype.
    parallel.Run(r, n, [&](int64_t begin, int64_t end) {
      std::vector<float> x3_row = MakeVector<float>(p.x3 ? n : 0);
      for (int64_t i = begin; i < end; ++i) {
        float* row = c + i * n;
        if (p.bias) AddInPlace(row, bias_f.data(), n);
        if (p.x3) {
          LoadAsFloat(dtype, p.x3, (r0 + i) * n, n, x3_row.data());
          AddInPlace(row, x3_row.data(), n);
        }
        if (!in_place) StoreRounded(dtype, p.stored, row, n, p.out, (r0 + i) * n);
      }
    });
  }
}

ffi::Error Mc2MatmulImpl(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::RemainingArgs extra,
                         ffi::Result<ffi::AnyBuffer> out, bool transpose_x2, bool has_bias,
                         bool has_x3, bool antiquant, bool has_offset, int64_t antiquant_group_size,
                         bool bf16_as_f32, int64_t parallelism) {
  return CatchAtBoundary(kOp, [&]() -> ffi::Error {
    MatmulArgs args;
    MC2_RETURN_IF_ERROR(ParseMatmulArgs(x1, x2, extra, *out, transpose_x2, has_bias, has_x3,
                                        antiquant, has_offset, antiquant_group_size, bf16_as_f32,
                                        args));
    bool work = false;
    MC2_RETURN_IF_ERROR(CheckMatmulWork(kOp, args.shape, x1, &work));
    if (!work) return ffi::Error::Success();
    const int threads = BlasThreads(parallelism);
    BlasThreadsScope blas_threads(threads);
    const RowParallel parallel(threads);
    RunMatmul(args, parallel);
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
                                  .Attr<bool>("bf16_as_f32")
                                  .Attr<int64_t>("parallelism"));

}  // namespace jax_mc2
