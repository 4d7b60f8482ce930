// Device memory: host allocations with guard bytes, a registry of live and
// recently freed blocks, and the copy functions.
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <sstream>

#include "core.h"

namespace cann_double {
namespace {

constexpr size_t kGuardBytes = 64;
// Blocks start 64 bytes past a 128-byte boundary: exactly the alignment ACL
// promises, no more, so code that assumes a larger one is caught.
constexpr size_t kRawAlignment = 128;
constexpr unsigned char kGuardByte = 0xFD;
// 0xFF bytes read as NaN in fp32/fp16/bf16 and -1 in integers.
constexpr unsigned char kGarbageByte = 0xFF;
constexpr unsigned char kFreedByte = 0xDD;
// Freed blocks stay mapped (and poisoned) up to this budget, so a late use is
// reported as use after free instead of hitting a reused block.
constexpr size_t kQuarantineBytes = size_t{256} << 20;
constexpr size_t kQuarantineBlocks = 16384;

struct Allocation {
  unsigned char* raw = nullptr;
  size_t raw_size = 0;
  unsigned char* user = nullptr;
  size_t size = 0;
  int device = -1;
  uint64_t id = 0;
};

struct Registry {
  std::mutex mutex;
  std::map<uintptr_t, Allocation> live;   // by user address
  std::map<uintptr_t, Allocation> freed;  // quarantine, by user address
  std::deque<uintptr_t> freed_order;
  size_t freed_bytes = 0;
  uint64_t next_id = 1;
};

Registry& GetRegistry() {
  static Registry* registry = new Registry;
  return *registry;
}

EnvCountdown malloc_failure("CANN_DOUBLE_FAIL_MALLOC");

std::string Describe(const Allocation& block) {
  std::ostringstream out;
  out << "allocation #" << block.id << " (" << block.size << " bytes at "
      << static_cast<const void*>(block.user) << ", device " << block.device << ")";
  return out.str();
}

// The block of `blocks` whose [user, user + size] holds `address`, or nullptr.
const Allocation* Containing(const std::map<uintptr_t, Allocation>& blocks, uintptr_t address) {
  auto after = blocks.upper_bound(address);
  if (after == blocks.begin()) return nullptr;
  const Allocation& block = std::prev(after)->second;
  uintptr_t begin = reinterpret_cast<uintptr_t>(block.user);
  return address <= begin + block.size ? &block : nullptr;
}

// Where the guard of `block` was overwritten; -1 if intact. Offsets are
// relative to the user pointer (negative: before it).
int64_t CorruptedGuardOffset(const Allocation& block) {
  for (unsigned char* p = block.raw; p < block.user; ++p) {
    if (*p != kGuardByte) return p - block.user;
  }
  for (unsigned char* p = block.user + block.size; p < block.raw + block.raw_size; ++p) {
    if (*p != kGuardByte) return p - block.user;
  }
  return -1;
}

// Records a violation if the guards of `block` were overwritten and repairs
// them, so one overflow is reported once.
void CheckGuards(const Allocation& block) {
  int64_t offset = CorruptedGuardOffset(block);
  if (offset == -1) return;
  RecordViolation("guard corruption (out-of-bounds write) at offset " + std::to_string(offset) +
                  " of " + Describe(block));
  std::memset(block.raw, kGuardByte, block.user - block.raw);
  std::memset(block.user + block.size, kGuardByte,
              block.raw + block.raw_size - block.user - block.size);
}

void Quarantine(Registry& registry, const Allocation& block) {
  std::memset(block.user, kFreedByte, block.size);
  uintptr_t key = reinterpret_cast<uintptr_t>(block.user);
  registry.freed[key] = block;
  registry.freed_order.push_back(key);
  registry.freed_bytes += block.raw_size;
  while (registry.freed_bytes > kQuarantineBytes ||
         registry.freed_order.size() > kQuarantineBlocks) {
    auto oldest = registry.freed.find(registry.freed_order.front());
    registry.freed_order.pop_front();
    registry.freed_bytes -= oldest->second.raw_size;
    std::free(oldest->second.raw);
    registry.freed.erase(oldest);
  }
}

// Why `address`, not the start of a live block, cannot be freed.
std::string DescribeBadFree(Registry& registry, uintptr_t address) {
  std::ostringstream what;
  std::lock_guard<std::mutex> lock(registry.mutex);
  auto freed = registry.freed.find(address);
  if (freed != registry.freed.end()) {
    what << "double free of " << Describe(freed->second);
  } else if (const Allocation* inner = Containing(registry.live, address)) {
    what << "free of " << reinterpret_cast<void*>(address) << ", inside " << Describe(*inner)
         << " but not its start";
  } else {
    what << "free of unknown pointer " << reinterpret_cast<void*>(address);
  }
  return what.str();
}

}  // namespace

bool CheckDeviceRange(const void* ptr, size_t bytes, std::string* why) {
  std::string reason;
  uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  Registry& registry = GetRegistry();
  {
    std::lock_guard<std::mutex> lock(registry.mutex);
    if (const Allocation* block = Containing(registry.live, address)) {
      uintptr_t end = reinterpret_cast<uintptr_t>(block->user) + block->size;
      if (bytes <= end - address) return true;
      reason = "range of " + std::to_string(bytes) + " bytes at offset " +
               std::to_string(address - reinterpret_cast<uintptr_t>(block->user)) +
               " runs past the end of " + Describe(*block);
    } else if (const Allocation* block = Containing(registry.freed, address)) {
      reason = "use after free: " + std::to_string(bytes) + " bytes at " +
               std::to_string(address - reinterpret_cast<uintptr_t>(block->user)) + " into freed " +
               Describe(*block);
    } else {
      std::ostringstream out;
      out << ptr << " is not device memory (no live aclrtMalloc block holds it)";
      reason = out.str();
    }
  }
  if (reason.rfind("use after free", 0) == 0) RecordViolation(reason);
  if (why) *why = reason;
  return false;
}

bool CheckCopyRange(const void* ptr, size_t bytes, bool on_device, const char* side,
                    std::string* why) {
  if (ptr == nullptr) {
    *why = std::string(side) + " is nullptr";
    return false;
  }
  if (on_device) {
    if (CheckDeviceRange(ptr, bytes, why)) return true;
    *why = std::string(side) + ": " + *why;
    return false;
  }
  Registry& registry = GetRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  uintptr_t address = reinterpret_cast<uintptr_t>(ptr);
  if (Containing(registry.live, address) || Containing(registry.freed, address)) {
    *why = std::string(side) + " is device memory but the copy kind says host";
    return false;
  }
  return true;
}

int64_t LiveAllocationCount() {
  Registry& registry = GetRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  return static_cast<int64_t>(registry.live.size());
}

void CheckAllGuards() {
  Registry& registry = GetRegistry();
  std::vector<Allocation> blocks;
  {
    std::lock_guard<std::mutex> lock(registry.mutex);
    for (const auto& entry : registry.live) blocks.push_back(entry.second);
  }
  for (const Allocation& block : blocks) CheckGuards(block);
}

std::string LiveAllocationSummary() {
  constexpr int kListed = 10;
  Registry& registry = GetRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  std::string summary;
  int listed = 0;
  for (const auto& entry : registry.live) {
    if (listed++ == kListed) break;
    summary += "  leaked " + Describe(entry.second) + "\n";
  }
  return summary;
}

namespace rt {

aclError Malloc(void** pointer, size_t size, int /*policy*/) {
  if (pointer == nullptr || size == 0) {
    SetRecentError("aclrtMalloc: null result pointer or zero size");
    return kRtErrParamInvalid;
  }
  int device = CurrentDevice();
  if (device < 0) {
    SetRecentError("aclrtMalloc: no device set on this thread (call aclrtSetDevice first)");
    return kRtErrContextNull;
  }
  if (malloc_failure.Fire()) {
    SetRecentError("aclrtMalloc: out of device memory (injected by CANN_DOUBLE_FAIL_MALLOC)");
    return kRtErrMemoryAllocation;
  }
  size_t raw_size =
      (kGuardBytes + size + kGuardBytes + kRawAlignment - 1) / kRawAlignment * kRawAlignment;
  auto* raw = static_cast<unsigned char*>(std::aligned_alloc(kRawAlignment, raw_size));
  if (raw == nullptr) {
    SetRecentError("aclrtMalloc: host allocation of " + std::to_string(size) + " bytes failed");
    return kRtErrMemoryAllocation;
  }
  Allocation block{raw, raw_size, raw + kGuardBytes, size, device, 0};
  std::memset(raw, kGuardByte, raw_size);
  std::memset(block.user, kGarbageByte, size);
  Registry& registry = GetRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  block.id = registry.next_id++;
  registry.live[reinterpret_cast<uintptr_t>(block.user)] = block;
  *pointer = block.user;
  return kAclSuccess;
}

aclError Free(void* pointer) {
  if (pointer == nullptr) {
    SetRecentError("aclrtFree: nullptr");
    return kRtErrParamInvalid;
  }
  Registry& registry = GetRegistry();
  uintptr_t address = reinterpret_cast<uintptr_t>(pointer);
  Allocation block;
  {
    std::lock_guard<std::mutex> lock(registry.mutex);
    auto found = registry.live.find(address);
    if (found != registry.live.end()) {
      block = found->second;
      registry.live.erase(found);
    }
  }
  if (block.user == nullptr) {
    RecordViolation("aclrtFree: " + DescribeBadFree(registry, address));
    return kRtErrParamInvalid;
  }
  CheckGuards(block);
  std::lock_guard<std::mutex> lock(registry.mutex);
  Quarantine(registry, block);
  return kAclSuccess;
}

namespace {

// Which sides of a copy kind are device memory; false if the kind is unknown.
bool CopySides(int kind, const void* dst, const void* src, bool* dst_device, bool* src_device) {
  switch (kind) {
    case 0:
      *dst_device = false, *src_device = false;
      return true;  // host to host
    case 1:
    case 5:
      *dst_device = true, *src_device = false;
      return true;  // host to device
    case 2:
      *dst_device = false, *src_device = true;
      return true;  // device to host
    case 3:
    case 6:
    case 7:
      *dst_device = true, *src_device = true;
      return true;  // device to device
    case 4: {       // default: inferred from the addresses
      std::string ignored;
      *dst_device = !CheckCopyRange(dst, 0, false, "dst", &ignored);
      *src_device = !CheckCopyRange(src, 0, false, "src", &ignored);
      return true;
    }
    default:
      return false;
  }
}

// Checks a copy; returns kAclSuccess or an error with `why` set.
aclError CheckCopy(void* dst, size_t dst_max, const void* src, size_t count, int kind,
                   std::string* why) {
  bool dst_device, src_device;
  if (!CopySides(kind, dst, src, &dst_device, &src_device)) {
    *why = "unknown memcpy kind " + std::to_string(kind);
    return kRtErrParamInvalid;
  }
  if (count > dst_max) {
    *why = "count " + std::to_string(count) + " exceeds destMax " + std::to_string(dst_max);
    return kRtErrParamInvalid;
  }
  if (count == 0) return kAclSuccess;
  if (!CheckCopyRange(dst, count, dst_device, "dst", why) ||
      !CheckCopyRange(src, count, src_device, "src", why)) {
    return kRtErrParamInvalid;
  }
  return kAclSuccess;
}

}  // namespace

aclError Memcpy(void* dst, size_t dst_max, const void* src, size_t count, int kind) {
  std::string why;
  aclError status = CheckCopy(dst, dst_max, src, count, kind, &why);
  if (status != kAclSuccess) {
    SetRecentError("aclrtMemcpy: " + why);
    return status;
  }
  if (count) std::memmove(dst, src, count);
  return kAclSuccess;
}

aclError MemcpyAsync(void* dst, size_t dst_max, const void* src, size_t count, int kind,
                     aclrtStream stream) {
  std::string why;
  aclError status = CheckCopy(dst, dst_max, src, count, kind, &why);
  if (status != kAclSuccess) {
    SetRecentError("aclrtMemcpyAsync: " + why);
    return status;
  }
  // Checked again when it runs: the memory may have been freed meanwhile.
  StreamTask task = [=](std::string* message) {
    std::string late_why;
    if (CheckCopy(dst, dst_max, src, count, kind, &late_why) != kAclSuccess) {
      *message = "aclrtMemcpyAsync (when run on the stream): " + late_why;
      return kRtErrAicoreException;
    }
    if (count) std::memmove(dst, src, count);
    return kAclSuccess;
  };
  return Enqueue("aclrtMemcpyAsync", stream, std::move(task));
}

}  // namespace rt
}  // namespace cann_double
