// mc2_add_rms_norm_ffi: the epilogue of matmul + all-reduce + add + RMSNorm,
// run on the all-reduced matmul output `mm`:
//   y        = round(mm + residual)
//   norm_out = y / sqrt(mean(y^2) + epsilon) * gamma
// Statistics are fp32 over the already-rounded y; each element's square is
// scaled by 1/n before the sum, and the fp16 and bf16 paths round where the
// Ascend AddRmsNorm kernel rounds (see the per-dtype comments).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ffi_common.h"
#include "mc2_ffi.h"

namespace jax_mc2 {
namespace {

constexpr char kOp[] = "mc2_add_rms_norm_ffi";

// Elementwise row steps, vectorized for AVX2 where the CPU has it.
__attribute__((target_clones("avx2", "default"))) void ScaleInto(float* out, const float* a,
                                                                 float s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = a[j] * s;
}

__attribute__((target_clones("avx2", "default"))) void MulInPlace(float* a, const float* b,
                                                                  int64_t n) {
  for (int64_t j = 0; j < n; ++j) a[j] *= b[j];
}

// sum_j (v_j * v_j * scale) in fp32, over kLanes interleaved partial sums so
// the compiler vectorizes it (the kernel's reduction order is unspecified:
// the Ascend kernel reduces with a tree).
__attribute__((target_clones("avx2", "default"))) float SumOfScaledSquares(const float* v,
                                                                           int64_t n, float scale) {
  constexpr int64_t kLanes = 16;
  float partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) partial[l] += v[j + l] * v[j + l] * scale;
  }
  for (; j < n; ++j) partial[0] += v[j] * v[j] * scale;
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += partial[l];
  return total;
}

ffi::Error Mc2AddRmsNormImpl(ffi::AnyBuffer mm, ffi::AnyBuffer residual, ffi::AnyBuffer gamma,
                             ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> norm_out,
                             float epsilon) {
  const ffi::DataType dtype = mm.element_type();
  if (!IsFloatType(dtype) || residual.element_type() != dtype || gamma.element_type() != dtype ||
      y->element_type() != dtype || norm_out->element_type() != dtype) {
    return InvalidArgument(kOp, "mm, residual, gamma, y and norm_out must share one float dtype");
  }
  auto dims = residual.dimensions();
  if (dims.size() == 0) return InvalidArgument(kOp, "residual must have at least one dimension");
  const int64_t n = dims.back();
  const int64_t total = static_cast<int64_t>(residual.element_count());
  if (static_cast<int64_t>(mm.element_count()) != total ||
      static_cast<int64_t>(y->element_count()) != total ||
      static_cast<int64_t>(norm_out->element_count()) != total ||
      static_cast<int64_t>(gamma.element_count()) != n) {
    return InvalidArgument(kOp, "mm, y and norm_out must have residual's " + std::to_string(total) +
                                    " elements and gamma (n,) = (" + std::to_string(n) +
                                    ",), got mm " + DimsToString(mm.dimensions()) + ", gamma " +
                                    DimsToString(gamma.dimensions()));
  }
  if (n == 0 || total == 0) return ffi::Error::Success();
  const int64_t rows = total / n;

  std::vector<float> g(n);
  LoadAsFloat(dtype, gamma.untyped_data(), 0, n, g.data());
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(n));
  const void* mm_data = mm.untyped_data();
  const void* res_data = residual.untyped_data();
  void* y_data = y->untyped_data();
  void* norm_data = norm_out->untyped_data();
  std::vector<float> a(n), b(n), out(n);
  for (int64_t r = 0; r < rows; ++r) {
    LoadAsFloat(dtype, mm_data, r * n, n, a.data());
    LoadAsFloat(dtype, res_data, r * n, n, b.data());
    AddInPlace(a.data(), b.data(), n);
    // y is rounded to the dtype first; the statistics read the rounded y.
    StoreFromFloat(dtype, a.data(), n, y_data, r * n);
    LoadAsFloat(dtype, y_data, r * n, n, a.data());
    const float mean_square = SumOfScaledSquares(a.data(), n, inv_n);
    const float rstd = 1.0f / std::sqrt(mean_square + epsilon);
    ScaleInto(out.data(), a.data(), rstd, n);
    // fp16/bf16: y * rstd is rounded to the dtype before the multiplication
    // by gamma (a product of two 16-bit floats, exact in fp32), which is
    // then rounded once more on the store.
    RoundInPlace(dtype, out.data(), n);
    MulInPlace(out.data(), g.data(), n);
    StoreFromFloat(dtype, out.data(), n, norm_data, r * n);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2AddRmsNormHandler, Mc2AddRmsNormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // mm (all-reduced)
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Arg<ffi::AnyBuffer>()  // gamma
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // norm_out
                                  .Attr<float>("epsilon"));

}  // namespace jax_mc2
