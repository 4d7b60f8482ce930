// The CANN test double's runtime core (libcann_double_core.so): everything the
// public libraries forward to. Not part of the operators' interface
// (double_api.h); the public wrappers in acl.cc, nnopbase.cc and hccl.cc call
// these.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "double_api.h"

extern "C" {
typedef void* aclrtContext;
typedef void* aclrtEvent;
}

#pragma GCC visibility push(default)
namespace cann_double {

// ACL / runtime return codes.
constexpr aclError kAclSuccess = 0;
constexpr aclError kAclErrInvalidParam = 100000;
constexpr aclError kAclErrUninitialize = 100001;
constexpr aclError kAclErrRepeatInitialize = 100002;
constexpr aclError kAclErrRepeatFinalize = 100037;
constexpr aclError kRtErrParamInvalid = 107000;
constexpr aclError kRtErrInvalidDeviceId = 107001;
constexpr aclError kRtErrContextNull = 107002;
constexpr aclError kRtErrStreamContext = 107003;
constexpr aclError kRtErrMemoryAllocation = 207001;
constexpr aclError kRtErrAicoreException = 507015;
constexpr aclError kRtErrStreamSyncTimeout = 507046;

// HcclResult values.
constexpr int kHcclSuccess = 0;
constexpr int kHcclErrPara = 1;
constexpr int kHcclErrPtr = 2;
constexpr int kHcclErrInternal = 4;
constexpr int kHcclErrNotFound = 6;
constexpr int kHcclErrTimeout = 9;
constexpr int kHcclErrTcpConnect = 11;
constexpr int kHcclErrTcpTransfer = 13;
constexpr int kHcclErrRuntime = 15;
constexpr int kHcclErrRemote = 21;

// ---- shared state (core_state.cc) ----

// The value of an environment variable, "" when unset.
std::string GetEnv(const char* name);

// Fires on the N-th call after the variable was set to N (counting restarts
// whenever its value changes); never when unset or not a positive integer.
class EnvCountdown {
 public:
  explicit EnvCountdown(const char* variable) : variable_(variable) {}
  bool Fire();

 private:
  const char* variable_;
  std::mutex mutex_;
  std::string seen_;
  int64_t calls_ = 0;
};

// Records a misuse the double detected (guard corruption, double free, use
// after free, ...) for cann_double_report(); also sets the recent error.
void RecordViolation(const std::string& what);

// aclGetRecentErrMsg: the calling thread's last message, then clears it.
const char* TakeRecentError();

// The default context of `device` is created by aclrtSetDevice.
struct Context {
  int device = -1;
  bool alive = true;
  aclrtStream default_stream = nullptr;
  std::map<int, int64_t> sys_params;  // aclrtCtxSetSysParamOpt's, under the state's mutex
};
Context* CurrentContext();
void SetCurrentContextForThread(Context* context);
bool IsLiveContext(const Context* context);
int DeviceCount();

namespace rt {
aclError Init();
aclError Finalize();
aclError SetDevice(int32_t device);
aclError ResetDevice(int32_t device);
aclError GetDevice(int32_t* device);
aclError GetDeviceCount(uint32_t* count);
aclError CreateContext(aclrtContext* context, int32_t device);
aclError DestroyContext(aclrtContext context);
aclError SetCurrentContext(aclrtContext context);
aclError GetCurrentContext(aclrtContext* context);
const char* SocName();
// aclrtSetSysParamOpt: the process's value, which contexts without one of
// their own read.
aclError SetSysParamOpt(int option, int64_t value);
// aclrtCtxSetSysParamOpt / aclrtCtxGetSysParamOpt: the calling thread's
// current context's value (107002 without a live current context).
aclError CtxSetSysParamOpt(int option, int64_t value);
aclError CtxGetSysParamOpt(int option, int64_t* value);
// `option` on `device`'s live default context; -1 if it has none.
int64_t DeviceSysParam(int device, int option);

// ---- device memory (core_memory.cc) ----
aclError Malloc(void** pointer, size_t size, int policy);
aclError Free(void* pointer);
aclError Memcpy(void* dst, size_t dst_max, const void* src, size_t count, int kind);
aclError MemcpyAsync(void* dst, size_t dst_max, const void* src, size_t count, int kind,
                     aclrtStream stream);

// ---- streams and events (core_stream.cc) ----
aclError CreateStream(aclrtStream* stream);
aclError DestroyStream(aclrtStream stream);
// timeout_ms: -1 (or 0) waits forever.
aclError SynchronizeStream(aclrtStream stream, int32_t timeout_ms);
aclError SynchronizeDevice();
aclError CreateEvent(aclrtEvent* event);
aclError DestroyEvent(aclrtEvent event);
aclError RecordEvent(aclrtEvent event, aclrtStream stream);
aclError StreamWaitEvent(aclrtStream stream, aclrtEvent event);
aclError SynchronizeEvent(aclrtEvent event);
}  // namespace rt

// Validates [ptr, ptr + bytes) for a copy; `side` names it in the message.
bool CheckCopyRange(const void* ptr, size_t bytes, bool on_device, const char* side,
                    std::string* why);
int64_t LiveAllocationCount();
// Checks every live allocation's guard bytes; records corruption.
void CheckAllGuards();
std::string LiveAllocationSummary();

// A unit of stream work: returns 0 or a status with `message` set.
using StreamTask = std::function<int(std::string* message)>;
// Queues `task` on `stream` (nullptr: the current context's default stream)
// after checking the stream is live and on the current device. Returns
// kAclSuccess, or a runtime error with the recent error set to "<fn>: <why>".
aclError Enqueue(const char* fn, aclrtStream stream, StreamTask task);
// The device a live stream runs on, -1 if `stream` is not a live stream.
int StreamDevice(aclrtStream stream);

// ---- tensors, int arrays, executors (core_tensor.cc) ----
namespace nn {
aclTensor* CreateTensor(const int64_t* view_dims, uint64_t view_dims_num, int dtype,
                        const int64_t* strides, int64_t offset, int format,
                        const int64_t* storage_dims, uint64_t storage_dims_num, void* data);
aclnnStatus DestroyTensor(const aclTensor* tensor);
aclIntArray* CreateIntArray(const int64_t* values, uint64_t size);
aclnnStatus DestroyIntArray(const aclIntArray* array);
aclnnStatus SetExecutorRepeatable(aclOpExecutor* executor);
aclnnStatus DestroyExecutor(aclOpExecutor* executor);
aclnnStatus Init();
aclnnStatus Finalize();
}  // namespace nn
int64_t LiveTensorCount();
int64_t LiveIntArrayCount();
int64_t LiveExecutorCount();
// Bytes one element of `dtype` takes, in eighths of a byte; 0 if unknown.
int DtypeBits(int dtype);

// ---- communicators (core_hccl.cc) ----
namespace hccl {
int GetRootInfo(void* root_info);
int CommInitRootInfo(uint32_t ranks, const void* root_info, uint32_t rank, HcclComm* comm);
int CommInitAll(uint32_t ranks, const int32_t* devices, HcclComm* comms);
int GetCommName(HcclComm comm, char* name);
int GetRankSize(HcclComm comm, uint32_t* size);
int GetRankId(HcclComm comm, uint32_t* rank);
int CommDestroy(HcclComm comm);
int SetConfig(int config, int32_t value);
int Barrier(HcclComm comm, aclrtStream stream);
// HcclAlltoAllV: counts and displacements are host uint64_t arrays (one entry
// per rank, in elements of `send_type`), copied at the call; the exchange runs
// on `stream` (through AllGatherV among the communicator's ranks).
int AlltoAllV(const void* send_buf, const void* send_counts, const void* sdispls, int send_type,
              const void* recv_buf, const void* recv_counts, const void* rdispls, int recv_type,
              HcclComm comm, aclrtStream stream);
const char* ErrorString(int code);
}  // namespace hccl
int64_t LiveCommCount();
// The live communicators made while HCCL_DETERMINISTIC was set.
int64_t LiveDeterministicCommCount();

}  // namespace cann_double
#pragma GCC visibility pop

// Exported for tests (ctypes).
extern "C" {
CANN_DOUBLE_EXPORT void cann_double_live_counts(int64_t* allocs, int64_t* tensors,
                                                int64_t* executors, int64_t* int_arrays);
CANN_DOUBLE_EXPORT const char* cann_double_report();
CANN_DOUBLE_EXPORT void cann_double_clear_report();
// The value of `option` on the default context of `device` (the process's
// value where the context has none of its own); -1 if the device has no live
// default context.
CANN_DOUBLE_EXPORT int64_t cann_double_device_sys_param(int device, int option);
// The live communicators, and those of them made while HCCL_DETERMINISTIC
// (HcclSetConfig) was 1.
CANN_DOUBLE_EXPORT void cann_double_comm_counts(int64_t* live, int64_t* deterministic);
CANN_DOUBLE_EXPORT int cann_double_check_device_range(const void* ptr, size_t bytes);
// The aclrtSetDevice count of devices 0 .. capacity-1 (sets minus resets, as
// ACL counts them) into counts[]; returns the device count.
CANN_DOUBLE_EXPORT int cann_double_device_set_counts(int64_t* counts, int capacity);
}
