// Communicators. Ranks of one process that share a communicator exchange data
// through a LocalGroup (mutex + condition variable). A communicator made from
// a root info whose ranks span processes talks through the hub: a small TCP
// server on 127.0.0.1 that the root-info holder runs. Every rank keeps one
// connection to it; the hub collects each AllGatherV round from all ranks and
// sends the concatenation back to each.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <thread>

#include "core.h"

namespace cann_double {
namespace {

using Clock = std::chrono::steady_clock;
using Bytes = std::vector<uint8_t>;

constexpr int kDefaultTimeoutMs = 30000;
constexpr size_t kRootInfoBytes = 4108;
constexpr size_t kCommNameMax = 128;
constexpr char kRootInfoMagic[8] = "CANNDBL";

// The communicator timeout, read when a communicator is created.
int TimeoutMs() {
  std::string ms = GetEnv("CANN_DOUBLE_HCCL_TIMEOUT_MS");
  if (!ms.empty() && std::atoi(ms.c_str()) > 0) return std::atoi(ms.c_str());
  std::string seconds = GetEnv("HCCL_CONNECT_TIMEOUT");
  if (!seconds.empty() && std::atoi(seconds.c_str()) > 0) return std::atoi(seconds.c_str()) * 1000;
  return kDefaultTimeoutMs;
}

uint64_t UniqueId() {
  static std::mutex mutex;
  static std::mt19937_64 random(std::random_device{}() ^ (uint64_t(getpid()) << 32));
  std::lock_guard<std::mutex> lock(mutex);
  return random();
}

std::string CommNameFor(uint64_t id) {
  char name[64];
  std::snprintf(name, sizeof name, "cann_double_comm_%016llx", (unsigned long long)id);
  return name;
}

// ---- in-process rounds ----

struct Round {
  std::vector<Bytes> data;
  int arrived = 0;
  int taken = 0;
};

struct LocalGroup {
  explicit LocalGroup(int size) : size(size) {}
  const int size;
  std::mutex mutex;
  std::condition_variable changed;
  std::map<uint64_t, Round> rounds;
  int broken = kHcclSuccess;  // once set, every later round fails with it
};

// ---- wire format (hub <-> rank) ----

enum MessageType : uint32_t {
  kHello = 1,     // seq = nRanks, payload = root id (u64) + pid (i32)
  kWelcome = 2,   // seq = 1 if every rank runs in one process, payload = comm name
  kGather = 3,    // seq = round, payload = this rank's bytes
  kResult = 4,    // seq = round, payload = per rank: u64 size + bytes
  kAbort = 5,     // seq = HcclResult every rank returns
  kTimedOut = 6,  // a rank gave up waiting
  kBye = 7,       // a rank destroyed its communicator
};

struct Header {
  uint32_t type;
  uint32_t rank;
  uint64_t seq;
  uint64_t length;
};

struct Message {
  Header header{};
  Bytes payload;
};

struct RootInfoWire {
  char magic[8];
  char host[16];
  uint16_t port;
  uint64_t id;
  int32_t pid;
};
static_assert(sizeof(RootInfoWire) <= kRootInfoBytes, "root info too large");

bool SendAll(int fd, const void* data, size_t size) {
  auto* bytes = static_cast<const uint8_t*>(data);
  while (size > 0) {
    ssize_t sent = send(fd, bytes, size, MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;
    if (sent <= 0) return false;
    bytes += sent;
    size -= static_cast<size_t>(sent);
  }
  return true;
}

bool SendMessage(int fd, uint32_t type, uint32_t rank, uint64_t seq, const void* data,
                 size_t size) {
  Header header{type, rank, seq, size};
  return SendAll(fd, &header, sizeof header) && SendAll(fd, data, size);
}

enum class Received { kOk, kTimeout, kClosed };

// Reads exactly `size` bytes; a deadline of Clock::time_point::max() waits forever.
Received RecvAll(int fd, void* data, size_t size, Clock::time_point deadline) {
  auto* bytes = static_cast<uint8_t*>(data);
  while (size > 0) {
    int wait_ms = -1;
    if (deadline != Clock::time_point::max()) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return Received::kTimeout;
      wait_ms = static_cast<int>(left.count());
    }
    pollfd entry{fd, POLLIN, 0};
    int ready = poll(&entry, 1, wait_ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) return Received::kTimeout;
    ssize_t got = recv(fd, bytes, size, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return Received::kClosed;
    bytes += got;
    size -= static_cast<size_t>(got);
  }
  return Received::kOk;
}

Received RecvMessage(int fd, Message* message, Clock::time_point deadline) {
  Received status = RecvAll(fd, &message->header, sizeof message->header, deadline);
  if (status != Received::kOk) return status;
  message->payload.resize(message->header.length);
  return RecvAll(fd, message->payload.data(), message->payload.size(), deadline);
}

// ---- the hub ----

struct Hub {
  uint64_t id = 0;
  int listen_fd = -1;
  std::mutex mutex;
  int size = 0;
  std::map<int, int> rank_fds;
  std::set<int> pids;
  int joined = 0;
  int left = 0;
  bool aborted = false;
  std::map<uint64_t, std::map<int, Bytes>> rounds;
};

void HubBroadcast(Hub& hub, uint32_t type, uint64_t seq, const Bytes& payload) {
  for (const auto& entry : hub.rank_fds) {
    SendMessage(entry.second, type, entry.first, seq, payload.data(), payload.size());
  }
}

void HubAbort(Hub& hub, int code) {
  if (hub.aborted) return;
  hub.aborted = true;
  HubBroadcast(hub, kAbort, static_cast<uint64_t>(code), {});
}

// Registers a rank's hello; once all ranks are in, welcomes them all.
void HubJoin(Hub& hub, int fd, const Header& hello, uint64_t id, int pid) {
  int ranks = static_cast<int>(hello.seq);
  int rank = static_cast<int>(hello.rank);
  bool valid = id == hub.id && ranks > 0 && (hub.size == 0 || hub.size == ranks) && rank >= 0 &&
               rank < ranks && hub.rank_fds.count(rank) == 0;
  if (!valid) {
    SendMessage(fd, kAbort, hello.rank, kHcclErrPara, nullptr, 0);
    return;
  }
  hub.size = ranks;
  hub.rank_fds[rank] = fd;
  hub.pids.insert(pid);
  if (++hub.joined < hub.size) return;
  std::string name = CommNameFor(hub.id);
  HubBroadcast(hub, kWelcome, hub.pids.size() == 1, Bytes(name.begin(), name.end()));
}

void HubGather(Hub& hub, const Message& message) {
  auto& round = hub.rounds[message.header.seq];
  round[static_cast<int>(message.header.rank)] = message.payload;
  if (static_cast<int>(round.size()) < hub.size) return;
  Bytes result;
  for (const auto& entry : round) {
    uint64_t size = entry.second.size();
    const auto* size_bytes = reinterpret_cast<const uint8_t*>(&size);
    result.insert(result.end(), size_bytes, size_bytes + sizeof size);
    result.insert(result.end(), entry.second.begin(), entry.second.end());
  }
  HubBroadcast(hub, kResult, message.header.seq, result);
  hub.rounds.erase(message.header.seq);
}

// Serves one rank's connection until it leaves.
void HubServe(std::shared_ptr<Hub> hub, int fd) {
  Message message;
  bool said_bye = false;
  while (RecvMessage(fd, &message, Clock::time_point::max()) == Received::kOk) {
    std::lock_guard<std::mutex> lock(hub->mutex);
    switch (message.header.type) {
      case kHello: {
        uint64_t id = 0;
        int32_t pid = 0;
        if (message.payload.size() == sizeof id + sizeof pid) {
          std::memcpy(&id, message.payload.data(), sizeof id);
          std::memcpy(&pid, message.payload.data() + sizeof id, sizeof pid);
        }
        HubJoin(*hub, fd, message.header, id, pid);
        break;
      }
      case kGather:
        HubGather(*hub, message);
        break;
      case kTimedOut:
        HubAbort(*hub, kHcclErrTimeout);
        break;
      case kBye:
        said_bye = true;
        break;
    }
    if (said_bye) break;
  }
  std::lock_guard<std::mutex> lock(hub->mutex);
  if (!said_bye) HubAbort(*hub, kHcclErrRemote);  // a rank vanished
  for (auto entry = hub->rank_fds.begin(); entry != hub->rank_fds.end(); ++entry) {
    if (entry->second == fd) {
      hub->rank_fds.erase(entry);
      break;
    }
  }
  close(fd);
  if (++hub->left == hub->size) shutdown(hub->listen_fd, SHUT_RDWR);
}

void HubAccept(std::shared_ptr<Hub> hub) {
  for (;;) {
    int fd = accept(hub->listen_fd, nullptr, nullptr);
    if (fd < 0) {
      if (errno == EINTR) continue;
      break;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    std::thread(HubServe, hub, fd).detach();
  }
  close(hub->listen_fd);
}

// Opens a listener on 127.0.0.1 and serves it; returns the port, 0 on failure.
uint16_t StartHub(uint64_t id) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), length) != 0 || listen(fd, 256) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    close(fd);
    return 0;
  }
  auto hub = std::make_shared<Hub>();
  hub->id = id;
  hub->listen_fd = fd;
  std::thread(HubAccept, hub).detach();
  return ntohs(address.sin_port);
}

// Connects to the hub, retrying until `deadline` (the root may not listen yet).
int ConnectHub(const RootInfoWire& info, Clock::time_point deadline) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(info.port);
  if (inet_pton(AF_INET, info.host, &address.sin_addr) != 1) return -1;
  while (Clock::now() < deadline) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      return fd;
    }
    close(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

}  // namespace

// ---- communicators ----

namespace {

// HcclSetConfig's HCCL_DETERMINISTIC (config 0): process-wide, read when a
// communicator is made.
constexpr int kConfigDeterministic = 0;
std::atomic<int32_t> g_deterministic{0};

}  // namespace

struct Comm {
  std::string name;
  int rank = 0;
  int size = 0;
  int device = -1;
  int timeout_ms = kDefaultTimeoutMs;
  std::shared_ptr<LocalGroup> local;  // set when every rank is in this process
  int hub_fd = -1;                    // connection to the hub (root-info comms)
  std::mutex mutex;                   // one collective at a time per rank
  uint64_t next_round = 0;
  int broken = kHcclSuccess;
  int32_t deterministic = 0;  // HCCL_DETERMINISTIC when it was made
};

namespace {

struct Comms {
  std::mutex mutex;
  std::set<Comm*> live;
  std::set<Comm*> destroyed;  // never freed: queued kernels may still hold them
  std::map<uint64_t, std::weak_ptr<LocalGroup>> groups_by_root;
};

Comms& GetComms() {
  static Comms* comms = new Comms;
  return *comms;
}

Comm* LiveComm(HcclComm handle) {
  Comms& comms = GetComms();
  std::lock_guard<std::mutex> lock(comms.mutex);
  auto* comm = static_cast<Comm*>(handle);
  return comms.live.count(comm) ? comm : nullptr;
}

Comm* NewComm(const std::string& name, int rank, int size, int device, int timeout_ms) {
  auto* comm = new Comm;
  comm->deterministic = g_deterministic.load();
  comm->name = name;
  comm->rank = rank;
  comm->size = size;
  comm->device = device;
  comm->timeout_ms = timeout_ms;
  Comms& comms = GetComms();
  std::lock_guard<std::mutex> lock(comms.mutex);
  comms.live.insert(comm);
  return comm;
}

bool Stalled(const Comm& comm) {
  std::string rule = GetEnv("CANN_DOUBLE_STALL_RANK");
  size_t colon = rule.rfind(':');
  if (colon == std::string::npos) return false;
  std::string group = rule.substr(0, colon);
  return (group == "*" || group == comm.name) && std::atoi(rule.c_str() + colon + 1) == comm.rank;
}

// A stalled rank waits past the deadline by this much, so the others time out first.
constexpr auto kStallMargin = std::chrono::milliseconds(200);

int LocalAllGatherV(Comm& comm, uint64_t seq, const void* data, size_t bytes, bool stall,
                    std::vector<Bytes>* out) {
  LocalGroup& group = *comm.local;
  auto deadline = Clock::now() + std::chrono::milliseconds(comm.timeout_ms);
  std::unique_lock<std::mutex> lock(group.mutex);
  if (stall) {
    group.changed.wait_until(lock, deadline + kStallMargin, [&] { return group.broken != 0; });
  } else if (group.broken == kHcclSuccess) {
    Round& round = group.rounds[seq];
    round.data.resize(group.size);
    auto* begin = static_cast<const uint8_t*>(data);
    round.data[comm.rank].assign(begin, begin + bytes);
    ++round.arrived;
    group.changed.notify_all();
    group.changed.wait_until(lock, deadline,
                             [&] { return round.arrived == group.size || group.broken != 0; });
    if (round.arrived == group.size) {
      *out = round.data;
      if (++round.taken == group.size) group.rounds.erase(seq);
      return kHcclSuccess;
    }
  }
  if (group.broken == kHcclSuccess) group.broken = kHcclErrTimeout;
  group.changed.notify_all();
  return group.broken;
}

bool ParseResult(const Bytes& payload, int size, std::vector<Bytes>* out) {
  out->assign(size, {});
  size_t at = 0;
  for (int rank = 0; rank < size; ++rank) {
    uint64_t length;
    if (payload.size() - at < sizeof length) return false;
    std::memcpy(&length, payload.data() + at, sizeof length);
    at += sizeof length;
    if (payload.size() - at < length) return false;
    (*out)[rank].assign(payload.begin() + at, payload.begin() + at + length);
    at += length;
  }
  return at == payload.size();
}

// Waits for the hub's answer to `seq` (or an abort) until `deadline`.
int AwaitHub(Comm& comm, uint64_t seq, Clock::time_point deadline, std::vector<Bytes>* out) {
  Message message;
  for (;;) {
    Received status = RecvMessage(comm.hub_fd, &message, deadline);
    if (status == Received::kTimeout) {
      SendMessage(comm.hub_fd, kTimedOut, comm.rank, seq, nullptr, 0);
      return kHcclErrTimeout;
    }
    if (status == Received::kClosed) return kHcclErrTcpTransfer;
    if (message.header.type == kAbort) return static_cast<int>(message.header.seq);
    if (message.header.type == kResult && message.header.seq == seq) {
      return ParseResult(message.payload, comm.size, out) ? kHcclSuccess : kHcclErrTcpTransfer;
    }
  }
}

int HubAllGatherV(Comm& comm, uint64_t seq, const void* data, size_t bytes, bool stall,
                  std::vector<Bytes>* out) {
  auto deadline = Clock::now() + std::chrono::milliseconds(comm.timeout_ms);
  if (stall) {
    Message message;  // wait for the others' abort, or give up a little later
    RecvMessage(comm.hub_fd, &message, deadline + kStallMargin);
    return kHcclErrTimeout;
  }
  if (!SendMessage(comm.hub_fd, kGather, comm.rank, seq, data, bytes)) return kHcclErrTcpTransfer;
  return AwaitHub(comm, seq, deadline, out);
}

// Joins the hub named by `info` as `rank`; returns an HcclResult.
int JoinHub(const RootInfoWire& info, uint32_t ranks, uint32_t rank, int timeout_ms, int* fd_out,
            Message* welcome) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  int fd = ConnectHub(info, deadline);
  if (fd < 0) {
    SetRecentError("HcclCommInitRootInfo: cannot reach the root at " + std::string(info.host) +
                   ":" + std::to_string(info.port));
    return kHcclErrTimeout;
  }
  uint8_t hello[12];
  int32_t pid = getpid();
  std::memcpy(hello, &info.id, 8);
  std::memcpy(hello + 8, &pid, 4);
  int result = kHcclErrTcpTransfer;
  if (SendMessage(fd, kHello, rank, ranks, hello, sizeof hello)) {
    Received status = RecvMessage(fd, welcome, deadline);
    if (status == Received::kTimeout) {
      SendMessage(fd, kTimedOut, rank, 0, nullptr, 0);
      result = kHcclErrTimeout;
    } else if (status == Received::kOk) {
      result =
          welcome->header.type == kWelcome ? kHcclSuccess : static_cast<int>(welcome->header.seq);
    }
  }
  if (result != kHcclSuccess) {
    close(fd);
    SetRecentError("HcclCommInitRootInfo: rank " + std::to_string(rank) + " of " +
                   std::to_string(ranks) + " failed to rendezvous (HcclResult " +
                   std::to_string(result) + ")");
    return result;
  }
  *fd_out = fd;
  return kHcclSuccess;
}

std::shared_ptr<LocalGroup> SharedLocalGroup(uint64_t root_id, int size) {
  Comms& comms = GetComms();
  std::lock_guard<std::mutex> lock(comms.mutex);
  std::shared_ptr<LocalGroup> group = comms.groups_by_root[root_id].lock();
  if (!group) {
    group = std::make_shared<LocalGroup>(size);
    comms.groups_by_root[root_id] = group;
  }
  return group;
}

}  // namespace

Comm* FindComm(const char* group, int device) {
  if (group == nullptr) return nullptr;
  Comms& comms = GetComms();
  std::lock_guard<std::mutex> lock(comms.mutex);
  for (Comm* comm : comms.live) {
    if (comm->name == group && comm->device == device) return comm;
  }
  return nullptr;
}

int CommRank(const Comm* comm) { return comm->rank; }
int CommSize(const Comm* comm) { return comm->size; }

int AllGatherV(Comm* comm, const void* data, size_t bytes, std::vector<Bytes>* out) {
  std::lock_guard<std::mutex> lock(comm->mutex);
  if (comm->broken != kHcclSuccess) return comm->broken;
  uint64_t seq = comm->next_round++;
  bool stall = Stalled(*comm);
  int result = comm->local ? LocalAllGatherV(*comm, seq, data, bytes, stall, out)
                           : HubAllGatherV(*comm, seq, data, bytes, stall, out);
  if (result != kHcclSuccess) {
    comm->broken = result;
    SetRecentError("AllGatherV on " + comm->name + " rank " + std::to_string(comm->rank) +
                   " failed: " + hccl::ErrorString(result) +
                   (result == kHcclErrTimeout ? " (a rank did not arrive within " +
                                                    std::to_string(comm->timeout_ms) + " ms)"
                                              : ""));
  }
  return result;
}

int64_t LiveCommCount() {
  Comms& comms = GetComms();
  std::lock_guard<std::mutex> lock(comms.mutex);
  return static_cast<int64_t>(comms.live.size());
}

int64_t LiveDeterministicCommCount() {
  Comms& comms = GetComms();
  std::lock_guard<std::mutex> lock(comms.mutex);
  int64_t count = 0;
  for (const Comm* comm : comms.live) count += comm->deterministic != 0;
  return count;
}

namespace hccl {

// HcclGetRootInfo and HcclCommInitAll begin by reading the calling thread's
// current device (a runtime query) and fail without one. The double returns
// HCCL_E_RUNTIME (15), HcclResult's code for a failed runtime call; the code
// real HCCL passes on from its query may differ by version.
namespace {
bool NeedsDevice(const char* function) {
  if (CurrentDevice() >= 0) return true;
  SetRecentError(std::string(function) +
                 ": no device set on this thread (call aclrtSetDevice or "
                 "aclrtSetCurrentContext first)");
  return false;
}
}  // namespace

int GetRootInfo(void* root_info) {
  if (root_info == nullptr) return kHcclErrPtr;
  if (!NeedsDevice("HcclGetRootInfo")) return kHcclErrRuntime;
  RootInfoWire info{};
  std::memcpy(info.magic, kRootInfoMagic, sizeof info.magic);
  std::strcpy(info.host, "127.0.0.1");
  info.id = UniqueId();
  info.pid = getpid();
  info.port = StartHub(info.id);
  if (info.port == 0) {
    SetRecentError("HcclGetRootInfo: cannot listen on 127.0.0.1");
    return kHcclErrTcpConnect;
  }
  std::memset(root_info, 0, kRootInfoBytes);
  std::memcpy(root_info, &info, sizeof info);
  return kHcclSuccess;
}

int CommInitRootInfo(uint32_t ranks, const void* root_info, uint32_t rank, HcclComm* comm) {
  if (root_info == nullptr || comm == nullptr) return kHcclErrPtr;
  RootInfoWire info;
  std::memcpy(&info, root_info, sizeof info);
  if (std::memcmp(info.magic, kRootInfoMagic, sizeof info.magic) != 0 || ranks == 0 ||
      rank >= ranks) {
    SetRecentError("HcclCommInitRootInfo: bad root info, nRanks or rank");
    return kHcclErrPara;
  }
  int device = CurrentDevice();
  if (device < 0) {
    SetRecentError("HcclCommInitRootInfo: no device set on this thread");
    return kHcclErrPara;
  }
  int timeout_ms = TimeoutMs();
  int fd = -1;
  Message welcome;
  int result = JoinHub(info, ranks, rank, timeout_ms, &fd, &welcome);
  if (result != kHcclSuccess) return result;
  std::string name(welcome.payload.begin(), welcome.payload.end());
  Comm* created =
      NewComm(name, static_cast<int>(rank), static_cast<int>(ranks), device, timeout_ms);
  created->hub_fd = fd;  // kept: the hub counts the rank gone when it closes
  if (welcome.header.seq == 1) created->local = SharedLocalGroup(info.id, ranks);
  *comm = created;
  return kHcclSuccess;
}

int CommInitAll(uint32_t ranks, const int32_t* devices, HcclComm* comms) {
  if (devices == nullptr || comms == nullptr) return kHcclErrPtr;
  if (!NeedsDevice("HcclCommInitAll")) return kHcclErrRuntime;
  std::set<int32_t> distinct(devices, devices + ranks);
  if (ranks == 0 || distinct.size() != ranks || *distinct.begin() < 0 ||
      *distinct.rbegin() >= DeviceCount()) {
    SetRecentError("HcclCommInitAll: devices must be distinct valid device ids");
    return kHcclErrPara;
  }
  std::string name = CommNameFor(UniqueId());
  auto group = std::make_shared<LocalGroup>(static_cast<int>(ranks));
  int timeout_ms = TimeoutMs();
  for (uint32_t rank = 0; rank < ranks; ++rank) {
    Comm* comm =
        NewComm(name, static_cast<int>(rank), static_cast<int>(ranks), devices[rank], timeout_ms);
    comm->local = group;
    comms[rank] = comm;
  }
  return kHcclSuccess;
}

int GetCommName(HcclComm handle, char* name) {
  if (int injected = InjectedStatus("HcclGetCommName")) return injected;
  Comm* comm = LiveComm(handle);
  if (comm == nullptr || name == nullptr) return kHcclErrPtr;
  std::snprintf(name, kCommNameMax, "%s", comm->name.c_str());
  return kHcclSuccess;
}

int GetRankSize(HcclComm handle, uint32_t* size) {
  Comm* comm = LiveComm(handle);
  if (comm == nullptr || size == nullptr) return kHcclErrPtr;
  *size = static_cast<uint32_t>(comm->size);
  return kHcclSuccess;
}

int GetRankId(HcclComm handle, uint32_t* rank) {
  Comm* comm = LiveComm(handle);
  if (comm == nullptr || rank == nullptr) return kHcclErrPtr;
  *rank = static_cast<uint32_t>(comm->rank);
  return kHcclSuccess;
}

int CommDestroy(HcclComm handle) {
  auto* comm = static_cast<Comm*>(handle);
  std::string problem;
  const int device = CurrentDevice();
  {
    Comms& comms = GetComms();
    std::lock_guard<std::mutex> lock(comms.mutex);
    if (comms.live.count(comm) && comm->device != device) {
      // HCCL looks the communicator up in the table of the calling thread's
      // device (every communicator, HcclCommInitAll's included: those are
      // root-info communicators made on one thread per device): from
      // another device it is not found, HCCL_E_PARA, and nothing is destroyed.
      problem = "the communicator of device " + std::to_string(comm->device) +
                " destroyed from a thread whose current device is " + std::to_string(device) +
                " (not found in that device's table; nothing destroyed)";
    } else if (comms.live.erase(comm)) {
      comms.destroyed.insert(comm);
    } else {
      problem =
          comms.destroyed.count(comm) ? "communicator destroyed twice" : "unknown communicator";
    }
  }
  if (!problem.empty()) {
    RecordViolation("HcclCommDestroy: " + problem);
    return kHcclErrPara;
  }
  std::lock_guard<std::mutex> lock(comm->mutex);
  if (comm->hub_fd >= 0) {
    SendMessage(comm->hub_fd, kBye, comm->rank, 0, nullptr, 0);
    close(comm->hub_fd);
    comm->hub_fd = -1;
  }
  comm->broken = kHcclErrPara;  // a kernel still holding it fails instead of hanging
  return kHcclSuccess;
}

int SetConfig(int config, int32_t value) {
  if (config != kConfigDeterministic) return kHcclErrNotFound;  // the only one there is
  g_deterministic.store(value);
  return kHcclSuccess;
}

int Barrier(HcclComm handle, aclrtStream stream) {
  Comm* comm = LiveComm(handle);
  if (comm == nullptr) return kHcclErrPtr;
  aclError status = Enqueue("HcclBarrier", stream, [comm](std::string* message) {
    std::vector<Bytes> ignored;
    int result = AllGatherV(comm, nullptr, 0, &ignored);
    if (result == kHcclSuccess) return kAclSuccess;
    *message = "HcclBarrier: " + std::string(ErrorString(result));
    return result == kHcclErrTimeout ? kRtErrStreamSyncTimeout : kRtErrAicoreException;
  });
  return status == kAclSuccess ? kHcclSuccess : kHcclErrPara;
}

namespace {

// Bytes per element of an HcclDataType (0: not one HcclAlltoAllV takes).
size_t DataTypeBytes(int type) {
  switch (type) {
    case 0:  // INT8
    case 7:  // UINT8
      return 1;
    case 1:   // INT16
    case 3:   // FP16
    case 8:   // UINT16
    case 11:  // BFP16
      return 2;
    case 2:  // INT32
    case 4:  // FP32
    case 9:  // UINT32
      return 4;
    case 5:   // INT64
    case 6:   // UINT64
    case 10:  // FP64
      return 8;
    default:
      return 0;
  }
}

// Whether every non-empty block (displs[i], counts[i]) of `buf` lies in live
// device memory; `why` names the first that does not.
bool CheckBlocks(const char* side, const void* buf, const std::vector<uint64_t>& counts,
                 const std::vector<uint64_t>& displs, size_t item, std::string* why) {
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] == 0) continue;
    std::string range;
    if (buf == nullptr || !CheckDeviceRange(static_cast<const uint8_t*>(buf) + displs[i] * item,
                                            counts[i] * item, &range)) {
      *why = std::string(side) + " block " + std::to_string(i) + " (displacement " +
             std::to_string(displs[i]) + ", count " + std::to_string(counts[i]) +
             ") is not in live device memory" + (range.empty() ? "" : ": " + range);
      return false;
    }
  }
  return true;
}

}  // namespace

int AlltoAllV(const void* send_buf, const void* send_counts, const void* sdispls, int send_type,
              const void* recv_buf, const void* recv_counts, const void* rdispls, int recv_type,
              HcclComm handle, aclrtStream stream) {
  if (int injected = InjectedStatus("HcclAlltoAllV")) return injected;
  auto fail = [](int code, const std::string& why) {
    SetRecentError("HcclAlltoAllV: " + why);
    return code;
  };
  Comm* comm = LiveComm(handle);
  if (comm == nullptr) return fail(kHcclErrPtr, "not a live communicator");
  if (send_counts == nullptr || sdispls == nullptr || recv_counts == nullptr || rdispls == nullptr)
    return fail(kHcclErrPtr, "a count or displacement array is null");
  if (send_type != recv_type) return fail(kHcclErrPara, "sendType and recvType differ");
  const size_t item = DataTypeBytes(send_type);
  if (item == 0) return fail(kHcclErrPara, "unsupported HcclDataType " + std::to_string(send_type));
  if (CurrentDevice() != comm->device)
    return fail(kHcclErrPara, "the communicator belongs to device " + std::to_string(comm->device) +
                                  ", the thread's device is " + std::to_string(CurrentDevice()));
  const size_t ranks = static_cast<size_t>(comm->size);
  auto copy = [ranks](const void* array) {
    const auto* values = static_cast<const uint64_t*>(array);
    return std::vector<uint64_t>(values, values + ranks);
  };
  const std::vector<uint64_t> sc = copy(send_counts), sd = copy(sdispls), rc = copy(recv_counts),
                              rd = copy(rdispls);
  uint64_t sent = 0, received = 0;
  for (size_t i = 0; i < ranks; ++i) {
    sent += sc[i];
    received += rc[i];
  }
  if (send_buf == recv_buf && sent + received > 0)
    return fail(kHcclErrPara, "recvBuf and sendBuf must differ");
  std::string why;
  if (!CheckBlocks("send", send_buf, sc, sd, item, &why) ||
      !CheckBlocks("receive", recv_buf, rc, rd, item, &why))
    return fail(kHcclErrPara, why);
  const int rank = comm->rank;
  auto* out = static_cast<uint8_t*>(const_cast<void*>(recv_buf));
  const auto* in = static_cast<const uint8_t*>(send_buf);
  aclError status = Enqueue("HcclAlltoAllV", stream, [=](std::string* message) {
    // Every rank's wire: int32 status, then its per-rank counts and its
    // blocks in rank order (or its error message). The memory is checked
    // again: it may have been freed since the call.
    std::string late;
    int32_t local = CheckBlocks("send", in, sc, sd, item, &late) &&
                            CheckBlocks("receive", out, rc, rd, item, &late)
                        ? 0
                        : 1;
    Bytes wire(4);
    std::memcpy(wire.data(), &local, 4);
    if (local == 0) {
      const auto* counts = reinterpret_cast<const uint8_t*>(sc.data());
      wire.insert(wire.end(), counts, counts + ranks * sizeof(uint64_t));
      for (size_t d = 0; d < ranks; ++d)
        wire.insert(wire.end(), in + sd[d] * item, in + (sd[d] + sc[d]) * item);
    } else {
      wire.insert(wire.end(), late.begin(), late.end());
    }
    std::vector<Bytes> got;
    const int result = AllGatherV(comm, wire.data(), wire.size(), &got);
    if (result != kHcclSuccess) {
      *message = "HcclAlltoAllV: " + std::string(ErrorString(result)) +
                 (result == kHcclErrTimeout ? " (a rank did not arrive)" : "");
      return result == kHcclErrTimeout ? kRtErrStreamSyncTimeout : kRtErrAicoreException;
    }
    if (local != 0) {
      *message = "HcclAlltoAllV (when run on the stream): " + late;
      return kRtErrAicoreException;
    }
    for (size_t s = 0; s < ranks; ++s) {
      const Bytes& w = got[s];
      int32_t peer = 1;
      if (w.size() >= 4) std::memcpy(&peer, w.data(), 4);
      if (peer != 0) {
        *message = "HcclAlltoAllV: rank " + std::to_string(s) +
                   " failed: " + std::string(w.begin() + std::min<size_t>(4, w.size()), w.end());
        return kRtErrAicoreException;
      }
      if (w.size() < 4 + ranks * sizeof(uint64_t)) {
        *message = "HcclAlltoAllV: rank " + std::to_string(s) + " sent a short payload";
        return kRtErrAicoreException;
      }
      std::vector<uint64_t> counts(ranks);
      std::memcpy(counts.data(), w.data() + 4, ranks * sizeof(uint64_t));
      uint64_t before = 0, total = 0;
      for (size_t d = 0; d < ranks; ++d) {
        if (static_cast<int>(d) < rank) before += counts[d];
        total += counts[d];
      }
      if (w.size() != 4 + ranks * sizeof(uint64_t) + total * item) {
        *message = "HcclAlltoAllV: rank " + std::to_string(s) +
                   " sent data that does not match its sendCounts";
        return kRtErrAicoreException;
      }
      if (counts[rank] != rc[s]) {
        *message = "HcclAlltoAllV: recvCounts[" + std::to_string(s) +
                   "] = " + std::to_string(rc[s]) + " on rank " + std::to_string(rank) +
                   " but rank " + std::to_string(s) + " sends it " + std::to_string(counts[rank]) +
                   " elements";
        return kRtErrAicoreException;
      }
      const uint8_t* data = w.data() + 4 + ranks * sizeof(uint64_t) + before * item;
      if (rc[s]) std::memcpy(out + rd[s] * item, data, rc[s] * item);
    }
    return kAclSuccess;
  });
  return status == kAclSuccess ? kHcclSuccess : kHcclErrPara;
}

const char* ErrorString(int code) {
  static const char* const kNames[] = {"HCCL_SUCCESS",
                                       "HCCL_E_PARA",
                                       "HCCL_E_PTR",
                                       "HCCL_E_MEMORY",
                                       "HCCL_E_INTERNAL",
                                       "HCCL_E_NOT_SUPPORT",
                                       "HCCL_E_NOT_FOUND",
                                       "HCCL_E_UNAVAIL",
                                       "HCCL_E_SYSCALL",
                                       "HCCL_E_TIMEOUT",
                                       "HCCL_E_OPEN_FILE_FAILURE",
                                       "HCCL_E_TCP_CONNECT",
                                       "HCCL_E_ROCE_CONNECT",
                                       "HCCL_E_TCP_TRANSFER",
                                       "HCCL_E_ROCE_TRANSFER",
                                       "HCCL_E_RUNTIME",
                                       "HCCL_E_DRV",
                                       "HCCL_E_PROFILING",
                                       "HCCL_E_CCE",
                                       "HCCL_E_NETWORK",
                                       "HCCL_E_AGAIN",
                                       "HCCL_E_REMOTE",
                                       "HCCL_E_SUSPENDING",
                                       "HCCL_E_OPRETRY_FAIL",
                                       "HCCL_E_OOM"};
  if (code >= 0 && code < static_cast<int>(sizeof kNames / sizeof kNames[0])) {
    return kNames[code];
  }
  return code == 1041 ? "HCCL_E_IN_STATUS" : "HCCL_E_UNKNOWN";
}

}  // namespace hccl
}  // namespace cann_double
