// libhccl.so of the double: communicator management, the barrier and
// HcclAlltoAllV (left out when built with -DCANN_DOUBLE_WITHOUT_ALLTOALLV, to
// stand for an HCCL that lacks it).
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
#ifndef CANN_DOUBLE_WITHOUT_ALLTOALLV
// HcclDataType is an int-sized enum.
CANN_DOUBLE_EXPORT HcclResult HcclAlltoAllV(const void* send_buf, const void* send_counts,
                                            const void* sdispls, int send_type,
                                            const void* recv_buf, const void* recv_counts,
                                            const void* rdispls, int recv_type, HcclComm comm,
                                            aclrtStream stream) {
  return hccl::AlltoAllV(send_buf, send_counts, sdispls, send_type, recv_buf, recv_counts, rdispls,
                         recv_type, comm, stream);
}
#endif
CANN_DOUBLE_EXPORT const char* HcclGetErrorString(HcclResult code) {
  return hccl::ErrorString(code);
}

}  // extern "C"
