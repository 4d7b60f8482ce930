// mc2_grouped_matmul_ffi: a grouped matmul with a row gather in front and a
// row scatter behind, the expert GEMM of a mixture of experts:
//   for every virtual row v in group g (group_offsets[g] <= v < group_offsets[g + 1]):
//     y[dst[v], :] = round(x[src[v], :] @ w[g])      (dst[v] == -1: discarded)
//   src[v] == -1 reads a zero row; y rows no virtual row writes are zero.
//   permute_out[v, :] = x[src[v], :] for every v (optional second result).
// w is (G, k, n), or (G, n, k) when transpose_w. Each group is one BLAS sgemm
// on an fp32 tile of its gathered rows, with one rounding to the dtype.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "blas.h"
#include "ffi_common.h"
#include "mc2_ffi.h"

namespace jax_mc2 {
namespace {

constexpr char kOp[] = "mc2_grouped_matmul_ffi";
// The fp32 tiles of the gathered rows and of their results hold at most this
// many elements each (64 MiB); a larger group runs as several sgemm calls.
constexpr int64_t kMaxTileElements = int64_t{1} << 24;
// The bytes of one element of a float dtype.
size_t ElementBytes(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return 4;
    case ffi::DataType::F16:
    case ffi::DataType::BF16:
      return 2;
    default:
      throw UnsupportedDtype("ElementBytes", type);
  }
}

// The sizes of one call.
struct GroupedShape {
  int64_t rows_in, k, groups, n, rows_out, v_rows;
};

// Checks the dtypes and ranks of the operands and that their sizes agree.
ffi::Error ParseGroupedShape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w,
                             const ffi::AnyBuffer& group_offsets, const ffi::AnyBuffer& src_index,
                             const ffi::AnyBuffer& dst_index, const ffi::AnyBuffer& y,
                             bool transpose_w, GroupedShape& shape) {
  const ffi::DataType dtype = x.element_type();
  if (!IsFloatType(dtype) || w.element_type() != dtype || y.element_type() != dtype) {
    return InvalidArgument(kOp,
                           "x, w and y must share one float dtype (float16, bfloat16 or "
                           "float32)");
  }
  if (group_offsets.element_type() != ffi::DataType::S32 ||
      src_index.element_type() != ffi::DataType::S32 ||
      dst_index.element_type() != ffi::DataType::S32) {
    return InvalidArgument(kOp, "group_offsets, src_index and dst_index must be int32");
  }
  auto x_dims = x.dimensions();
  auto w_dims = w.dimensions();
  auto y_dims = y.dimensions();
  auto off_dims = group_offsets.dimensions();
  auto src_dims = src_index.dimensions();
  auto dst_dims = dst_index.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || y_dims.size() != 2 || off_dims.size() != 1 ||
      src_dims.size() != 1 || dst_dims.size() != 1) {
    return InvalidArgument(kOp,
                           "expected x (rows, k), w (G, k, n), group_offsets (G + 1,), "
                           "src_index (V,), dst_index (V,), y (rows, n); got x " +
                               DimsToString(x_dims) + ", w " + DimsToString(w_dims) +
                               ", group_offsets " + DimsToString(off_dims) + ", src_index " +
                               DimsToString(src_dims) + ", dst_index " + DimsToString(dst_dims) +
                               ", y " + DimsToString(y_dims));
  }
  shape.rows_in = x_dims[0];
  shape.k = x_dims[1];
  shape.groups = w_dims[0];
  shape.n = transpose_w ? w_dims[1] : w_dims[2];
  shape.rows_out = y_dims[0];
  shape.v_rows = src_dims[0];
  const int64_t k = shape.k, n = shape.n;
  if ((transpose_w ? w_dims[2] : w_dims[1]) != k) {
    return InvalidArgument(kOp, "w's k must match x's k = " + std::to_string(k) + ", got w " +
                                    DimsToString(w_dims) +
                                    (transpose_w ? " (G, n, k)" : " (G, k, n)"));
  }
  if (y_dims[1] != n) {
    return InvalidArgument(
        kOp, "y must be (rows, n) with n = " + std::to_string(n) + ", got " + DimsToString(y_dims));
  }
  if (off_dims[0] != shape.groups + 1) {
    return InvalidArgument(
        kOp, "group_offsets must have G + 1 = " + std::to_string(shape.groups + 1) +
                 " entries for w " + DimsToString(w_dims) + ", got " + DimsToString(off_dims));
  }
  if (dst_dims[0] != shape.v_rows) {
    return InvalidArgument(kOp, "src_index and dst_index must have the same length, got " +
                                    DimsToString(src_dims) + " and " + DimsToString(dst_dims));
  }
  return CheckBlasDims(kOp, {{"k", k}, {"n", n}});
}

// The optional second result, permute_out (V, k), or nullptr.
ffi::Error ReadPermuteOut(ffi::RemainingRets extra_rets, bool has_permute_out, ffi::DataType dtype,
                          const GroupedShape& shape, void*& permute_data) {
  permute_data = nullptr;
  const size_t expected_rets = has_permute_out ? 1 : 0;
  if (extra_rets.size() != expected_rets) {
    return InvalidArgument(kOp, "expected " + std::to_string(1 + expected_rets) + " results, got " +
                                    std::to_string(1 + extra_rets.size()));
  }
  if (!has_permute_out) return ffi::Error::Success();
  auto permute_out = extra_rets.get<ffi::AnyBuffer>(0);
  if (permute_out.has_error()) return permute_out.error();
  MC2_RETURN_IF_ERROR(
      CheckBuffer(kOp, **permute_out, BufferSpec{dtype, -1, 2, {shape.v_rows, shape.k}}, [&] {
        return "permute_out must be (V, k) = (" + std::to_string(shape.v_rows) + ", " +
               std::to_string(shape.k) + ") of x's dtype, got " +
               DimsToString((*permute_out)->dimensions());
      }));
  permute_data = (*permute_out)->untyped_data();
  return ffi::Error::Success();
}

// The index operands, checked.
struct GroupedIndices {
  const int32_t* offsets;
  const int32_t* src;
  const int32_t* dst;
  int64_t max_group = 0;  // the most virtual rows of one group
  // written[r]: some virtual row inside a group writes y row r.
  std::vector<uint8_t> written;
};

// Checks the group offsets and the gather and scatter rows.
ffi::Error CheckIndices(const GroupedShape& shape, GroupedIndices& ix) {
  const int32_t* offsets = ix.offsets;
  const int32_t* src = ix.src;
  const int32_t* dst = ix.dst;
  const int64_t groups = shape.groups, v_rows = shape.v_rows;
  if (offsets[0] < 0 || offsets[groups] > v_rows) {
    return InvalidArgument(kOp, "group_offsets must lie in [0, V = " + std::to_string(v_rows) +
                                    "], got group_offsets[0] = " + std::to_string(offsets[0]) +
                                    ", group_offsets[" + std::to_string(groups) +
                                    "] = " + std::to_string(offsets[groups]));
  }
  for (int64_t g = 0; g < groups; ++g) {
    if (offsets[g + 1] < offsets[g]) {
      return InvalidArgument(kOp, "group_offsets must be non-decreasing, got group_offsets[" +
                                      std::to_string(g) + "] = " + std::to_string(offsets[g]) +
                                      " > group_offsets[" + std::to_string(g + 1) +
                                      "] = " + std::to_string(offsets[g + 1]));
    }
    ix.max_group = std::max<int64_t>(ix.max_group, offsets[g + 1] - offsets[g]);
  }
  const int64_t first = offsets[0], last = offsets[groups];
  // Only the rows written from inside a group may not collide; rows outside
  // every group write nothing.
  ix.written = MakeVector<uint8_t>(shape.rows_out);
  for (int64_t v = 0; v < v_rows; ++v) {
    if (src[v] < -1 || src[v] >= shape.rows_in) {
      return InvalidArgument(kOp, "src_index[" + std::to_string(v) +
                                      "] = " + std::to_string(src[v]) + " is outside [-1, " +
                                      std::to_string(shape.rows_in) + ")");
    }
    if (dst[v] < -1 || dst[v] >= shape.rows_out) {
      return InvalidArgument(kOp, "dst_index[" + std::to_string(v) +
                                      "] = " + std::to_string(dst[v]) + " is outside [-1, " +
                                      std::to_string(shape.rows_out) + ")");
    }
    if (v >= first && v < last && dst[v] >= 0) {
      if (ix.written[dst[v]]) {
        return InvalidArgument(kOp, "dst_index[" + std::to_string(v) +
                                        "] = " + std::to_string(dst[v]) +
                                        " duplicates the y row of an earlier virtual row");
      }
      ix.written[dst[v]] = 1;
    }
  }
  return ffi::Error::Success();
}

// The data of one call's operands and results.
struct GroupedData {
  ffi::DataType dtype;
  bool transpose_w;
  const void* x;
  const void* w;
  char* y;
  char* permute_out;  // nullptr without the second result
};

// permute_out row v: a copy of the raw x row `src_row` (no conversion), or
// zeros for -1.
void CopyPermuteRow(const GroupedData& d, int32_t src_row, size_t x_row_bytes, int64_t v) {
  char* out = d.permute_out + v * x_row_bytes;
  if (src_row < 0) {
    std::memset(out, 0, x_row_bytes);
  } else {
    std::memcpy(out, static_cast<const char*>(d.x) + src_row * x_row_bytes, x_row_bytes);
  }
}

// The groups' GEMMs, on checked operands with k, n >= 1.
void RunGroups(const GroupedShape& shape, const GroupedIndices& ix, const GroupedData& d) {
  const ffi::DataType dtype = d.dtype;
  const int64_t k = shape.k, n = shape.n;
  const int32_t* src = ix.src;
  const int32_t* dst = ix.dst;
  const size_t esize = ElementBytes(dtype);
  const size_t x_row_bytes = static_cast<size_t>(k) * esize;
  const size_t y_row_bytes = static_cast<size_t>(n) * esize;
  const int64_t tile_rows =
      std::min(ix.max_group, std::max<int64_t>(64, kMaxTileElements / std::max(n, k)));
  // Scratch reused by every group. Uninitialized: every element is written
  // before it is read.
  Scratch scratch;
  float* a = scratch.Get(ScratchSlot::kLhs, static_cast<size_t>(tile_rows) * k);
  float* c = scratch.Get(ScratchSlot::kOut, static_cast<size_t>(tile_rows) * n);
  const bool convert_w = dtype != ffi::DataType::F32;
  float* w_f32 = convert_w ? scratch.Get(ScratchSlot::kRhs, static_cast<size_t>(k) * n) : nullptr;
  const int64_t ldb = d.transpose_w ? k : n;
  for (int64_t g = 0; g < shape.groups; ++g) {
    const int64_t begin = ix.offsets[g], end = ix.offsets[g + 1];
    if (begin == end) continue;
    const float* b;
    if (convert_w) {
      LoadAsFloat(dtype, d.w, g * k * n, k * n, w_f32);
      b = w_f32;
    } else {
      b = static_cast<const float*>(d.w) + g * k * n;
    }
    for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, end - r0);
      // Gather: one fp32 row per virtual row (zeros for src -1).
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t v = r0 + i;
        float* row = a + i * k;
        if (src[v] < 0) {
          std::fill(row, row + k, 0.0f);
        } else {
          LoadAsFloat(dtype, d.x, src[v] * k, k, row);
        }
        if (d.permute_out) CopyPermuteRow(d, src[v], x_row_bytes, v);
      }
      Sgemm(false, d.transpose_w, rows, n, k, a, k, b, ldb, c, n);
      // Scatter: one rounding per element into the destination row. A src
      // -1 row is stored as zeros, not as 0 * w (NaN where w holds an Inf).
      for (int64_t i = 0; i < rows; ++i) {
        const int32_t dr = dst[r0 + i];
        if (dr < 0) continue;
        if (src[r0 + i] < 0) {
          std::memset(d.y + dr * y_row_bytes, 0, y_row_bytes);
        } else {
          StoreFromFloat(dtype, c + i * n, n, d.y, dr * n);
        }
      }
    }
  }
}

// The whole call on checked operands: zero rows, permute_out rows outside
// the groups, and the groups.
void RunGroupedMatmul(const GroupedShape& shape, const GroupedIndices& ix, const GroupedData& d) {
  const int64_t k = shape.k, n = shape.n;
  const size_t esize = ElementBytes(d.dtype);
  const size_t x_row_bytes = static_cast<size_t>(k) * esize;
  const size_t y_row_bytes = static_cast<size_t>(n) * esize;
  const int64_t first = ix.offsets[0], last = ix.offsets[shape.groups];
  // y rows that no virtual row writes are zero (the zero bit pattern is 0.0
  // in every float dtype).
  for (int64_t r = 0; r < shape.rows_out; ++r) {
    if (!ix.written[r]) std::memset(d.y + r * y_row_bytes, 0, y_row_bytes);
  }
  if (d.permute_out) {
    for (int64_t v = 0; v < first; ++v) CopyPermuteRow(d, ix.src[v], x_row_bytes, v);
    for (int64_t v = last; v < shape.v_rows; ++v) CopyPermuteRow(d, ix.src[v], x_row_bytes, v);
  }
  if (k == 0 || n == 0) {
    // Nothing to multiply: written y rows are empty sums (zero).
    for (int64_t r = 0; r < shape.rows_out; ++r) {
      if (ix.written[r]) std::memset(d.y + r * y_row_bytes, 0, y_row_bytes);
    }
    if (d.permute_out) {
      for (int64_t v = first; v < last; ++v) CopyPermuteRow(d, ix.src[v], x_row_bytes, v);
    }
    return;
  }
  RunGroups(shape, ix, d);
}

ffi::Error Mc2GroupedMatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer group_offsets,
                                ffi::AnyBuffer src_index, ffi::AnyBuffer dst_index,
                                ffi::Result<ffi::AnyBuffer> y, ffi::RemainingRets extra_rets,
                                bool transpose_w, bool has_permute_out, int64_t parallelism) {
  return CatchAtBoundary(kOp, [&]() -> ffi::Error {
    GroupedShape shape;
    MC2_RETURN_IF_ERROR(
        ParseGroupedShape(x, w, group_offsets, src_index, dst_index, *y, transpose_w, shape));
    GroupedData data{x.element_type(),
                     transpose_w,
                     x.untyped_data(),
                     w.untyped_data(),
                     static_cast<char*>(y->untyped_data()),
                     nullptr};
    void* permute_data = nullptr;
    MC2_RETURN_IF_ERROR(
        ReadPermuteOut(extra_rets, has_permute_out, data.dtype, shape, permute_data));
    data.permute_out = static_cast<char*>(permute_data);
    GroupedIndices ix;
    ix.offsets = static_cast<const int32_t*>(group_offsets.untyped_data());
    ix.src = static_cast<const int32_t*>(src_index.untyped_data());
    ix.dst = static_cast<const int32_t*>(dst_index.untyped_data());
    MC2_RETURN_IF_ERROR(CheckIndices(shape, ix));
    BlasThreadsScope blas_threads(BlasThreads(parallelism));
    RunGroupedMatmul(shape, ix, data);
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2GroupedMatmulHandler, Mc2GroupedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // group_offsets
                                  .Arg<ffi::AnyBuffer>()  // src_index
                                  .Arg<ffi::AnyBuffer>()  // dst_index
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .RemainingRets()        // permute_out?
                                  .Attr<bool>("transpose_w")
                                  .Attr<bool>("has_permute_out")
                                  .Attr<int64_t>("parallelism"));

}  // namespace jax_mc2
