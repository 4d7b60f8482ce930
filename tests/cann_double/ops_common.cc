// The operators' shared pieces (see ops_common.h).
#include "ops_common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "../../ffi/dtypes.h"
#include "../../ffi/lowp_codecs.h"

namespace cann_double {
namespace ops {

// ---------------------------------------------------------------------------
// Names and sizes

const char* DtypeName(int dtype) {
  switch (dtype) {
    case kFloat:
      return "FLOAT32";
    case kFloat16:
      return "FLOAT16";
    case kInt8:
      return "INT8";
    case kInt32:
      return "INT32";
    case kUint8:
      return "UINT8";
    case kInt16:
      return "INT16";
    case kUint16:
      return "UINT16";
    case kUint32:
      return "UINT32";
    case kInt64:
      return "INT64";
    case kUint64:
      return "UINT64";
    case kDouble:
      return "DOUBLE";
    case kBool:
      return "BOOL";
    case kBf16:
      return "BFLOAT16";
    case kHifloat8:
      return "HIFLOAT8";
    case kFloat8E5m2:
      return "FLOAT8_E5M2";
    case kFloat8E4m3fn:
      return "FLOAT8_E4M3FN";
    case kFloat8E8m0:
      return "FLOAT8_E8M0";
    case kFloat4E2m1:
      return "FLOAT4_E2M1";
    default:
      return "UNKNOWN";
  }
}

int DtypeBits(int dtype) {
  switch (dtype) {
    case kInt8:
    case kUint8:
    case kBool:
    case kHifloat8:
    case kFloat8E5m2:
    case kFloat8E4m3fn:
    case kFloat8E8m0:
      return 8;
    case kFloat16:
    case kBf16:
    case kInt16:
    case kUint16:
      return 16;
    case kFloat:
    case kInt32:
    case kUint32:
      return 32;
    case kInt64:
    case kUint64:
    case kDouble:
      return 64;
    case kFloat4E2m1:
      return 4;
    default:
      return 0;
  }
}

std::string DimsString(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  if (dims.size() == 1) os << ",";
  os << ")";
  return os.str();
}

int64_t Numel(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

size_t Tensor::StorageBytes() const {
  const int64_t count = Numel(desc.storage_dims);
  return static_cast<size_t>((count * DtypeBits(desc.dtype) + 7) / 8);
}

// ---------------------------------------------------------------------------
// Element codecs

float DecodeFp16(uint16_t bits) { return jax_mc2::Fp16ToFloat(bits); }
uint16_t EncodeFp16(float value) { return jax_mc2::FloatToFp16(value); }
float DecodeBf16(uint16_t bits) { return jax_mc2::Bf16ToFloat(bits); }
uint16_t EncodeBf16(float value) { return jax_mc2::FloatToBf16(value); }

float DecodeHifloat8(uint8_t code) { return jax_mc2::DecodeHif8(code); }
float DecodeFloat8E4m3fn(uint8_t code) { return jax_mc2::DecodeE4m3fn(code); }
float DecodeFloat8E5m2(uint8_t code) { return jax_mc2::DecodeE5m2(code); }
float DecodeFloat8E8m0(uint8_t code) { return jax_mc2::DecodeE8m0(code); }

// float4_e2m1: S E E M, bias 1, no Inf / NaN: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
float DecodeFloat4E2m1(uint8_t nibble) {
  const float sign = (nibble & 0x8) ? -1.0f : 1.0f;
  const int e = (nibble >> 1) & 0x3, m = nibble & 0x1;
  if (e == 0) return sign * 0.5f * static_cast<float>(m);
  return sign * std::ldexp(1.0f + 0.5f * static_cast<float>(m), e - 1);
}

float Float8Max(int dtype) { return dtype == kFloat8E5m2 ? 57344.0f : 448.0f; }

uint8_t EncodeFloat8(float value, int dtype) {
  return dtype == kFloat8E5m2 ? jax_mc2::EncodeFp8(value, 2, 15, Float8Max(dtype))
                              : jax_mc2::EncodeFp8(value, 3, 7, Float8Max(dtype));
}

float RoundTo(int dtype, float value) {
  if (dtype == kFloat16) return DecodeFp16(EncodeFp16(value));
  if (dtype == kBf16) return DecodeBf16(EncodeBf16(value));
  return value;
}

int8_t Int8SatRne(float value) {
  if (std::isnan(value)) return 0;
  const float r = std::nearbyint(std::min(127.0f, std::max(-128.0f, value)));
  return static_cast<int8_t>(r);
}

float PackedScale(uint64_t word) {
  return jax_mc2::BitsToFloat(static_cast<uint32_t>(word) & 0xFFFFE000u);
}

// ---------------------------------------------------------------------------
// Phase 1 checks

aclnnStatus Fail(const char* fn, aclnnStatus status, const std::string& rule) {
  SetRecentError(std::string(fn) + ": " + rule);
  return status;
}

namespace {

// The smallest and largest storage element index the view touches.
void ViewExtent(const TensorDesc& d, int64_t* lo, int64_t* hi) {
  *lo = *hi = d.offset;
  for (size_t i = 0; i < d.view_dims.size(); ++i) {
    const int64_t span = (d.view_dims[i] - 1) * d.strides[i];
    if (span < 0)
      *lo += span;
    else
      *hi += span;
  }
}

aclnnStatus CheckDescriptor(const char* fn, const Tensor& t) {
  const TensorDesc& d = t.desc;
  if (DtypeBits(d.dtype) == 0) {
    return Fail(
        fn, kErrParamInvalid,
        t.name + " has aclDataType " + std::to_string(d.dtype) + ", which no MC2 operator takes");
  }
  for (int64_t dim : d.view_dims) {
    if (dim < 0) return Fail(fn, kErrParamInvalid, t.name + " has a negative dim");
  }
  if (d.strides.size() != d.view_dims.size()) {
    return Fail(fn, kErrParamInvalid,
                t.name + " has " + std::to_string(d.strides.size()) + " strides for " +
                    std::to_string(d.view_dims.size()) + " dims");
  }
  if (d.format == kFormatNz || Numel(d.view_dims) == 0) return kAclnnSuccess;  // NZ: ResolveWeight
  int64_t lo, hi;
  ViewExtent(d, &lo, &hi);
  if (lo < 0 || hi >= Numel(d.storage_dims)) {
    return Fail(fn, kErrParamInvalid,
                t.name + " view " + DimsString(d.view_dims) + " with strides " +
                    DimsString(d.strides) + " and offset " + std::to_string(d.offset) +
                    " reaches outside its storage " + DimsString(d.storage_dims));
  }
  return kAclnnSuccess;
}

bool IsContiguous(const std::vector<int64_t>& dims, const std::vector<int64_t>& strides) {
  int64_t expect = 1;
  for (size_t i = dims.size(); i-- > 0;) {
    if (dims[i] != 1 && strides[i] != expect) return false;
    expect *= dims[i];
  }
  return true;
}

}  // namespace

aclnnStatus Optional(const char* fn, const char* name, const aclTensor* tensor, Tensor* out) {
  out->name = name;
  out->present = false;
  if (tensor == nullptr) return kAclnnSuccess;
  const TensorDesc* d = Desc(tensor);
  if (d == nullptr) {
    return Fail(fn, kErrParamInvalid, std::string(name) + " is not a live aclTensor");
  }
  out->desc = *d;
  out->present = true;
  return CheckDescriptor(fn, *out);
}

aclnnStatus Required(const char* fn, const char* name, const aclTensor* tensor, Tensor* out) {
  if (tensor == nullptr) {
    return Fail(fn, kErrParamNullptr, std::string(name) + " must not be nullptr");
  }
  return Optional(fn, name, tensor, out);
}

aclnnStatus MustBeNull(const char* fn, const char* name, const aclTensor* tensor,
                       const std::string& why) {
  if (tensor == nullptr) return kAclnnSuccess;
  return Fail(fn, kErrParamInvalid, std::string(name) + " must be nullptr: " + why);
}

aclnnStatus CheckDtype(const char* fn, const Tensor& t, const std::vector<int>& allowed) {
  if (std::find(allowed.begin(), allowed.end(), t.dtype()) != allowed.end()) return kAclnnSuccess;
  std::string names;
  for (size_t i = 0; i < allowed.size(); ++i)
    names += (i ? ", " : "") + std::string(DtypeName(allowed[i]));
  return Fail(fn, kErrParamInvalid,
              t.name + " dtype must be one of " + names + ", got " + DtypeName(t.dtype()));
}

aclnnStatus CheckSameDtype(const char* fn, const Tensor& t, const Tensor& like) {
  if (t.dtype() == like.dtype()) return kAclnnSuccess;
  return Fail(fn, kErrParamInvalid,
              t.name + " dtype must equal " + like.name + "'s " + DtypeName(like.dtype()) +
                  ", got " + DtypeName(t.dtype()));
}

aclnnStatus CheckRank(const char* fn, const Tensor& t, int lo, int hi) {
  if (t.rank() >= lo && t.rank() <= hi) return kAclnnSuccess;
  const std::string want =
      lo == hi ? std::to_string(lo) : std::to_string(lo) + " to " + std::to_string(hi);
  return Fail(fn, kErrParamInvalid,
              t.name + " must have " + want + " dims, got " + DimsString(t.dims()));
}

aclnnStatus CheckShape(const char* fn, const Tensor& t, const std::vector<int64_t>& want,
                       const std::string& rule) {
  if (t.dims() == want) return kAclnnSuccess;
  return Fail(fn, kErrParamInvalid,
              t.name + " shape must be " + DimsString(want) + " (" + rule + "), got " +
                  DimsString(t.dims()));
}

aclnnStatus CheckShapeIn(const char* fn, const Tensor& t,
                         const std::vector<std::vector<int64_t>>& allowed,
                         const std::string& rule) {
  for (const auto& a : allowed) {
    if (t.dims() == a) return kAclnnSuccess;
  }
  return Fail(fn, kErrParamInvalid,
              t.name + " shape must be " + rule + ", got " + DimsString(t.dims()));
}

aclnnStatus CheckNd(const char* fn, const Tensor& t) {
  if (t.desc.format == kFormatNd) return kAclnnSuccess;
  return Fail(fn, kErrParamInvalid,
              t.name + " format must be ND (2), got " + std::to_string(t.desc.format));
}

aclnnStatus CheckContiguous(const char* fn, const Tensor& t) {
  if (IsContiguous(t.dims(), t.desc.strides)) return kAclnnSuccess;
  return Fail(fn, kErrParamInvalid,
              t.name + " must be contiguous, got strides " + DimsString(t.desc.strides) + " for " +
                  DimsString(t.dims()));
}

namespace {

std::vector<int64_t> NzShape(int64_t rows, int64_t cols, int64_t c0) {
  return {CeilDiv(cols, c0), CeilDiv(rows, 16), 16, c0};
}

bool StridesTransposed(const std::vector<int64_t>& dims, const std::vector<int64_t>& strides) {
  // (k, n) viewing a row-major (n, k): strides (1, k); size-1 dims are free.
  return (dims[0] == 1 || strides[0] == 1) && (dims[1] == 1 || strides[1] == dims[0]);
}

aclnnStatus ResolveNzWeight(const char* fn, const Tensor& t, int64_t k_hint, int64_t n_hint,
                            Weight* w) {
  const TensorDesc& d = t.desc;
  if (d.dtype != kFloat16 && d.dtype != kBf16 && d.dtype != kInt8) {
    return Fail(
        fn, kErrParamInvalid,
        t.name + " in FRACTAL_NZ must be FLOAT16, BFLOAT16 or INT8, got " + DtypeName(d.dtype));
  }
  if (t.rank() == 2) {
    w->k = t.dim(0), w->n = t.dim(1);
  } else if (t.rank() == 4 && d.view_dims == d.storage_dims && k_hint > 0 && n_hint > 0) {
    w->k = k_hint, w->n = n_hint;
  } else {
    return Fail(fn, kErrParamInvalid,
                t.name +
                    " in FRACTAL_NZ must have the (k, n) view (or its 4-D NZ storage shape as "
                    "the view), got " +
                    DimsString(d.view_dims));
  }
  if (d.offset != 0) {
    return Fail(fn, kErrParamInvalid, t.name + " in FRACTAL_NZ must have offset 0");
  }
  const int64_t c0 = 32 / (DtypeBits(d.dtype) / 8);
  const auto plain = NzShape(w->k, w->n, c0);       // stored (k, n)
  const auto transposed = NzShape(w->n, w->k, c0);  // stored (n, k)
  // The (k, n) view's strides say which matrix the blocks hold: (n, 1) the
  // stored (k, n), (1, k) the stored (n, k). With k == 1 and n <= 16 the two
  // storage shapes coincide and only the strides tell them apart.
  // A 4-D view (the storage itself) says it by the storage shape alone.
  const std::vector<int64_t> t_strides{1, w->k}, p_strides{w->n, 1};
  const bool may_p = t.rank() == 4 || d.strides == p_strides;
  const bool may_t = t.rank() == 4 || d.strides == t_strides;
  if (!may_p && !may_t) {
    return Fail(fn, kErrParamInvalid,
                t.name + " in FRACTAL_NZ must have the strides (n, 1) = " + DimsString(p_strides) +
                    " of a stored (k, n) or (1, k) = " + DimsString(t_strides) +
                    " of a stored (n, k), got " + DimsString(d.strides));
  }
  if (may_p && d.storage_dims == plain) {
    w->transposed = false;
  } else if (may_t && d.storage_dims == transposed) {
    w->transposed = true;
  } else {
    return Fail(fn, kErrParamInvalid,
                t.name + " FRACTAL_NZ storage must be (ceil(n/c0), ceil(k/16), 16, c0) = " +
                    DimsString(plain) + ", or " + DimsString(transposed) +
                    " for a transposed x2 (c0 = 32 bytes / itemsize), got " +
                    DimsString(d.storage_dims));
  }
  // The buffer holds the whole NZ storage (aclnnCalculateMatmulWeightSizeV2's
  // element count), padding included.
  const int64_t itemsize = DtypeBits(d.dtype) / 8;
  const int64_t elements = Numel(d.storage_dims);
  std::string why;
  if (d.data != nullptr && !CheckDeviceRange(d.data, elements * itemsize, &why)) {
    return Fail(fn, kErrParamInvalid,
                t.name + " FRACTAL_NZ storage " + DimsString(d.storage_dims) + " needs " +
                    std::to_string(elements) + " elements (" + std::to_string(elements * itemsize) +
                    " bytes) of device memory: " + why);
  }
  w->nz = true;
  return kAclnnSuccess;
}

}  // namespace

aclnnStatus ResolveWeight(const char* fn, const Tensor& t, bool allow_nz, int64_t k_hint,
                          int64_t n_hint, Weight* out) {
  out->t = t;
  if (t.desc.format == kFormatNz) {
    if (!allow_nz) {
      return Fail(fn, kErrParamInvalid,
                  t.name + " format must be ND (2), got FRACTAL_NZ (29): this operator takes " +
                      t.name + " in ND only");
    }
    return ResolveNzWeight(fn, t, k_hint, n_hint, out);
  }
  CD_RETURN_IF_ERROR(CheckNd(fn, t));
  CD_RETURN_IF_ERROR(CheckRank(fn, t, 2, 2));
  out->k = t.dim(0), out->n = t.dim(1);
  out->nz = false;
  if (IsContiguous(t.dims(), t.desc.strides)) {
    out->transposed = false;
  } else if (StridesTransposed(t.dims(), t.desc.strides)) {
    out->transposed = true;
  } else {
    return Fail(fn, kErrParamInvalid,
                t.name +
                    " must be contiguous (k, n) or its last two axes transposed (strides (1, k)), "
                    "got strides " +
                    DimsString(t.desc.strides) + " for " + DimsString(t.dims()));
  }
  return kAclnnSuccess;
}

int64_t LastDim(const aclTensor* tensor) {
  const TensorDesc* d = tensor ? Desc(tensor) : nullptr;
  return d && !d->view_dims.empty() ? d->view_dims.back() : 0;
}

aclnnStatus CheckMatmul(const char* fn, const Tensor& x1, const Tensor& x2, bool allow_nz,
                        int64_t n_hint, Weight* w, std::vector<int64_t>* out_dims) {
  CD_RETURN_IF_ERROR(CheckRank(fn, x1, 2, 3));
  CD_RETURN_IF_ERROR(CheckNd(fn, x1));
  CD_RETURN_IF_ERROR(CheckContiguous(fn, x1));
  const int64_t k = x1.dim(-1);
  CD_RETURN_IF_ERROR(ResolveWeight(fn, x2, allow_nz, k, n_hint, w));
  if (w->k != k) {
    return Fail(fn, kErrParamInvalid,
                "x2's k (" + std::to_string(w->k) + ") must equal x1's last dim " +
                    std::to_string(k) + ": x1 " + DimsString(x1.dims()) + ", x2 " +
                    DimsString(x2.dims()));
  }
  if (k < 1) return Fail(fn, kErrParamInvalid, "k must be at least 1");
  *out_dims = x1.dims();
  out_dims->back() = w->n;
  return kAclnnSuccess;
}

aclnnStatus CheckGroup(const char* fn, const char* group, int* world_size) {
  if (group == nullptr) return Fail(fn, kErrParamNullptr, "group must not be nullptr");
  const size_t len = strnlen(group, 128);
  if (len == 0 || len >= 128) {
    return Fail(fn, kErrParamInvalid, "group name length must be in (0, 128)");
  }
  const int device = CurrentDevice();
  Comm* comm = FindComm(group, device);
  if (comm == nullptr) {
    return Fail(fn, kErrParamInvalid,
                std::string("group '") + group +
                    "' names no live communicator on the current device " + std::to_string(device));
  }
  *world_size = CommSize(comm);
  return kAclnnSuccess;
}

aclnnStatus CheckAllReduceArgs(const char* fn, const char* group, const char* reduce_op,
                               int64_t comm_turn, int64_t stream_mode,
                               const std::vector<int>& world_sizes, int* world_size) {
  if (reduce_op == nullptr) return Fail(fn, kErrParamNullptr, "reduceOp must not be nullptr");
  if (std::strcmp(reduce_op, "sum") != 0) {
    return Fail(fn, kErrParamInvalid,
                std::string("reduceOp must be \"sum\", got \"") + reduce_op + "\"");
  }
  if (comm_turn != 0) {
    return Fail(fn, kErrParamInvalid, "commTurn must be 0, got " + std::to_string(comm_turn));
  }
  if (stream_mode != 1) {
    return Fail(fn, kErrParamInvalid,
                "streamMode must be 1 (ACL_STOP_ON_FAILURE), got " + std::to_string(stream_mode));
  }
  CD_RETURN_IF_ERROR(CheckGroup(fn, group, world_size));
  if (std::find(world_sizes.begin(), world_sizes.end(), *world_size) == world_sizes.end()) {
    std::string list;
    for (size_t i = 0; i < world_sizes.size(); ++i)
      list += (i ? ", " : "") + std::to_string(world_sizes[i]);
    return Fail(
        fn, kErrParamInvalid,
        "the communicator has " + std::to_string(*world_size) + " ranks; supported: " + list);
  }
  return kAclnnSuccess;
}

uint64_t WorkspaceFor(uint64_t bytes) { return bytes + 1024; }

aclnnStatus Finish(const char* fn, uint64_t workspace_bytes, KernelBody body,
                   uint64_t* workspace_size, aclOpExecutor** executor) {
  if (workspace_size == nullptr)
    return Fail(fn, kErrParamNullptr, "workspaceSize must not be nullptr");
  if (executor == nullptr) return Fail(fn, kErrParamNullptr, "executor must not be nullptr");
  Kernel kernel = [body](void*, uint64_t, int device, std::string* message) {
    return body(device, message);
  };
  aclOpExecutor* e = NewExecutor(fn, workspace_bytes, std::move(kernel));
  if (e == nullptr) return Fail(fn, kErrInner, "could not create the executor");
  *workspace_size = workspace_bytes;
  *executor = e;
  return kAclnnSuccess;
}

aclnnStatus Injected(const char* fn) {
  // InjectedStatus sets the recent error itself when it injects a failure.
  return InjectedStatus(fn);
}

// ---------------------------------------------------------------------------
// Kernel-side access

bool StorageLive(const char* fn, const std::vector<const Tensor*>& tensors, std::string* message) {
  for (const Tensor* t : tensors) {
    if (t == nullptr || !t->present) continue;
    const size_t bytes = t->StorageBytes();
    if (bytes == 0) continue;
    std::string why;
    if (!CheckDeviceRange(t->desc.data, bytes, &why)) {
      *message = std::string(fn) + ": " + t->name + " storage (" + std::to_string(bytes) +
                 " bytes) is not live device memory: " + why;
      return false;
    }
  }
  return true;
}

namespace {

// The T stored (unaligned) at p.
template <typename T>
T ReadAs(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

double LoadElement(const TensorDesc& d, int64_t index) {
  const uint8_t* base = static_cast<const uint8_t*>(d.data);
  switch (d.dtype) {
    case kFloat4E2m1: {
      const uint8_t byte = base[index / 2];
      return DecodeFloat4E2m1((index & 1) ? (byte >> 4) : (byte & 0xF));
    }
    case kInt8:
      return static_cast<int8_t>(base[index]);
    case kUint8:
    case kBool:
      return base[index];
    case kHifloat8:
      return DecodeHifloat8(base[index]);
    case kFloat8E4m3fn:
      return DecodeFloat8E4m3fn(base[index]);
    case kFloat8E5m2:
      return DecodeFloat8E5m2(base[index]);
    case kFloat8E8m0:
      return DecodeFloat8E8m0(base[index]);
    default:
      break;
  }
  const uint8_t* p = base + index * (DtypeBits(d.dtype) / 8);
  switch (d.dtype) {
    case kFloat16:
      return DecodeFp16(ReadAs<uint16_t>(p));
    case kBf16:
      return DecodeBf16(ReadAs<uint16_t>(p));
    case kInt16:
      return ReadAs<int16_t>(p);
    case kUint16:
      return ReadAs<uint16_t>(p);
    case kFloat:
      return ReadAs<float>(p);
    case kInt32:
      return ReadAs<int32_t>(p);
    case kUint32:
      return ReadAs<uint32_t>(p);
    case kInt64:
      return static_cast<double>(ReadAs<int64_t>(p));
    case kUint64:
      return static_cast<double>(ReadAs<uint64_t>(p));
    case kDouble:
      return ReadAs<double>(p);
    default:
      return 0.0;
  }
}

void StoreElement(const TensorDesc& d, int64_t index, float value) {
  uint8_t* p = static_cast<uint8_t*>(d.data) + index * (DtypeBits(d.dtype) / 8);
  if (d.dtype == kFloat16) {
    const uint16_t v = EncodeFp16(value);
    std::memcpy(p, &v, 2);
  } else if (d.dtype == kBf16) {
    const uint16_t v = EncodeBf16(value);
    std::memcpy(p, &v, 2);
  } else if (d.dtype == kFloat) {
    std::memcpy(p, &value, 4);
  }
}

int64_t StorageIndex(const TensorDesc& d, const std::vector<int64_t>& index) {
  int64_t at = d.offset;
  for (size_t i = 0; i < index.size(); ++i) at += index[i] * d.strides[i];
  return at;
}

namespace {

// Calls visit(linear, storage_index) for every element of the view, row-major.
template <typename Visit>
void ForEachElement(const TensorDesc& d, Visit visit) {
  const int64_t count = Numel(d.view_dims);
  std::vector<int64_t> index(d.view_dims.size(), 0);
  for (int64_t linear = 0; linear < count; ++linear) {
    visit(linear, StorageIndex(d, index));
    for (size_t i = index.size(); i-- > 0;) {
      if (++index[i] < d.view_dims[i]) break;
      index[i] = 0;
    }
  }
}

}  // namespace

std::vector<double> ReadAll(const Tensor& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  ForEachElement(t.desc, [&](int64_t i, int64_t at) { out[i] = LoadElement(t.desc, at); });
  return out;
}

std::vector<uint64_t> ReadWords(const Tensor& t) {
  std::vector<uint64_t> out(static_cast<size_t>(t.numel()));
  const uint8_t* base = static_cast<const uint8_t*>(t.desc.data);
  ForEachElement(t.desc, [&](int64_t i, int64_t at) { std::memcpy(&out[i], base + at * 8, 8); });
  return out;
}

std::vector<double> ReadWeight(const Weight& w) {
  const TensorDesc& d = w.t.desc;
  std::vector<double> out(static_cast<size_t>(w.k * w.n));
  if (!w.nz) {
    for (int64_t i = 0; i < w.k; ++i) {
      for (int64_t j = 0; j < w.n; ++j) out[i * w.n + j] = LoadElement(d, StorageIndex(d, {i, j}));
    }
    return out;
  }
  // nz[c / c0, r / 16, r % 16, c % c0] = stored[r, c]; stored = (k, n) or (n, k).
  const int64_t c0 = 32 / (DtypeBits(d.dtype) / 8);
  const int64_t rows = w.transposed ? w.n : w.k;
  const int64_t r1 = CeilDiv(rows, 16);
  for (int64_t i = 0; i < w.k; ++i) {
    for (int64_t j = 0; j < w.n; ++j) {
      const int64_t r = w.transposed ? j : i, c = w.transposed ? i : j;
      const int64_t at = (((c / c0) * r1 + r / 16) * 16 + r % 16) * c0 + c % c0;
      out[i * w.n + j] = LoadElement(d, d.offset + at);
    }
  }
  return out;
}

void WriteAll(const Tensor& t, const std::vector<float>& values) {
  ForEachElement(t.desc, [&](int64_t i, int64_t at) { StoreElement(t.desc, at, values[i]); });
}

std::vector<uint8_t> EncodeBuffer(int dtype, const std::vector<float>& values) {
  const size_t item = DtypeBits(dtype) / 8;
  std::vector<uint8_t> out(values.size() * item);
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == kFloat16) {
      const uint16_t v = EncodeFp16(values[i]);
      std::memcpy(&out[i * 2], &v, 2);
    } else if (dtype == kBf16) {
      const uint16_t v = EncodeBf16(values[i]);
      std::memcpy(&out[i * 2], &v, 2);
    } else {
      std::memcpy(&out[i * 4], &values[i], 4);
    }
  }
  return out;
}

std::vector<float> DecodeBuffer(int dtype, const uint8_t* data, size_t count) {
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) {
    if (dtype == kFloat16 || dtype == kBf16) {
      uint16_t v;
      std::memcpy(&v, data + i * 2, 2);
      out[i] = dtype == kFloat16 ? DecodeFp16(v) : DecodeBf16(v);
    } else {
      std::memcpy(&out[i], data + i * 4, 4);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Collectives

aclnnStatus OpenCollective(const char* fn, const std::string& group, int device, Collective* c,
                           std::string* message) {
  c->fn = fn;
  c->group = group;
  c->device = device;
  c->comm = FindComm(group.c_str(), device);
  if (c->comm == nullptr) {
    *message = std::string(fn) + ": group '" + group + "' names no live communicator on device " +
               std::to_string(device) + " when the kernel runs";
    return kErrInner;
  }
  c->rank = CommRank(c->comm);
  c->size = CommSize(c->comm);
  return kAclnnSuccess;
}

aclnnStatus Exchange(const Collective& c, aclnnStatus local, const std::vector<uint8_t>& payload,
                     std::vector<std::vector<uint8_t>>* out, std::string* message) {
  // Header: int32 status; a failed rank sends its message instead of the payload.
  std::vector<uint8_t> wire(4);
  std::memcpy(wire.data(), &local, 4);
  if (local == kAclnnSuccess) {
    wire.insert(wire.end(), payload.begin(), payload.end());
  } else {
    wire.insert(wire.end(), message->begin(), message->end());
  }
  std::vector<std::vector<uint8_t>> got;
  const int result = AllGatherV(c.comm, wire.data(), wire.size(), &got);
  if (local != kAclnnSuccess) return local;
  if (result == kHcclTimeout) {
    *message = std::string(c.fn) + ": the collective timed out on rank " + std::to_string(c.rank) +
               " (a rank of group '" + c.group + "' did not arrive)";
    return kStreamSyncTimeout;
  }
  if (result != 0 || got.size() != static_cast<size_t>(c.size)) {
    *message = std::string(c.fn) + ": AllGatherV failed with HcclResult " + std::to_string(result);
    return kErrInner;
  }
  out->assign(got.size(), {});
  for (size_t r = 0; r < got.size(); ++r) {
    aclnnStatus peer = kErrInner;
    if (got[r].size() >= 4) std::memcpy(&peer, got[r].data(), 4);
    if (peer != kAclnnSuccess) {
      const std::string why =
          got[r].size() > 4 ? std::string(got[r].begin() + 4, got[r].end()) : "";
      *message = std::string(c.fn) + ": rank " + std::to_string(r) + " failed: " + why;
      return kErrInner;
    }
    (*out)[r].assign(got[r].begin() + 4, got[r].end());
  }
  return kAclnnSuccess;
}

aclnnStatus AllReduceSum(const Collective& c, aclnnStatus local, int dtype,
                         const std::vector<float>& partial, std::vector<float>* sum,
                         std::string* message) {
  std::vector<std::vector<uint8_t>> got;
  const std::vector<uint8_t> payload =
      local == kAclnnSuccess ? EncodeBuffer(dtype, partial) : std::vector<uint8_t>();
  CD_RETURN_IF_ERROR(Exchange(c, local, payload, &got, message));
  const size_t item = DtypeBits(dtype) / 8;
  sum->assign(partial.size(), 0.0f);
  for (size_t r = 0; r < got.size(); ++r) {
    if (got[r].size() != partial.size() * item) {
      *message = std::string(c.fn) + ": rank " + std::to_string(r) + " sent " +
                 std::to_string(got[r].size()) + " bytes, expected " +
                 std::to_string(partial.size() * item) + " (shapes differ across ranks)";
      return kErrInner;
    }
    const std::vector<float> v = DecodeBuffer(dtype, got[r].data(), partial.size());
    for (size_t i = 0; i < v.size(); ++i) (*sum)[i] += v[i];
  }
  for (float& v : *sum) v = RoundTo(dtype, v);
  return kAclnnSuccess;
}

std::vector<double> MatmulDouble(const std::vector<double>& a, const std::vector<double>& b,
                                 int64_t m, int64_t k, int64_t n) {
  std::vector<double> out(static_cast<size_t>(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i) {
    double* row = &out[i * n];
    for (int64_t t = 0; t < k; ++t) {
      const double av = a[i * k + t];
      const double* brow = &b[t * n];
      for (int64_t j = 0; j < n; ++j) row[j] += av * brow[j];
    }
  }
  return out;
}

}  // namespace ops
}  // namespace cann_double
