// libascendcl.so of the double: the ACL runtime entry points.
#include "core.h"

using namespace cann_double;

namespace {
EnvCountdown sync_timeout("CANN_DOUBLE_SYNC_TIMEOUT");
}  // namespace

extern "C" {

CANN_DOUBLE_EXPORT aclError aclInit(const char*) { return rt::Init(); }
CANN_DOUBLE_EXPORT aclError aclFinalize() { return rt::Finalize(); }
CANN_DOUBLE_EXPORT const char* aclGetRecentErrMsg() { return TakeRecentError(); }

CANN_DOUBLE_EXPORT aclError aclrtSetDevice(int32_t device) { return rt::SetDevice(device); }
CANN_DOUBLE_EXPORT aclError aclrtResetDevice(int32_t device) { return rt::ResetDevice(device); }
CANN_DOUBLE_EXPORT aclError aclrtGetDevice(int32_t* device) { return rt::GetDevice(device); }
CANN_DOUBLE_EXPORT aclError aclrtGetDeviceCount(uint32_t* count) {
  return rt::GetDeviceCount(count);
}
CANN_DOUBLE_EXPORT aclError aclrtSynchronizeDevice() { return rt::SynchronizeDevice(); }

CANN_DOUBLE_EXPORT aclError aclrtCreateContext(aclrtContext* context, int32_t device) {
  return rt::CreateContext(context, device);
}
CANN_DOUBLE_EXPORT aclError aclrtDestroyContext(aclrtContext context) {
  return rt::DestroyContext(context);
}
CANN_DOUBLE_EXPORT aclError aclrtSetCurrentContext(aclrtContext context) {
  return rt::SetCurrentContext(context);
}
CANN_DOUBLE_EXPORT aclError aclrtGetCurrentContext(aclrtContext* context) {
  return rt::GetCurrentContext(context);
}

CANN_DOUBLE_EXPORT const char* aclrtGetSocName() { return rt::SocName(); }
CANN_DOUBLE_EXPORT aclError aclrtCtxSetSysParamOpt(int option, int64_t value) {
  return rt::CtxSetSysParamOpt(option, value);
}
CANN_DOUBLE_EXPORT aclError aclrtSetSysParamOpt(int option, int64_t value) {
  return rt::SetSysParamOpt(option, value);
}
CANN_DOUBLE_EXPORT aclError aclrtCtxGetSysParamOpt(int option, int64_t* value) {
  return rt::CtxGetSysParamOpt(option, value);
}

CANN_DOUBLE_EXPORT aclError aclrtMalloc(void** pointer, size_t size, int policy) {
  return rt::Malloc(pointer, size, policy);
}
CANN_DOUBLE_EXPORT aclError aclrtFree(void* pointer) { return rt::Free(pointer); }
CANN_DOUBLE_EXPORT aclError aclrtMemcpy(void* dst, size_t dst_max, const void* src, size_t count,
                                        int kind) {
  return rt::Memcpy(dst, dst_max, src, count, kind);
}
CANN_DOUBLE_EXPORT aclError aclrtMemcpyAsync(void* dst, size_t dst_max, const void* src,
                                             size_t count, int kind, aclrtStream stream) {
  return rt::MemcpyAsync(dst, dst_max, src, count, kind, stream);
}

// CANN_DOUBLE_FAIL_PHASE=aclrtCreateStream:N makes stream creation return N.
CANN_DOUBLE_EXPORT aclError aclrtCreateStream(aclrtStream* stream) {
  if (aclError injected = InjectedStatus("aclrtCreateStream")) return injected;
  return rt::CreateStream(stream);
}
CANN_DOUBLE_EXPORT aclError aclrtCreateStreamWithConfig(aclrtStream* stream, uint32_t, uint32_t) {
  if (aclError injected = InjectedStatus("aclrtCreateStream")) return injected;
  return rt::CreateStream(stream);
}
CANN_DOUBLE_EXPORT aclError aclrtDestroyStream(aclrtStream stream) {
  return rt::DestroyStream(stream);
}
CANN_DOUBLE_EXPORT aclError aclrtSynchronizeStream(aclrtStream stream) {
  return rt::SynchronizeStream(stream, -1);
}
CANN_DOUBLE_EXPORT aclError aclrtSynchronizeStreamWithTimeout(aclrtStream stream,
                                                              int32_t timeout_ms) {
  if (sync_timeout.Fire()) {
    SetRecentError(
        "aclrtSynchronizeStreamWithTimeout: timed out (injected by "
        "CANN_DOUBLE_SYNC_TIMEOUT)");
    return kRtErrStreamSyncTimeout;
  }
  return rt::SynchronizeStream(stream, timeout_ms);
}

CANN_DOUBLE_EXPORT aclError aclrtCreateEvent(aclrtEvent* event) { return rt::CreateEvent(event); }
CANN_DOUBLE_EXPORT aclError aclrtDestroyEvent(aclrtEvent event) { return rt::DestroyEvent(event); }
CANN_DOUBLE_EXPORT aclError aclrtRecordEvent(aclrtEvent event, aclrtStream stream) {
  return rt::RecordEvent(event, stream);
}
CANN_DOUBLE_EXPORT aclError aclrtStreamWaitEvent(aclrtStream stream, aclrtEvent event) {
  return rt::StreamWaitEvent(stream, event);
}
CANN_DOUBLE_EXPORT aclError aclrtSynchronizeEvent(aclrtEvent event) {
  return rt::SynchronizeEvent(event);
}

}  // extern "C"
