// The CANN test double's internal interface: what its operator library
// (libopapi.so, the aclnn MC2 operators) uses from its runtime (device memory,
// tensor descriptors, executors, streams, communicators, failure injection).
//
// The double is a set of shared libraries with the file and symbol names of
// CANN's (libascendcl.so, libnnopbase.so, libhccl.so, libopapi.so). Each public
// C symbol lives in the library CANN puts it in. The state they share lives in
// libcann_double_core.so, which every one of them links; the functions below
// are defined there. Never installed with jax_mc2; built by build.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

extern "C" {
typedef int aclError;
typedef int32_t aclnnStatus;
typedef void* aclrtStream;
typedef void* HcclComm;
struct aclTensor;
struct aclIntArray;
struct aclOpExecutor;
}

// Marks a symbol a library of the double exports (they build with
// -fvisibility=hidden); the operators mark their aclnn entry points with it.
#define CANN_DOUBLE_EXPORT __attribute__((visibility("default")))

// The interface below is exported by libcann_double_core.so and imported by
// the other libraries, so it keeps default visibility under -fvisibility=hidden.
#pragma GCC visibility push(default)
namespace cann_double {

// aclnn status codes the operators return.
constexpr aclnnStatus kAclnnSuccess = 0;
constexpr aclnnStatus kErrParamNullptr = 161001;
constexpr aclnnStatus kErrParamInvalid = 161002;
constexpr aclnnStatus kErrRuntime = 361001;
constexpr aclnnStatus kErrInner = 561000;

// A tensor descriptor as aclCreateTensor recorded it. Strides and offset
// count elements; `data` is the storage base (device memory).
struct TensorDesc {
  std::vector<int64_t> view_dims;
  std::vector<int64_t> strides;
  int64_t offset = 0;
  int dtype = -1;   // aclDataType
  int format = -1;  // aclFormat
  std::vector<int64_t> storage_dims;
  void* data = nullptr;
};

// The descriptor behind a live aclTensor; nullptr for nullptr. A pointer that
// is not a live descriptor is reported (use after destroy) and gives nullptr.
const TensorDesc* Desc(const aclTensor* tensor);

// The values of a live aclIntArray (empty for nullptr; `ok` false if the
// pointer is not a live array).
std::vector<int64_t> IntArrayValues(const aclIntArray* array, bool* ok = nullptr);

// Whether [ptr, ptr + bytes) lies inside one live device allocation; `why`
// says what is wrong otherwise (freed, out of bounds, host pointer).
bool CheckDeviceRange(const void* ptr, size_t bytes, std::string* why);

// Sets what aclGetRecentErrMsg() returns on the calling thread.
void SetRecentError(const std::string& message);

// The status injected for `function` (e.g. "aclnnMatmulAllReduceGetWorkspaceSize"
// or "aclnnMatmulAllReduce"), 0 when none (CANN_DOUBLE_FAIL_PHASE=name:status).
aclnnStatus InjectedStatus(const char* function);

// The device the calling thread has set (aclrtSetDevice / current context), -1 if none.
int CurrentDevice();

// A communicator rank of this process.
struct Comm;
// The live communicator named `group` (HcclGetCommName) on `device`, nullptr if none.
Comm* FindComm(const char* group, int device);
int CommRank(const Comm* comm);
int CommSize(const Comm* comm);
// Every rank's `bytes` (sizes may differ by rank), in rank order, inside the
// operator: blocks until all ranks of the communicator have called it. Returns
// an HcclResult: 0, or HCCL_E_TIMEOUT (9) when a rank does not arrive within
// the communicator's timeout (HCCL_CONNECT_TIMEOUT / CANN_DOUBLE_HCCL_TIMEOUT_MS).
int AllGatherV(Comm* comm, const void* data, size_t bytes, std::vector<std::vector<uint8_t>>* out);

// The work phase 2 runs on the stream's worker thread. `device` is the
// stream's device. Return kAclnnSuccess, or a status with `message` set.
using Kernel = std::function<aclnnStatus(void* workspace, uint64_t workspace_size, int device,
                                         std::string* message)>;

// Phase 1's executor: owns `kernel` until phase 2 runs it (single use).
aclOpExecutor* NewExecutor(const char* function, uint64_t workspace_size, Kernel kernel);

// Phase 2 of every operator: checks the executor (live, made by `function`'s
// phase 1, not run before), the workspace (size >= asked, live device memory)
// and the stream, then enqueues the kernel on the stream and returns at once
// (the stream is asynchronous). A kernel failure makes the stream's next
// synchronization return the status; its message is kept for aclGetRecentErrMsg.
// The executor is destroyed once the kernel has run, and at once when phase
// 2 fails: CANN's second phase deletes a (non-repeatable) executor on every
// path, so aclDestroyAclOpExecutor after a failed phase 2 is a double destroy.
aclnnStatus LaunchExecutor(const char* function, void* workspace, uint64_t workspace_size,
                           aclOpExecutor* executor, aclrtStream stream);

// What a failed phase 2 does to its executor: destroys it unless it is
// unknown, destroyed already or queued.
void ConsumeExecutor(aclOpExecutor* executor);

}  // namespace cann_double
#pragma GCC visibility pop
