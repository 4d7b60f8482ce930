// Test hooks (exported C functions) that reach the operators' interface from
// ctypes, so the runtime is tested without an operator.
#include <cstring>

#include "core.h"

using namespace cann_double;

extern "C" {

// AllGatherV on the communicator `group` bound to `device`: writes every
// rank's bytes, in rank order, into `out` and their total into `out_bytes`.
// Returns the HcclResult, or -1 if no such communicator or `out` is too small.
CANN_DOUBLE_EXPORT int cann_double_test_all_gather(const char* group, int device, const void* data,
                                                   size_t bytes, void* out, size_t capacity,
                                                   size_t* out_bytes) {
  Comm* comm = FindComm(group, device);
  if (comm == nullptr) return -1;
  std::vector<std::vector<uint8_t>> gathered;
  int result = AllGatherV(comm, data, bytes, &gathered);
  if (result != 0) return result;
  size_t total = 0;
  for (const auto& part : gathered) {
    if (total + part.size() > capacity) return -1;
    std::memcpy(static_cast<uint8_t*>(out) + total, part.data(), part.size());
    total += part.size();
  }
  *out_bytes = total;
  return 0;
}

// An executor for `function` whose kernel fails with `status` (0: succeeds).
CANN_DOUBLE_EXPORT aclOpExecutor* cann_double_test_new_executor(const char* function,
                                                                uint64_t workspace_size,
                                                                int status) {
  return NewExecutor(function, workspace_size,
                     [status](void*, uint64_t, int, std::string* message) {
                       if (status != 0) *message = "test kernel failed";
                       return status;
                     });
}

CANN_DOUBLE_EXPORT int cann_double_test_launch(const char* function, void* workspace,
                                               uint64_t workspace_size, aclOpExecutor* executor,
                                               aclrtStream stream) {
  return LaunchExecutor(function, workspace, workspace_size, executor, stream);
}

CANN_DOUBLE_EXPORT int cann_double_test_injected_status(const char* function) {
  return InjectedStatus(function);
}
}
