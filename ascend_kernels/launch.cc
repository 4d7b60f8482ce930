// The launch core (see launch.h and docs/ascend.md).
#include "launch.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <unordered_map>

#include "cann_abi.h"
#include "loader.h"

namespace jax_mc2::ascend {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string RecentErr(const Cann& c) {
  const char* m = c.aclGetRecentErrMsg ? c.aclGetRecentErrMsg() : nullptr;
  return (m && *m) ? std::string(m) : std::string("(no message)");
}

std::atomic<int32_t> g_timeout_ms{[] {
  const char* v = std::getenv("JAX_MC2_ASCEND_TIMEOUT_MS");
  return v ? std::atoi(v) : 120000;
}()};
std::atomic<bool> g_deterministic{false};
std::mutex g_bind_mu;
std::map<int, int> g_npus;  // JAX device ordinal -> NPU

std::mutex g_timing_mu;
Timings g_timings;
std::atomic<int64_t> g_launches{0};

// ---------------------------------------------------------------- devices

// A stream-ordered pool of device memory for one stream. Blocks go back to
// the free list only after the stream has synchronized past the kernel that
// used them; after a failed synchronization they are quarantined until the
// stream next synchronizes cleanly (Shutdown frees them only then, too).
struct Pool {
  std::multimap<size_t, void*> free_blocks;
  std::vector<std::pair<size_t, void*>> quarantine;
};

struct DeviceState {
  int ordinal = -1;
  int npu = -1;
  aclrtContext ctx = nullptr;
  aclrtStream stream = nullptr;
  std::mutex mu;  // one call at a time on this device's stream
  Pool pool;
  bool dirty = false;  // a failed call may have left work on the stream
  // ACL_OPT_DETERMINISTIC as last set on this context (the default: off);
  // any thread that enters the device may set it.
  std::atomic<bool> deterministic{false};
  bool retired = false;  // Shutdown has released it (under mu)
};

std::mutex g_dev_mu;
std::map<int, std::unique_ptr<DeviceState>> g_devices;
// States Shutdown released: kept, not freed, since a call that looked its
// device up before Shutdown may still wait for the state's lock; it finds
// the state retired (guarded by g_dev_mu).
std::vector<std::unique_ptr<DeviceState>> g_retired;

Status Fail(const Cann& c, const std::string& what, int code) {
  return Status::Error(what + " failed with status " + std::to_string(code) + ": " + RecentErr(c));
}

// Sets ACL_OPT_DETERMINISTIC on `d`'s context (the calling thread's current
// one) when configure(deterministic=...) asks for another value than the
// context has: so a change after the first call reaches the contexts made
// before it.
Status ApplyDeterminism(const Cann& c, DeviceState* d) {
  const bool want = g_deterministic.load();
  if (want == d->deterministic.load()) return Status::Ok();
  if (c.aclrtCtxSetSysParamOpt == nullptr)
    return Status::Error(
        "configure(deterministic=True): aclrtCtxSetSysParamOpt not found in "
        "libascendcl.so");
  const aclError rc = c.aclrtCtxSetSysParamOpt(kOptDeterministic, want ? 1 : 0);
  if (rc != kAclSuccess)
    return Fail(c, "aclrtCtxSetSysParamOpt(ACL_OPT_DETERMINISTIC, " + std::to_string(want) + ")",
                rc);
  d->deterministic.store(want);
  return Status::Ok();
}

// The state of JAX device `ordinal`, made on first use. Making it is the one
// aclrtSetDevice of the device (it also makes the calling thread's current
// device that one): ACL counts every aclrtSetDevice of the process and
// releases the device's default context only when as many aclrtResetDevice
// calls have brought the count back to 0, so each set is paired with the one
// reset in Shutdown, or undone here when making the state fails.
Status GetDevice(const Cann& c, int ordinal, DeviceState** out) {
  std::lock_guard<std::mutex> lock(g_dev_mu);
  auto it = g_devices.find(ordinal);
  if (it != g_devices.end()) {
    *out = it->second.get();
    return Status::Ok();
  }
  auto d = std::make_unique<DeviceState>();
  d->ordinal = ordinal;
  d->npu = NpuOf(ordinal);
  aclError rc = c.aclrtSetDevice(d->npu);
  if (rc != kAclSuccess)
    return Fail(
        c,
        "aclrtSetDevice(" + std::to_string(d->npu) + ") for JAX device " + std::to_string(ordinal),
        rc);
  Status s;
  if ((rc = c.aclrtGetCurrentContext(&d->ctx)) != kAclSuccess) {
    s = Fail(c, "aclrtGetCurrentContext", rc);
  } else if ((rc = c.aclrtCreateStream(&d->stream)) != kAclSuccess) {
    s = Fail(c, "aclrtCreateStream", rc);
  }
  if (!s.ok) {
    c.aclrtResetDevice(d->npu);  // the set above (nothing was made in the context)
    return s;
  }
  *out = d.get();
  g_devices.emplace(ordinal, std::move(d));
  return Status::Ok();
}

// Binds the calling thread to the device: XLA runs handlers on its worker
// threads (and HCCL creations run on threads of their own), so every entry
// point that calls CANN for a device enters it first. Adopting the device's
// context is enough: a context of another device also switches the thread's
// device, and an aclrtSetDevice here would add to ACL's count of the device
// at every call, never to be balanced.
Status Enter(const Cann& c, DeviceState* d) {
  aclError rc = c.aclrtSetCurrentContext(d->ctx);
  if (rc != kAclSuccess)
    return Fail(c, "aclrtSetCurrentContext (NPU " + std::to_string(d->npu) + ")", rc);
  return ApplyDeterminism(c, d);
}

// CANN, loaded, and the state of JAX device `ordinal` (set up on first use).
Status OpenDevice(int ordinal, const Cann** c, DeviceState** d) {
  std::string why;
  *c = LoadCann(&why);
  if (*c == nullptr) return Status::Error(why);
  return GetDevice(**c, ordinal, d);
}

size_t RoundUp(size_t n) { return (n + 511) & ~size_t{511}; }

// A block of at least `bytes` from the pool (a cached one of at most twice
// the size + 1 MiB) or from aclrtMalloc; `*size` is the block's own size,
// under which it goes back to the pool (filing a larger cached block under
// the smaller request would keep it from every request of its real size and
// grow the pool).
void* Acquire(const Cann& c, Pool& pool, size_t bytes, aclError* rc, size_t* size) {
  bytes = RoundUp(bytes == 0 ? 1 : bytes);
  auto it = pool.free_blocks.lower_bound(bytes);
  if (it != pool.free_blocks.end() && it->first <= 2 * bytes + (1 << 20)) {
    void* p = it->second;
    *size = it->first;
    pool.free_blocks.erase(it);
    *rc = kAclSuccess;
    return p;
  }
  *size = bytes;
  void* p = nullptr;
  *rc = c.aclrtMalloc(&p, bytes, kMallocHugeFirst);
  if (*rc != kAclSuccess && !pool.free_blocks.empty()) {  // give the cache back, retry once
    for (auto& [sz, blk] : pool.free_blocks) c.aclrtFree(blk);
    pool.free_blocks.clear();
    *rc = c.aclrtMalloc(&p, bytes, kMallocHugeFirst);
  }
  return *rc == kAclSuccess ? p : nullptr;
}

struct Held {  // blocks one call holds, with their pool sizes
  std::vector<std::pair<size_t, void*>> blocks;
};

void ReleaseAll(const Cann& c, Pool& pool, Held& held, bool stream_clean) {
  if (stream_clean) {
    for (auto& q : pool.quarantine) pool.free_blocks.emplace(q.first, q.second);
    pool.quarantine.clear();
    for (auto& b : held.blocks) pool.free_blocks.emplace(b.first, b.second);
  } else {
    for (auto& b : held.blocks) pool.quarantine.push_back(b);
  }
  held.blocks.clear();
  (void)c;
}

// The pool blocks one call takes, held until it ends (ReleaseAll).
struct CallMemory {
  const Cann& c;
  Pool& pool;
  Held held;

  // A block of at least `bytes` in *out; aclrtMalloc's failure is an error
  // naming `fn` and what the block was for (`what`: "" for plain bytes).
  Status Take(const std::string& fn, size_t bytes, void** out, const std::string& what = "") {
    aclError rc;
    size_t size = 0;
    *out = Acquire(c, pool, bytes, &rc, &size);
    if (*out == nullptr) {
      const std::string n = std::to_string(bytes);
      return Status::Error(fn + ": aclrtMalloc of " +
                           (what.empty() ? n + " bytes" : "the " + n + "-byte " + what) +
                           " failed with status " + std::to_string(rc) + ": " + RecentErr(c));
    }
    held.blocks.emplace_back(size, *out);
    return Status::Ok();
  }
};

// ---------------------------------------------------------------- communicators

struct CommEntry {
  HcclComm comm = nullptr;
  std::string name;
  int rank = 0;
};
std::mutex g_comm_mu;
std::map<std::pair<std::string, int>, CommEntry> g_comms;

// What a communicator group was made from, kept across Shutdown so that a
// compiled call finds (or re-creates) its communicators: a group whose
// collective failed is marked broken and re-created by the next call that
// needs it.
//
// Ranks run the same sequence of calls on a group, so each device counts its
// calls per group (every call, failed or not): a failure in call n marks the
// group broken at n, and the first of this process's ranks to start a later
// call m re-creates this process's communicators of the group (never a rank
// still in call n, whose peers may be using the communicators). A group whose
// ranks all live here is re-made with HcclCommInitAll. A group spanning
// processes is re-made as generation "<epoch>.<m>": the root info of that
// generation travels through the key-value store (RootInfoExchange), so every
// process re-creates the same generation at the same call and a stale one can
// never be joined.
struct GroupDef {
  std::vector<int> ordinals;
  bool init_all = false;
  int64_t broken_at = -1;        // the call whose collective failed, -1 if none
  int64_t recreated_at = 0;      // the call that created the current communicators
  int64_t attempted_at = -1;     // the last call that tried to re-create them
  std::string attempt_error;     // and why that failed
  std::map<int, int64_t> calls;  // calls per device ordinal
  // Groups spanning processes:
  int nranks = 0;
  std::vector<std::pair<int, int>> rank_ordinals;  // this process's (rank, ordinal)
  int64_t epoch = -1;                              // creations at lowering, minus one
  std::string generation;                          // of the current communicators
  std::mutex mu;
};
std::map<std::string, std::shared_ptr<GroupDef>> g_groups;  // guarded by g_comm_mu

// The group's definition, added empty on first use.
std::shared_ptr<GroupDef> FindOrAddGroup(const std::string& key) {
  std::lock_guard<std::mutex> lock(g_comm_mu);
  auto& slot = g_groups[key];
  if (!slot) slot = std::make_shared<GroupDef>();
  return slot;
}

// Whether every device of the group has an unbroken communicator (the
// caller holds g_comm_mu).
bool IsLive(const std::string& key, const GroupDef& def) {
  for (int o : def.ordinals)
    if (g_comms.count({key, o}) == 0) return false;
  return def.broken_at < 0;
}

// The highest call count among the group's devices (the caller holds def.mu).
int64_t LatestCall(const GroupDef& def) {
  int64_t latest = 0;
  for (auto& [o, n] : def.calls) latest = std::max(latest, n);
  return latest;
}

std::string HcclErr(const Cann& c, HcclResult r) {
  const char* s = c.HcclGetErrorString ? c.HcclGetErrorString(r) : nullptr;
  return std::to_string(r) + (s ? std::string(" (") + s + ")" : "");
}

// HCCL_DETERMINISTIC as last set by HcclSetConfig: -1 never (HCCL's default).
std::atomic<int> g_hccl_deterministic{-1};

// HCCL_DETERMINISTIC for the communicators made next: set when
// configure(deterministic=True) asks for it, and set back to 0 when it is
// turned off after that (HCCL's setting is process-wide and outlives the
// communicators made under it).
Status ApplyHcclDeterminism(const Cann& c) {
  const int want = g_deterministic.load() ? 1 : 0;
  const int set = g_hccl_deterministic.load();
  if (want == set || (want == 0 && set < 0)) return Status::Ok();
  if (c.HcclSetConfig == nullptr)
    return Status::Error("configure(deterministic=" + std::string(want ? "True" : "False") +
                         "): HcclSetConfig not found in libhccl.so");
  const HcclResult r = c.HcclSetConfig(kHcclDeterministic, want);
  if (r != 0)
    return Status::Error("HcclSetConfig(HCCL_DETERMINISTIC, " + std::to_string(want) +
                         ") failed with HcclResult " + HcclErr(c, r));
  g_hccl_deterministic.store(want);
  return Status::Ok();
}

// ---------------------------------------------------------------- argument spec

struct Slot {
  char kind = 0;  // t tensor, n null, s string, g group, i int, d double, b bool, a int array
  char src = 'o';
  int index = 0;
  int dtype = -1, format = 2;
  int64_t offset = 0;
  std::vector<int64_t> dims, strides, storage;
  std::string text;
  int64_t i = 0;
  double d = 0;
};
struct Spec {
  std::vector<Slot> slots;
  std::vector<std::pair<int, int>> readback;     // (result, operand) aliases
  std::vector<std::pair<int, int64_t>> partial;  // (result, bytes the kernel writes)
  bool uses_group = false;
};

std::vector<int64_t> Ints(const std::string& s) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    if (end > pos) out.push_back(std::stoll(s.substr(pos, end - pos)));
    pos = end + 1;
  }
  return out;
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (true) {
    size_t end = s.find(sep, pos);
    out.push_back(s.substr(pos, end == std::string::npos ? std::string::npos : end - pos));
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  return out;
}

// Grammar: slots separated by ';'.
// t<o|r><index>/<dtype>/<format>/<offset>/<dims>/<strides>/<storage> (csv lists), n, s<text>, g,
// i<int>, d<double>, b<0|1>, a<csv>, and x<result>=<operand> (not an argument: result read back
// from the operand's device buffer), c<result>=<bytes> (not an argument: the kernel writes the
// result's first bytes; the rest is zero). The attribute may hold one spec per communicator rank,
// separated by '\n'.
bool ParseSpec(const std::string& text, Spec* spec, std::string* err) {
  try {
    for (const std::string& item : Split(text, ';')) {
      if (item.empty()) continue;
      Slot s;
      s.kind = item[0];
      const std::string body = item.substr(1);
      switch (s.kind) {
        case 't': {
          auto f = Split(body, '/');
          if (f.size() != 7 || f[0].size() < 2) throw std::runtime_error("bad tensor " + item);
          s.src = f[0][0];
          s.index = std::stoi(f[0].substr(1));
          s.dtype = std::stoi(f[1]);
          s.format = std::stoi(f[2]);
          s.offset = std::stoll(f[3]);
          s.dims = Ints(f[4]);
          s.strides = Ints(f[5]);
          s.storage = Ints(f[6]);
          if (s.strides.size() != s.dims.size()) throw std::runtime_error("bad strides " + item);
          break;
        }
        case 'x': {
          auto f = Split(body, '=');
          spec->readback.emplace_back(std::stoi(f.at(0)), std::stoi(f.at(1)));
          continue;
        }
        case 'c': {
          auto f = Split(body, '=');
          spec->partial.emplace_back(std::stoi(f.at(0)), std::stoll(f.at(1)));
          continue;
        }
        case 'g':
          spec->uses_group = true;
          break;
        case 'n':
          break;
        case 's':
          s.text = body;
          break;
        case 'i':
        case 'b':
          s.i = std::stoll(body);
          break;
        case 'd':
          s.d = std::stod(body);
          break;
        case 'a':
          s.dims = Ints(body);
          break;
        default:
          throw std::runtime_error("unknown slot kind in " + item);
      }
      spec->slots.push_back(std::move(s));
    }
  } catch (const std::exception& e) {
    *err = std::string("malformed argument spec: ") + e.what();
    return false;
  }
  return true;
}

// The parsed specs of an attribute (one per rank, or one for all).
const std::vector<Spec>* CachedSpecs(std::string_view text, std::string* err) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<std::vector<Spec>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  std::string key(text);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.get();
  auto specs = std::make_unique<std::vector<Spec>>();
  for (const std::string& one : Split(key, '\n')) {
    specs->emplace_back();
    if (!ParseSpec(one, &specs->back(), err)) return nullptr;
  }
  return cache.emplace(key, std::move(specs)).first->second.get();
}

// ---------------------------------------------------------------- typed calls

struct ArgVal {
  char kind = 0;
  aclTensor* tensor = nullptr;
  const aclIntArray* array = nullptr;
  const char* str = nullptr;
  int64_t i = 0;
  double d = 0;
};

namespace kinds {
struct T {};
struct O {};
struct S {};
struct G {};
struct I {};
struct D {};
struct B {};
struct A {};
}  // namespace kinds

template <typename K>
struct Param;
// A tensor slot ('n': nullptr) passed as `Type` (const for inputs).
template <typename Type>
struct TensorParam {
  using type = Type;
  static bool Accept(char k) { return k == 't' || k == 'n'; }
  static type Get(const ArgVal& a) { return a.tensor; }
};
template <>
struct Param<kinds::T> : TensorParam<const aclTensor*> {};
template <>
struct Param<kinds::O> : TensorParam<aclTensor*> {};
// A string slot of kind `Kind` ('s' a string, 'g' the group name).
template <char Kind>
struct StringParam {
  using type = const char*;
  static bool Accept(char k) { return k == Kind; }
  static type Get(const ArgVal& a) { return a.str; }
};
template <>
struct Param<kinds::S> : StringParam<'s'> {};
template <>
struct Param<kinds::G> : StringParam<'g'> {};
template <>
struct Param<kinds::I> {
  using type = int64_t;
  static bool Accept(char k) { return k == 'i'; }
  static type Get(const ArgVal& a) { return a.i; }
};
template <>
struct Param<kinds::D> {
  using type = double;
  static bool Accept(char k) { return k == 'd'; }
  static type Get(const ArgVal& a) { return a.d; }
};
template <>
struct Param<kinds::B> {
  using type = bool;
  static bool Accept(char k) { return k == 'b'; }
  static type Get(const ArgVal& a) { return a.i != 0; }
};
template <>
struct Param<kinds::A> {
  using type = const aclIntArray*;
  static bool Accept(char k) { return k == 'a'; }
  static type Get(const ArgVal& a) { return a.array; }
};

using Caller = bool (*)(void* fn, const std::vector<ArgVal>&, uint64_t*, aclOpExecutor**,
                        aclnnStatus*, std::string*);

template <typename... K, size_t... Idx>
aclnnStatus CallImpl(void* fn, const std::vector<ArgVal>& a, uint64_t* ws, aclOpExecutor** ex,
                     std::index_sequence<Idx...>) {
  using Fn = aclnnStatus (*)(typename Param<K>::type..., uint64_t*, aclOpExecutor**);
  return reinterpret_cast<Fn>(fn)(Param<K>::Get(a[Idx])..., ws, ex);
}

template <typename... K>
bool Call(void* fn, const std::vector<ArgVal>& a, uint64_t* ws, aclOpExecutor** ex,
          aclnnStatus* status, std::string* err) {
  if (a.size() != sizeof...(K)) {
    *err = "argument spec has " + std::to_string(a.size()) + " arguments, the function takes " +
           std::to_string(sizeof...(K));
    return false;
  }
  static constexpr bool (*accept[])(char) = {&Param<K>::Accept...};
  for (size_t i = 0; i < a.size(); ++i) {
    if (!accept[i](a[i].kind)) {
      *err = "argument " + std::to_string(i) + " of the spec has the wrong kind '" +
             std::string(1, a[i].kind) + "'";
      return false;
    }
  }
  *status = CallImpl<K...>(fn, a, ws, ex, std::index_sequence_for<K...>{});
  return true;
}

const std::unordered_map<std::string, Caller>& Callers() {
  using namespace kinds;
  static const auto* table = new std::unordered_map<std::string, Caller>{
#define ACLNN_OP(name, ...) {"aclnn" #name, &Call<__VA_ARGS__>},
#include "aclnn_ops.def"
#undef ACLNN_OP
  };
  return *table;
}

// Destroys the descriptors of one call on every path.
struct Descriptors {
  const Cann* c;
  std::vector<aclTensor*> tensors;
  std::vector<aclIntArray*> arrays;
  ~Descriptors() {
    for (auto* t : tensors) c->aclDestroyTensor(t);
    for (auto* a : arrays) c->aclDestroyIntArray(a);
  }
};

}  // namespace

// ---------------------------------------------------------------- settings

void SetTimeoutMs(int32_t ms) { g_timeout_ms.store(ms); }
int32_t TimeoutMs() { return g_timeout_ms.load(); }
void SetDeterministic(bool on) { g_deterministic.store(on); }

void BindDevices(const std::vector<std::pair<int, int>>& ordinal_npu) {
  std::lock_guard<std::mutex> lock(g_bind_mu);
  g_npus.clear();
  for (auto [o, n] : ordinal_npu) g_npus[o] = n;
}

int NpuOf(int ordinal) {
  std::lock_guard<std::mutex> lock(g_bind_mu);
  auto it = g_npus.find(ordinal);
  return it == g_npus.end() ? ordinal : it->second;
}

Timings TimingTotals() {
  std::lock_guard<std::mutex> lock(g_timing_mu);
  return g_timings;
}

void ResetTimings() {
  std::lock_guard<std::mutex> lock(g_timing_mu);
  g_timings = Timings();
}
int64_t LaunchCount() { return g_launches.load(); }

std::string SocName(Status* status) {
  std::string why;
  const Cann* c = LoadCann(&why);
  if (c == nullptr) {
    *status = Status::Error(why);
    return "";
  }
  if (c->aclrtGetSocName == nullptr) {
    *status = Status::Error("CANN symbol aclrtGetSocName not found in libascendcl.so");
    return "";
  }
  const char* s = c->aclrtGetSocName();
  return s ? s : "";
}

int DeviceCount(Status* status) {
  std::string why;
  const Cann* c = LoadCann(&why);
  if (c == nullptr) {
    *status = Status::Error(why);
    return 0;
  }
  uint32_t n = 0;
  aclError rc = c->aclrtGetDeviceCount(&n);
  if (rc != kAclSuccess) *status = Fail(*c, "aclrtGetDeviceCount", rc);
  return static_cast<int>(n);
}

// ---------------------------------------------------------------- communicators

namespace {

std::mutex g_exchange_mu;
RootInfoExchange g_exchange;  // guarded by g_exchange_mu

// The key-value store timeout of a re-creation at call time: the stream
// timeout, or 300 s where that is -1 (forever): a re-creation never blocks
// without bound.
int KvTimeoutMs() {
  const int32_t ms = TimeoutMs();
  return ms > 0 ? ms : 300000;
}

// Destroys communicator `comm` of JAX device `ordinal` from that device: HCCL
// looks a communicator up in the table of the calling thread's device, and
// from another device HcclCommDestroy returns HCCL_E_PARA and destroys
// nothing. An error names the device, the HcclResult and CANN's message.
Status DestroyComm(const Cann& c, int ordinal, HcclComm comm) {
  if (comm == nullptr) return Status::Ok();
  const std::string what =
      "destroying the HCCL communicator of JAX device " + std::to_string(ordinal);
  DeviceState* d = nullptr;
  Status s = GetDevice(c, ordinal, &d);
  if (s.ok) s = Enter(c, d);
  if (!s.ok) return Status::Error(what + ": " + s.message);
  const HcclResult r = c.HcclCommDestroy(comm);
  if (r != 0)
    return Status::Error(what + ": HcclCommDestroy failed with HcclResult " + HcclErr(c, r) + ": " +
                         RecentErr(c));
  return Status::Ok();
}

// Adds `s`'s message (when it failed) to `errors`, '; '-separated.
void Collect(const Status& s, std::string* errors) {
  if (s.ok) return;
  if (!errors->empty()) *errors += "; ";
  *errors += s.message;
}

// Destroys this process's communicators of `key` (on `ordinals`), each from
// its own device. Every one leaves the registry, destroyed or not: one that
// HCCL refused to destroy is abandoned (no later call could use it), and the
// error says so.
Status DestroyComms(const Cann& c, const std::string& key, const std::vector<int>& ordinals) {
  std::vector<std::pair<int, HcclComm>> doomed;
  {
    std::lock_guard<std::mutex> cl(g_comm_mu);
    for (int o : ordinals) {
      auto it = g_comms.find({key, o});
      if (it != g_comms.end()) {
        doomed.emplace_back(o, it->second.comm);
        g_comms.erase(it);
      }
    }
  }
  // Outside g_comm_mu: entering a device takes g_dev_mu.
  std::string errors;
  for (auto [o, comm] : doomed) Collect(DestroyComm(c, o, comm), &errors);
  if (errors.empty()) return Status::Ok();
  return Status::Error(errors + " (the communicator is abandoned)");
}

// Lets kernels still queued from a failed call finish (or fail) on the old
// communicators first; their status belongs to that call.
void DrainStreams(const Cann& c, const std::vector<int>& ordinals) {
  for (int o : ordinals) {
    DeviceState* od = nullptr;
    {
      std::lock_guard<std::mutex> dl(g_dev_mu);
      auto it = g_devices.find(o);
      if (it != g_devices.end()) od = it->second.get();
    }
    // Bounded like every wait of a re-creation: 300 s where the stream
    // timeout is -1 (forever).
    if (od != nullptr && Enter(c, od).ok)
      c.aclrtSynchronizeStreamWithTimeout(od->stream, KvTimeoutMs());
  }
}

std::string Generation(const GroupDef& def, int64_t call) {
  return std::to_string(def.epoch) + "." + std::to_string(call);
}

// Every local rank joins the communicator of `root_info` concurrently, one
// thread each (HCCL's initialization is collective). All or nothing: a rank
// that failed leaves none of this process's communicators behind.
Status InitRootInfo(const Cann& c, const std::string& key, int nranks, const std::string& root_info,
                    const std::vector<std::pair<int, int>>& rank_ordinals) {
  if (root_info.size() != kHcclRootInfoBytes)
    return Status::Error("HCCL root info must be " + std::to_string(kHcclRootInfoBytes) +
                         " bytes, got " + std::to_string(root_info.size()));
  if (Status det = ApplyHcclDeterminism(c); !det.ok) return det;
  std::vector<Status> results(rank_ordinals.size());
  std::vector<CommEntry> entries(rank_ordinals.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < rank_ordinals.size(); ++i) {
    threads.emplace_back([&, i] {
      auto [rank, ordinal] = rank_ordinals[i];
      DeviceState* d = nullptr;
      Status s = GetDevice(c, ordinal, &d);
      if (s.ok) s = Enter(c, d);
      if (s.ok) {
        HcclComm comm = nullptr;
        HcclResult r = c.HcclCommInitRootInfo(static_cast<uint32_t>(nranks), root_info.data(),
                                              static_cast<uint32_t>(rank), &comm);
        if (r != 0) {
          s = Status::Error("HcclCommInitRootInfo (rank " + std::to_string(rank) + " of " +
                            std::to_string(nranks) + ") failed with HcclResult " + HcclErr(c, r) +
                            ": " + RecentErr(c));
        } else {
          char name[kCommNameMaxLength + 1] = {0};
          r = c.HcclGetCommName(comm, name);
          entries[i] = CommEntry{comm, name, rank};
          if (r != 0) s = Status::Error("HcclGetCommName failed with HcclResult " + HcclErr(c, r));
        }
      }
      results[i] = s;
    });
  }
  for (auto& t : threads) t.join();
  for (auto& s : results) {
    if (s.ok) continue;
    // A creation that failed part way: the communicators no table holds yet.
    std::string errors;
    for (size_t i = 0; i < entries.size(); ++i)
      Collect(DestroyComm(c, rank_ordinals[i].second, entries[i].comm), &errors);
    return errors.empty() ? s : Status::Error(s.message + "; then " + errors);
  }
  std::lock_guard<std::mutex> lock(g_comm_mu);
  for (size_t i = 0; i < rank_ordinals.size(); ++i)
    g_comms[{key, rank_ordinals[i].second}] = entries[i];
  return Status::Ok();
}

// Generation `generation` of a group spanning processes: the root info from
// the process holding rank 0 (through the exchange), then every local rank
// joins. `def.mu` is held; the old communicators are gone.
Status JoinLocked(const Cann& c, const std::string& key, GroupDef& def,
                  const std::string& generation, int timeout_ms) {
  RootInfoExchange exchange;
  {
    std::lock_guard<std::mutex> lock(g_exchange_mu);
    exchange = g_exchange;
  }
  const std::string what = "generation " + generation +
                           " of the HCCL communicator of replica group " + key + " (" +
                           std::to_string(def.nranks) + " ranks across processes)";
  if (!exchange)
    return Status::Error(what + ": no key-value store to exchange HCCL's root info through " +
                         "(jax.distributed is not initialized here)");
  int root_ordinal = -1;
  for (auto [r, o] : def.rank_ordinals)
    if (r == 0) root_ordinal = o;
  std::string root;
  Status s;
  if (root_ordinal >= 0) {
    if (!(s = GetRootInfo(root_ordinal, &root)).ok) return Status::Error(what + ": " + s.message);
    s = exchange(key, generation, &root, timeout_ms, &root);
  } else {
    s = exchange(key, generation, nullptr, timeout_ms, &root);
  }
  if (!s.ok) return Status::Error(what + ": " + s.message);
  if (!(s = InitRootInfo(c, key, def.nranks, root, def.rank_ordinals)).ok)
    return Status::Error(what + ": " + s.message);
  def.generation = generation;
  return Status::Ok();
}

// (Re)defines the group `key` with `define(def)` and, unless all of its
// communicators are live, destroys what is left of them and creates them
// with `create(cann, def, latest)`, `latest` being the group's latest call.
template <typename Define, typename Create>
Status RedefineGroup(const std::string& key, Define define, Create create) {
  std::string why;
  const Cann* c = LoadCann(&why);
  if (c == nullptr) return Status::Error(why);
  std::shared_ptr<GroupDef> def = FindOrAddGroup(key);
  std::lock_guard<std::mutex> lock(def->mu);  // CountCall waits: `latest` holds
  {
    // The definition changes under both locks: GroupOf reads it under
    // g_comm_mu, EnsureComm under def->mu.
    std::lock_guard<std::mutex> cl(g_comm_mu);
    define(*def);
    if (IsLive(key, *def)) return Status::Ok();  // already there
  }
  Status s = DestroyComms(*c, key, def->ordinals);
  if (!s.ok) return s;
  const int64_t latest = LatestCall(*def);
  s = create(*c, *def, latest);
  if (s.ok) {
    def->broken_at = -1;
    def->recreated_at = latest;
  }
  return s;
}

}  // namespace

Status CommInitAllLocked(const Cann* c, const std::string& key, const std::vector<int>& ordinals);

Status CommInitAll(const std::string& key, const std::vector<int>& ordinals) {
  return RedefineGroup(
      key,
      [&](GroupDef& def) {
        def.ordinals = ordinals;
        def.init_all = true;
      },
      [&](const Cann& c, GroupDef&, int64_t) { return CommInitAllLocked(&c, key, ordinals); });
}

Status CommInitAllLocked(const Cann* c, const std::string& key, const std::vector<int>& ordinals) {
  if (c->HcclCommInitAll == nullptr)
    return Status::Error("CANN symbol HcclCommInitAll not found in libhccl.so");
  if (ordinals.empty()) return Status::Error("HcclCommInitAll: a group without devices");
  std::vector<int32_t> npus;
  DeviceState* first = nullptr;
  for (int o : ordinals) {
    DeviceState* d = nullptr;
    Status s = GetDevice(*c, o, &d);
    if (!s.ok) return s;
    if (first == nullptr) first = d;
    npus.push_back(d->npu);
  }
  // HcclCommInitAll begins by reading the calling thread's current device
  // and fails without one, and GetDevice sets a device only when it makes a
  // device's state: a thread that never ran a call (a Python thread
  // lowering a new group over devices in use) has none. Enter the first.
  Status entered = Enter(*c, first);
  if (!entered.ok) return entered;
  if (Status det = ApplyHcclDeterminism(*c); !det.ok) return det;
  std::vector<HcclComm> comms(ordinals.size(), nullptr);
  HcclResult r = c->HcclCommInitAll(static_cast<uint32_t>(npus.size()), npus.data(), comms.data());
  if (r != 0) return Status::Error("HcclCommInitAll failed with HcclResult " + HcclErr(*c, r));
  // Every name first: on a failure no communicator is registered and all
  // of them are destroyed (none is left behind unowned).
  std::vector<CommEntry> entries(ordinals.size());
  for (size_t i = 0; i < ordinals.size(); ++i) {
    char name[kCommNameMaxLength + 1] = {0};
    r = c->HcclGetCommName(comms[i], name);
    if (r != 0) {
      std::string errors;
      for (size_t j = 0; j < ordinals.size(); ++j)
        Collect(DestroyComm(*c, ordinals[j], comms[j]), &errors);
      return Status::Error("HcclGetCommName failed with HcclResult " + HcclErr(*c, r) +
                           (errors.empty() ? "" : "; then " + errors));
    }
    entries[i] = CommEntry{comms[i], name, static_cast<int>(i)};
  }
  std::lock_guard<std::mutex> lock(g_comm_mu);
  for (size_t i = 0; i < ordinals.size(); ++i) g_comms[{key, ordinals[i]}] = entries[i];
  return Status::Ok();
}

Status GetRootInfo(int ordinal, std::string* bytes) {
  const Cann* c = nullptr;
  DeviceState* d = nullptr;
  Status s = OpenDevice(ordinal, &c, &d);
  if (!s.ok) return s;
  if (!(s = Enter(*c, d)).ok) return s;
  bytes->assign(kHcclRootInfoBytes, '\0');
  HcclResult r = c->HcclGetRootInfo(bytes->data());
  if (r != 0)
    return Status::Error("HcclGetRootInfo failed with HcclResult " + HcclErr(*c, r) + ": " +
                         RecentErr(*c));
  return Status::Ok();
}

void SetRootInfoExchange(RootInfoExchange exchange) {
  std::lock_guard<std::mutex> lock(g_exchange_mu);
  g_exchange = std::move(exchange);
}

Status CommJoin(const std::string& key, int nranks,
                const std::vector<std::pair<int, int>>& rank_ordinals, int timeout_ms) {
  return RedefineGroup(
      key,
      [&](GroupDef& def) {
        def.init_all = false;
        def.nranks = nranks;
        def.rank_ordinals = rank_ordinals;
        def.ordinals.clear();
        for (auto [r, o] : rank_ordinals) def.ordinals.push_back(o);
      },
      [&](const Cann& c, GroupDef& def, int64_t latest) {
        ++def.epoch;
        return JoinLocked(c, key, def, Generation(def, latest), timeout_ms);
      });
}

std::string CommGeneration(const std::string& key) {
  std::shared_ptr<GroupDef> def;
  {
    std::lock_guard<std::mutex> lock(g_comm_mu);
    auto it = g_groups.find(key);
    if (it == g_groups.end()) return "";
    def = it->second;
  }
  std::lock_guard<std::mutex> lock(def->mu);
  return def->generation;
}

bool HasComm(const std::string& key, int ordinal) {
  std::lock_guard<std::mutex> lock(g_comm_mu);
  return g_comms.count({key, ordinal}) != 0;
}

size_t CommCount() {
  std::lock_guard<std::mutex> lock(g_comm_mu);
  return g_comms.size();
}

std::string CommName(const std::string& key, int ordinal) {
  std::lock_guard<std::mutex> lock(g_comm_mu);
  auto it = g_comms.find({key, ordinal});
  return it == g_comms.end() ? std::string() : it->second.name;
}

namespace {

// The group (key, definition) of `ordinal` among the '|'-separated keys.
std::pair<std::string, std::shared_ptr<GroupDef>> GroupOf(std::string_view keys, int ordinal) {
  std::lock_guard<std::mutex> lock(g_comm_mu);
  for (const std::string& key : Split(std::string(keys), '|')) {
    auto it = g_groups.find(key);
    if (it == g_groups.end()) continue;
    for (int o : it->second->ordinals)
      if (o == ordinal) return {key, it->second};
  }
  return {"", nullptr};
}

// Counts this device's call on its group: every call that names the group,
// failed or not, so that ranks number their calls alike. 0 without a group.
int64_t CountCall(std::string_view keys, int ordinal) {
  auto [key, def] = GroupOf(keys, ordinal);
  if (!def) return 0;
  std::lock_guard<std::mutex> lock(def->mu);
  return ++def->calls[ordinal];
}

void MarkBroken(std::string_view keys, int ordinal, int64_t call) {
  auto [key, def] = GroupOf(keys, ordinal);
  if (def) {
    std::lock_guard<std::mutex> lock(def->mu);
    if (call >= def->recreated_at) def->broken_at = std::max(def->broken_at, call);
  }
}

// Makes sure this device's communicator for its call `call` exists and is not
// broken: re-creates this process's communicators of the group once,
// whichever of its ranks comes first to a call after the failure (or after
// Shutdown). A re-creation that fails leaves the group broken at `call`: the
// other local ranks' call `call` fails at once, the next call tries again
// (with the next generation).
Status EnsureComm(const Cann& c, std::string_view keys, int ordinal, int64_t call) {
  auto [key, def] = GroupOf(keys, ordinal);
  if (!def) return Status::Ok();  // reported by the lookup
  std::lock_guard<std::mutex> lock(def->mu);
  const bool present = HasComm(key, ordinal);
  if (present && call < def->recreated_at)
    // A rank that lagged behind a failure: its peers have re-created the
    // group for a later call, and pairing this call with theirs would mix
    // the data of different calls.
    return Status::Error("call " + std::to_string(call) + " of replica group " + key +
                         " predates the re-creation of its HCCL communicator for call " +
                         std::to_string(def->recreated_at) +
                         " after a failure; the next call uses the new communicator");
  if (present && (def->broken_at < 0 || call <= def->broken_at)) return Status::Ok();
  if (call <= def->attempted_at)
    return Status::Error("the HCCL communicator of replica group " + key +
                         " could not be re-created for this call: " + def->attempt_error);
  def->attempted_at = call;
  DrainStreams(c, def->ordinals);
  // The old communicators first: one HCCL refuses to destroy fails this
  // attempt (it has left the registry; the next call tries again).
  Status s = DestroyComms(c, key, def->ordinals);
  if (s.ok)
    s = def->init_all ? CommInitAllLocked(&c, key, def->ordinals)
                      : JoinLocked(c, key, *def, Generation(*def, call), KvTimeoutMs());
  if (!s.ok) {
    const Status undo = DestroyComms(c, key, def->ordinals);  // all or nothing
    if (!undo.ok) s = Status::Error(s.message + "; then " + undo.message);
    def->attempt_error = s.message;
    def->broken_at = std::max(def->broken_at, call);
    return Status::Error("re-creating the HCCL communicator of replica group " + key +
                         " (it failed in an earlier call" + (present ? "" : " or was destroyed") +
                         ") failed: " + s.message);
  }
  def->broken_at = -1;
  def->recreated_at = call;
  return Status::Ok();
}

// The communicator (name, rank, handle) of `ordinal` among the '|'-separated keys.
bool FindComm(std::string_view keys, int ordinal, std::string* name, int* rank, HcclComm* comm) {
  std::lock_guard<std::mutex> lock(g_comm_mu);
  for (const std::string& key : Split(std::string(keys), '|')) {
    auto it = g_comms.find({key, ordinal});
    if (it != g_comms.end()) {
      *name = it->second.name;
      *rank = it->second.rank;
      *comm = it->second.comm;
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------- HcclAlltoAllV

constexpr const char* kHcclAlltoAllV = "HcclAlltoAllV";

// The data-movement call (docs/ascend.md, "Gradients"): one rank's spec is
//   i<HcclDataType>;a<sendCounts>;a<sdispls>;a<recvCounts>;a<rdispls>;a<pre>;a<post>
// (plus c0=<bytes>), every number in elements of the data type. `pre` and
// `post` are (source offset, destination offset, elements) triples: `pre`
// copies operand 0 into a staging send buffer, `post` copies a staging
// receive buffer into result 0; an empty list sends straight from operand 0 /
// receives straight into result 0.
struct AlltoAllvPlan {
  int dtype = 0;
  size_t item = 0;
  std::vector<uint64_t> send_counts, sdispls, recv_counts, rdispls;
  std::vector<int64_t> pre, post;
};

bool ParseAlltoAllv(const Spec& spec, AlltoAllvPlan* plan, std::string* err) {
  const auto& sl = spec.slots;
  static const char kKinds[] = "iaaaaaa";
  if (sl.size() != 7) {
    *err = "argument spec has " + std::to_string(sl.size()) + " slots, HcclAlltoAllV takes 7";
    return false;
  }
  for (size_t k = 0; k < sl.size(); ++k) {
    if (sl[k].kind != kKinds[k]) {
      *err = "argument " + std::to_string(k) + " of the spec has the wrong kind '" +
             std::string(1, sl[k].kind) + "'";
      return false;
    }
  }
  plan->dtype = static_cast<int>(sl[0].i);
  plan->item = static_cast<size_t>(HcclDataTypeBytes(plan->dtype));
  if (plan->item == 0) {
    *err = "HcclDataType " + std::to_string(plan->dtype) + " is not one jax_mc2 sends";
    return false;
  }
  std::vector<uint64_t>* arrays[] = {&plan->send_counts, &plan->sdispls, &plan->recv_counts,
                                     &plan->rdispls};
  for (size_t k = 0; k < 4; ++k) {
    for (int64_t v : sl[k + 1].dims) {
      if (v < 0) {
        *err = "argument " + std::to_string(k + 1) + " holds a negative count " + std::to_string(v);
        return false;
      }
      arrays[k]->push_back(static_cast<uint64_t>(v));
    }
  }
  const size_t n = plan->send_counts.size();
  if (n == 0 || plan->sdispls.size() != n || plan->recv_counts.size() != n ||
      plan->rdispls.size() != n) {
    *err = "sendCounts, sdispls, recvCounts and rdispls must have one entry per rank";
    return false;
  }
  plan->pre = sl[5].dims;
  plan->post = sl[6].dims;
  for (const auto* perm : {&plan->pre, &plan->post}) {
    if (perm->size() % 3 != 0) {
      *err = "a copy list must hold (source, destination, elements) triples";
      return false;
    }
    for (int64_t v : *perm) {
      if (v < 0) {
        *err = "a copy list holds a negative offset or count " + std::to_string(v);
        return false;
      }
    }
  }
  return true;
}

// The elements a buffer must hold for the (displacement, count) pairs and the
// copy-list side `side` (0: source, 1: destination) of `perm`.
uint64_t NeededElements(const std::vector<uint64_t>& displs, const std::vector<uint64_t>& counts,
                        const std::vector<int64_t>& perm, int side) {
  uint64_t need = 0;
  for (size_t i = 0; i < counts.size(); ++i)
    if (counts[i]) need = std::max(need, displs[i] + counts[i]);
  for (size_t i = 0; i + 2 < perm.size(); i += 3)
    if (perm[i + 2]) need = std::max(need, static_cast<uint64_t>(perm[i + side] + perm[i + 2]));
  return need;
}

// Enqueues the copy list `perm` (dst <- src, on the device) on `stream`.
Status EnqueueCopies(const Cann& c, const std::vector<int64_t>& perm, size_t item, char* dst,
                     size_t dst_bytes, const char* src, aclrtStream stream) {
  for (size_t i = 0; i + 2 < perm.size(); i += 3) {
    const size_t from = perm[i] * item, to = perm[i + 1] * item, bytes = perm[i + 2] * item;
    if (bytes == 0) continue;
    const aclError rc = c.aclrtMemcpyAsync(dst + to, dst_bytes - to, src + from, bytes,
                                           kMemcpyDeviceToDevice, stream);
    if (rc != kAclSuccess) return Fail(c, "aclrtMemcpyAsync (device to device)", rc);
  }
  return Status::Ok();
}

// The bytes of result `r` (`bytes` long) that the kernel writes: all of them,
// or fewer where the spec's c<result>=<bytes> entries say so.
size_t WrittenBytes(const Spec& spec, size_t r, size_t bytes) {
  for (auto [res, b] : spec.partial)
    if (res >= 0 && static_cast<size_t>(res) == r) bytes = std::min(bytes, static_cast<size_t>(b));
  return bytes;
}

// Device mode: zeroes, on `stream`, the bytes of each result past those the
// spec's c<result>=<bytes> entries say the kernel writes (the padding rows of
// the AlltoAllv outputs), copying from a zeroed block of the call's memory.
// The errors name `fn`. The host bridge zeroes them in host memory instead.
Status ZeroPaddingOnStream(const Cann& c, const std::string& fn, const Spec& spec, const CallIo& io,
                           const std::vector<void*>& dev_out, aclrtStream stream,
                           CallMemory& memory) {
  for (size_t r = 0; r < io.results.size(); ++r) {
    const size_t written = WrittenBytes(spec, r, io.results[r].bytes);
    const size_t tail = io.results[r].bytes - written;
    if (tail == 0) continue;
    void* zeros = nullptr;
    Status s = memory.Take(fn, tail, &zeros);
    if (!s.ok) return s;
    const std::vector<char> host(tail, 0);
    aclError rc = c.aclrtMemcpy(zeros, tail, host.data(), tail, kMemcpyHostToDevice);
    if (rc == kAclSuccess)
      rc = c.aclrtMemcpyAsync(static_cast<char*>(dev_out[r]) + written, tail, zeros, tail,
                              kMemcpyDeviceToDevice, stream);
    if (rc != kAclSuccess)
      return Status::Error(fn + ": " + Fail(c, "zeroing the padding rows", rc).message);
  }
  return Status::Ok();
}

// One side of the exchange (send or receive) and its size in elements.
struct ExchangeSide {
  char* data = nullptr;
  uint64_t elems = 0;
};

// One side of the exchange: `buffer` (`bytes`, operand 0 or result 0) itself,
// or, when `copies` stage it, a pool block sized for the copies and the
// exchange's `counts` at `displs`. `own` is the place of `buffer` in each
// copy triple (0: the copies read it, the send side; 1: they write it, the
// receive side).
Status StageSide(CallMemory& memory, const std::string& fn, const std::vector<int64_t>& copies,
                 int own, const std::vector<uint64_t>& displs, const std::vector<uint64_t>& counts,
                 size_t item, void* buffer, size_t bytes, ExchangeSide* side) {
  side->data = static_cast<char*>(buffer);
  side->elems = bytes / item;
  if (copies.empty()) return Status::Ok();
  if (NeededElements({}, {}, copies, own) > side->elems)
    return Status::Error(fn + ": a copy " + (own == 0 ? "reads" : "writes") + " past the " +
                         std::to_string(side->elems) + "-element " +
                         (own == 0 ? "operand" : "result"));
  side->elems = NeededElements(displs, counts, copies, 1 - own);
  void* block = nullptr;
  Status s = memory.Take(fn, side->elems * item, &block);
  side->data = static_cast<char*>(block);
  return s;
}

// Enqueues one rank's HcclAlltoAllV call on `stream`: operand 0 (through the
// `pre` copies into a staging buffer when there are any) is exchanged into
// result 0 (through a staging buffer and the `post` copies when there are
// any). In device mode the result rows past the bytes the exchange writes
// (the spec's c0=) are zeroed on the stream; the host bridge zeroes them on
// the host. Staging buffers are pool blocks held until the call ends.
Status RunAlltoAllv(const Cann& c, const AlltoAllvPlan& plan, HcclComm comm, aclrtStream stream,
                    const CallIo& io, const std::vector<void*>& dev_in,
                    const std::vector<void*>& dev_out, const Spec& spec, CallMemory& memory) {
  const std::string fn = kHcclAlltoAllV;
  const size_t item = plan.item;
  // The send buffer: operand 0 itself, or a staging buffer the `pre` copies
  // fill; the receive buffer: result 0 itself, or one the `post` copies read.
  ExchangeSide send, recv;
  Status s = StageSide(memory, fn, plan.pre, 0, plan.sdispls, plan.send_counts, item, dev_in[0],
                       io.operands[0].bytes, &send);
  if (!s.ok) return s;
  if (!plan.pre.empty()) {
    s = EnqueueCopies(c, plan.pre, item, send.data, send.elems * item,
                      static_cast<const char*>(dev_in[0]), stream);
    if (!s.ok) return Status::Error(fn + ": " + s.message);
  }
  s = StageSide(memory, fn, plan.post, 1, plan.rdispls, plan.recv_counts, item, dev_out[0],
                io.results[0].bytes, &recv);
  if (!s.ok) return s;
  if (NeededElements(plan.sdispls, plan.send_counts, {}, 0) > send.elems ||
      NeededElements(plan.rdispls, plan.recv_counts, {}, 0) > recv.elems)
    return Status::Error(fn + ": the counts and displacements reach past the " +
                         std::to_string(send.elems) + "-element send or " +
                         std::to_string(recv.elems) + "-element receive buffer");
  const HcclResult r = c.HcclAlltoAllV(send.data, plan.send_counts.data(), plan.sdispls.data(),
                                       plan.dtype, recv.data, plan.recv_counts.data(),
                                       plan.rdispls.data(), plan.dtype, comm, stream);
  if (r != 0)
    return Status::Error(fn + " failed with HcclResult " + HcclErr(c, r) + ": " + RecentErr(c));
  if (!plan.post.empty()) {
    s = EnqueueCopies(c, plan.post, item, static_cast<char*>(dev_out[0]), io.results[0].bytes,
                      recv.data, stream);
    if (!s.ok) return Status::Error(fn + ": " + s.message);
  }
  if (!io.host) return ZeroPaddingOnStream(c, fn, spec, io, dev_out, stream, memory);
  return Status::Ok();
}

// Waits until `d`'s stream has passed everything queued on it (the caller
// holds d->mu). A wait that returns a kernel's failure is made once more:
// the status may be a failed call's, whose kernel has ended (a call drops
// such a status the same way). A timeout, a second failure, or a device
// that cannot be entered is an error: work may still be running there.
Status WaitIdle(const Cann& c, DeviceState* d) {
  Status s = Enter(c, d);
  if (!s.ok) return s;
  aclError rc = c.aclrtSynchronizeStreamWithTimeout(d->stream, TimeoutMs());
  if (rc != kAclSuccess && rc != kAclStreamSyncTimeout)
    rc = c.aclrtSynchronizeStreamWithTimeout(d->stream, TimeoutMs());
  if (rc == kAclSuccess) return Status::Ok();
  return Fail(c, "aclrtSynchronizeStreamWithTimeout (" + std::to_string(TimeoutMs()) + " ms)", rc);
}

// What Shutdown could not do goes to stderr: it has no caller to return an
// error to (jax_mc2.ascend.shutdown(), also run at exit).
void ShutdownWarning(const std::string& message) {
  std::fprintf(stderr, "jax_mc2.ascend shutdown: %s\n", message.c_str());
}

}  // namespace

void Shutdown() {
  std::string why;
  const Cann* c = LoadCann(&why);
  if (c == nullptr) return;
  // Device locks are never taken inside g_dev_mu here: a launch holds its
  // device's lock and then takes g_dev_mu (draining streams, re-creating a
  // communicator), so the opposite order could deadlock.
  std::vector<DeviceState*> devices;
  {
    std::lock_guard<std::mutex> lock(g_dev_mu);
    for (auto& [o, d] : g_devices) devices.push_back(d.get());
  }
  // Every stream first. One that does not come back (the wait timed out or
  // failed) may still run the kernel of a failed call, which uses that
  // call's quarantined blocks, the stream and the device's communicators,
  // and may write into the blocks at any time: those are deliberately
  // leaked below (freeing them would hand the kernel freed device memory),
  // and the device is not reset (that would take its context, and the
  // stream, from under the kernel). A later call on the device makes its
  // state afresh.
  std::set<int> busy;
  for (DeviceState* d : devices) {
    std::lock_guard<std::mutex> dl(d->mu);
    d->retired = true;  // a call that takes the lock after this one fails
    const Status idle = WaitIdle(*c, d);
    if (!idle.ok) {
      busy.insert(d->ordinal);
      ShutdownWarning("the stream of JAX device " + std::to_string(d->ordinal) + " (NPU " +
                      std::to_string(d->npu) + ") did not come back (" + idle.message +
                      "): its stream, its HCCL communicators and the buffers of its failed "
                      "call are left allocated, and the device is not reset");
    }
  }
  // Communicators, each destroyed from its own device; a busy device's are
  // abandoned.
  std::vector<std::pair<int, HcclComm>> comms;
  {
    std::lock_guard<std::mutex> lock(g_comm_mu);
    for (auto& [k, e] : g_comms) comms.emplace_back(k.second, e.comm);
    g_comms.clear();
  }
  for (auto [o, comm] : comms) {
    if (busy.count(o)) continue;
    const Status s = DestroyComm(*c, o, comm);
    if (!s.ok) ShutdownWarning(s.message);
  }
  std::vector<int> reset;
  for (DeviceState* d : devices) {
    std::lock_guard<std::mutex> dl(d->mu);
    const Status entered = Enter(*c, d);
    if (!entered.ok) {
      ShutdownWarning("JAX device " + std::to_string(d->ordinal) + ": " + entered.message +
                      "; its memory and stream are left allocated");
      continue;
    }
    // The free list only ever holds blocks the stream has passed.
    for (auto& [sz, blk] : d->pool.free_blocks) c->aclrtFree(blk);
    d->pool.free_blocks.clear();
    if (busy.count(d->ordinal)) continue;  // the quarantine and the stream stay (see above)
    for (auto& [sz, blk] : d->pool.quarantine) c->aclrtFree(blk);
    d->pool.quarantine.clear();
    c->aclrtDestroyStream(d->stream);
    reset.push_back(d->npu);
  }
  {
    std::lock_guard<std::mutex> lock(g_dev_mu);
    for (auto& [o, d] : g_devices) g_retired.push_back(std::move(d));
    g_devices.clear();
  }
  // One reset per device state: the pair of GetDevice's aclrtSetDevice.
  for (int n : reset) c->aclrtResetDevice(n);
}

// ---------------------------------------------------------------- launch

namespace {

// What a call runs: an aclnn operator (two phases), or HCCL's own AlltoAllV
// (the data movement of the AlltoAllv operators' gradients).
struct Entry {
  bool alltoallv = false;
  Caller caller = nullptr;
  void* phase1 = nullptr;
  void* phase2 = nullptr;
};

Status ResolveEntry(const Cann& c, const std::string& function, Entry* entry) {
  entry->alltoallv = function == kHcclAlltoAllV;
  if (entry->alltoallv) {
    if (c.HcclAlltoAllV == nullptr) return Status::Error(MissingSymbol(c, function, "libhccl.so"));
    return Status::Ok();
  }
  auto caller = Callers().find(function);
  if (caller == Callers().end()) return Status::Error("unknown aclnn function " + function);
  entry->caller = caller->second;
  std::string why;
  entry->phase1 = AclnnSymbol(c, function + "GetWorkspaceSize", &why);
  if (entry->phase1 == nullptr) return Status::Error(why);
  entry->phase2 = AclnnSymbol(c, function, &why);
  if (entry->phase2 == nullptr) return Status::Error(why);
  return Status::Ok();
}

// Makes the device ready for a call (the caller holds d->mu): not retired,
// entered, and, on the host bridge, its stream past a failed call's work.
Status ReadyDevice(const Cann& c, DeviceState* d, const std::string& function, int ordinal,
                   const CallIo& io) {
  if (d->retired)
    return Status::Error(function + ": jax_mc2.ascend.shutdown() ran while this call waited for " +
                         "JAX device " + std::to_string(ordinal) + "; a new call starts afresh");
  Status s = Enter(c, d);
  if (!s.ok || !d->dirty || !io.host) return s;
  // A failed call may have left work on the stream: wait for it, and drop
  // its status (it belongs to that call, already reported).
  const aclError rc = c.aclrtSynchronizeStreamWithTimeout(d->stream, TimeoutMs());
  if (rc == kAclStreamSyncTimeout)
    return Status::Error(function + ": the stream of JAX device " + std::to_string(ordinal) +
                         " is still busy with an earlier failed call (status " +
                         std::to_string(rc) + ")");
  d->dirty = false;
  Held none;
  ReleaseAll(c, d->pool, none, true);
  return Status::Ok();
}

// The communicator side of a call: its group's name, this rank, and the
// rank's argument spec (with the AlltoAllV plan when it runs HCCL's own).
struct Peer {
  std::string group_name;
  int rank = 0;
  HcclComm comm = nullptr;
  const Spec* spec = nullptr;
  AlltoAllvPlan plan;  // holds HcclAlltoAllV's host count arrays until the call ends
};

Status JoinGroup(const Cann& c, DeviceState* d, const std::string& function,
                 std::string_view group_key, int ordinal, int64_t call,
                 const std::vector<Spec>& specs, const Entry& entry, const CallIo& io, Peer* peer) {
  Status s = EnsureComm(c, group_key, ordinal, call);
  if (!s.ok) return Status::Error(function + ": " + s.message);
  if (!(s = Enter(c, d)).ok) return s;  // a re-created group may move the thread
  if (!FindComm(group_key, ordinal, &peer->group_name, &peer->rank, &peer->comm) &&
      (specs[0].uses_group || entry.alltoallv))
    return Status::Error("no HCCL communicator for replica group " + std::string(group_key) +
                         " on JAX device " + std::to_string(ordinal) +
                         " (communicators are created when the call is lowered)");
  if (specs.size() > 1 && static_cast<size_t>(peer->rank) >= specs.size())
    return Status::Error(function + ": no argument spec for rank " + std::to_string(peer->rank));
  peer->spec = &specs[specs.size() > 1 ? peer->rank : 0];
  if (!entry.alltoallv) return Status::Ok();
  std::string err;
  if (!ParseAlltoAllv(*peer->spec, &peer->plan, &err)) return Status::Error(function + ": " + err);
  // One spec line per rank, each with one count per rank: HCCL reads as many
  // entries as the communicator has ranks.
  if (peer->plan.send_counts.size() != specs.size())
    return Status::Error(function + ": the spec has " + std::to_string(specs.size()) +
                         " rank lines but " + std::to_string(peer->plan.send_counts.size()) +
                         " counts per rank");
  if (io.operands.empty() || io.results.empty())
    return Status::Error(function + ": the call needs one operand and one result");
  return Status::Ok();
}

// The state the steps of one call share once it holds its device.
struct CallState {
  CallState(const Cann& cann, const std::string& fn, const CallIo& call_io, aclrtStream s,
            Pool& pool)
      : c(cann),
        function(fn),
        io(call_io),
        stream(s),
        memory{cann, pool, {}},
        desc{&cann, {}, {}} {}

  const Cann& c;
  const std::string& function;
  const CallIo& io;
  aclrtStream stream;
  CallMemory memory;
  std::vector<void*> dev_in, dev_out;  // the operands and results on the NPU
  Timings tm;
  Descriptors desc;  // the aclnn arguments', kept until the stream has passed the kernel
};

// The operands and results in device memory: on the host bridge pool blocks,
// the operands copied in; in device mode XLA's own buffers.
Status StageBuffers(CallState& s) {
  const CallIo& io = s.io;
  s.dev_in.assign(io.operands.size(), nullptr);
  s.dev_out.assign(io.results.size(), nullptr);
  if (!io.host) {
    for (size_t i = 0; i < io.operands.size(); ++i) s.dev_in[i] = io.operands[i].data;
    for (size_t i = 0; i < io.results.size(); ++i) s.dev_out[i] = io.results[i].data;
    return Status::Ok();
  }
  for (size_t i = 0; i < io.operands.size(); ++i) {
    const size_t bytes = io.operands[i].bytes;
    Status taken = s.memory.Take(s.function, bytes, &s.dev_in[i]);
    if (!taken.ok) return taken;
    if (bytes == 0) continue;
    // Synchronous: once it returns nothing reads XLA's host buffer any more,
    // whatever happens to the stream later.
    const int64_t t0 = NowNs();
    const aclError rc =
        s.c.aclrtMemcpy(s.dev_in[i], bytes, io.operands[i].data, bytes, kMemcpyHostToDevice);
    s.tm.copy_in += NowNs() - t0;
    s.tm.bytes_in += static_cast<int64_t>(bytes);
    if (rc != kAclSuccess)
      return Status::Error(s.function + ": " +
                           Fail(s.c, "aclrtMemcpy (host to device)", rc).message);
  }
  for (size_t i = 0; i < io.results.size(); ++i) {
    Status taken = s.memory.Take(s.function, io.results[i].bytes, &s.dev_out[i]);
    if (!taken.ok) return taken;
  }
  return Status::Ok();
}

// The aclnn arguments of `spec`'s slots; their descriptors go into s.desc.
Status MakeArgs(CallState& s, const Spec& spec, const std::string& group_name,
                std::vector<ArgVal>* args) {
  const std::string& function = s.function;
  args->reserve(spec.slots.size());
  for (size_t k = 0; k < spec.slots.size(); ++k) {
    const Slot& sl = spec.slots[k];
    ArgVal a;
    a.kind = sl.kind;
    switch (sl.kind) {
      case 't': {
        const auto& bufs = sl.src == 'r' ? s.dev_out : s.dev_in;
        if (sl.index < 0 || static_cast<size_t>(sl.index) >= bufs.size())
          return Status::Error(function + ": argument " + std::to_string(k) +
                               " names a missing buffer");
        a.tensor = s.c.aclCreateTensor(sl.dims.data(), sl.dims.size(), sl.dtype, sl.strides.data(),
                                       sl.offset, sl.format, sl.storage.data(), sl.storage.size(),
                                       bufs[sl.index]);
        if (a.tensor == nullptr)
          return Status::Error(function + ": aclCreateTensor failed for argument " +
                               std::to_string(k) + ": " + RecentErr(s.c));
        s.desc.tensors.push_back(a.tensor);
        break;
      }
      case 'a': {
        aclIntArray* arr = s.c.aclCreateIntArray(sl.dims.data(), sl.dims.size());
        if (arr == nullptr)
          return Status::Error(function + ": aclCreateIntArray failed for argument " +
                               std::to_string(k) + ": " + RecentErr(s.c));
        s.desc.arrays.push_back(arr);
        a.array = arr;
        break;
      }
      case 's':
        a.str = sl.text.c_str();
        break;
      case 'g':
        a.str = group_name.c_str();
        break;
      case 'i':
      case 'b':
        a.i = sl.i;
        break;
      case 'd':
        a.d = sl.d;
        break;
      default:
        break;
    }
    args->push_back(a);
  }
  return Status::Ok();
}

// Enqueues the aclnn operator: phase 1 (the workspace size and executor),
// then phase 2 on the stream with a pooled workspace; in device mode also
// the zeroing of the results' padding rows.
Status RunAclnn(CallState& s, const Entry& entry, const Spec& spec, const std::string& group_name) {
  const std::string& function = s.function;
  std::vector<ArgVal> args;
  Status st = MakeArgs(s, spec, group_name, &args);
  if (!st.ok) return st;
  const int64_t t1 = NowNs();
  uint64_t ws_size = 0;
  aclOpExecutor* executor = nullptr;
  aclnnStatus rc = 0;
  std::string err;
  if (!entry.caller(entry.phase1, args, &ws_size, &executor, &rc, &err))
    return Status::Error(function + ": " + err);
  if (rc != 0)
    return Status::Error(function + "GetWorkspaceSize failed with status " + std::to_string(rc) +
                         ": " + RecentErr(s.c));
  s.tm.phase1 = NowNs() - t1;
  const int64_t t2 = NowNs();
  void* ws = nullptr;
  if (ws_size > 0 && !(st = s.memory.Take(function, ws_size, &ws, "workspace")).ok) {
    if (s.c.aclDestroyAclOpExecutor) s.c.aclDestroyAclOpExecutor(executor);
    return st;
  }
  // Phase 2 consumes the executor, failed or not (CANN deletes a
  // non-repeatable executor on every path of its second phase); only one
  // that never reached phase 2 (the workspace failure above) is ours.
  rc = reinterpret_cast<AclnnPhase2_t>(entry.phase2)(ws, ws_size, executor, s.stream);
  if (rc != 0)
    return Status::Error(function + " failed with status " + std::to_string(rc) + ": " +
                         RecentErr(s.c));
  s.tm.phase2 = NowNs() - t2;
  if (s.io.host) return Status::Ok();
  return ZeroPaddingOnStream(s.c, function, spec, s.io, s.dev_out, s.stream, s.memory);
}

// Waits until the stream has passed the kernel; the host bridge's error
// names the timeout's setting.
Status WaitForStream(const CallState& s) {
  const aclError rc = s.c.aclrtSynchronizeStreamWithTimeout(s.stream, TimeoutMs());
  if (rc == kAclSuccess) return Status::Ok();
  if (!s.io.host)
    return Status::Error(s.function + " failed on the stream: status " + std::to_string(rc) + ": " +
                         RecentErr(s.c));
  const std::string what = rc == kAclStreamSyncTimeout
                               ? " did not finish within " + std::to_string(TimeoutMs()) +
                                     " ms (JAX_MC2_ASCEND_TIMEOUT_MS)"
                               : " failed on the stream";
  return Status::Error(s.function + what + ": aclrtSynchronizeStreamWithTimeout status " +
                       std::to_string(rc) + ": " + RecentErr(s.c));
}

// Host bridge: the bytes of each result to copy back (the rest, the padding
// rows past a spec's c<result>=<bytes>, zeroed in host memory) and the
// operand a result reads back from (-1: the result itself).
void PlanReadBack(const Spec& spec, const CallIo& io, std::vector<size_t>* count,
                  std::vector<int>* from) {
  from->assign(io.results.size(), -1);
  count->resize(io.results.size());
  for (auto [r, o] : spec.readback)
    if (r >= 0 && static_cast<size_t>(r) < from->size()) (*from)[r] = o;
  for (size_t i = 0; i < io.results.size(); ++i) {
    const Buffer& result = io.results[i];
    (*count)[i] = WrittenBytes(spec, i, result.bytes);
    if ((*count)[i] < result.bytes)
      std::memset(static_cast<char*>(result.data) + (*count)[i], 0, result.bytes - (*count)[i]);
  }
}

// Host bridge: the results back once the stream has passed the kernel, with
// synchronous copies, so that a call that timed out leaves nothing queued
// that would write into XLA's host buffers later.
Status ReadBack(CallState& s, const std::vector<size_t>& count, const std::vector<int>& from) {
  for (size_t i = 0; i < s.io.results.size(); ++i) {
    if (count[i] == 0) continue;
    void* src = from[i] >= 0 ? s.dev_in[from[i]] : s.dev_out[i];
    const int64_t t0 = NowNs();
    const aclError rc = s.c.aclrtMemcpy(s.io.results[i].data, s.io.results[i].bytes, src, count[i],
                                        kMemcpyDeviceToHost);
    s.tm.copy_out += NowNs() - t0;
    s.tm.bytes_out += static_cast<int64_t>(count[i]);
    if (rc != kAclSuccess)
      return Status::Error(s.function + ": " +
                           Fail(s.c, "aclrtMemcpy (device to host)", rc).message);
  }
  return Status::Ok();
}

void AddTimings(const Timings& tm) {
  std::lock_guard<std::mutex> lock(g_timing_mu);
  g_timings.calls += 1;
  g_timings.copy_in += tm.copy_in;
  g_timings.copy_out += tm.copy_out;
  g_timings.wait += tm.wait;
  g_timings.phase1 += tm.phase1;
  g_timings.phase2 += tm.phase2;
  g_timings.total += tm.total;
  g_timings.bytes_in += tm.bytes_in;
  g_timings.bytes_out += tm.bytes_out;
}

}  // namespace

Status Launch(int ordinal, std::string_view op_view, std::string_view function_view,
              std::string_view spec_text, std::string_view group_key, const CallIo& io) {
  const int64_t t0 = NowNs();
  g_launches.fetch_add(1);
  const std::string op(op_view), function(function_view);
  auto error = [&](const std::string& m) { return Status::Error(op + ": " + m); };
  std::string why;
  const Cann* c = LoadCann(&why);
  if (c == nullptr) return error(why);
  const std::vector<Spec>* specs = CachedSpecs(spec_text, &why);
  if (specs == nullptr) return error(function + ": " + why);
  Entry entry;
  Status s = ResolveEntry(*c, function, &entry);
  if (!s.ok) return error(s.message);

  // Every call that gets this far counts on the group (ranks number their
  // calls alike), and every failure from here until the stream has passed
  // the collective marks the group broken: the peers' collective cannot
  // complete without this rank, so they fail in the same call, and every
  // process re-creates the group at the same next call.
  const int64_t call = CountCall(group_key, ordinal);
  bool collective_done = false;
  auto broken = [&](const Status& st) {
    if (!collective_done) MarkBroken(group_key, ordinal, call);
    return error(st.message);
  };
  DeviceState* d = nullptr;
  if (!(s = GetDevice(*c, ordinal, &d)).ok) return broken(s);
  std::lock_guard<std::mutex> lock(d->mu);
  Peer peer;
  if (!(s = ReadyDevice(*c, d, function, ordinal, io)).ok ||
      !(s = JoinGroup(*c, d, function, group_key, ordinal, call, *specs, entry, io, &peer)).ok)
    return broken(s);

  CallState state(*c, function, io, io.host ? d->stream : static_cast<aclrtStream>(io.stream),
                  d->pool);
  // Every failure from here may leave work on the stream: the call's blocks
  // are quarantined and the device is marked dirty.
  auto failed = [&](const Status& st) {
    ReleaseAll(*c, d->pool, state.memory.held, false);
    d->dirty = true;
    return broken(st);
  };
  if (!(s = StageBuffers(state)).ok) return failed(s);
  if (entry.alltoallv) {
    const int64_t t1 = NowNs();
    // Peers may be waiting in the exchange: their collective fails, and the
    // group's communicators are re-created by the next call.
    s = RunAlltoAllv(*c, peer.plan, peer.comm, state.stream, io, state.dev_in, state.dev_out,
                     *peer.spec, state.memory);
    if (!s.ok) return failed(s);
    state.tm.phase2 = NowNs() - t1;
  } else if (!(s = RunAclnn(state, entry, *peer.spec, peer.group_name)).ok) {
    return failed(s);
  }
  if (io.host) {
    std::vector<size_t> count;
    std::vector<int> from;
    PlanReadBack(*peer.spec, io, &count, &from);
    const int64_t t2 = NowNs();
    s = WaitForStream(state);
    state.tm.wait = NowNs() - t2;
    if (!s.ok) return failed(s);
    collective_done = true;  // a failure from here on is this rank's alone
    if (!(s = ReadBack(state, count, from)).ok) return failed(s);
  } else if (!(s = WaitForStream(state)).ok) {
    // Device mode: the buffers are XLA's, but the pooled workspace may be
    // reused only once the stream has passed the kernel, so this first
    // version of the seam synchronizes too (an event-ordered pool would not).
    return failed(s);
  }
  ReleaseAll(*c, d->pool, state.memory.held, true);
  state.tm.total = NowNs() - t0;
  AddTimings(state.tm);
  return Status::Ok();
}

Status CopyBenchmark(int ordinal, size_t bytes, int reps, double* h2d, double* d2h) {
  const Cann* c = nullptr;
  DeviceState* d = nullptr;
  Status s = OpenDevice(ordinal, &c, &d);
  if (!s.ok) return s;
  std::lock_guard<std::mutex> lock(d->mu);
  if (!(s = Enter(*c, d)).ok) return s;
  std::vector<char> host(bytes, 1), back(bytes);
  aclError rc;
  size_t size = 0;
  void* dev = Acquire(*c, d->pool, bytes, &rc, &size);
  if (dev == nullptr) return Fail(*c, "aclrtMalloc", rc);
  const int64_t t0 = NowNs();
  for (int i = 0; i < reps; ++i)
    c->aclrtMemcpy(dev, bytes, host.data(), bytes, kMemcpyHostToDevice);
  const int64_t t1 = NowNs();
  for (int i = 0; i < reps; ++i)
    c->aclrtMemcpy(back.data(), bytes, dev, bytes, kMemcpyDeviceToHost);
  const int64_t t2 = NowNs();
  d->pool.free_blocks.emplace(size, dev);
  *h2d = (t1 - t0) * 1e-9;
  *d2h = (t2 - t1) * 1e-9;
  return Status::Ok();
}

}  // namespace jax_mc2::ascend
