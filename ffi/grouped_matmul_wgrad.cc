// mc2_grouped_matmul_wgrad_ffi: the weight gradient of a grouped matmul,
//   dw[g] = round(x[o_g:o_(g+1)]^T @ dy[o_g:o_(g+1)])      (k, n) per group
// (stored (n, k), i.e. dy_g^T @ x_g, when transpose_w), for contiguous groups
// of rows given by group_offsets (G + 1,). Rows outside every group do not
// contribute; an empty group gives a zero matrix. Each group is one BLAS
// sgemm on fp32 tiles, with one rounding to the dtype.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "blas.h"
#include "ffi_common.h"
#include "mc2_ffi.h"

namespace jax_mc2 {
namespace {

constexpr char kOp[] = "mc2_grouped_matmul_wgrad_ffi";
// Rows of one group converted at a time (its fp32 tiles stay below 64 MiB
// each); a longer group accumulates several sgemm calls.
constexpr int64_t kMaxTileElements = int64_t{1} << 24;

ffi::Error GroupedMatmulWgrad(const ffi::AnyBuffer& x, const ffi::AnyBuffer& dy,
                              const ffi::AnyBuffer& group_offsets, ffi::AnyBuffer& dw_buffer,
                              bool transpose_w, int64_t parallelism) {
  ffi::AnyBuffer* dw = &dw_buffer;
  const ffi::DataType dtype = x.element_type();
  if (!IsFloatType(dtype) || dy.element_type() != dtype || dw->element_type() != dtype) {
    return InvalidArgument(kOp, "x, dy and dw must share one float dtype");
  }
  if (group_offsets.element_type() != ffi::DataType::S32) {
    return InvalidArgument(kOp, "group_offsets must be int32");
  }
  auto x_dims = x.dimensions();
  auto dy_dims = dy.dimensions();
  auto dw_dims = dw->dimensions();
  auto off_dims = group_offsets.dimensions();
  if (x_dims.size() != 2 || dy_dims.size() != 2 || dw_dims.size() != 3 || off_dims.size() != 1 ||
      x_dims[0] != dy_dims[0]) {
    return InvalidArgument(kOp,
                           "expected x (rows, k), dy (rows, n), group_offsets (G + 1,), "
                           "dw (G, k, n); got x " +
                               DimsToString(x_dims) + ", dy " + DimsToString(dy_dims) + ", dw " +
                               DimsToString(dw_dims));
  }
  const int64_t rows = x_dims[0], k = x_dims[1], n = dy_dims[1], groups = dw_dims[0];
  const int64_t dw_k = transpose_w ? dw_dims[2] : dw_dims[1];
  const int64_t dw_n = transpose_w ? dw_dims[1] : dw_dims[2];
  if (dw_k != k || dw_n != n || off_dims[0] != groups + 1) {
    return InvalidArgument(kOp,
                           "dw must be (G, k, n) (or (G, n, k) transposed) with G + 1 == "
                           "group_offsets length; got x " +
                               DimsToString(x_dims) + ", dy " + DimsToString(dy_dims) + ", dw " +
                               DimsToString(dw_dims) + ", group_offsets " + DimsToString(off_dims));
  }
  const int32_t* offsets = static_cast<const int32_t*>(group_offsets.untyped_data());
  for (int64_t g = 0; g < groups; ++g) {
    if (offsets[g] < 0 || offsets[g] > offsets[g + 1] || offsets[g + 1] > rows) {
      return InvalidArgument(
          kOp, "group_offsets must be non-decreasing in [0, " + std::to_string(rows) +
                   "], got offsets[" + std::to_string(g) + "] = " + std::to_string(offsets[g]) +
                   ", offsets[" + std::to_string(g + 1) + "] = " + std::to_string(offsets[g + 1]));
    }
  }
  if (groups == 0 || k == 0 || n == 0) return ffi::Error::Success();
  MC2_RETURN_IF_ERROR(CheckBlasDims(kOp, {{"k", k}, {"n", n}}));
  BlasThreadsScope blas_threads(BlasThreads(parallelism));
  const int64_t tile_rows = std::max<int64_t>(1, kMaxTileElements / std::max(k, n));
  Scratch scratch;
  float* a = scratch.Get(ScratchSlot::kLhs, static_cast<size_t>(std::min(rows, tile_rows)) * k + 1);
  float* b = scratch.Get(ScratchSlot::kRhs, static_cast<size_t>(std::min(rows, tile_rows)) * n + 1);
  float* c = scratch.Get(ScratchSlot::kOut, static_cast<size_t>(k) * n);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = offsets[g], end = offsets[g + 1];
    if (begin == end) {
      std::fill(c, c + k * n, 0.0f);
    }
    for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
      const int64_t r = std::min(tile_rows, end - r0);
      LoadAsFloat(dtype, x.untyped_data(), r0 * k, r * k, a);
      LoadAsFloat(dtype, dy.untyped_data(), r0 * n, r * n, b);
      const float beta = r0 == begin ? 0.0f : 1.0f;
      if (transpose_w) {
        // (n, k) = dy_g^T @ x_g
        Sgemm(true, false, n, k, r, b, n, a, k, c, k, beta);
      } else {
        // (k, n) = x_g^T @ dy_g
        Sgemm(true, false, k, n, r, a, k, b, n, c, n, beta);
      }
    }
    StoreFromFloat(dtype, c, k * n, dw->untyped_data(), g * k * n);
  }
  return ffi::Error::Success();
}

ffi::Error Mc2GroupedMatmulWgradImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                     ffi::AnyBuffer group_offsets, ffi::Result<ffi::AnyBuffer> dw,
                                     bool transpose_w, int64_t parallelism) {
  return CatchAtBoundary(
      kOp, [&] { return GroupedMatmulWgrad(x, dy, group_offsets, *dw, transpose_w, parallelism); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2GroupedMatmulWgradHandler, Mc2GroupedMatmulWgradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // group_offsets
                                  .Ret<ffi::AnyBuffer>()  // dw
                                  .Attr<bool>("transpose_w")
                                  .Attr<int64_t>("parallelism"));

}  // namespace jax_mc2
