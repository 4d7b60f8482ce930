// The part of CANN's C ABI (ACL runtime, aclnn meta API, HCCL) that jax_mc2's
// Ascend launch layer uses, declared as function-pointer types. Nothing here
// needs CANN headers or libraries at build time: every symbol is resolved with
// dlopen/dlsym at first use (see loader.cc). Values and signatures follow
// CANN's public headers (acl_base_rt.h, acl_rt.h, acl_meta.h, aclnn_base.h,
// hccl_comm.h, hccl_types.h); docs/ascend.md lists what is relied on.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {
typedef int aclError;
typedef int32_t aclnnStatus;
typedef void* aclrtStream;
typedef void* aclrtContext;
typedef void* HcclComm;
typedef int HcclResult;
struct aclTensor;
struct aclIntArray;
struct aclOpExecutor;
}

namespace jax_mc2::ascend {

// Data types and formats: the single table in acl_codes.def.
enum AclDataType : int {
#define ACL_DTYPE(e, name, code) e = code,
#include "acl_codes.def"
#undef ACL_DTYPE
};
enum AclFormat : int {
#define ACL_FORMAT(e, name, code) e = code,
#include "acl_codes.def"
#undef ACL_FORMAT
};
enum HcclDataType : int {
#define HCCL_DTYPE(e, name, code, bytes) e = code,
#include "acl_codes.def"
#undef HCCL_DTYPE
};

// Bytes per element of an HcclDataType code; 0 for a code jax_mc2 never sends.
inline int HcclDataTypeBytes(int code) {
  switch (code) {
#define HCCL_DTYPE(e, name, c, bytes) \
  case c:                             \
    return bytes;
#include "acl_codes.def"
#undef HCCL_DTYPE
    default:
      return 0;
  }
}

constexpr aclError kAclSuccess = 0;
constexpr aclError kAclRepeatInitialize = 100002;
constexpr aclError kAclStreamSyncTimeout = 507046;
constexpr int kMemcpyHostToDevice = 1;
constexpr int kMemcpyDeviceToHost = 2;
constexpr int kMemcpyDeviceToDevice = 3;
constexpr int kMallocHugeFirst = 0;
constexpr int64_t kStopOnFailure = 1;  // ACL_STOP_ON_FAILURE: MC2's streamMode
constexpr int kOptDeterministic = 0;   // aclSysParamOpt ACL_OPT_DETERMINISTIC
constexpr int kHcclDeterministic = 0;  // HcclConfig HCCL_DETERMINISTIC
constexpr size_t kHcclRootInfoBytes = 4108;
constexpr size_t kCommNameMaxLength = 128;

// ACL runtime (libascendcl.so).
using aclInit_t = aclError (*)(const char*);
using aclFinalize_t = aclError (*)();
using aclGetRecentErrMsg_t = const char* (*)();
using aclrtSetDevice_t = aclError (*)(int32_t);
using aclrtResetDevice_t = aclError (*)(int32_t);
using aclrtGetDeviceCount_t = aclError (*)(uint32_t*);
using aclrtGetCurrentContext_t = aclError (*)(aclrtContext*);
using aclrtSetCurrentContext_t = aclError (*)(aclrtContext);
using aclrtCreateStream_t = aclError (*)(aclrtStream*);
using aclrtDestroyStream_t = aclError (*)(aclrtStream);
using aclrtSynchronizeStreamWithTimeout_t = aclError (*)(aclrtStream, int32_t);
using aclrtMalloc_t = aclError (*)(void**, size_t, int);
using aclrtFree_t = aclError (*)(void*);
using aclrtMemcpy_t = aclError (*)(void*, size_t, const void*, size_t, int);
using aclrtMemcpyAsync_t = aclError (*)(void*, size_t, const void*, size_t, int, aclrtStream);
using aclrtCtxSetSysParamOpt_t = aclError (*)(int, int64_t);
using aclrtGetSocName_t = const char* (*)();

// aclnn meta API (libnnopbase.so).
using aclCreateTensor_t = aclTensor* (*)(const int64_t*, uint64_t, int, const int64_t*, int64_t,
                                         int, const int64_t*, uint64_t, void*);
using aclDestroyTensor_t = aclnnStatus (*)(const aclTensor*);
using aclCreateIntArray_t = aclIntArray* (*)(const int64_t*, uint64_t);
using aclDestroyIntArray_t = aclnnStatus (*)(const aclIntArray*);
using aclDestroyAclOpExecutor_t = aclnnStatus (*)(aclOpExecutor*);

// HCCL (libhccl.so).
using HcclGetRootInfo_t = HcclResult (*)(void* root_info);
using HcclCommInitRootInfo_t = HcclResult (*)(uint32_t, const void* root_info, uint32_t, HcclComm*);
using HcclCommInitAll_t = HcclResult (*)(uint32_t, int32_t*, HcclComm*);
using HcclGetCommName_t = HcclResult (*)(HcclComm, char*);
using HcclCommDestroy_t = HcclResult (*)(HcclComm);
using HcclSetConfig_t = HcclResult (*)(int, int32_t);  // union HcclConfigValue { int32_t }
using HcclGetErrorString_t = const char* (*)(HcclResult);
// HcclAlltoAllV(sendBuf, sendCounts, sdispls, sendType, recvBuf, recvCounts,
// rdispls, recvType, comm, stream): the count and displacement arguments are
// host arrays of uint64_t, one entry per rank, in elements of the data type;
// the exchange is enqueued on `stream` (the call returns before it runs).
using HcclAlltoAllV_t = HcclResult (*)(const void*, const void*, const void*, int, const void*,
                                       const void*, const void*, int, HcclComm, aclrtStream);

// Phase 2 of every aclnn operator.
using AclnnPhase2_t = aclnnStatus (*)(void*, uint64_t, aclOpExecutor*, aclrtStream);

}  // namespace jax_mc2::ascend
