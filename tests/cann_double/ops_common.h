// The operators' shared pieces: argument checks with messages, tensor reading
// and writing through descriptors (every dtype code the MC2 operators take,
// strides, offset, FRACTAL_NZ storage), rounding, and the collectives the
// kernels run over AllGatherV (all-reduce sum, raw exchange).
//
// Phase 1 copies every descriptor it checked (a Tensor below): the caller may
// destroy its aclTensors once phase 2 has returned, before the stream runs
// the kernel, so kernels never look an aclTensor up again.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "double_api.h"

#ifndef CANN_DOUBLE_EXPORT
#define CANN_DOUBLE_EXPORT __attribute__((visibility("default")))
#endif

namespace cann_double {
namespace ops {

// aclDataType codes.
enum Dtype : int {
  kFloat = 0,
  kFloat16 = 1,
  kInt8 = 2,
  kInt32 = 3,
  kUint8 = 4,
  kInt16 = 6,
  kUint16 = 7,
  kUint32 = 8,
  kInt64 = 9,
  kUint64 = 10,
  kDouble = 11,
  kBool = 12,
  kBf16 = 27,
  kHifloat8 = 34,
  kFloat8E5m2 = 35,
  kFloat8E4m3fn = 36,
  kFloat8E8m0 = 37,
  kFloat4E2m1 = 40,
};

// aclFormat codes.
constexpr int kFormatNd = 2;
constexpr int kFormatNz = 29;

// aclrt / HCCL codes the kernels report.
constexpr aclnnStatus kStreamSyncTimeout = 507046;  // ACL_ERROR_RT_STREAM_SYNC_TIMEOUT
constexpr int kHcclTimeout = 9;                     // HCCL_E_TIMEOUT

const char* DtypeName(int dtype);
// Bits per element (4 for FLOAT4_E2M1), 0 for a code the operators never take.
int DtypeBits(int dtype);
std::string DimsString(const std::vector<int64_t>& dims);
int64_t Numel(const std::vector<int64_t>& dims);
inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Element codecs

float DecodeFp16(uint16_t bits);
uint16_t EncodeFp16(float value);  // round half to even
float DecodeBf16(uint16_t bits);
uint16_t EncodeBf16(float value);  // round half to even
float DecodeHifloat8(uint8_t code);
float DecodeFloat8E4m3fn(uint8_t code);
float DecodeFloat8E5m2(uint8_t code);
float DecodeFloat8E8m0(uint8_t code);
float DecodeFloat4E2m1(uint8_t nibble);
// fp32 -> float8 (e4m3fn or e5m2), round half to even, saturating.
uint8_t EncodeFloat8(float value, int dtype);
// The largest finite value of a float8 dtype (448 e4m3fn, 57344 e5m2).
float Float8Max(int dtype);
// Rounds to a float output dtype (fp16 / bf16 half to even; fp32 unchanged).
float RoundTo(int dtype, float value);
// float -> int8, round half to even, saturating at [-128, 127]; NaN -> 0.
int8_t Int8SatRne(float value);
// fp32 scale of a packed 64-bit dequant word: float32(low 32 bits & 0xFFFFE000).
float PackedScale(uint64_t word);

// ---------------------------------------------------------------------------
// Tensors captured at phase 1

struct Tensor {
  std::string name;
  bool present = false;
  TensorDesc desc;

  int dtype() const { return desc.dtype; }
  int rank() const { return static_cast<int>(desc.view_dims.size()); }
  int64_t dim(int i) const { return desc.view_dims[i < 0 ? i + rank() : i]; }
  const std::vector<int64_t>& dims() const { return desc.view_dims; }
  int64_t numel() const { return Numel(desc.view_dims); }
  // The storage in bytes (storage dims times the element size).
  size_t StorageBytes() const;
};

// The matmul weight x2 as the operators see it: a (k, n) view, stored as
// (k, n) or, transposed, as (n, k); ND (through its strides) or FRACTAL_NZ.
struct Weight {
  Tensor t;
  int64_t k = 0, n = 0;
  bool transposed = false;
  bool nz = false;
};

// ---------------------------------------------------------------------------
// Phase 1 checks. Each returns kAclnnSuccess, or a status after setting the
// recent error to "<function>: <rule>".

aclnnStatus Fail(const char* fn, aclnnStatus status, const std::string& rule);

#define CD_RETURN_IF_ERROR(expr)                                       \
  do {                                                                 \
    const ::aclnnStatus cd_status_ = (expr);                           \
    if (cd_status_ != ::cann_double::kAclnnSuccess) return cd_status_; \
  } while (0)

// A required tensor: nullptr -> 161001, a dead descriptor -> 161002; the
// view must lie inside the storage dims.
aclnnStatus Required(const char* fn, const char* name, const aclTensor* tensor, Tensor* out);
// An optional tensor: nullptr leaves out->present false.
aclnnStatus Optional(const char* fn, const char* name, const aclTensor* tensor, Tensor* out);
// A tensor that must be nullptr in this call ("not supported" etc.).
aclnnStatus MustBeNull(const char* fn, const char* name, const aclTensor* tensor,
                       const std::string& why);

aclnnStatus CheckDtype(const char* fn, const Tensor& t, const std::vector<int>& allowed);
aclnnStatus CheckSameDtype(const char* fn, const Tensor& t, const Tensor& like);
aclnnStatus CheckRank(const char* fn, const Tensor& t, int lo, int hi);
aclnnStatus CheckShape(const char* fn, const Tensor& t, const std::vector<int64_t>& want,
                       const std::string& rule);
// One of several shapes (e.g. (n,) or (1, n)).
aclnnStatus CheckShapeIn(const char* fn, const Tensor& t,
                         const std::vector<std::vector<int64_t>>& allowed, const std::string& rule);
aclnnStatus CheckNd(const char* fn, const Tensor& t);
aclnnStatus CheckContiguous(const char* fn, const Tensor& t);
// The (k, n) weight: ND contiguous or transposed (strides (1, k)), or, when
// allow_nz, FRACTAL_NZ with the storage (ceil(C/c0), ceil(R/16), 16, c0) of
// the stored (R, C) matrix (c0 = 32 bytes / itemsize). A 4-D NZ view is read
// with k and n taken from the caller (k_hint, n_hint >= 1).
aclnnStatus ResolveWeight(const char* fn, const Tensor& t, bool allow_nz, int64_t k_hint,
                          int64_t n_hint, Weight* out);
// The last view dim of a live tensor (0 for nullptr, a dead or 0-D tensor):
// the n of a 4-D FRACTAL_NZ weight view, taken from the output.
int64_t LastDim(const aclTensor* tensor);
// The matmul shapes: x1 (m, k) or (b, s, k) contiguous ND, x2 a Weight with
// x1's k; returns the output dims (x1's leading dims + n).
aclnnStatus CheckMatmul(const char* fn, const Tensor& x1, const Tensor& x2, bool allow_nz,
                        int64_t n_hint, Weight* w, std::vector<int64_t>* out_dims);

// The communication arguments of the all-reduce family: reduceOp "sum",
// commTurn 0, streamMode 1, a live communicator named `group` on the current
// device whose size is one of `world_sizes`. Returns its size.
aclnnStatus CheckAllReduceArgs(const char* fn, const char* group, const char* reduce_op,
                               int64_t comm_turn, int64_t stream_mode,
                               const std::vector<int>& world_sizes, int* world_size);
// A live communicator named `group` on the current device.
aclnnStatus CheckGroup(const char* fn, const char* group, int* world_size);

// Phase 1's last step: the workspace size (> 0) and the executor.
using KernelBody = std::function<aclnnStatus(int device, std::string* message)>;
aclnnStatus Finish(const char* fn, uint64_t workspace_bytes, KernelBody body,
                   uint64_t* workspace_size, aclOpExecutor** executor);
// Phase 1's workspace size for an output of `bytes`: bytes + 1 KiB.
uint64_t WorkspaceFor(uint64_t bytes);
// The injected status of `fn`, with a message; 0 when none.
aclnnStatus Injected(const char* fn);

// Defines the exported phase 2 entry point `name`: its injected status, else
// the executor launched on the stream.
#define CD_PHASE2(name)                                                                         \
  extern "C" CANN_DOUBLE_EXPORT aclnnStatus name(void* workspace, uint64_t workspaceSize,       \
                                                 aclOpExecutor* executor, aclrtStream stream) { \
    if (aclnnStatus s = ::cann_double::ops::Injected(#name)) {                                  \
      ::cann_double::ConsumeExecutor(executor);                                                 \
      return s;                                                                                 \
    }                                                                                           \
    return ::cann_double::LaunchExecutor(#name, workspace, workspaceSize, executor, stream);    \
  }

// ---------------------------------------------------------------------------
// Kernel-side access

// Whether each present tensor's storage lies in live device memory; the
// message names the tensor.
bool StorageLive(const char* fn, const std::vector<const Tensor*>& tensors, std::string* message);

// Every element of the view as a double, row-major over the view dims
// (through strides and offset; FLOAT4_E2M1 nibbles, low nibble first).
std::vector<double> ReadAll(const Tensor& t);
// The raw 64-bit words of an INT64/UINT64 tensor's view.
std::vector<uint64_t> ReadWords(const Tensor& t);
// The (k, n) weight as a row-major double matrix.
std::vector<double> ReadWeight(const Weight& w);
// Writes `values` (row-major over the view dims), encoding to the dtype.
void WriteAll(const Tensor& t, const std::vector<float>& values);

// Element value at a storage element index (fp4: a nibble index).
double LoadElement(const TensorDesc& d, int64_t index);
void StoreElement(const TensorDesc& d, int64_t index, float value);
// The storage element index of a view multi-index.
int64_t StorageIndex(const TensorDesc& d, const std::vector<int64_t>& index);

// Encodes floats into a byte buffer of a 16/32-bit float dtype, and back.
std::vector<uint8_t> EncodeBuffer(int dtype, const std::vector<float>& values);
std::vector<float> DecodeBuffer(int dtype, const uint8_t* data, size_t count);

// ---------------------------------------------------------------------------
// Collectives (inside a kernel)

// One rank's view of a communicator inside a kernel.
struct Collective {
  const char* fn;
  std::string group;
  int device;
  Comm* comm = nullptr;
  int rank = 0;
  int size = 1;
};

// Looks the communicator up again (it may have been destroyed since phase 1).
aclnnStatus OpenCollective(const char* fn, const std::string& group, int device, Collective* c,
                           std::string* message);
// Every rank's payload in rank order. Each payload travels with a status
// byte: a rank that failed before the collective still takes part (so that
// its peers do not wait for it) with local_ok false, and every rank then
// fails. A timeout gives 507046.
// `local` is this rank's status so far (kAclnnSuccess, or a failure with
// *message already set: then the payload is not sent and that status is
// returned after the exchange).
aclnnStatus Exchange(const Collective& c, aclnnStatus local, const std::vector<uint8_t>& payload,
                     std::vector<std::vector<uint8_t>>* out, std::string* message);
// All-reduce in `dtype`: each rank's partial (already rounded to dtype) is
// sent in dtype; the sum runs in fp32 in rank order from 0 and is rounded to
// dtype. `local` as for Exchange.
aclnnStatus AllReduceSum(const Collective& c, aclnnStatus local, int dtype,
                         const std::vector<float>& partial, std::vector<float>* sum,
                         std::string* message);

// Plain reference matmul: a (m, k) row-major times b (k, n) row-major, each
// dot product accumulated in double.
std::vector<double> MatmulDouble(const std::vector<double>& a, const std::vector<double>& b,
                                 int64_t m, int64_t k, int64_t n);

}  // namespace ops
}  // namespace cann_double
