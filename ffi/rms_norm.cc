// mc2_add_rms_norm_ffi: the epilogue of matmul + all-reduce + add + RMSNorm,
// run on the all-reduced matmul output `mm`:
//   y        = round(mm + residual)
//   norm_out = y / sqrt(mean(y^2) + epsilon) * gamma
// Statistics are fp32 over the already-rounded y; each element's square is
// scaled by 1/n before the sum, and the fp16 and bf16 paths round where the
// Ascend AddRmsNorm kernel rounds (see the per-dtype comments). `mm` is in
// the dtype, or (float16 / bfloat16) the float32 matmul accumulator of one
// rank, rounded to the dtype as it is loaded: the same values as rounding it
// first, without a pass that writes them.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "blas.h"
#include "ffi_common.h"
#include "mc2_ffi.h"
#include "parallel_rows.h"

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

// One call's operands, as rows of n elements.
struct AddRmsNormRows {
  ffi::DataType dtype;
  ffi::DataType mm_dtype;  // dtype, or F32: an accumulator rounded on load
  const void* mm;
  const void* residual;
  const float* gamma;  // fp32 copy
  void* y;             // may be residual's buffer (the in-place variant)
  void* norm_out;
  int64_t n;
  float inv_n;
  float epsilon;
};

// `count` values of mm from element `offset`, in the dtype's values.
void LoadMm(const AddRmsNormRows& p, int64_t offset, int64_t count, float* dst) {
  LoadAsFloat(p.mm_dtype, p.mm, offset, count, dst);
  if (p.mm_dtype != p.dtype) RoundInPlace(p.dtype, dst, count);
}

// The reference row loop, one step per pass over the row; rows [begin, end).
void AddRmsNormPortable(const AddRmsNormRows& p, int64_t begin, int64_t end) {
  const int64_t n = p.n;
  std::vector<float> a = MakeVector<float>(n), b = MakeVector<float>(n), out = MakeVector<float>(n);
  for (int64_t r = begin; r < end; ++r) {
    LoadMm(p, r * n, n, a.data());
    LoadAsFloat(p.dtype, p.residual, r * n, n, b.data());
    AddInPlace(a.data(), b.data(), n);
    // y is rounded to the dtype first; the statistics read the rounded y.
    RoundInPlace(p.dtype, a.data(), n);
    StoreFromFloat(p.dtype, a.data(), n, p.y, r * n);
    const float mean_square = SumOfScaledSquares(a.data(), n, p.inv_n);
    const float rstd = 1.0f / std::sqrt(mean_square + p.epsilon);
    ScaleInto(out.data(), a.data(), rstd, n);
    // fp16/bf16: y * rstd is rounded to the dtype before the multiplication
    // by gamma (a product of two 16-bit floats, exact in fp32), which is
    // then rounded once more on the store.
    RoundInPlace(p.dtype, out.data(), n);
    MulInPlace(out.data(), p.gamma, n);
    StoreFromFloat(p.dtype, out.data(), n, p.norm_out, r * n);
  }
}

#define MC2_AVX2 __attribute__((target("avx2,f16c")))

// Eight elements of one format in an AVX2 register: load to fp32, round
// half to even to the format (staying fp32), and store (rounding).
struct F32Lanes {
  MC2_AVX2 static __m256 Load(const void* p, int64_t i) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
  MC2_AVX2 static __m256 Round(__m256 v) { return v; }
  MC2_AVX2 static void Store(void* p, int64_t i, __m256 v) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  }
};

struct Fp16Lanes {
  MC2_AVX2 static __m256 Load(const void* p, int64_t i) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
  MC2_AVX2 static __m128i Pack(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
  MC2_AVX2 static __m256 Round(__m256 v) { return _mm256_cvtph_ps(Pack(v)); }
  MC2_AVX2 static void Store(void* p, int64_t i, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), Pack(v));
  }
};

struct Bf16Lanes {
  MC2_AVX2 static __m256 Load(const void* p, int64_t i) {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // The bf16 bits of each lane in its low 16 bits (as FloatToBf16).
  MC2_AVX2 static __m256i Bits(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i quiet_nan =
        _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x0040));
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                              _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
  }
  MC2_AVX2 static __m256 Round(__m256 v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(Bits(v), 16));
  }
  MC2_AVX2 static void Store(void* p, int64_t i, __m256 v) {
    const __m256i b = Bits(v);
    // packus interleaves the two 128-bit halves; gather quads 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                     _mm256_castsi256_si128(packed));
  }
};

// mm as a float32 accumulator, each lane rounded to L's format on load.
template <typename L>
struct RoundedF32Lanes {
  MC2_AVX2 static __m256 Load(const void* p, int64_t i) { return L::Round(F32Lanes::Load(p, i)); }
};

// The same arithmetic as AddRmsNormPortable, bit for bit (the sum of
// squares runs over the same 16 interleaved partial sums, the tail into the
// first), in two passes over each row: add, round, store y and accumulate;
// then scale, round, multiply by gamma and store norm_out. M loads mm.
template <typename L, typename M = L>
MC2_AVX2 void AddRmsNormAvx2(const AddRmsNormRows& p, int64_t begin, int64_t end) {
  const int64_t n = p.n;
  const int64_t body = n - n % 16;
  std::vector<float> v = MakeVector<float>(n);
  const __m256 inv_n = _mm256_set1_ps(p.inv_n);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t base = r * n;
    __m256 acc_lo = _mm256_setzero_ps(), acc_hi = _mm256_setzero_ps();
    for (int64_t j = 0; j < body; j += 16) {
      // Both loads come before the stores: y may be residual's buffer.
      const __m256 lo =
          L::Round(_mm256_add_ps(M::Load(p.mm, base + j), L::Load(p.residual, base + j)));
      const __m256 hi =
          L::Round(_mm256_add_ps(M::Load(p.mm, base + j + 8), L::Load(p.residual, base + j + 8)));
      L::Store(p.y, base + j, lo);
      L::Store(p.y, base + j + 8, hi);
      _mm256_storeu_ps(v.data() + j, lo);
      _mm256_storeu_ps(v.data() + j + 8, hi);
      acc_lo = _mm256_add_ps(acc_lo, _mm256_mul_ps(_mm256_mul_ps(lo, lo), inv_n));
      acc_hi = _mm256_add_ps(acc_hi, _mm256_mul_ps(_mm256_mul_ps(hi, hi), inv_n));
    }
    float partial[16];
    _mm256_storeu_ps(partial, acc_lo);
    _mm256_storeu_ps(partial + 8, acc_hi);
    if (body < n) {
      const int64_t tail = n - body;
      float b[16];
      LoadMm(p, base + body, tail, v.data() + body);
      LoadAsFloat(p.dtype, p.residual, base + body, tail, b);
      AddInPlace(v.data() + body, b, tail);
      RoundInPlace(p.dtype, v.data() + body, tail);
      StoreFromFloat(p.dtype, v.data() + body, tail, p.y, base + body);
      for (int64_t j = body; j < n; ++j) partial[0] += v[j] * v[j] * p.inv_n;
    }
    float mean_square = 0.0f;
    for (float s : partial) mean_square += s;
    const float rstd_s = 1.0f / std::sqrt(mean_square + p.epsilon);
    const __m256 rstd = _mm256_set1_ps(rstd_s);
    const int64_t body8 = n - n % 8;
    for (int64_t j = 0; j < body8; j += 8) {
      const __m256 t = L::Round(_mm256_mul_ps(_mm256_loadu_ps(v.data() + j), rstd));
      L::Store(p.norm_out, base + j, _mm256_mul_ps(t, _mm256_loadu_ps(p.gamma + j)));
    }
    if (body8 < n) {
      const int64_t tail = n - body8;
      float out[8];
      for (int64_t j = 0; j < tail; ++j) out[j] = v[body8 + j] * rstd_s;
      RoundInPlace(p.dtype, out, tail);
      MulInPlace(out, p.gamma + body8, tail);
      StoreFromFloat(p.dtype, out, tail, p.norm_out, base + body8);
    }
  }
}

ffi::Error AddRmsNorm(const ffi::AnyBuffer& mm, const ffi::AnyBuffer& residual,
                      const ffi::AnyBuffer& gamma, ffi::AnyBuffer& y_buffer,
                      ffi::AnyBuffer& norm_buffer, float epsilon, const RowParallel& parallel) {
  ffi::AnyBuffer* y = &y_buffer;
  ffi::AnyBuffer* norm_out = &norm_buffer;
  const ffi::DataType dtype = residual.element_type();
  const ffi::DataType mm_dtype = mm.element_type();
  if (!IsFloatType(dtype) || gamma.element_type() != dtype || y->element_type() != dtype ||
      norm_out->element_type() != dtype) {
    return InvalidArgument(kOp, "residual, gamma, y and norm_out must share one float dtype");
  }
  if (mm_dtype != dtype && mm_dtype != ffi::DataType::F32) {
    return InvalidArgument(kOp, "mm must be in residual's dtype or float32 (an accumulator)");
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

  std::vector<float> g = MakeVector<float>(n);
  LoadAsFloat(dtype, gamma.untyped_data(), 0, n, g.data());
  const AddRmsNormRows p{dtype,
                         mm_dtype,
                         mm.untyped_data(),
                         residual.untyped_data(),
                         g.data(),
                         y->untyped_data(),
                         norm_out->untyped_data(),
                         n,
                         static_cast<float>(1.0 / static_cast<double>(n)),
                         epsilon};
  void (*rows_fn)(const AddRmsNormRows&, int64_t, int64_t) = nullptr;
  if (!HasAvx2F16c()) {
    rows_fn = AddRmsNormPortable;
  } else if (dtype == ffi::DataType::F16) {
    rows_fn = mm_dtype == dtype ? AddRmsNormAvx2<Fp16Lanes>
                                : AddRmsNormAvx2<Fp16Lanes, RoundedF32Lanes<Fp16Lanes>>;
  } else if (dtype == ffi::DataType::BF16) {
    rows_fn = mm_dtype == dtype ? AddRmsNormAvx2<Bf16Lanes>
                                : AddRmsNormAvx2<Bf16Lanes, RoundedF32Lanes<Bf16Lanes>>;
  } else if (dtype == ffi::DataType::F32) {
    rows_fn = AddRmsNormAvx2<F32Lanes>;
  } else {
    throw UnsupportedDtype("AddRmsNorm", dtype);
  }
  // Rows are independent (y may be residual's buffer: each row reads its
  // own residual row before writing it).
  parallel.Run(total / n, n, [&](int64_t begin, int64_t end) { rows_fn(p, begin, end); });
  return ffi::Error::Success();
}

ffi::Error Mc2AddRmsNormImpl(ffi::AnyBuffer mm, ffi::AnyBuffer residual, ffi::AnyBuffer gamma,
                             ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> norm_out,
                             float epsilon, int64_t parallelism) {
  return CatchAtBoundary(kOp, [&] {
    const RowParallel parallel(BlasThreads(parallelism));
    return AddRmsNorm(mm, residual, gamma, *y, *norm_out, epsilon, parallel);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2AddRmsNormHandler, Mc2AddRmsNormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // mm (all-reduced, or f32 acc)
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Arg<ffi::AnyBuffer>()  // gamma
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // norm_out
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("parallelism"));

}  // namespace jax_mc2
