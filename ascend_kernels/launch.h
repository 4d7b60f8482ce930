// The Ascend launch core: runs one whole MC2 aclnn operator (compute and
// HCCL communication inside CANN's kernel) on the ACL stream bound to a JAX
// device. Two ways in share it: the host bridge (XLA:CPU buffers, copied to
// the NPU and back) and device mode (XLA device buffers on an ACL stream).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace jax_mc2::ascend {

struct Status {
  bool ok = true;
  std::string message;
  static Status Ok() { return {}; }
  static Status Error(std::string m) { return {false, std::move(m)}; }
};

// ---- settings
void SetTimeoutMs(int32_t ms);  // aclrtSynchronizeStreamWithTimeout; -1 waits forever
int32_t TimeoutMs();
void SetDeterministic(bool on);  // ACL_OPT_DETERMINISTIC + HCCL_DETERMINISTIC
// (JAX device ordinal, NPU) pairs; an ordinal not bound uses NPU = ordinal.
void BindDevices(const std::vector<std::pair<int, int>>& ordinal_npu);
int NpuOf(int ordinal);

// ---- HCCL communicator registry, keyed by (group key, JAX device ordinal)
Status CommInitAll(const std::string& key, const std::vector<int>& ordinals);
Status GetRootInfo(int ordinal, std::string* bytes);

// Groups spanning processes. Every (re-)creation of a group's communicators
// is a generation named "<epoch>.<call>": epoch counts the creations at
// lowering (CommJoin), call is the group's call number at which the
// communicators were made (0 at the first lowering). Ranks number their calls
// on a group alike, so every process names the same generation.
//
// The exchange publishes (`publish` set: this process holds rank 0) or
// fetches the root info of generation `generation` of group `key` through the
// processes' key-value store, then waits there until every process of the
// group has it; it returns an error, never blocks, past `timeout_ms`.
using RootInfoExchange =
    std::function<Status(const std::string& key, const std::string& generation,
                         const std::string* publish, int timeout_ms, std::string* root_info)>;
void SetRootInfoExchange(RootInfoExchange exchange);  // empty: none
// This process's ranks (rank, ordinal) of an `nranks`-rank group join a new
// generation (at lowering), one thread each, concurrently. A compiled call
// re-creates a failed group itself (next generation, same exchange).
Status CommJoin(const std::string& key, int nranks,
                const std::vector<std::pair<int, int>>& rank_ordinals, int timeout_ms);
// The generation of a group's current communicators ("" if none).
std::string CommGeneration(const std::string& key);
bool HasComm(const std::string& key, int ordinal);
// The HCCL communicators that exist in this process (one per group and device).
size_t CommCount();
std::string CommName(const std::string& key, int ordinal);
// Destroys communicators, frees pooled memory and streams, and resets the
// devices. A device whose stream wait fails (a kernel of a failed call may
// still run) keeps its stream, communicators and that call's buffers
// (leaked) and is not reset; a later call makes its state afresh.
void Shutdown();
std::string SocName(Status* status);
int DeviceCount(Status* status);

// ---- one operator call
struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;
};
struct CallIo {
  std::vector<Buffer> operands;
  std::vector<Buffer> results;
  bool host = true;        // host bridge: copy in and out
  void* stream = nullptr;  // device mode: XLA's aclrtStream
};

// Where the host bridge's calls spent their time (nanoseconds, summed over
// the successful calls since the last reset): copies in and out, the stream
// wait, the two aclnn phases (CANN's own time), and the total.
struct Timings {
  int64_t calls = 0, copy_in = 0, copy_out = 0, wait = 0, phase1 = 0, phase2 = 0, total = 0;
  int64_t bytes_in = 0, bytes_out = 0;
};
Timings TimingTotals();
void ResetTimings();
// Host-to-device and device-to-host copy time (seconds) of `reps` copies of
// `bytes` through the bridge's copy path on `ordinal`'s NPU.
Status CopyBenchmark(int ordinal, size_t bytes, int reps, double* h2d, double* d2h);
// How many operator calls the launch core has started (all devices).
int64_t LaunchCount();

// `spec` describes the aclnn function's arguments (see the Python side,
// jax_mc2/ascend/_spec.py, for the grammar); `group_key` names the
// communicator of this call's replica group.
Status Launch(int ordinal, std::string_view op, std::string_view function, std::string_view spec,
              std::string_view group_key, const CallIo& io);

}  // namespace jax_mc2::ascend
