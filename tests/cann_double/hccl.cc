// libhccl.so of the double: communicator management and the barrier.
#include "core.h"

using namespace cann_double;

extern "C" {

typedef int HcclResult;
struct HcclRootInfo {
  char internal[4108];
};
union HcclConfigValue {
  int32_t value;
};

CANN_DOUBLE_EXPORT HcclResult HcclGetRootInfo(HcclRootInfo* root_info) {
  return hccl::GetRootInfo(root_info);
}
CANN_DOUBLE_EXPORT HcclResult HcclCommInitRootInfo(uint32_t ranks, const HcclRootInfo* root_info,
                                                   uint32_t rank, HcclComm* comm) {
  return hccl::CommInitRootInfo(ranks, root_info, rank, comm);
}
// The config (buffer size, ...) changes nothing in the double.
CANN_DOUBLE_EXPORT HcclResult HcclCommInitRootInfoConfig(uint32_t ranks,
                                                         const HcclRootInfo* root_info,
                                                         uint32_t rank, const void*,
                                                         HcclComm* comm) {
  return hccl::CommInitRootInfo(ranks, root_info, rank, comm);
}
CANN_DOUBLE_EXPORT HcclResult HcclCommInitAll(uint32_t ranks, int32_t* devices, HcclComm* comms) {
  return hccl::CommInitAll(ranks, devices, comms);
}
CANN_DOUBLE_EXPORT HcclResult HcclGetCommName(HcclComm comm, char* name) {
  return hccl::GetCommName(comm, name);
}
CANN_DOUBLE_EXPORT HcclResult HcclGetRankSize(HcclComm comm, uint32_t* size) {
  return hccl::GetRankSize(comm, size);
}
CANN_DOUBLE_EXPORT HcclResult HcclGetRankId(HcclComm comm, uint32_t* rank) {
  return hccl::GetRankId(comm, rank);
}
CANN_DOUBLE_EXPORT HcclResult HcclCommDestroy(HcclComm comm) { return hccl::CommDestroy(comm); }
CANN_DOUBLE_EXPORT HcclResult HcclSetConfig(int config, HcclConfigValue value) {
  return hccl::SetConfig(config, value.value);
}
CANN_DOUBLE_EXPORT HcclResult HcclBarrier(HcclComm comm, aclrtStream stream) {
  return hccl::Barrier(comm, stream);
}
CANN_DOUBLE_EXPORT const char* HcclGetErrorString(HcclResult code) {
  return hccl::ErrorString(code);
}

}  // extern "C"
