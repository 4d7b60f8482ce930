// The matmul + all-reduce family's shared kernel, also used by the add +
// RMSNorm operators: one rank's partial result, then the reduction across
// the communicator (plain sum in the output dtype, the int8 low-bit chain, or
// the fp8 pertile chain).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ops_common.h"

namespace cann_double {
namespace ops {

// What every matmul + all-reduce call holds after phase 1.
struct MatmulAllReducePlan {
  const char* fn = "";
  std::string group;
  Tensor x1, bias, x3, out;
  Weight x2;
  int64_t m = 0, k = 0, n = 0;
  std::vector<int64_t> out_dims;
  int out_dtype = kFloat16;

  virtual ~MatmulAllReducePlan() = default;
  // Every tensor the kernel reads or writes.
  virtual std::vector<const Tensor*> Tensors() const;
  // The rank's partial [m * n]: rounded to out_dtype (x3 included) for the
  // sum and the int8 chain; fp32 (x3 included) for the fp8 chain.
  virtual std::vector<float> Local() const = 0;
  // The reduction of the partials across ranks into the output values.
  virtual aclnnStatus Reduce(const Collective& c, aclnnStatus local,
                             const std::vector<float>& partial, std::vector<float>* result,
                             std::string* message) const;
};

// The non-quantized plan: x1 @ x2 (fp32 accumulation) + bias + x3, one
// rounding to out_dtype; the all-reduce in out_dtype.
struct FloatMatmulPlan : MatmulAllReducePlan {
  std::vector<float> Local() const override;
  // x1 @ w + bias + x3 rounded once, for a (k, n) weight already decoded.
  std::vector<float> LocalWith(const std::vector<double>& w) const;
};

// Checks the float matmul arguments shared by MatmulAllReduce(V2/V3) and
// the add + RMSNorm operators: x1/x2 FLOAT16 or BFLOAT16 (x2 ND, or NZ when
// allow_nz), bias (n,) of x1's dtype; fills plan's x1, x2, bias, m, k, n,
// out_dims, out_dtype.
// n_hint: n for a 4-D FRACTAL_NZ view (the output's last dim), else 0.
aclnnStatus CheckFloatMatmul(const char* fn, const aclTensor* x1, const aclTensor* x2,
                             const aclTensor* bias, bool allow_nz, int64_t n_hint,
                             MatmulAllReducePlan* plan);

// Phase 2 kernel body of a plan: storage checks, the local part, the
// reduction, the output written. `after` (optional) post-processes the
// reduced values and writes further outputs (add + RMSNorm) instead of
// writing plan.out.
using AfterReduce = std::function<void(const std::vector<float>& reduced)>;
aclnnStatus RunMatmulAllReduce(const MatmulAllReducePlan& plan, int device,
                               const std::vector<const Tensor*>& extra, const AfterReduce& after,
                               std::string* message);

// The kernel closure of a plan.
KernelBody MatmulAllReduceKernel(std::shared_ptr<const MatmulAllReducePlan> plan);

}  // namespace ops
}  // namespace cann_double
