// mc2_lowp_matmul_ffi: the local (per-rank) part of the fp8 / hifloat8 / MX
// rows of quant_matmul_all_reduce_v4 (aclnnQuantMatmulAllReduceV4, seed 003).
// x1 [m, k] and x2 [k, n] ([n, k] when transpose_x2) hold float8_e4m3fn,
// float8_e5m2 or HiFloat8 codes (uint8); float4_e2m1fn operands reach the
// kernel converted to float8_e4m3fn (exact: XLA:CPU stores fp4 packed).
// Every operand is decoded through a 256-entry table into fp32 tiles that
// BLAS sgemm multiplies; the dequantization runs in the output pass:
//   mode 0 (scaled):   y = (x1 @ x2 + bias) * x2_scale[1 or n] (* x1_scale[m])
//   mode 1 (perblock): y = sum over k-blocks kb, in order, of
//                      (x1[:, kb] @ x2[kb, :]) * (x1_scale[m, kb] * x2_scale[kb, n])
//                      (one sgemm per block of block_k rows of k; tail blocks shorter)
//   mode 2 (mx):       y = (x1 * x1_scale) @ (x2 * x2_scale) + bias, with e8m0 scales
//                      per 32 values along k ([m, kb32] and [n, kb32]; x2 is (n, k))
//   out = round(round(y) + x3)             (round: half to even to out's dtype)
// With `comm` the output is the wire of the fp8 pertile low-bit communication
// (docs/semantics.md §5.2) instead: C = y + x3 in fp32, and per row, for each
// 1 x 128 tile: a = max|tile| (FP8_MAX if 0), sc = FP8_MAX / a (1 if 0),
// q = fp8_rne(clip(tile * sc)) in x1's fp8 format; row layout
// [n fp8 codes][ceil(n/128) f32 scales as 4 bytes each], in a float8_e4m3fn
// buffer (a byte container).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "blas.h"
#include "ffi_common.h"
#include "lowp_codecs.h"
#include "lowp_modes.h"
#include "mc2_ffi.h"
#include "parallel_rows.h"

namespace jax_mc2 {
namespace {

constexpr char kOp[] = "mc2_lowp_matmul_ffi";
constexpr int64_t kChunkK = 1024;
constexpr int64_t kMaxTileElements = int64_t{1} << 24;
constexpr int64_t kCommTile = 128;
constexpr int64_t kMxBlock = 32;
// Perblock output tiles: at most 512 columns and about 2^18 elements (1 MiB
// of fp32 products).
constexpr int64_t kPerblockTile = 512;
constexpr int64_t kPerblockTileElements = int64_t{1} << 18;

constexpr LowpMode kScaled = LowpMode::kScaled;
constexpr LowpMode kPerblock = LowpMode::kPerblock;
constexpr LowpMode kMx = LowpMode::kMx;

struct Table {
  float v[256];
};

Table MakeTable(float (*decode)(uint32_t)) {
  Table t;
  for (uint32_t b = 0; b < 256; ++b) t.v[b] = decode(b);
  return t;
}

// The fp32 value of every byte of a value (or scale) buffer, or nullptr.
const float* DecodeTable(ffi::DataType type) {
  static const Table e4m3 = MakeTable(DecodeE4m3fn);
  static const Table e5m2 = MakeTable(DecodeE5m2);
  static const Table hif8 = MakeTable(DecodeHif8);
  static const Table e8m0 = MakeTable(DecodeE8m0);
  switch (type) {
    case ffi::DataType::F8E4M3FN:
      return e4m3.v;
    case ffi::DataType::F8E5M2:
      return e5m2.v;
    case ffi::DataType::U8:
      return hif8.v;
    case ffi::DataType::F8E8M0FNU:
      return e8m0.v;
    default:
      return nullptr;
  }
}

struct Fp8Format {
  int mant_bits, bias;
  float max_value;
};

// One row of C quantized per 1 x 128 tile into `wire` (n codes, then the
// ceil(n / 128) fp32 scales' bytes).
void QuantizeRowPertile(const float* c, int64_t n, const Fp8Format& f, uint8_t* wire) {
  const int64_t tiles = (n + kCommTile - 1) / kCommTile;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t j0 = t * kCommTile, j1 = std::min(n, j0 + kCommTile);
    // A NaN in the tile makes its maximum, its scale and so every code of
    // the tile NaN, as the xla implementation's max and clip do (std::max
    // and std::min would drop the NaN).
    float amax = 0.0f;
    for (int64_t j = j0; j < j1; ++j) {
      const float a = std::fabs(c[j]);
      if (std::isnan(a) || a > amax) amax = a;
      if (std::isnan(amax)) break;
    }
    if (amax == 0.0f) amax = f.max_value;
    float sc = f.max_value / amax;
    if (sc == 0.0f) sc = 1.0f;
    for (int64_t j = j0; j < j1; ++j) {
      float v = c[j] * sc;
      if (v > f.max_value) v = f.max_value;
      if (v < -f.max_value) v = -f.max_value;
      wire[j] = EncodeFp8(v, f.mant_bits, f.bias, f.max_value);
    }
    std::memcpy(wire + n + 4 * t, &sc, sizeof(float));
  }
}

// dst[i] = table[src[i]] (* scale[i / 32] for MX).
__attribute__((target_clones("avx2", "default"))) void Decode(const uint8_t* __restrict src,
                                                              int64_t count,
                                                              const float* __restrict table,
                                                              float* __restrict dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = table[src[i]];
}

// The scaled mode's dequantization of one row, in the formula's order:
// ((acc + bias) * x2_scale) * x1_scale. Small loops on restrict pointers so
// that they vectorize (inside the handler they stay scalar).
__attribute__((target_clones("avx2", "default"))) void DequantRow(float* __restrict row,
                                                                  const float* __restrict bias,
                                                                  const float* __restrict col,
                                                                  const float* token, int64_t n) {
  if (bias) {
    for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
  }
  if (token) {
    const float t = *token;
    for (int64_t j = 0; j < n; ++j) row[j] = (row[j] * col[j]) * t;
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] *= col[j];
  }
}

// Perblock: c (=, or += after the first block) p * (row_scale * col_scale),
// the product rounded before the addition (no FMA: the avx2 clone has none).
__attribute__((target_clones("avx2", "default"))) void AccumulateBlockRow(
    float* __restrict c, const float* __restrict p, float row_scale,
    const float* __restrict col_scale, int64_t n, bool first) {
  if (first) {
    for (int64_t j = 0; j < n; ++j) c[j] = p[j] * (row_scale * col_scale[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) c[j] += p[j] * (row_scale * col_scale[j]);
  }
}

// Perblock, rows r0 .. r0 + r of c [r, n] (row stride n): the sum over
// k-blocks, in order, of (x1 block @ x2 block) * (x1_scale * x2_scale),
// computed tile by tile. For each ti x tj tile of c, every k-block's product
// goes to a small buffer `p` and is added at once, so the tile stays in
// cache across the k-blocks: c is read and written once instead of once per
// k-block, and each sgemm packs a square-ish tile's panels rather than a
// whole row panel of x2. s1 is [m, kb] (row_scale per row), s2 [kb, n].
void PerblockRows(const uint8_t* a8, const uint8_t* b8, const float* table, int64_t r0, int64_t r,
                  int64_t k, int64_t n, bool transpose_x2, int64_t block_k, const float* s1,
                  const float* s2, Scratch& scratch, float* c) {
  const int64_t blocks = CeilDiv(k, block_k);
  float* a = scratch.Get(ScratchSlot::kLhs, static_cast<size_t>(r) * k);
  for (int64_t i = 0; i < r; ++i) Decode(a8 + (r0 + i) * k, k, table, a + i * k);
  // x2 decoded in column blocks of at most kMaxTileElements values.
  const int64_t cols = std::min(n, std::max<int64_t>(kPerblockTile, kMaxTileElements / k));
  float* b = scratch.Get(ScratchSlot::kRhs, static_cast<size_t>(k) * cols);
  const int64_t tj = std::min(cols, kPerblockTile);
  const int64_t ti = std::min(r, std::max<int64_t>(64, kPerblockTileElements / tj));
  float* p = scratch.Get(ScratchSlot::kBlockProducts, static_cast<size_t>(ti) * tj);
  for (int64_t n0 = 0; n0 < n; n0 += cols) {
    const int64_t nc = std::min(cols, n - n0);
    // (k, nc) for x2 as (k, n); (nc, k) for x2 as (n, k).
    if (transpose_x2) {
      for (int64_t j = 0; j < nc; ++j) Decode(b8 + (n0 + j) * k, k, table, b + j * k);
    } else {
      for (int64_t t = 0; t < k; ++t) Decode(b8 + t * n + n0, nc, table, b + t * nc);
    }
    const int64_t ldb = transpose_x2 ? k : nc;
    for (int64_t i0 = 0; i0 < r; i0 += ti) {
      const int64_t ri = std::min(ti, r - i0);
      for (int64_t j0 = 0; j0 < nc; j0 += tj) {
        const int64_t rj = std::min(tj, nc - j0);
        for (int64_t kb = 0; kb < blocks; ++kb) {
          const int64_t k0 = kb * block_k, kc = std::min(block_k, k - k0);
          const float* bt = transpose_x2 ? b + j0 * k + k0 : b + k0 * nc + j0;
          Sgemm(false, transpose_x2, ri, rj, kc, a + i0 * k + k0, k, bt, ldb, p, rj);
          for (int64_t i = 0; i < ri; ++i) {
            AccumulateBlockRow(c + (i0 + i) * n + n0 + j0, p + i * rj,
                               s1[(r0 + i0 + i) * blocks + kb], s2 + kb * n + n0 + j0, rj, kb == 0);
          }
        }
      }
    }
  }
}

// dst[i] = table[src[i]] * scale, a run sharing one MX scale.
__attribute__((target_clones("avx2", "default"))) void DecodeScaled(const uint8_t* __restrict src,
                                                                    int64_t count,
                                                                    const float* __restrict table,
                                                                    float scale,
                                                                    float* __restrict dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = table[src[i]] * scale;
}

// Values first .. first + count of one MX row: each 32-value block times
// its e8m0 scale.
void DecodeMx(const uint8_t* src, int64_t first, int64_t count, const float* table,
              const uint8_t* scales, const float* scale_table, float* dst) {
  for (int64_t i = 0; i < count;) {
    const int64_t block = (first + i) / kMxBlock;
    const int64_t run = std::min(count - i, (block + 1) * kMxBlock - (first + i));
    DecodeScaled(src + i, run, table, scale_table[scales[block]], dst + i);
    i += run;
  }
}

// One call's checked operands and sizes.
struct LowpArgs {
  LowpMode mode;
  bool transpose_x2, comm;
  int64_t block_k;
  int64_t m, k, n;
  int64_t width;     // of an output row: n, or the wire's n + 4 * tiles
  int64_t kb_block;  // perblock: k-blocks
  int64_t kb_mx;     // MX: scales per row
  const float* table;
  Fp8Format fmt{3, 7, 448.0f};
  const uint8_t* x1;
  const uint8_t* x2;
  const void* x2_scale;
  int64_t s2_len;
  const void* x1_scale = nullptr;  // optional
  const float* bias = nullptr;     // optional
  const void* x3 = nullptr;        // optional
  ffi::DataType x3_type = ffi::DataType::F32;
  ffi::DataType out_type;  // the result's dtype
  ffi::DataType stored;    // out's: out_type, or float32 (bf16_as_f32)
  void* out;
};

// Checks the dtypes against the mode and the communication; fills the
// decode table and the wire's fp8 format.
ffi::Error CheckLowpConfig(const ffi::AnyBuffer& x1, const ffi::AnyBuffer& x2,
                           const ffi::AnyBuffer& out, int64_t mode, bool transpose_x2,
                           bool has_x1_scale, bool has_bias, int64_t block_k, bool comm,
                           LowpArgs& args) {
  const ffi::DataType vtype = x1.element_type();
  args.table = DecodeTable(vtype);
  if (args.table == nullptr || vtype == ffi::DataType::F8E8M0FNU || x2.element_type() != vtype) {
    return InvalidArgument(kOp,
                           "x1 and x2 must share one of float8_e4m3fn, float8_e5m2 or "
                           "uint8 (HiFloat8)");
  }
  if (!IsLowpMode(mode)) {
    return InvalidArgument(kOp, "mode must be 0, 1 or 2, got " + std::to_string(mode));
  }
  args.mode = static_cast<LowpMode>(mode);
  if (args.mode == kMx && !transpose_x2) return InvalidArgument(kOp, "MX needs x2 as (n, k)");
  if (args.mode == kPerblock && (block_k < 1 || has_bias || !has_x1_scale)) {
    return InvalidArgument(kOp, "perblock needs block_k >= 1, x1 scales and no bias");
  }
  if (comm) {
    if (vtype == ffi::DataType::F8E5M2) {
      args.fmt = Fp8Format{2, 15, 57344.0f};
    } else if (vtype != ffi::DataType::F8E4M3FN) {
      return InvalidArgument(kOp, "the fp8 communication needs float8 x1 and x2");
    }
    if (out.element_type() != ffi::DataType::F8E4M3FN) {
      return InvalidArgument(kOp, "the communication wire output must be float8_e4m3fn");
    }
  } else if (!IsFloatType(out.element_type())) {
    return InvalidArgument(kOp, "out must be float16, bfloat16 or float32");
  }
  args.transpose_x2 = transpose_x2;
  args.comm = comm;
  args.block_k = block_k;
  return ffi::Error::Success();
}

// Checks that x1, x2 and out form a matmul (out: the wire with `comm`).
ffi::Error ParseLowpShape(const ffi::AnyBuffer& x1, const ffi::AnyBuffer& x2,
                          const ffi::AnyBuffer& out, LowpArgs& args) {
  auto x1_dims = x1.dimensions();
  auto x2_dims = x2.dimensions();
  auto out_dims = out.dimensions();
  if (x1_dims.size() < 2 || x2_dims.size() != 2 || out_dims.size() != x1_dims.size()) {
    return InvalidArgument(kOp, "x1 must be at least 2-D and x2 2-D, got x1 " +
                                    DimsToString(x1_dims) + ", x2 " + DimsToString(x2_dims));
  }
  const bool transpose_x2 = args.transpose_x2;
  const int64_t k = x1_dims.back();
  int64_t m = 1;
  for (size_t i = 0; i + 1 < x1_dims.size(); ++i) m *= x1_dims[i];
  const int64_t n = transpose_x2 ? x2_dims[0] : x2_dims[1];
  const int64_t tiles = (n + kCommTile - 1) / kCommTile;
  const int64_t width = args.comm ? n + 4 * tiles : n;
  if ((transpose_x2 ? x2_dims[1] : x2_dims[0]) != k || !SameRows(x1_dims, out_dims, width)) {
    return InvalidArgument(kOp, "shapes do not form a matmul: x1 " + DimsToString(x1_dims) +
                                    ", x2 " + DimsToString(x2_dims) + ", out " +
                                    DimsToString(out_dims));
  }
  if (k == 0) return InvalidArgument(kOp, "k must be at least 1");
  args.m = m;
  args.k = k;
  args.n = n;
  args.width = width;
  args.kb_block = args.mode == kPerblock ? CeilDiv(k, args.block_k) : 0;
  args.kb_mx = args.mode == kMx ? 2 * CeilDiv(k, 2 * kMxBlock) : 0;
  return ffi::Error::Success();
}

// `name` must have `count` elements of `type` (with `rank` >= 0, in that
// many dimensions).
ffi::Error CheckCount(const char* name, const ffi::AnyBuffer& b, ffi::DataType type, int64_t count,
                      int rank = -1) {
  return CheckBuffer(kOp, b, BufferSpec{type, count, rank}, [&] {
    return std::string(name) + " has the wrong dtype or size: expected " + std::to_string(count) +
           " elements, got " + DimsToString(b.dimensions());
  });
}

// The x1 scale's dtype and element count for the mode.
struct ScaleSpec {
  ffi::DataType type;
  int64_t count;
};

ScaleSpec X1ScaleSpec(const LowpArgs& a) {
  switch (a.mode) {
    case kScaled:
      return {ffi::DataType::F32, a.m};
    case kPerblock:
      return {ffi::DataType::F32, a.m * a.kb_block};
    case kMx:
      break;
  }
  return {ffi::DataType::F8E8M0FNU, a.m * a.kb_mx};
}

// The scales: scaled f32 [1 or n] (+ [m]); perblock f32 [kb, n] (+ [m, kb]);
// MX e8m0 [n, kb32] (+ [m, kb32]); then bias f32 [n] and x3 [..., n] (x1's
// leading dimensions).
ffi::Error ReadLowpScalesAndOptionals(const ffi::AnyBuffer& x1, const ffi::AnyBuffer& x2_scale,
                                      ffi::RemainingArgs extra, bool has_x1_scale, bool has_bias,
                                      bool has_x3, LowpArgs& args) {
  const int64_t m = args.m, n = args.n;
  args.s2_len = static_cast<int64_t>(x2_scale.element_count());
  if (args.mode == kScaled) {
    if (x2_scale.element_type() != ffi::DataType::F32 || (args.s2_len != 1 && args.s2_len != n)) {
      return InvalidArgument(kOp, "x2_scale must be float32 with 1 or n elements, got " +
                                      DimsToString(x2_scale.dimensions()));
    }
  } else if (args.mode == kPerblock) {
    MC2_RETURN_IF_ERROR(CheckCount("x2_scale", x2_scale, ffi::DataType::F32, args.kb_block * n));
  } else {
    MC2_RETURN_IF_ERROR(CheckCount("x2_scale", x2_scale, ffi::DataType::F8E8M0FNU, n * args.kb_mx));
  }
  args.x2_scale = x2_scale.untyped_data();
  OptionalOperands operands(kOp, extra);
  MC2_RETURN_IF_ERROR(
      operands.ExpectCount(size_t{has_x1_scale} + size_t{has_bias} + size_t{has_x3}));
  std::optional<ffi::AnyBuffer> s1, bias, x3;
  MC2_RETURN_IF_ERROR(operands.Next(has_x1_scale, s1));
  if (s1) {
    const ScaleSpec spec = X1ScaleSpec(args);
    MC2_RETURN_IF_ERROR(CheckCount("x1_scale", *s1, spec.type, spec.count));
  } else if (args.mode == kMx) {
    return InvalidArgument(kOp, "MX needs x1 scales");
  }
  MC2_RETURN_IF_ERROR(operands.Next(has_bias, bias));
  if (bias) MC2_RETURN_IF_ERROR(CheckCount("bias", *bias, ffi::DataType::F32, n, 1));
  MC2_RETURN_IF_ERROR(operands.Next(
      has_x3, RowsBy(kFloatTypes, x1, n),
      [&] {
        return "x3 must be a float array of shape [..., n] with x1's leading dimensions, got " +
               DimsToString(x3->dimensions());
      },
      x3));
  args.x1_scale = DataOrNull(s1);
  args.bias = static_cast<const float*>(DataOrNull(bias));
  args.x3 = DataOrNull(x3);
  if (x3) args.x3_type = x3->element_type();
  return ffi::Error::Success();
}

// The fp32 tiles of one k-chunk (modes scaled and MX), a range of rows at a
// time: x1 rows r0 + begin .. r0 + end, columns k0 .. k0 + kc into rows
// begin .. end of a [r, kc].
void DecodeLhsRows(const LowpArgs& p, int64_t r0, int64_t begin, int64_t end, int64_t k0,
                   int64_t kc, float* a) {
  const float* e8m0 = DecodeTable(ffi::DataType::F8E8M0FNU);
  const uint8_t* s1m = static_cast<const uint8_t*>(p.x1_scale);
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* src = p.x1 + (r0 + i) * p.k + k0;
    if (p.mode == kMx) {
      DecodeMx(src, k0, kc, p.table, s1m + (r0 + i) * p.kb_mx, e8m0, a + i * kc);
    } else {
      Decode(src, kc, p.table, a + i * kc);
    }
  }
}

// Rows begin .. end of b: of [kc, n] (x2 rows k0 + begin.. of (k, n)), or of
// [n, kc] (columns k0.. of rows begin.. of (n, k)).
void DecodeRhsRows(const LowpArgs& p, int64_t begin, int64_t end, int64_t k0, int64_t kc,
                   float* b) {
  const int64_t k = p.k, n = p.n;
  if (!p.transpose_x2) {
    Decode(p.x2 + (k0 + begin) * n, (end - begin) * n, p.table, b + begin * n);
    return;
  }
  const float* e8m0 = DecodeTable(ffi::DataType::F8E8M0FNU);
  const uint8_t* s2m = static_cast<const uint8_t*>(p.x2_scale);
  for (int64_t j = begin; j < end; ++j) {
    if (p.mode == kMx) {
      DecodeMx(p.x2 + j * k + k0, k0, kc, p.table, s2m + j * p.kb_mx, e8m0, b + j * kc);
    } else {
      Decode(p.x2 + j * k + k0, kc, p.table, b + j * kc);
    }
  }
}

// The output pass of row `row_index`: bias and dequant, then x3 and the
// rounding(s), or the communication quantization. x3_row: n floats of
// scratch.
void OutputRow(const LowpArgs& p, int64_t row_index, const float* col_scale, float* row,
               float* x3_row) {
  const int64_t n = p.n;
  if (p.mode == kScaled) {
    DequantRow(row, p.bias, col_scale,
               p.x1_scale ? static_cast<const float*>(p.x1_scale) + row_index : nullptr, n);
  } else if (p.mode == kMx && p.bias) {
    AddInPlace(row, p.bias, n);
  }
  if (p.x3) LoadAsFloat(p.x3_type, p.x3, row_index * n, n, x3_row);
  if (p.comm) {
    if (p.x3) {
      AddInPlace(row, x3_row, n);
    }
    QuantizeRowPertile(row, n, p.fmt, static_cast<uint8_t*>(p.out) + row_index * p.width);
    return;
  }
  if (p.x3) {
    RoundInPlace(p.out_type, row, n);
    AddInPlace(row, x3_row, n);
  }
  StoreRounded(p.out_type, p.stored, row, n, p.out, row_index * n);
}

// The matmul itself, on checked operands with m, n, k >= 1. The decoding and
// output passes of the scaled and MX modes are split by rows over
// `parallel`.
void RunLowpMatmul(const LowpArgs& p, const RowParallel& parallel) {
  const int64_t m = p.m, k = p.k, n = p.n;
  // Perblock decodes all of k per row block (PerblockRows); the other modes
  // k-chunks of at most kChunkK.
  const bool perblock = p.mode == kPerblock;
  const int64_t kc_max = perblock ? k : std::min(k, kChunkK);
  const int64_t rows = std::min(m, std::max<int64_t>(64, kMaxTileElements / std::max(n, kc_max)));
  Scratch scratch;
  float* c = scratch.Get(ScratchSlot::kOut, static_cast<size_t>(rows) * n);
  float* a =
      perblock ? nullptr : scratch.Get(ScratchSlot::kLhs, static_cast<size_t>(rows) * kc_max);
  float* b = perblock ? nullptr : scratch.Get(ScratchSlot::kRhs, static_cast<size_t>(kc_max) * n);
  const float* s2f = static_cast<const float*>(p.x2_scale);
  // The scaled mode's x2 scale as a full row (pertensor broadcast).
  std::vector<float> col_scale = MakeVector<float>(p.mode == kScaled ? n : 0);
  for (int64_t j = 0; j < static_cast<int64_t>(col_scale.size()); ++j) {
    col_scale[j] = s2f[p.s2_len == 1 ? 0 : j];
  }
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t r = std::min(rows, m - r0);
    if (perblock) {
      PerblockRows(p.x1, p.x2, p.table, r0, r, k, n, p.transpose_x2, p.block_k,
                   static_cast<const float*>(p.x1_scale), s2f, scratch, c);
    }
    for (int64_t k0 = 0; !perblock && k0 < k; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, k - k0);
      parallel.Run(
          r, kc, [&](int64_t begin, int64_t end) { DecodeLhsRows(p, r0, begin, end, k0, kc, a); });
      parallel.Run(p.transpose_x2 ? n : kc, p.transpose_x2 ? kc : n,
                   [&](int64_t begin, int64_t end) { DecodeRhsRows(p, begin, end, k0, kc, b); });
      Sgemm(false, p.transpose_x2, r, n, kc, a, kc, b, p.transpose_x2 ? kc : n, c, n,
            k0 == 0 ? 0.0f : 1.0f);
    }
    parallel.Run(r, n, [&](int64_t begin, int64_t end) {
      std::vector<float> x3_row = MakeVector<float>(p.x3 ? n : 0);
      for (int64_t i = begin; i < end; ++i) {
        OutputRow(p, r0 + i, col_scale.data(), c + i * n, x3_row.data());
      }
    });
  }
}

ffi::Error Mc2LowpMatmulImpl(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::AnyBuffer x2_scale,
                             ffi::RemainingArgs extra, ffi::Result<ffi::AnyBuffer> out,
                             int64_t mode, bool transpose_x2, bool has_x1_scale, bool has_bias,
                             bool has_x3, bool comm, int64_t block_k, bool bf16_as_f32,
                             int64_t parallelism) {
  return CatchAtBoundary(kOp, [&]() -> ffi::Error {
    LowpArgs args;
    MC2_RETURN_IF_ERROR(CheckLowpConfig(x1, x2, *out, mode, transpose_x2, has_x1_scale, has_bias,
                                        block_k, comm, args));
    MC2_RETURN_IF_ERROR(ParseLowpShape(x1, x2, *out, args));
    MC2_RETURN_IF_ERROR(
        ReadLowpScalesAndOptionals(x1, x2_scale, extra, has_x1_scale, has_bias, has_x3, args));
    // With bf16_as_f32 the float32 out holds bfloat16 values (never the wire).
    args.out_type = bf16_as_f32 && !comm ? ffi::DataType::BF16 : out->element_type();
    MC2_RETURN_IF_ERROR(StoredType(kOp, args.out_type, bf16_as_f32, &args.stored));
    if (out->element_type() != args.stored) {
      return InvalidArgument(kOp, "bf16_as_f32 needs a float32 out and no communication");
    }
    if (args.m == 0 || args.n == 0) return ffi::Error::Success();
    MC2_RETURN_IF_ERROR(CheckBlasDims(kOp, {{"k", args.k}, {"n", args.n}}));
    args.x1 = static_cast<const uint8_t*>(x1.untyped_data());
    args.x2 = static_cast<const uint8_t*>(x2.untyped_data());
    args.out = out->untyped_data();
    const int threads = BlasThreads(parallelism);
    BlasThreadsScope blas_threads(threads);
    RunLowpMatmul(args, RowParallel(threads));
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2LowpMatmulHandler, Mc2LowpMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x1
                                  .Arg<ffi::AnyBuffer>()  // x2
                                  .Arg<ffi::AnyBuffer>()  // x2 scale
                                  .RemainingArgs()        // x1 scale?, bias?, x3?
                                  .Ret<ffi::AnyBuffer>()  // out, or the fp8 wire
                                  .Attr<int64_t>("mode")
                                  .Attr<bool>("transpose_x2")
                                  .Attr<bool>("has_x1_scale")
                                  .Attr<bool>("has_bias")
                                  .Attr<bool>("has_x3")
                                  .Attr<bool>("comm")
                                  .Attr<int64_t>("block_k")
                                  .Attr<bool>("bf16_as_f32")
                                  .Attr<int64_t>("parallelism"));

}  // namespace jax_mc2
