// libnnopbase.so of the double: tensor descriptors, int arrays, executors.
#include "core.h"

using namespace cann_double;

extern "C" {

CANN_DOUBLE_EXPORT aclTensor* aclCreateTensor(const int64_t* view_dims, uint64_t view_dims_num,
                                              int dtype, const int64_t* strides, int64_t offset,
                                              int format, const int64_t* storage_dims,
                                              uint64_t storage_dims_num, void* data) {
  return nn::CreateTensor(view_dims, view_dims_num, dtype, strides, offset, format, storage_dims,
                          storage_dims_num, data);
}
CANN_DOUBLE_EXPORT aclnnStatus aclDestroyTensor(const aclTensor* tensor) {
  return nn::DestroyTensor(tensor);
}
CANN_DOUBLE_EXPORT aclIntArray* aclCreateIntArray(const int64_t* values, uint64_t size) {
  return nn::CreateIntArray(values, size);
}
CANN_DOUBLE_EXPORT aclnnStatus aclDestroyIntArray(const aclIntArray* array) {
  return nn::DestroyIntArray(array);
}
CANN_DOUBLE_EXPORT aclnnStatus aclSetAclOpExecutorRepeatable(aclOpExecutor* executor) {
  return nn::SetExecutorRepeatable(executor);
}
CANN_DOUBLE_EXPORT aclnnStatus aclDestroyAclOpExecutor(aclOpExecutor* executor) {
  return nn::DestroyExecutor(executor);
}
CANN_DOUBLE_EXPORT aclnnStatus aclnnInit(const char*) { return nn::Init(); }
CANN_DOUBLE_EXPORT aclnnStatus aclnnFinalize() { return nn::Finalize(); }

}  // extern "C"
