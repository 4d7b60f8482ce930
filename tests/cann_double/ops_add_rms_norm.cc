// aclnnMatmulAllReduceAddRmsNorm and aclnnInplaceMatmulAllReduceAddRmsNorm:
//   mm = allReduce(x1 @ x2 + bias)          (in the dtype, as the plain operator)
//   y = round(mm + residual)
//   normOut = round(round(y * rstd) * gamma), rstd = 1 / sqrt(mean(y^2) + eps)
// with the statistics in fp32 over the rounded y; the inplace variant writes
// y into residual.
#include <cmath>

#include "ops_matmul_all_reduce.h"

namespace cann_double {
namespace ops {
namespace {

struct AddRmsNormPlan : FloatMatmulPlan {
  Tensor residual, gamma, y, norm_out;  // y is residual itself when inplace
  float epsilon = 1e-6f;

  std::vector<const Tensor*> Tensors() const override {
    auto t = MatmulAllReducePlan::Tensors();
    for (const Tensor* e : {&residual, &gamma, &y, &norm_out}) t.push_back(e);
    return t;
  }

  // y and normOut from the all-reduced mm [m, n].
  void AddRmsNorm(const std::vector<float>& mm) const {
    const std::vector<double> res = ReadAll(residual), gam = ReadAll(gamma);
    std::vector<float> yv(mm.size()), norm(mm.size());
    const float inv_n = n > 0 ? 1.0f / static_cast<float>(n) : 0.0f;
    for (int64_t i = 0; i < m; ++i) {
      double ms = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        const float v = RoundTo(out_dtype, mm[i * n + j] + static_cast<float>(res[i * n + j]));
        yv[i * n + j] = v;
        ms += (v * v) * inv_n;
      }
      const float rstd = 1.0f / std::sqrt(static_cast<float>(ms) + epsilon);
      for (int64_t j = 0; j < n; ++j) {
        const float t = RoundTo(out_dtype, yv[i * n + j] * rstd);
        norm[i * n + j] = RoundTo(out_dtype, t * static_cast<float>(gam[j]));
      }
    }
    WriteAll(y, yv);
    WriteAll(norm_out, norm);
  }
};

aclnnStatus CheckSameLayout(const char* fn, const Tensor& t, const AddRmsNormPlan& plan) {
  CD_RETURN_IF_ERROR(CheckNd(fn, t));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, t, plan.x1));
  return CheckShape(fn, t, plan.residual.dims(), "residual's shape (b, s, n)");
}

aclnnStatus CheckNormArgs(const char* fn, const aclTensor* residual, const aclTensor* gamma,
                          double epsilon, AddRmsNormPlan* plan) {
  CD_RETURN_IF_ERROR(Required(fn, "residual", residual, &plan->residual));
  CD_RETURN_IF_ERROR(Required(fn, "gamma", gamma, &plan->gamma));
  const Tensor& r = plan->residual;
  CD_RETURN_IF_ERROR(CheckRank(fn, r, 3, 3));
  CD_RETURN_IF_ERROR(CheckNd(fn, r));
  CD_RETURN_IF_ERROR(CheckContiguous(fn, r));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, r, plan->x1));
  const bool rows_match = plan->x1.rank() == 2
                              ? r.dim(0) * r.dim(1) == plan->m
                              : r.dim(0) == plan->x1.dim(0) && r.dim(1) == plan->x1.dim(1);
  if (!rows_match || r.dim(2) != plan->n) {
    return Fail(fn, kErrParamInvalid,
                "residual must be (b, s, n) with b * s = m (x1's (b, s) for a 3-D x1) and n = " +
                    std::to_string(plan->n) + ", got " + DimsString(r.dims()) + " for x1 " +
                    DimsString(plan->x1.dims()));
  }
  CD_RETURN_IF_ERROR(CheckNd(fn, plan->gamma));
  CD_RETURN_IF_ERROR(CheckContiguous(fn, plan->gamma));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, plan->gamma, plan->x1));
  CD_RETURN_IF_ERROR(CheckShape(fn, plan->gamma, {plan->n}, "1-D (n,)"));
  if (!(epsilon > 0.0 && epsilon < 1.0)) {
    return Fail(fn, kErrParamInvalid, "epsilon must be in (0, 1), got " + std::to_string(epsilon));
  }
  plan->epsilon = static_cast<float>(epsilon);
  return kAclnnSuccess;
}

// Everything but the outputs; `fn` names the operator.
aclnnStatus CheckInputs(const char* fn, const aclTensor* x1, const aclTensor* x2,
                        const aclTensor* bias, const aclTensor* residual, const aclTensor* gamma,
                        double epsilon, const char* group, const char* reduce_op, int64_t comm_turn,
                        int64_t stream_mode, AddRmsNormPlan* plan) {
  CD_RETURN_IF_ERROR(CheckFloatMatmul(fn, x1, x2, bias, false, 0, plan));
  CD_RETURN_IF_ERROR(CheckNormArgs(fn, residual, gamma, epsilon, plan));
  int world = 0;
  CD_RETURN_IF_ERROR(
      CheckAllReduceArgs(fn, group, reduce_op, comm_turn, stream_mode, {1, 2, 4, 8}, &world));
  plan->group = group;
  return kAclnnSuccess;
}

aclnnStatus FinishNorm(std::shared_ptr<AddRmsNormPlan> plan, uint64_t* workspace_size,
                       aclOpExecutor** executor) {
  KernelBody body = [plan](int device, std::string* message) {
    return RunMatmulAllReduce(
        *plan, device, {}, [&](const std::vector<float>& mm) { plan->AddRmsNorm(mm); }, message);
  };
  const uint64_t bytes = static_cast<uint64_t>(plan->residual.numel()) * 4;
  return Finish(plan->fn, WorkspaceFor(bytes), body, workspace_size, executor);
}

// Phase 1 of both operators; the in-place one (y nullptr) writes y into
// residual.
aclnnStatus NormCommon(const char* fn, bool inplace, const aclTensor* x1, const aclTensor* x2,
                       const aclTensor* bias, const aclTensor* residual, const aclTensor* gamma,
                       double epsilon, const char* group, const char* reduce_op, int64_t comm_turn,
                       int64_t stream_mode, const aclTensor* y, const aclTensor* norm_out,
                       uint64_t* workspace_size, aclOpExecutor** executor) {
  auto plan = std::make_shared<AddRmsNormPlan>();
  CD_RETURN_IF_ERROR(CheckInputs(fn, x1, x2, bias, residual, gamma, epsilon, group, reduce_op,
                                 comm_turn, stream_mode, plan.get()));
  if (inplace) {
    plan->y = plan->residual;
    plan->y.name = "residual (y)";
  } else {
    CD_RETURN_IF_ERROR(Required(fn, "y", y, &plan->y));
    CD_RETURN_IF_ERROR(CheckSameLayout(fn, plan->y, *plan));
  }
  CD_RETURN_IF_ERROR(Required(fn, "normOut", norm_out, &plan->norm_out));
  CD_RETURN_IF_ERROR(CheckSameLayout(fn, plan->norm_out, *plan));
  return FinishNorm(plan, workspace_size, executor);
}

}  // namespace
}  // namespace ops
}  // namespace cann_double

using cann_double::ops::Injected;

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnMatmulAllReduceAddRmsNormGetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* residual,
    const aclTensor* gamma, double epsilon, const char* group, const char* reduceOp,
    int64_t commTurn, int64_t streamMode, const aclTensor* y, const aclTensor* normOut,
    uint64_t* workspaceSize, aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnMatmulAllReduceAddRmsNormGetWorkspaceSize")) return s;
  return cann_double::ops::NormCommon("aclnnMatmulAllReduceAddRmsNorm", false, x1, x2, bias,
                                      residual, gamma, epsilon, group, reduceOp, commTurn,
                                      streamMode, y, normOut, workspaceSize, executor);
}
CD_PHASE2(aclnnMatmulAllReduceAddRmsNorm)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnInplaceMatmulAllReduceAddRmsNormGetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* residual,
    const aclTensor* gamma, double epsilon, const char* group, const char* reduceOp,
    int64_t commTurn, int64_t streamMode, const aclTensor* normOut, uint64_t* workspaceSize,
    aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnInplaceMatmulAllReduceAddRmsNormGetWorkspaceSize")) return s;
  return cann_double::ops::NormCommon("aclnnInplaceMatmulAllReduceAddRmsNorm", true, x1, x2, bias,
                                      residual, gamma, epsilon, group, reduceOp, commTurn,
                                      streamMode, nullptr, normOut, workspaceSize, executor);
}
CD_PHASE2(aclnnInplaceMatmulAllReduceAddRmsNorm)
