// Tensor descriptors, int arrays and op executors, each tracked in a registry
// that tells a live handle from a destroyed one.
#include <deque>
#include <memory>
#include <set>
#include <unordered_map>

#include "core.h"

struct aclTensor {
  cann_double::TensorDesc desc;
};

struct aclIntArray {
  std::vector<int64_t> values;
};

struct aclOpExecutor {
  std::string function;
  uint64_t workspace_size = 0;
  cann_double::Kernel kernel;
  bool launched = false;  // phase 2 called; the kernel may still be queued
};

namespace cann_double {
namespace {

enum class HandleState { kLive, kDestroyed, kUnknown };

// Destroyed handles are kept (up to a bound) so a second destroy or a late
// use is told apart from a pointer that never was a handle.
template <typename T>
class HandleRegistry {
 public:
  T* Add(T* handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    states_[handle] = HandleState::kLive;
    ++live_;
    return handle;
  }

  HandleState State(const T* handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = states_.find(handle);
    return found == states_.end() ? HandleState::kUnknown : found->second;
  }

  // Marks a live handle destroyed; returns its state before.
  HandleState Retire(const T* handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = states_.find(handle);
    if (found == states_.end()) return HandleState::kUnknown;
    if (found->second != HandleState::kLive) return found->second;
    found->second = HandleState::kDestroyed;
    --live_;
    retired_.push_back(handle);
    if (retired_.size() > kKeptRetired) {
      states_.erase(retired_.front());
      delete retired_.front();
      retired_.pop_front();
    }
    return HandleState::kLive;
  }

  int64_t LiveCount() {
    std::lock_guard<std::mutex> lock(mutex_);
    return live_;
  }

 private:
  static constexpr size_t kKeptRetired = 65536;
  std::mutex mutex_;
  std::unordered_map<const T*, HandleState> states_;
  std::deque<const T*> retired_;
  int64_t live_ = 0;
};

template <typename T>
HandleRegistry<T>& Registry() {
  static auto* registry = new HandleRegistry<T>;
  return *registry;
}

std::string Pointer(const void* pointer) {
  char text[32];
  std::snprintf(text, sizeof text, "%p", pointer);
  return text;
}

bool KnownFormat(int format) {
  static const std::set<int> kFormats = {-1, 0,  1,  2,  3,  4,  12, 16, 27, 29,
                                         30, 32, 33, 35, 47, 50, 51, 52, 53, 54};
  return kFormats.count(format) > 0;
}

bool NonNegative(const std::vector<int64_t>& values) {
  for (int64_t value : values) {
    if (value < 0) return false;
  }
  return true;
}

int64_t Product(const std::vector<int64_t>& values) {
  int64_t product = 1;
  for (int64_t value : values) product *= value;
  return product;
}

std::vector<int64_t> ContiguousStrides(const std::vector<int64_t>& dims) {
  std::vector<int64_t> strides(dims.size(), 1);
  for (size_t i = dims.size(); i-- > 1;) strides[i - 1] = strides[i] * dims[i];
  return strides;
}

// Why `desc` is not a valid tensor, "" if it is.
std::string TensorProblem(const TensorDesc& desc) {
  int bits = DtypeBits(desc.dtype);
  if (bits == 0) return "unknown dtype " + std::to_string(desc.dtype);
  if (!KnownFormat(desc.format)) return "unknown format " + std::to_string(desc.format);
  if (!NonNegative(desc.view_dims)) return "negative view dim";
  if (!NonNegative(desc.strides)) return "negative stride";
  if (!NonNegative(desc.storage_dims)) return "negative storage dim";
  if (desc.offset < 0) return "negative offset";
  int64_t storage_elements = Product(desc.storage_dims);
  if (Product(desc.view_dims) > 0) {
    int64_t last = desc.offset;
    for (size_t i = 0; i < desc.view_dims.size(); ++i) {
      last += (desc.view_dims[i] - 1) * desc.strides[i];
    }
    if (last >= storage_elements) {
      return "view reaches element " + std::to_string(last) + " of a storage of " +
             std::to_string(storage_elements);
    }
  }
  if (desc.data == nullptr) return "";
  if (reinterpret_cast<uintptr_t>(desc.data) % 32 != 0) {
    return "data " + Pointer(desc.data) + " is not 32-byte aligned";
  }
  size_t storage_bytes = static_cast<size_t>((storage_elements * bits + 7) / 8);
  std::string why;
  if (!CheckDeviceRange(desc.data, storage_bytes, &why)) return "storage: " + why;
  return "";
}

// Checks an executor for phase 2; "" if it may run.
std::string ExecutorProblem(const char* function, aclOpExecutor* executor, aclnnStatus* status) {
  *status = kErrParamInvalid;
  if (executor == nullptr) {
    *status = kErrParamNullptr;
    return "executor is nullptr";
  }
  HandleState state = Registry<aclOpExecutor>().State(executor);
  if (state == HandleState::kUnknown) return "executor " + Pointer(executor) + " is unknown";
  if (state == HandleState::kDestroyed || executor->launched) {
    return "executor reused: phase 2 already ran it (executors are single-use; call " +
           std::string(function) + "GetWorkspaceSize again)";
  }
  if (executor->function != function) {
    return "executor was made by " + executor->function + "GetWorkspaceSize";
  }
  return "";
}

std::string WorkspaceProblem(aclOpExecutor* executor, void* workspace, uint64_t size,
                             aclnnStatus* status) {
  *status = kErrParamInvalid;
  if (size < executor->workspace_size) {
    return "workspace size " + std::to_string(size) + " < the " +
           std::to_string(executor->workspace_size) + " bytes phase 1 asked for";
  }
  if (size == 0) return "";
  if (workspace == nullptr) {
    *status = kErrParamNullptr;
    return "workspace is nullptr";
  }
  std::string why;
  return CheckDeviceRange(workspace, size, &why) ? "" : "workspace: " + why;
}

void RetireExecutor(aclOpExecutor* executor) { Registry<aclOpExecutor>().Retire(executor); }

}  // namespace

int DtypeBits(int dtype) {
  static const std::unordered_map<int, int> kBits = {
      {0, 32},  {1, 16},  {2, 8},  {3, 32},  {4, 8},    {6, 16},  {7, 16}, {8, 32}, {9, 64},
      {10, 64}, {11, 64}, {12, 8}, {16, 64}, {17, 128}, {27, 16}, {29, 4}, {30, 1}, {33, 32},
      {34, 8},  {35, 8},  {36, 8}, {37, 8},  {38, 6},   {39, 6},  {40, 4}, {41, 4}};
  auto found = kBits.find(dtype);
  return found == kBits.end() ? 0 : found->second;
}

const TensorDesc* Desc(const aclTensor* tensor) {
  if (tensor == nullptr) return nullptr;
  switch (Registry<aclTensor>().State(tensor)) {
    case HandleState::kLive:
      return &tensor->desc;
    case HandleState::kDestroyed:
      RecordViolation("use of destroyed aclTensor " + Pointer(tensor));
      return nullptr;
    default:
      RecordViolation(Pointer(tensor) + " is not an aclTensor");
      return nullptr;
  }
}

std::vector<int64_t> IntArrayValues(const aclIntArray* array, bool* ok) {
  bool live = array == nullptr || Registry<aclIntArray>().State(array) == HandleState::kLive;
  if (ok) *ok = live;
  if (!live) RecordViolation(Pointer(array) + " is not a live aclIntArray");
  return live && array ? array->values : std::vector<int64_t>{};
}

void ConsumeExecutor(aclOpExecutor* executor) {
  if (executor != nullptr && Registry<aclOpExecutor>().State(executor) == HandleState::kLive &&
      !executor->launched) {
    RetireExecutor(executor);
  }
}

aclOpExecutor* NewExecutor(const char* function, uint64_t workspace_size, Kernel kernel) {
  auto* executor = new aclOpExecutor;
  executor->function = function;
  executor->workspace_size = workspace_size;
  executor->kernel = std::move(kernel);
  return Registry<aclOpExecutor>().Add(executor);
}

aclnnStatus LaunchExecutor(const char* function, void* workspace, uint64_t workspace_size,
                           aclOpExecutor* executor, aclrtStream stream) {
  aclnnStatus status;
  std::string problem = ExecutorProblem(function, executor, &status);
  if (problem.empty()) problem = WorkspaceProblem(executor, workspace, workspace_size, &status);
  int device = StreamDevice(stream);
  if (problem.empty() && device < 0) {
    status = kErrParamInvalid;
    problem = "not a live stream";
  }
  if (!problem.empty()) {
    SetRecentError(std::string(function) + ": " + problem);
    ConsumeExecutor(executor);
    return status;
  }
  executor->launched = true;
  StreamTask task = [=](std::string* message) {
    std::string why;
    aclnnStatus result;
    if (workspace_size && !CheckDeviceRange(workspace, workspace_size, &why)) {
      *message = executor->function + " (on the stream): workspace: " + why;
      result = kRtErrAicoreException;
    } else {
      result = executor->kernel(workspace, workspace_size, device, message);
    }
    RetireExecutor(executor);
    return result;
  };
  if (Enqueue(function, stream, std::move(task)) != kAclSuccess) {
    executor->launched = false;
    ConsumeExecutor(executor);
    return kErrRuntime;
  }
  return kAclnnSuccess;
}

namespace nn {

aclTensor* CreateTensor(const int64_t* view_dims, uint64_t view_dims_num, int dtype,
                        const int64_t* strides, int64_t offset, int format,
                        const int64_t* storage_dims, uint64_t storage_dims_num, void* data) {
  if ((view_dims == nullptr && view_dims_num) || (storage_dims == nullptr && storage_dims_num)) {
    SetRecentError("aclCreateTensor: dims are nullptr");
    return nullptr;
  }
  auto tensor = std::make_unique<aclTensor>();
  TensorDesc& desc = tensor->desc;
  desc.view_dims.assign(view_dims, view_dims + view_dims_num);
  desc.strides = strides ? std::vector<int64_t>(strides, strides + view_dims_num)
                         : ContiguousStrides(desc.view_dims);
  desc.offset = offset;
  desc.dtype = dtype;
  desc.format = format;
  desc.storage_dims.assign(storage_dims, storage_dims + storage_dims_num);
  desc.data = data;
  std::string problem = TensorProblem(desc);
  if (!problem.empty()) {
    SetRecentError("aclCreateTensor: " + problem);
    return nullptr;
  }
  return Registry<aclTensor>().Add(tensor.release());
}

template <typename T>
aclnnStatus DestroyHandle(const T* handle, const char* what) {
  if (handle == nullptr) return kAclnnSuccess;
  HandleState before = Registry<T>().Retire(handle);
  if (before == HandleState::kLive) return kAclnnSuccess;
  RecordViolation(std::string(before == HandleState::kDestroyed ? "double destroy of "
                                                                : "destroy of unknown ") +
                  what + " " + Pointer(handle));
  return kErrParamInvalid;
}

aclnnStatus DestroyTensor(const aclTensor* tensor) { return DestroyHandle(tensor, "aclTensor"); }

aclIntArray* CreateIntArray(const int64_t* values, uint64_t size) {
  if (values == nullptr && size) {
    SetRecentError("aclCreateIntArray: values are nullptr");
    return nullptr;
  }
  auto* array = new aclIntArray;
  array->values.assign(values, values + size);
  return Registry<aclIntArray>().Add(array);
}

aclnnStatus DestroyIntArray(const aclIntArray* array) {
  return DestroyHandle(array, "aclIntArray");
}

aclnnStatus SetExecutorRepeatable(aclOpExecutor* executor) {
  if (executor == nullptr) return kErrParamNullptr;
  SetRecentError("aclSetAclOpExecutorRepeatable: repeatable executors are not supported for " +
                 (Registry<aclOpExecutor>().State(executor) == HandleState::kLive
                      ? executor->function
                      : std::string("this executor")));
  return kErrParamInvalid;
}

aclnnStatus DestroyExecutor(aclOpExecutor* executor) {
  if (executor != nullptr && Registry<aclOpExecutor>().State(executor) == HandleState::kLive &&
      executor->launched) {
    RecordViolation("aclDestroyAclOpExecutor: executor of " + executor->function +
                    " destroyed while its kernel is queued");
    return kErrParamInvalid;
  }
  return DestroyHandle(executor, "aclOpExecutor");
}

aclnnStatus Init() { return kAclnnSuccess; }
aclnnStatus Finalize() { return kAclnnSuccess; }

}  // namespace nn

int64_t LiveTensorCount() { return Registry<aclTensor>().LiveCount(); }
int64_t LiveIntArrayCount() { return Registry<aclIntArray>().LiveCount(); }
int64_t LiveExecutorCount() { return Registry<aclOpExecutor>().LiveCount(); }

}  // namespace cann_double
