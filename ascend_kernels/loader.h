// Run-time loading of CANN (dlopen/dlsym): never needed at build time.
#pragma once

#include <string>
#include <vector>

#include "cann_abi.h"

namespace jax_mc2::ascend {

struct Cann {
#define CANN_FN(name) name##_t name = nullptr;
  // Required.
  CANN_FN(aclInit)
  CANN_FN(aclGetRecentErrMsg)
  CANN_FN(aclrtSetDevice)
  CANN_FN(aclrtResetDevice)
  CANN_FN(aclrtGetDeviceCount)
  CANN_FN(aclrtGetCurrentContext)
  CANN_FN(aclrtSetCurrentContext)
  CANN_FN(aclrtCreateStream)
  CANN_FN(aclrtDestroyStream)
  CANN_FN(aclrtSynchronizeStreamWithTimeout)
  CANN_FN(aclrtMalloc)
  CANN_FN(aclrtFree)
  CANN_FN(aclrtMemcpy)
  CANN_FN(aclrtMemcpyAsync)
  CANN_FN(aclCreateTensor)
  CANN_FN(aclDestroyTensor)
  CANN_FN(aclCreateIntArray)
  CANN_FN(aclDestroyIntArray)
  CANN_FN(HcclGetRootInfo)
  CANN_FN(HcclCommInitRootInfo)
  CANN_FN(HcclGetCommName)
  CANN_FN(HcclCommDestroy)
  // Optional (nullptr when absent).
  CANN_FN(aclFinalize)
  CANN_FN(aclrtCtxSetSysParamOpt)
  CANN_FN(aclrtGetSocName)
  CANN_FN(HcclCommInitAll)
  CANN_FN(HcclSetConfig)
  CANN_FN(HcclGetErrorString)
  CANN_FN(HcclAlltoAllV)  // needed only by the data-movement calls (gradients)
  CANN_FN(aclDestroyAclOpExecutor)
#undef CANN_FN
  // The operator libraries, searched in order for aclnn functions.
  std::vector<void*> op_libs;
  std::vector<std::string> op_lib_paths;
  std::vector<std::string> loaded;  // every library path opened, for reports
  std::string where;                // the directory searched, and why, for messages
};

// Loads CANN once (thread safe). Returns nullptr and sets *why (naming the
// missing library or symbol and JAX_MC2_CANN_LIBRARY_PATH) when it cannot.
const Cann* LoadCann(std::string* why);

// The aclnn function `name` from the operator libraries, nullptr (and *why)
// if no library has it. Cached.
void* AclnnSymbol(const Cann& cann, const std::string& name, std::string* why);

// The message for an optional symbol `name` of `library` that this CANN lacks
// (same wording as a missing required symbol).
std::string MissingSymbol(const Cann& cann, const std::string& name, const std::string& library);

// The library search: where each library is looked for, in order.
std::vector<std::string> SearchDescription();

}  // namespace jax_mc2::ascend
