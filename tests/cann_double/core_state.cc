// Process state of the double: environment, violations, recent errors,
// devices and contexts, failure injection, and the exit report.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>

#include "core.h"

namespace cann_double {
namespace {

constexpr int kDefaultDeviceCount = 8;
constexpr const char* kDefaultSocName = "Ascend910B1";

struct State {
  std::mutex mutex;
  bool acl_initialized = false;
  std::vector<std::string> violations;
  std::vector<Context*> contexts;  // never freed: a stale handle stays detectable
  std::map<int, Context*> default_contexts;
  std::map<int, int> device_refcounts;
  std::map<int, int64_t> sys_params;
};

// Leaked on purpose: stream workers may still run while statics are destroyed.
State& GetState() {
  static State* state = new State;
  return *state;
}

thread_local Context* current_context = nullptr;
thread_local std::string recent_error;
thread_local std::string taken_error;

}  // namespace

std::string GetEnv(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

bool EnvCountdown::Fire() {
  std::string value = GetEnv(variable_);
  std::lock_guard<std::mutex> lock(mutex_);
  if (value != seen_) {
    seen_ = value;
    calls_ = 0;
  }
  char* end = nullptr;
  long long target = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || target <= 0) return false;
  return ++calls_ == target;
}

void SetRecentError(const std::string& message) { recent_error = message; }

const char* TakeRecentError() {
  taken_error.swap(recent_error);
  recent_error.clear();
  return taken_error.c_str();
}

void RecordViolation(const std::string& what) {
  SetRecentError(what);
  std::fprintf(stderr, "[cann_double] violation: %s\n", what.c_str());
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  state.violations.push_back(what);
}

aclnnStatus InjectedStatus(const char* function) {
  // CANN_DOUBLE_FAIL_PHASE=name:status[,name:status...]
  std::stringstream entries(GetEnv("CANN_DOUBLE_FAIL_PHASE"));
  std::string entry;
  while (std::getline(entries, entry, ',')) {
    size_t colon = entry.rfind(':');
    if (colon == std::string::npos || entry.compare(0, colon, function) != 0) continue;
    if (colon != std::strlen(function)) continue;
    aclnnStatus status = std::atoi(entry.c_str() + colon + 1);
    if (status != 0) {
      SetRecentError(std::string("injected failure of ") + function + " (CANN_DOUBLE_FAIL_PHASE)");
    }
    return status;
  }
  return kAclnnSuccess;
}

int DeviceCount() {
  std::string value = GetEnv("CANN_DOUBLE_DEVICE_COUNT");
  int count = value.empty() ? kDefaultDeviceCount : std::atoi(value.c_str());
  return count > 0 ? count : kDefaultDeviceCount;
}

Context* CurrentContext() { return current_context; }
void SetCurrentContextForThread(Context* context) { current_context = context; }

bool IsLiveContext(const Context* context) {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  for (Context* known : state.contexts) {
    if (known == context) return known->alive;
  }
  return false;
}

int CurrentDevice() {
  Context* context = current_context;
  return context && context->alive ? context->device : -1;
}

namespace rt {

aclError Init() {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.acl_initialized) return kAclErrRepeatInitialize;
  state.acl_initialized = true;
  return kAclSuccess;
}

aclError Finalize() {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (!state.acl_initialized) return kAclErrRepeatFinalize;
  state.acl_initialized = false;
  return kAclSuccess;
}

static bool ValidDevice(int32_t device) {
  if (device >= 0 && device < DeviceCount()) return true;
  SetRecentError("invalid device id " + std::to_string(device) + " (device count " +
                 std::to_string(DeviceCount()) + ")");
  return false;
}

aclError SetDevice(int32_t device) {
  if (!ValidDevice(device)) return kRtErrInvalidDeviceId;
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  Context*& context = state.default_contexts[device];
  if (context == nullptr || !context->alive) {
    context = new Context{device, true, nullptr, {}};
    state.contexts.push_back(context);
  }
  ++state.device_refcounts[device];
  current_context = context;
  return kAclSuccess;
}

aclError ResetDevice(int32_t device) {
  if (!ValidDevice(device)) return kRtErrInvalidDeviceId;
  State& state = GetState();
  Context* released = nullptr;
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    Context* context = state.default_contexts[device];
    if (current_context && current_context->device == device && current_context == context) {
      current_context = nullptr;
    }
    // ACL counts every aclrtSetDevice of the process (from any thread) and
    // releases the device's default context only when the count returns to
    // 0: a thread still holding it has no device any more, and the next
    // aclrtSetDevice makes a new one.
    int& refcount = state.device_refcounts[device];
    if (refcount > 0 && --refcount == 0 && context != nullptr && context->alive) {
      context->alive = false;
      released = context;
    }
  }
  // Outside the lock: the stream's worker may record a violation.
  if (released != nullptr && released->default_stream != nullptr) {
    DestroyStream(released->default_stream);
  }
  return kAclSuccess;
}

aclError GetDevice(int32_t* device) {
  if (device == nullptr) return kRtErrParamInvalid;
  int current = CurrentDevice();
  if (current < 0) {
    SetRecentError("aclrtGetDevice: no device set on this thread");
    return kRtErrContextNull;
  }
  *device = current;
  return kAclSuccess;
}

aclError GetDeviceCount(uint32_t* count) {
  if (count == nullptr) return kRtErrParamInvalid;
  *count = static_cast<uint32_t>(DeviceCount());
  return kAclSuccess;
}

aclError CreateContext(aclrtContext* handle, int32_t device) {
  if (handle == nullptr) return kRtErrParamInvalid;
  if (!ValidDevice(device)) return kRtErrInvalidDeviceId;
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  Context* context = new Context{device, true, nullptr, {}};
  state.contexts.push_back(context);
  current_context = context;  // as in ACL: the new context becomes current
  *handle = context;
  return kAclSuccess;
}

aclError DestroyContext(aclrtContext handle) {
  auto* context = static_cast<Context*>(handle);
  if (!IsLiveContext(context)) {
    SetRecentError("aclrtDestroyContext: not a live context");
    return kRtErrParamInvalid;
  }
  if (context->default_stream) DestroyStream(context->default_stream);
  context->alive = false;
  if (current_context == context) current_context = nullptr;
  return kAclSuccess;
}

aclError SetCurrentContext(aclrtContext handle) {
  auto* context = static_cast<Context*>(handle);
  if (!IsLiveContext(context)) {
    SetRecentError("aclrtSetCurrentContext: not a live context");
    return kRtErrParamInvalid;
  }
  current_context = context;
  return kAclSuccess;
}

aclError GetCurrentContext(aclrtContext* handle) {
  if (handle == nullptr) return kRtErrParamInvalid;
  if (current_context == nullptr || !current_context->alive) return kRtErrContextNull;
  *handle = current_context;
  return kAclSuccess;
}

const char* SocName() {
  static thread_local std::string name;
  name = GetEnv("CANN_DOUBLE_SOC_NAME");
  if (name.empty()) name = kDefaultSocName;
  return name.c_str();
}

aclError SetSysParamOpt(int option, int64_t value) {
  if (option < 0 || option > 3) return kRtErrParamInvalid;
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  state.sys_params[option] = value;
  return kAclSuccess;
}

namespace {

// `option` as `context` reads it: its own value, else the process's, else 0.
int64_t SysParamOf(const State& state, const Context* context, int option) {
  auto own = context->sys_params.find(option);
  if (own != context->sys_params.end()) return own->second;
  auto process = state.sys_params.find(option);
  return process == state.sys_params.end() ? 0 : process->second;
}

}  // namespace

// Runs `access(state, context)` under the state's mutex on the calling
// thread's current context; 107002 without a live one.
template <typename Access>
aclError WithCurrentContext(const char* function, int option, Access&& access) {
  if (option < 0 || option > 3) return kRtErrParamInvalid;
  Context* context = current_context;
  if (!IsLiveContext(context)) {
    SetRecentError(std::string(function) + ": no live current context on this thread");
    return kRtErrContextNull;
  }
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  access(state, context);
  return kAclSuccess;
}

aclError CtxSetSysParamOpt(int option, int64_t value) {
  return WithCurrentContext("aclrtCtxSetSysParamOpt", option,
                            [&](State&, Context* context) { context->sys_params[option] = value; });
}

aclError CtxGetSysParamOpt(int option, int64_t* value) {
  if (value == nullptr) return kRtErrParamInvalid;
  return WithCurrentContext("aclrtCtxGetSysParamOpt", option, [&](State& state, Context* context) {
    *value = SysParamOf(state, context, option);
  });
}

int64_t DeviceSysParam(int device, int option) {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  auto found = state.default_contexts.find(device);
  if (found == state.default_contexts.end() || found->second == nullptr || !found->second->alive)
    return -1;
  return SysParamOf(state, found->second, option);
}

}  // namespace rt

namespace {

std::string BuildReport() {
  int64_t allocs, tensors, executors, int_arrays;
  cann_double_live_counts(&allocs, &tensors, &executors, &int_arrays);
  std::ostringstream out;
  State& state = GetState();
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    out << "violations: " << state.violations.size() << "\n";
    for (const std::string& violation : state.violations) out << "  " << violation << "\n";
  }
  out << "live: allocations=" << allocs << " tensors=" << tensors << " executors=" << executors
      << " int_arrays=" << int_arrays << " comms=" << LiveCommCount() << "\n";
  out << LiveAllocationSummary();
  return out.str();
}

// Runs when the process exits (or the core library is unloaded).
struct ExitReport {
  ~ExitReport() {
    CheckAllGuards();
    std::string report = BuildReport();
    std::string path = GetEnv("CANN_DOUBLE_REPORT");
    if (!path.empty()) {
      if (FILE* file = std::fopen(path.c_str(), "w")) {
        std::fputs(report.c_str(), file);
        std::fclose(file);
      }
    }
    bool clean =
        report.rfind("violations: 0\n", 0) == 0 &&
        report.find("allocations=0 tensors=0 executors=0 int_arrays=0") != std::string::npos;
    if (!clean) std::fprintf(stderr, "[cann_double] exit report:\n%s", report.c_str());
  }
} exit_report;

}  // namespace
}  // namespace cann_double

using namespace cann_double;

extern "C" {

void cann_double_live_counts(int64_t* allocs, int64_t* tensors, int64_t* executors,
                             int64_t* int_arrays) {
  if (allocs) *allocs = LiveAllocationCount();
  if (tensors) *tensors = LiveTensorCount();
  if (executors) *executors = LiveExecutorCount();
  if (int_arrays) *int_arrays = LiveIntArrayCount();
}

const char* cann_double_report() {
  static std::mutex mutex;
  static std::string report;
  std::lock_guard<std::mutex> lock(mutex);
  CheckAllGuards();
  report = BuildReport();
  return report.c_str();
}

int64_t cann_double_device_sys_param(int device, int option) {
  return rt::DeviceSysParam(device, option);
}

void cann_double_comm_counts(int64_t* live, int64_t* deterministic) {
  if (live) *live = LiveCommCount();
  if (deterministic) *deterministic = LiveDeterministicCommCount();
}

void cann_double_clear_report() {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  state.violations.clear();
}

int cann_double_device_set_counts(int64_t* counts, int capacity) {
  State& state = GetState();
  std::lock_guard<std::mutex> lock(state.mutex);
  for (int device = 0; counts != nullptr && device < capacity; ++device) {
    auto found = state.device_refcounts.find(device);
    counts[device] = found == state.device_refcounts.end() ? 0 : found->second;
  }
  return DeviceCount();
}

int cann_double_check_device_range(const void* ptr, size_t bytes) {
  std::string why;
  bool ok = CheckDeviceRange(ptr, bytes, &why);
  if (!ok) SetRecentError(why);
  return ok ? 1 : 0;
}
}
