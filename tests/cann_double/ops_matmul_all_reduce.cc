// The matmul + all-reduce operators: aclnnMatmulAllReduce (V2, V3),
// aclnnWeightQuantMatmulAllReduce (V2), aclnnQuantMatmulAllReduce (V2, V3,
// V4, V5). Phase 1 checks the arguments and captures a plan; the kernel
// computes the rank's partial with plain loops and reduces it across the
// communicator over AllGatherV.
#include "ops_matmul_all_reduce.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace cann_double {
namespace ops {

namespace {

const std::vector<int> kA2WorldSizes = {1, 2, 4, 8};
const std::vector<int> kV4WorldSizes = {1, 2, 4, 8, 16, 32, 64};
constexpr int64_t kMaxKn = 65535;

std::vector<float> ToFloats(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

std::vector<float> ReadFloats(const Tensor& t) {
  return t.present ? ToFloats(ReadAll(t)) : std::vector<float>();
}

// A scale of 1 or n values: its element for column j.
float Col(const std::vector<float>& s, int64_t j) { return s.size() == 1 ? s[0] : s[j]; }

aclnnStatus CheckOutput(const char* fn, const aclTensor* output, MatmulAllReducePlan* plan,
                        const std::string& dtype_rule) {
  CD_RETURN_IF_ERROR(Required(fn, "output", output, &plan->out));
  CD_RETURN_IF_ERROR(CheckNd(fn, plan->out));
  if (plan->out.dtype() != plan->out_dtype) {
    return Fail(fn, kErrParamInvalid,
                std::string("output dtype must be ") + DtypeName(plan->out_dtype) + " (" +
                    dtype_rule + "), got " + DtypeName(plan->out.dtype()));
  }
  return CheckShape(fn, plan->out, plan->out_dims, "x1's leading dims and n");
}

// An optional ND operand: when present, a dtype from `allowed` and the shape
// `want` (`rule` names it).
aclnnStatus CheckOptionalNd(const char* fn, const char* name, const aclTensor* tensor,
                            const std::vector<int>& allowed, const std::vector<int64_t>& want,
                            const std::string& rule, Tensor* out) {
  CD_RETURN_IF_ERROR(Optional(fn, name, tensor, out));
  if (!out->present) return kAclnnSuccess;
  CD_RETURN_IF_ERROR(CheckNd(fn, *out));
  CD_RETURN_IF_ERROR(CheckDtype(fn, *out, allowed));
  return CheckShape(fn, *out, want, rule);
}

// x3: the output's shape, a dtype from `allowed`.
aclnnStatus CheckX3(const char* fn, const aclTensor* x3, const std::vector<int>& allowed,
                    MatmulAllReducePlan* plan) {
  return CheckOptionalNd(fn, "x3", x3, allowed, plan->out_dims, "the output shape", &plan->x3);
}

aclnnStatus CheckBias(const char* fn, const aclTensor* bias, const std::vector<int>& allowed,
                      MatmulAllReducePlan* plan) {
  return CheckOptionalNd(fn, "bias", bias, allowed, {plan->n}, "1-D (n,)", &plan->bias);
}

aclnnStatus CheckNotEmpty(const char* fn, const MatmulAllReducePlan& plan) {
  if (plan.m < 1 || plan.n < 1) {
    return Fail(fn, kErrParamInvalid,
                "empty tensors are not supported: m = " + std::to_string(plan.m) +
                    ", n = " + std::to_string(plan.n));
  }
  return kAclnnSuccess;
}

// The quantized rows' limit: k and x2's last dim (n, or k transposed) <= 65535.
aclnnStatus CheckQuantLimits(const char* fn, const MatmulAllReducePlan& plan, bool n_too) {
  const int64_t x2_last = plan.x2.transposed ? plan.k : plan.n;
  if (plan.k > kMaxKn || x2_last > kMaxKn || (n_too && plan.n > kMaxKn)) {
    return Fail(fn, kErrParamInvalid,
                "k and x2's last dim must be at most 65535, got k = " + std::to_string(plan.k) +
                    ", n = " + std::to_string(plan.n));
  }
  return kAclnnSuccess;
}

aclnnStatus CheckCommMode(const char* fn, const char* comm_mode) {
  if (comm_mode == nullptr) return Fail(fn, kErrParamNullptr, "commMode must not be nullptr");
  const std::string mode = comm_mode;
  if (mode != "" && mode != "ai_cpu" && mode != "aiv" && mode != "ccu") {
    return Fail(fn, kErrParamInvalid,
                "commMode must be \"\", \"ai_cpu\", \"aiv\" or \"ccu\", got \"" + mode + "\"");
  }
  return kAclnnSuccess;
}

void SetShape(MatmulAllReducePlan* plan, const std::vector<int64_t>& out_dims) {
  plan->out_dims = out_dims;
  plan->k = plan->x2.k;
  plan->n = plan->x2.n;
  plan->m = Numel(out_dims) / (plan->n == 0 ? 1 : plan->n);
  if (plan->n == 0) plan->m = Numel(plan->x1.dims()) / plan->k;
}

}  // namespace

// ---------------------------------------------------------------------------
// The shared kernel

std::vector<const Tensor*> MatmulAllReducePlan::Tensors() const {
  return {&x1, &x2.t, &bias, &x3, &out};
}

aclnnStatus MatmulAllReducePlan::Reduce(const Collective& c, aclnnStatus local,
                                        const std::vector<float>& partial,
                                        std::vector<float>* result, std::string* message) const {
  return AllReduceSum(c, local, out_dtype, partial, result, message);
}

aclnnStatus RunMatmulAllReduce(const MatmulAllReducePlan& plan, int device,
                               const std::vector<const Tensor*>& extra, const AfterReduce& after,
                               std::string* message) {
  Collective c;
  CD_RETURN_IF_ERROR(OpenCollective(plan.fn, plan.group, device, &c, message));
  std::vector<const Tensor*> tensors = plan.Tensors();
  tensors.insert(tensors.end(), extra.begin(), extra.end());
  const aclnnStatus local = StorageLive(plan.fn, tensors, message) ? kAclnnSuccess : kErrInner;
  std::vector<float> partial;
  if (local == kAclnnSuccess) partial = plan.Local();
  std::vector<float> reduced;
  CD_RETURN_IF_ERROR(plan.Reduce(c, local, partial, &reduced, message));
  if (after) {
    after(reduced);
  } else {
    WriteAll(plan.out, reduced);
  }
  return kAclnnSuccess;
}

KernelBody MatmulAllReduceKernel(std::shared_ptr<const MatmulAllReducePlan> plan) {
  return [plan](int device, std::string* message) {
    return RunMatmulAllReduce(*plan, device, {}, nullptr, message);
  };
}

namespace {

aclnnStatus FinishPlan(std::shared_ptr<MatmulAllReducePlan> plan, uint64_t* workspace_size,
                       aclOpExecutor** executor) {
  const uint64_t bytes = static_cast<uint64_t>(Numel(plan->out_dims)) * 4;
  return Finish(plan->fn, WorkspaceFor(bytes), MatmulAllReduceKernel(plan), workspace_size,
                executor);
}

}  // namespace

// ---------------------------------------------------------------------------
// Non-quantized

std::vector<float> FloatMatmulPlan::LocalWith(const std::vector<double>& w) const {
  const std::vector<double> acc = MatmulDouble(ReadAll(x1), w, m, k, n);
  const std::vector<float> b = ReadFloats(bias), x3v = ReadFloats(x3);
  std::vector<float> part(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float v = static_cast<float>(acc[i * n + j]);
      if (!b.empty()) v += b[j];
      if (!x3v.empty()) v += x3v[i * n + j];
      part[i * n + j] = RoundTo(out_dtype, v);
    }
  }
  return part;
}

std::vector<float> FloatMatmulPlan::Local() const { return LocalWith(ReadWeight(x2)); }

aclnnStatus CheckFloatMatmul(const char* fn, const aclTensor* x1, const aclTensor* x2,
                             const aclTensor* bias, bool allow_nz, int64_t n_hint,
                             MatmulAllReducePlan* plan) {
  plan->fn = fn;
  CD_RETURN_IF_ERROR(Required(fn, "x1", x1, &plan->x1));
  Tensor x2t;
  CD_RETURN_IF_ERROR(Required(fn, "x2", x2, &x2t));
  CD_RETURN_IF_ERROR(CheckDtype(fn, plan->x1, {kFloat16, kBf16}));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, x2t, plan->x1));
  std::vector<int64_t> out_dims;
  CD_RETURN_IF_ERROR(CheckMatmul(fn, plan->x1, x2t, allow_nz, n_hint, &plan->x2, &out_dims));
  SetShape(plan, out_dims);
  plan->out_dtype = plan->x1.dtype();
  return CheckBias(fn, bias, {plan->x1.dtype()}, plan);
}

namespace {

aclnnStatus MatmulAllReduceCommon(const char* fn, const aclTensor* x1, const aclTensor* x2,
                                  const aclTensor* bias, const aclTensor* x3, const char* group,
                                  const char* reduce_op, int64_t comm_turn, int64_t stream_mode,
                                  const aclTensor* output, uint64_t* workspace_size,
                                  aclOpExecutor** executor) {
  auto plan = std::make_shared<FloatMatmulPlan>();
  int world = 0;
  CD_RETURN_IF_ERROR(CheckFloatMatmul(fn, x1, x2, bias, true, LastDim(output), plan.get()));
  CD_RETURN_IF_ERROR(CheckNotEmpty(fn, *plan));
  CD_RETURN_IF_ERROR(CheckX3(fn, x3, {plan->out_dtype}, plan.get()));
  CD_RETURN_IF_ERROR(CheckOutput(fn, output, plan.get(), "x1's dtype"));
  CD_RETURN_IF_ERROR(
      CheckAllReduceArgs(fn, group, reduce_op, comm_turn, stream_mode, kA2WorldSizes, &world));
  plan->group = group;
  return FinishPlan(plan, workspace_size, executor);
}

// ---------------------------------------------------------------------------
// Weight-only quantization (antiquant)

struct WeightQuantPlan : FloatMatmulPlan {
  Tensor scale, offset;
  int64_t group_size = 0;

  std::vector<const Tensor*> Tensors() const override {
    auto t = MatmulAllReducePlan::Tensors();
    t.push_back(&scale);
    t.push_back(&offset);
    return t;
  }

  // scale / offset element for weight (kk, j): pertensor, perchannel, pergroup.
  float At(const std::vector<float>& v, int64_t kk, int64_t j) const {
    if (v.size() == 1) return v[0];
    if (group_size > 0) return v[(kk / group_size) * n + j];
    return v[j];
  }

  // fp16: w = half(half(w + offset) * scale); bf16: bf16((w + offset) * scale) in fp32.
  std::vector<double> Dequantized() const {
    std::vector<double> w = ReadWeight(x2);
    const std::vector<float> s = ReadFloats(scale), o = ReadFloats(offset);
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t j = 0; j < n; ++j) {
        float v = static_cast<float>(w[kk * n + j]);
        if (!o.empty()) {
          v += At(o, kk, j);
          if (out_dtype == kFloat16) v = RoundTo(kFloat16, v);
        }
        w[kk * n + j] = RoundTo(out_dtype, v * At(s, kk, j));
      }
    }
    return w;
  }

  std::vector<float> Local() const override { return LocalWith(Dequantized()); }
};

aclnnStatus CheckAntiquant(const char* fn, const aclTensor* scale, const aclTensor* offset,
                           int64_t group_size, WeightQuantPlan* plan) {
  if (group_size != 0 && (group_size % 32 != 0 || group_size < 32 || group_size > plan->k - 1)) {
    return Fail(fn, kErrParamInvalid,
                "antiquantGroupSize must be 0 or a multiple of 32 in [32, k - 1] = [32, " +
                    std::to_string(plan->k - 1) + "], got " + std::to_string(group_size));
  }
  plan->group_size = group_size;
  CD_RETURN_IF_ERROR(Required(fn, "antiquantScale", scale, &plan->scale));
  CD_RETURN_IF_ERROR(CheckNd(fn, plan->scale));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, plan->scale, plan->x1));
  const int64_t n = plan->n;
  if (group_size > 0) {
    CD_RETURN_IF_ERROR(CheckShape(fn, plan->scale, {CeilDiv(plan->k, group_size), n},
                                  "pergroup (ceil(k / antiquantGroupSize), n)"));
  } else {
    CD_RETURN_IF_ERROR(
        CheckShapeIn(fn, plan->scale, {{1}, {n}, {1, n}},
                     "pertensor (1,) or perchannel (n,) / (1, n) with n = " + std::to_string(n)));
  }
  CD_RETURN_IF_ERROR(Optional(fn, "antiquantOffset", offset, &plan->offset));
  if (!plan->offset.present) return kAclnnSuccess;
  CD_RETURN_IF_ERROR(CheckNd(fn, plan->offset));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, plan->offset, plan->x1));
  return CheckShape(fn, plan->offset, plan->scale.dims(), "antiquantScale's shape");
}

aclnnStatus WeightQuantCommon(const char* fn, const aclTensor* x1, const aclTensor* x2,
                              const aclTensor* bias, const aclTensor* scale,
                              const aclTensor* offset, const aclTensor* x3, const char* group,
                              const char* reduce_op, int64_t comm_turn, int64_t stream_mode,
                              int64_t group_size, const aclTensor* output, uint64_t* workspace_size,
                              aclOpExecutor** executor) {
  auto plan = std::make_shared<WeightQuantPlan>();
  plan->fn = fn;
  int world = 0;
  CD_RETURN_IF_ERROR(Required(fn, "x1", x1, &plan->x1));
  Tensor x2t;
  CD_RETURN_IF_ERROR(Required(fn, "x2", x2, &x2t));
  CD_RETURN_IF_ERROR(CheckDtype(fn, plan->x1, {kFloat16, kBf16}));
  CD_RETURN_IF_ERROR(CheckDtype(fn, x2t, {kInt8}));
  std::vector<int64_t> out_dims;
  CD_RETURN_IF_ERROR(CheckMatmul(fn, plan->x1, x2t, true, LastDim(output), &plan->x2, &out_dims));
  SetShape(plan.get(), out_dims);
  plan->out_dtype = plan->x1.dtype();
  CD_RETURN_IF_ERROR(CheckNotEmpty(fn, *plan));
  CD_RETURN_IF_ERROR(CheckQuantLimits(fn, *plan, true));
  CD_RETURN_IF_ERROR(CheckAntiquant(fn, scale, offset, group_size, plan.get()));
  CD_RETURN_IF_ERROR(CheckBias(fn, bias, {plan->out_dtype}, plan.get()));
  CD_RETURN_IF_ERROR(CheckX3(fn, x3, {plan->out_dtype}, plan.get()));
  CD_RETURN_IF_ERROR(CheckOutput(fn, output, plan.get(), "x1's dtype"));
  CD_RETURN_IF_ERROR(
      CheckAllReduceArgs(fn, group, reduce_op, comm_turn, stream_mode, kA2WorldSizes, &world));
  plan->group = group;
  return FinishPlan(plan, workspace_size, executor);
}

// ---------------------------------------------------------------------------
// int8 x int8 (QuantMatmulAllReduce V1-V5, the int8 rows)

// The int8 low-bit communication: per column j, q = int8(fp16(c / s1)); the
// int8 all-to-all + sum (exact); q2 = int8(fp16(sum * (s1 / s2))); the int8
// all-gather; y = round(q2 * s2) to the output dtype. The sum is row-local,
// so gathering every rank's q and summing all rows gives the same values as
// the chunked all-to-all / all-gather.
aclnnStatus Int8CommReduce(const Collective& c, aclnnStatus local, const std::vector<float>& c_out,
                           const std::vector<float>& s1, const std::vector<float>& s2, int64_t n,
                           int out_dtype, std::vector<float>* result, std::string* message) {
  std::vector<uint8_t> q(c_out.size());
  for (size_t i = 0; i < c_out.size(); ++i) {
    const float v = RoundTo(kFloat16, c_out[i] / Col(s1, static_cast<int64_t>(i % n)));
    q[i] = static_cast<uint8_t>(Int8SatRne(v));
  }
  std::vector<std::vector<uint8_t>> got;
  CD_RETURN_IF_ERROR(Exchange(c, local, q, &got, message));
  std::vector<float> acc(c_out.size(), 0.0f);
  for (size_t r = 0; r < got.size(); ++r) {
    if (got[r].size() != q.size()) {
      *message = std::string(c.fn) + ": rank " + std::to_string(r) + " sent " +
                 std::to_string(got[r].size()) + " int8 values, expected " +
                 std::to_string(q.size());
      return kErrInner;
    }
    for (size_t i = 0; i < acc.size(); ++i)
      acc[i] += static_cast<float>(static_cast<int8_t>(got[r][i]));
  }
  result->resize(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) {
    const int64_t j = static_cast<int64_t>(i % n);
    const float ratio = Col(s1, j) / Col(s2, j);
    const int8_t q2 = Int8SatRne(RoundTo(kFloat16, acc[i] * ratio));
    (*result)[i] = RoundTo(out_dtype, static_cast<float>(q2) * Col(s2, j));
  }
  return kAclnnSuccess;
}

struct Int8Plan : MatmulAllReducePlan {
  Tensor scale, pertoken, comm1, comm2;

  std::vector<const Tensor*> Tensors() const override {
    auto t = MatmulAllReducePlan::Tensors();
    for (const Tensor* s : {&scale, &pertoken, &comm1, &comm2}) t.push_back(s);
    return t;
  }

  std::vector<float> Scale() const {
    if (scale.dtype() == kInt64 || scale.dtype() == kUint64) {
      std::vector<float> s;
      for (uint64_t w : ReadWords(scale)) s.push_back(PackedScale(w));
      return s;
    }
    return ReadFloats(scale);
  }

  // y = f32(acc + bias) * scale (* pertoken), rounded; + x3, rounded again.
  std::vector<float> Local() const override {
    const std::vector<double> acc = MatmulDouble(ReadAll(x1), ReadWeight(x2), m, k, n);
    const std::vector<double> b = bias.present ? ReadAll(bias) : std::vector<double>();
    const std::vector<float> s = Scale(), token = ReadFloats(pertoken), x3v = ReadFloats(x3);
    std::vector<float> part(static_cast<size_t>(m * n));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        int64_t a = std::llround(acc[i * n + j]);
        if (!b.empty()) a += static_cast<int64_t>(b[j]);
        // The cube unit's int32 accumulator and bias add wrap (two's complement).
        const auto wrapped = static_cast<int32_t>(static_cast<uint32_t>(a));
        float y = static_cast<float>(wrapped) * Col(s, j);
        if (!token.empty()) y *= token[i];
        y = RoundTo(out_dtype, y);
        if (!x3v.empty()) y = RoundTo(out_dtype, y + x3v[i * n + j]);
        part[i * n + j] = y;
      }
    }
    return part;
  }

  aclnnStatus Reduce(const Collective& c, aclnnStatus local, const std::vector<float>& partial,
                     std::vector<float>* result, std::string* message) const override {
    if (!comm1.present) return MatmulAllReducePlan::Reduce(c, local, partial, result, message);
    return Int8CommReduce(c, local, partial, ReadFloats(comm1), ReadFloats(comm2), n, out_dtype,
                          result, message);
  }
};

// The int8 operands: x1/x2 INT8, bias INT32 (n,), limits.
aclnnStatus CheckInt8Matmul(const char* fn, const aclTensor* x1, const aclTensor* x2,
                            const aclTensor* bias, int64_t n_hint, Int8Plan* plan) {
  plan->fn = fn;
  CD_RETURN_IF_ERROR(Required(fn, "x1", x1, &plan->x1));
  Tensor x2t;
  CD_RETURN_IF_ERROR(Required(fn, "x2", x2, &x2t));
  CD_RETURN_IF_ERROR(CheckDtype(fn, plan->x1, {kInt8}));
  CD_RETURN_IF_ERROR(CheckDtype(fn, x2t, {kInt8}));
  std::vector<int64_t> out_dims;
  CD_RETURN_IF_ERROR(CheckMatmul(fn, plan->x1, x2t, true, n_hint, &plan->x2, &out_dims));
  SetShape(plan, out_dims);
  CD_RETURN_IF_ERROR(CheckNotEmpty(fn, *plan));
  CD_RETURN_IF_ERROR(CheckQuantLimits(fn, *plan, false));
  return CheckBias(fn, bias, {kInt32}, plan);
}

// The dequant scale (and pertoken scale) decide the output dtype:
// INT64/UINT64 packed words -> FLOAT16 (no pertoken); BFLOAT16 -> BFLOAT16;
// FLOAT32 with a FLOAT32 pertoken scale -> FLOAT16.
aclnnStatus CheckInt8Scales(const char* fn, const char* scale_name, const aclTensor* scale,
                            const char* pertoken_name, const aclTensor* pertoken, Int8Plan* plan) {
  CD_RETURN_IF_ERROR(Required(fn, scale_name, scale, &plan->scale));
  CD_RETURN_IF_ERROR(Optional(fn, pertoken_name, pertoken, &plan->pertoken));
  CD_RETURN_IF_ERROR(CheckNd(fn, plan->scale));
  const int sd = plan->scale.dtype();
  const bool token = plan->pertoken.present;
  if ((sd == kInt64 || sd == kUint64) && !token) {
    plan->out_dtype = kFloat16;
  } else if (sd == kBf16) {
    plan->out_dtype = kBf16;
  } else if (sd == kFloat && token) {
    plan->out_dtype = kFloat16;
  } else {
    return Fail(fn, kErrParamInvalid,
                std::string(scale_name) + " dtype must be INT64/UINT64 (FLOAT16 output, no " +
                    pertoken_name + "), BFLOAT16 (BFLOAT16 output) or FLOAT32 with " +
                    pertoken_name + " (FLOAT16 output), got " + DtypeName(sd) +
                    (token ? " with " : " without ") + pertoken_name);
  }
  const int64_t n = plan->n;
  CD_RETURN_IF_ERROR(
      CheckShapeIn(fn, plan->scale, {{1}, {n}, {1, n}},
                   "pertensor (1,) or perchannel (n,) / (1, n) with n = " + std::to_string(n)));
  if (!token) return kAclnnSuccess;
  CD_RETURN_IF_ERROR(CheckNd(fn, plan->pertoken));
  CD_RETURN_IF_ERROR(CheckDtype(fn, plan->pertoken, {kFloat}));
  return CheckShape(fn, plan->pertoken, {plan->m}, "1-D (m,), b * s for a 3-D x1");
}

// commQuantScale1/2: both or neither; (n,) or (1, n), one shape, the output dtype.
aclnnStatus CheckCommScales(const char* fn, const aclTensor* s1, const aclTensor* s2,
                            Int8Plan* plan) {
  CD_RETURN_IF_ERROR(Optional(fn, "commQuantScale1", s1, &plan->comm1));
  CD_RETURN_IF_ERROR(Optional(fn, "commQuantScale2", s2, &plan->comm2));
  if (plan->comm1.present != plan->comm2.present) {
    return Fail(fn, kErrParamInvalid,
                "commQuantScale1 and commQuantScale2 must both be given or both be nullptr");
  }
  if (!plan->comm1.present) return kAclnnSuccess;
  const int64_t n = plan->n;
  for (const Tensor* t : {&plan->comm1, &plan->comm2}) {
    CD_RETURN_IF_ERROR(CheckNd(fn, *t));
    CD_RETURN_IF_ERROR(CheckDtype(fn, *t, {plan->out_dtype}));
    CD_RETURN_IF_ERROR(
        CheckShapeIn(fn, *t, {{n}, {1, n}}, "(n,) or (1, n) with n = " + std::to_string(n)));
  }
  return CheckShape(fn, plan->comm2, plan->comm1.dims(), "commQuantScale1's shape");
}

struct Int8Args {
  const aclTensor *x1, *x2, *bias, *x3, *scale, *pertoken, *comm1, *comm2;
  const char *scale_name, *pertoken_name;
  const aclTensor* output = nullptr;  // for a 4-D FRACTAL_NZ x2's n
};

aclnnStatus CheckInt8Call(const char* fn, const Int8Args& a, Int8Plan* plan) {
  CD_RETURN_IF_ERROR(CheckInt8Matmul(fn, a.x1, a.x2, a.bias, LastDim(a.output), plan));
  CD_RETURN_IF_ERROR(CheckInt8Scales(fn, a.scale_name, a.scale, a.pertoken_name, a.pertoken, plan));
  CD_RETURN_IF_ERROR(CheckX3(fn, a.x3, {plan->out_dtype}, plan));
  return CheckCommScales(fn, a.comm1, a.comm2, plan);
}

// Phase 1 of aclnnQuantMatmulAllReduce V1-V3 (V1 passes no pertokenScale, V1
// and V2 no commQuantScale1/2).
aclnnStatus QuantCommon(const char* fn, const aclTensor* x1, const aclTensor* x2,
                        const aclTensor* bias, const aclTensor* x3, const aclTensor* dequant_scale,
                        const aclTensor* pertoken_scale, const aclTensor* comm1,
                        const aclTensor* comm2, const char* group, const char* reduce_op,
                        int64_t comm_turn, int64_t stream_mode, const aclTensor* output,
                        uint64_t* workspace_size, aclOpExecutor** executor) {
  auto plan = std::make_shared<Int8Plan>();
  int world = 0;
  const Int8Args a{x1,
                   x2,
                   bias,
                   x3,
                   dequant_scale,
                   pertoken_scale,
                   comm1,
                   comm2,
                   "dequantScale",
                   "pertokenScale",
                   output};
  CD_RETURN_IF_ERROR(CheckInt8Call(fn, a, plan.get()));
  CD_RETURN_IF_ERROR(CheckOutput(fn, output, plan.get(), std::string("set by ") + a.scale_name));
  CD_RETURN_IF_ERROR(
      CheckAllReduceArgs(fn, group, reduce_op, comm_turn, stream_mode, kA2WorldSizes, &world));
  plan->group = group;
  return FinishPlan(plan, workspace_size, executor);
}

// ---------------------------------------------------------------------------
// V4 low-precision rows: fp8 e4m3fn / e5m2, hifloat8, MX (fp8 / fp4 with
// e8m0 scales), perblock

enum class LowpMode { kPertoken, kPacked, kPerblock, kMx };

const char* ModeName(LowpMode mode) {
  switch (mode) {
    case LowpMode::kPertoken:
      return "pertoken";
    case LowpMode::kPacked:
      return "perchannel/pertensor (packed x2Scale)";
    case LowpMode::kPerblock:
      return "perblock";
    default:
      return "MX";
  }
}

constexpr int64_t kBlock = 128;     // perblock group along m, n, k
constexpr int64_t kMxBlock = 32;    // MX group along k
constexpr int64_t kCommTile = 128;  // fp8 pertile communication tile along n

// Per row, per 1 x 128 tile: a = max|tile| (FP8_MAX if 0), sc = FP8_MAX / a
// (1 if 0), q = fp8(clip(tile * sc)) half to even. The max and the clip
// propagate NaN: a NaN in the tile makes a, sc and every code of the tile NaN.
void QuantizeTiles(const float* row, int64_t n, int fp8, uint8_t* codes, float* scales) {
  const float fmax = Float8Max(fp8);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t t = 0; t * kCommTile < n; ++t) {
    const int64_t j0 = t * kCommTile, j1 = std::min(n, j0 + kCommTile);
    float amax = 0.0f;
    bool has_nan = false;
    for (int64_t j = j0; j < j1; ++j) {
      has_nan = has_nan || std::isnan(row[j]);
      amax = std::max(amax, std::fabs(row[j]));
    }
    if (has_nan) amax = nan;
    if (amax == 0.0f) amax = fmax;
    float sc = fmax / amax;
    if (sc == 0.0f) sc = 1.0f;
    for (int64_t j = j0; j < j1; ++j) {
      const float v = row[j] * sc;
      codes[j] = EncodeFloat8(std::isnan(v) ? v : std::min(fmax, std::max(-fmax, v)), fp8);
    }
    scales[t] = sc;
  }
}

float DecodeFloat8(uint8_t code, int fp8) {
  return fp8 == kFloat8E5m2 ? DecodeFloat8E5m2(code) : DecodeFloat8E4m3fn(code);
}

// The fp8 pertile chain: each rank's C quantized per tile (wire row: n codes,
// then the tiles' fp32 scales); every source dequantized (f32(q) / sc) and
// summed in rank order from 0; requantized per tile; dequantized and rounded
// to the output dtype. Row-local, so gathering all rows equals the kernel's
// all-to-all + all-gather of row chunks.
aclnnStatus Fp8PertileReduce(const Collective& c, aclnnStatus local, const std::vector<float>& cf,
                             int64_t m, int64_t n, int fp8, int out_dtype,
                             std::vector<float>* result, std::string* message) {
  const int64_t tiles = CeilDiv(n, kCommTile), width = n + 4 * tiles;
  std::vector<uint8_t> wire(local == kAclnnSuccess ? static_cast<size_t>(m * width) : 0);
  std::vector<float> sc(static_cast<size_t>(tiles));
  for (int64_t i = 0; local == kAclnnSuccess && i < m; ++i) {
    QuantizeTiles(&cf[i * n], n, fp8, &wire[i * width], sc.data());
    std::memcpy(&wire[i * width + n], sc.data(), 4 * tiles);
  }
  std::vector<std::vector<uint8_t>> got;
  CD_RETURN_IF_ERROR(Exchange(c, local, wire, &got, message));
  std::vector<float> acc(static_cast<size_t>(m * n), 0.0f);
  for (size_t r = 0; r < got.size(); ++r) {
    if (got[r].size() != wire.size()) {
      *message = std::string(c.fn) + ": rank " + std::to_string(r) + " sent a wire of " +
                 std::to_string(got[r].size()) + " bytes, expected " + std::to_string(wire.size());
      return kErrInner;
    }
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(sc.data(), &got[r][i * width + n], 4 * tiles);
      for (int64_t j = 0; j < n; ++j) {
        acc[i * n + j] += DecodeFloat8(got[r][i * width + j], fp8) / sc[j / kCommTile];
      }
    }
  }
  std::vector<uint8_t> q(static_cast<size_t>(n));
  result->resize(acc.size());
  for (int64_t i = 0; i < m; ++i) {
    QuantizeTiles(&acc[i * n], n, fp8, q.data(), sc.data());
    for (int64_t j = 0; j < n; ++j) {
      (*result)[i * n + j] = RoundTo(out_dtype, DecodeFloat8(q[j], fp8) / sc[j / kCommTile]);
    }
  }
  return kAclnnSuccess;
}

struct LowpPlan : MatmulAllReducePlan {
  Tensor x1_scale, x2_scale;
  LowpMode mode = LowpMode::kPertoken;
  bool fp8_comm = false;

  std::vector<const Tensor*> Tensors() const override {
    auto t = MatmulAllReducePlan::Tensors();
    t.push_back(&x1_scale);
    t.push_back(&x2_scale);
    return t;
  }

  // Perblock: sum over k-blocks, in order, of the block's product (fp32)
  // times x1Scale[row block, kb] * x2Scale[kb, column block].
  std::vector<float> Perblock(const std::vector<double>& a, const std::vector<double>& b) const {
    const std::vector<double> s1 = ReadAll(x1_scale), s2 = ReadAll(x2_scale);
    const int64_t kb = CeilDiv(k, kBlock), nb = CeilDiv(n, kBlock);
    const int64_t rows = x1.dim(-2), row_blocks = CeilDiv(rows, kBlock);
    std::vector<float> y(static_cast<size_t>(m * n));
    for (int64_t i = 0; i < m; ++i) {
      const int64_t s1_row = (i / rows) * row_blocks + (i % rows) / kBlock;
      for (int64_t j = 0; j < n; ++j) {
        float v = 0.0f;
        for (int64_t blk = 0; blk < kb; ++blk) {
          double p = 0.0;
          for (int64_t t = blk * kBlock; t < std::min(k, (blk + 1) * kBlock); ++t)
            p += a[i * k + t] * b[t * n + j];
          const double s2v =
              x2.transposed ? s2[(j / kBlock) * kb + blk] : s2[blk * nb + j / kBlock];
          const float scale = static_cast<float>(s1[s1_row * kb + blk]) * static_cast<float>(s2v);
          const float term = static_cast<float>(p) * scale;
          v = blk == 0 ? term : v + term;
        }
        y[i * n + j] = v;
      }
    }
    return y;
  }

  // MX: every value times its 32-block's e8m0 scale (fp32), then the matmul.
  void ApplyMx(std::vector<double>* a, std::vector<double>* b) const {
    const std::vector<double> s1 = ReadAll(x1_scale), s2 = ReadAll(x2_scale);
    const int64_t per_row = 2 * CeilDiv(k, 2 * kMxBlock);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t t = 0; t < k; ++t) {
        (*a)[i * k + t] = static_cast<float>((*a)[i * k + t]) *
                          static_cast<float>(s1[i * per_row + t / kMxBlock]);
      }
    }
    for (int64_t t = 0; t < k; ++t) {
      for (int64_t j = 0; j < n; ++j) {
        (*b)[t * n + j] = static_cast<float>((*b)[t * n + j]) *
                          static_cast<float>(s2[j * per_row + t / kMxBlock]);
      }
    }
  }

  // The column scale of the pertoken / packed rows.
  std::vector<float> ColumnScale() const {
    if (mode != LowpMode::kPacked) return ReadFloats(x2_scale);
    std::vector<float> s;
    for (uint64_t w : ReadWords(x2_scale)) s.push_back(PackedScale(w));
    return s;
  }

  // The fp32 y before the output rounding.
  std::vector<float> Y() const {
    std::vector<double> a = ReadAll(x1), b = ReadWeight(x2);
    if (mode == LowpMode::kPerblock) return Perblock(a, b);
    if (mode == LowpMode::kMx) ApplyMx(&a, &b);
    const std::vector<double> acc = MatmulDouble(a, b, m, k, n);
    const std::vector<float> bv = ReadFloats(bias);
    const std::vector<float> s2 = mode == LowpMode::kMx ? std::vector<float>() : ColumnScale();
    const std::vector<float> s1 =
        mode == LowpMode::kPertoken ? ReadFloats(x1_scale) : std::vector<float>();
    std::vector<float> y(static_cast<size_t>(m * n));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        float v = static_cast<float>(acc[i * n + j]);
        if (!bv.empty()) v += bv[j];
        if (!s2.empty()) v *= Col(s2, j);
        if (!s1.empty()) v *= s1[i];
        y[i * n + j] = v;
      }
    }
    return y;
  }

  // Rounded y, + x3 rounded again; with the fp8 chain, y + x3 in fp32.
  std::vector<float> Local() const override {
    std::vector<float> y = Y();
    const std::vector<float> x3v = ReadFloats(x3);
    for (size_t i = 0; i < y.size(); ++i) {
      if (fp8_comm) {
        if (!x3v.empty()) y[i] += x3v[i];
        continue;
      }
      y[i] = RoundTo(out_dtype, y[i]);
      if (!x3v.empty()) y[i] = RoundTo(out_dtype, y[i] + x3v[i]);
    }
    return y;
  }

  aclnnStatus Reduce(const Collective& c, aclnnStatus local, const std::vector<float>& partial,
                     std::vector<float>* result, std::string* message) const override {
    if (!fp8_comm) return MatmulAllReducePlan::Reduce(c, local, partial, result, message);
    return Fp8PertileReduce(c, local, partial, m, n, x1.dtype(), out_dtype, result, message);
  }
};

// groupSize = K | N << 16 | M << 32; a 0 field is dim / scale extent and must divide.
aclnnStatus ResolveGroupSize(const char* fn, int64_t group_size, const int64_t dims[3],
                             const int64_t scale_dims[3], const int64_t want[3], LowpMode mode) {
  if (group_size < 0 || (group_size >> 48) != 0) {
    return Fail(
        fn, kErrParamInvalid,
        "groupSize must pack K | N << 16 | M << 32 in 48 bits, got " + std::to_string(group_size));
  }
  const int64_t fields[3] = {(group_size >> 32) & 0xFFFF, (group_size >> 16) & 0xFFFF,
                             group_size & 0xFFFF};
  const char* names = "MNK";
  for (int i = 0; i < 3; ++i) {
    int64_t g = fields[i];
    if (g == 0) {
      if (scale_dims[i] <= 0 || dims[i] % scale_dims[i] != 0) {
        return Fail(fn, kErrParamInvalid,
                    std::string("groupSize") + names[i] + " can not be inferred: " +
                        std::to_string(dims[i]) + " is not a multiple of the scale extent " +
                        std::to_string(scale_dims[i]) + "; pass it explicitly");
      }
      g = dims[i] / scale_dims[i];
    }
    if (g != want[i]) {
      return Fail(fn, kErrParamInvalid,
                  std::string("groupSize") + names[i] + " must be " + std::to_string(want[i]) +
                      " in the " + ModeName(mode) + " rows, got " + std::to_string(g));
    }
  }
  return kAclnnSuccess;
}

aclnnStatus ClassifyLowp(const char* fn, LowpPlan* plan) {
  const int sd = plan->x2_scale.dtype(), vd = plan->x1.dtype();
  if (sd == kFloat8E8m0) {
    plan->mode = LowpMode::kMx;
  } else if (sd == kInt64 || sd == kUint64) {
    plan->mode = LowpMode::kPacked;
  } else if (sd == kFloat) {
    const bool block = plan->x1_scale.present && plan->x1_scale.rank() >= 2;
    plan->mode = block ? LowpMode::kPerblock : LowpMode::kPertoken;
  } else {
    return Fail(fn, kErrParamInvalid,
                std::string("x2Scale dtype for ") + DtypeName(vd) +
                    " x1/x2 must be FLOAT32 (pertoken / perblock), UINT64/INT64 (perchannel / "
                    "pertensor) or FLOAT8_E8M0 (MX), got " +
                    DtypeName(sd));
  }
  if (vd == kFloat4E2m1 && plan->mode != LowpMode::kMx) {
    return Fail(fn, kErrParamInvalid,
                "FLOAT4_E2M1 x1/x2 need FLOAT8_E8M0 x1Scale and x2Scale (MX)");
  }
  if (vd == kHifloat8 && plan->mode == LowpMode::kMx) {
    return Fail(fn, kErrParamInvalid,
                "the MX rows take FLOAT8_E4M3FN, FLOAT8_E5M2 or FLOAT4_E2M1, not HIFLOAT8");
  }
  return kAclnnSuccess;
}

aclnnStatus CheckPertokenOrPacked(const char* fn, int64_t group_size, LowpPlan* plan) {
  const int64_t n = plan->n;
  CD_RETURN_IF_ERROR(
      CheckShapeIn(fn, plan->x2_scale, {{1}, {n}, {1, n}},
                   "pertensor (1,) or perchannel (n,) / (1, n) with n = " + std::to_string(n)));
  if (group_size != 0) {
    return Fail(fn, kErrParamInvalid,
                std::string("groupSize must be 0 in the ") + ModeName(plan->mode) + " rows, got " +
                    std::to_string(group_size));
  }
  if (plan->mode == LowpMode::kPacked) {
    if (plan->x1_scale.present) {
      return Fail(fn, kErrParamInvalid, "x1Scale must be nullptr with a UINT64/INT64 x2Scale");
    }
    return kAclnnSuccess;
  }
  if (!plan->x1_scale.present) {
    return Fail(fn, kErrParamInvalid,
                "a FLOAT32 x2Scale needs x1Scale (FLOAT32 (m,) pertoken or perblock)");
  }
  CD_RETURN_IF_ERROR(CheckDtype(fn, plan->x1_scale, {kFloat}));
  return CheckShape(fn, plan->x1_scale, {plan->m}, "pertoken (m,), b * s for a 3-D x1");
}

aclnnStatus CheckPerblock(const char* fn, int64_t group_size, LowpPlan* plan) {
  const int64_t kb = CeilDiv(plan->k, kBlock), nb = CeilDiv(plan->n, kBlock);
  CD_RETURN_IF_ERROR(CheckDtype(fn, plan->x1_scale, {kFloat}));
  if (plan->x1.rank() == 3) {
    CD_RETURN_IF_ERROR(CheckShape(fn, plan->x1_scale,
                                  {plan->x1.dim(0), CeilDiv(plan->x1.dim(1), kBlock), kb},
                                  "perblock (b, ceil(s/128), ceil(k/128))"));
  } else {
    CD_RETURN_IF_ERROR(CheckShape(fn, plan->x1_scale, {CeilDiv(plan->m, kBlock), kb},
                                  "perblock (ceil(m/128), ceil(k/128))"));
  }
  if (plan->x2.transposed) {
    CD_RETURN_IF_ERROR(CheckShape(fn, plan->x2_scale, {nb, kb},
                                  "perblock (ceil(n/128), ceil(k/128)), x2 transposed"));
  } else {
    CD_RETURN_IF_ERROR(
        CheckShape(fn, plan->x2_scale, {kb, nb}, "perblock (ceil(k/128), ceil(n/128))"));
  }
  if (plan->bias.present)
    return Fail(fn, kErrParamInvalid, "bias must be nullptr in the perblock rows");
  const int64_t dims[3] = {plan->x1.dim(-2), plan->n, plan->k};
  const int64_t scale_dims[3] = {plan->x1_scale.dim(-2),
                                 plan->x2_scale.dim(plan->x2.transposed ? 0 : 1),
                                 plan->x1_scale.dim(-1)};
  const int64_t want[3] = {kBlock, kBlock, kBlock};
  return ResolveGroupSize(fn, group_size, dims, scale_dims, want, plan->mode);
}

aclnnStatus CheckMx(const char* fn, int64_t group_size, LowpPlan* plan) {
  if (!plan->x2.transposed && plan->k > 1 && plan->n > 1) {
    return Fail(fn, kErrParamInvalid, "the MX rows take only a transposed x2 (strides (1, k))");
  }
  if (!plan->x1_scale.present)
    return Fail(fn, kErrParamNullptr, "x1Scale must not be nullptr in the MX rows");
  CD_RETURN_IF_ERROR(CheckDtype(fn, plan->x1_scale, {kFloat8E8m0}));
  const int64_t kb = CeilDiv(plan->k, 2 * kMxBlock);
  CD_RETURN_IF_ERROR(CheckShape(fn, plan->x1_scale, {plan->m, kb, 2}, "MX (m, ceil(k/64), 2)"));
  CD_RETURN_IF_ERROR(CheckShape(fn, plan->x2_scale, {plan->n, kb, 2}, "MX (n, ceil(k/64), 2)"));
  if (plan->x1.dtype() == kFloat4E2m1 && CeilDiv(plan->k, kMxBlock) % 2 != 0) {
    return Fail(fn, kErrParamInvalid,
                "FLOAT4_E2M1 x1/x2 need ceil(k/32) even, got k = " + std::to_string(plan->k));
  }
  // Two values a byte along the inner axis: FLOAT4_E2M1 tensors have an even one.
  if (plan->x1.dtype() == kFloat4E2m1 && plan->k % 2 != 0) {
    return Fail(
        fn, kErrParamInvalid,
        "FLOAT4_E2M1 x1/x2 need an even inner dimension k, got k = " + std::to_string(plan->k));
  }
  const int64_t dims[3] = {plan->m, plan->n, plan->k};
  const int64_t scale_dims[3] = {plan->m, plan->n, 2 * kb};
  const int64_t want[3] = {1, 1, kMxBlock};
  return ResolveGroupSize(fn, group_size, dims, scale_dims, want, plan->mode);
}

struct V4Args {
  const aclTensor *x1, *x2, *bias, *x3, *x1_scale, *x2_scale, *comm1, *comm2, *output;
  int64_t group_size, comm_quant_mode;
};

aclnnStatus CheckLowpOutput(const char* fn, const V4Args& a, LowpPlan* plan) {
  Tensor out;
  CD_RETURN_IF_ERROR(Required(fn, "output", a.output, &out));
  std::vector<int> allowed = {kFloat16, kBf16};
  if (plan->mode != LowpMode::kPacked) allowed.push_back(kFloat);
  CD_RETURN_IF_ERROR(CheckDtype(fn, out, allowed));
  plan->out_dtype = out.dtype();
  return CheckOutput(fn, a.output, plan, "FLOAT16, BFLOAT16 or FLOAT32");
}

aclnnStatus CheckLowpCall(const char* fn, const V4Args& a, Tensor x2t, LowpPlan* plan) {
  CD_RETURN_IF_ERROR(
      CheckDtype(fn, plan->x1, {kFloat8E4m3fn, kFloat8E5m2, kHifloat8, kFloat4E2m1}));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, x2t, plan->x1));
  std::vector<int64_t> out_dims;
  CD_RETURN_IF_ERROR(CheckMatmul(fn, plan->x1, x2t, false, 0, &plan->x2, &out_dims));
  SetShape(plan, out_dims);
  CD_RETURN_IF_ERROR(CheckNotEmpty(fn, *plan));
  CD_RETURN_IF_ERROR(CheckQuantLimits(fn, *plan, false));
  CD_RETURN_IF_ERROR(MustBeNull(fn, "commQuantScale1", a.comm1, "only INT8 x1/x2 take it"));
  CD_RETURN_IF_ERROR(MustBeNull(fn, "commQuantScale2", a.comm2, "only INT8 x1/x2 take it"));
  CD_RETURN_IF_ERROR(Required(fn, "x2Scale", a.x2_scale, &plan->x2_scale));
  CD_RETURN_IF_ERROR(Optional(fn, "x1Scale", a.x1_scale, &plan->x1_scale));
  CD_RETURN_IF_ERROR(CheckNd(fn, plan->x2_scale));
  if (plan->x1_scale.present) CD_RETURN_IF_ERROR(CheckNd(fn, plan->x1_scale));
  CD_RETURN_IF_ERROR(ClassifyLowp(fn, plan));
  CD_RETURN_IF_ERROR(CheckBias(fn, a.bias, {kFloat}, plan));
  if (plan->mode == LowpMode::kPerblock) {
    CD_RETURN_IF_ERROR(CheckPerblock(fn, a.group_size, plan));
  } else if (plan->mode == LowpMode::kMx) {
    CD_RETURN_IF_ERROR(CheckMx(fn, a.group_size, plan));
  } else {
    CD_RETURN_IF_ERROR(CheckPertokenOrPacked(fn, a.group_size, plan));
  }
  CD_RETURN_IF_ERROR(CheckLowpOutput(fn, a, plan));
  CD_RETURN_IF_ERROR(CheckX3(fn, a.x3, {kFloat16, kBf16, kFloat}, plan));
  plan->fp8_comm = a.comm_quant_mode == 1;
  const int vd = plan->x1.dtype();
  const bool fp8 = vd == kFloat8E4m3fn || vd == kFloat8E5m2;
  if (plan->fp8_comm &&
      (!fp8 || (plan->mode != LowpMode::kPertoken && plan->mode != LowpMode::kPerblock))) {
    return Fail(fn, kErrParamInvalid,
                std::string("commQuantMode 1 (fp8 pertile communication) needs FLOAT8_E4M3FN or "
                            "FLOAT8_E5M2 x1/x2 with FLOAT32 x1Scale and x2Scale, got ") +
                    DtypeName(vd) + " in the " + ModeName(plan->mode) + " rows");
  }
  return kAclnnSuccess;
}

aclnnStatus CheckV4Int8(const char* fn, const V4Args& a, Int8Plan* plan) {
  const Int8Args ia{a.x1,    a.x2,    a.bias,    a.x3,      a.x2_scale, a.x1_scale,
                    a.comm1, a.comm2, "x2Scale", "x1Scale", a.output};
  CD_RETURN_IF_ERROR(CheckInt8Call(fn, ia, plan));
  if (a.group_size != 0) {
    return Fail(fn, kErrParamInvalid,
                "groupSize must be 0 for INT8 x1/x2, got " + std::to_string(a.group_size));
  }
  if (a.comm_quant_mode != 0) {
    return Fail(fn, kErrParamInvalid,
                "commQuantMode must be 0 for INT8 x1/x2 (their low-bit communication takes "
                "commQuantScale1/2), got " +
                    std::to_string(a.comm_quant_mode));
  }
  return CheckOutput(fn, a.output, plan, "set by x2Scale");
}

// Phase 1 of aclnnQuantMatmulAllReduceV4 and V5 (after V5's commMode check).
aclnnStatus QuantV4Common(const char* fn, const aclTensor* x1, const aclTensor* x2,
                          const aclTensor* bias, const aclTensor* x3, const aclTensor* x1_scale,
                          const aclTensor* x2_scale, const aclTensor* comm1, const aclTensor* comm2,
                          const char* group, const char* reduce_op, int64_t comm_turn,
                          int64_t stream_mode, int64_t group_size, int64_t comm_quant_mode,
                          const aclTensor* output, uint64_t* workspace_size,
                          aclOpExecutor** executor) {
  const V4Args a{x1,    x2,    bias,   x3,         x1_scale,       x2_scale,
                 comm1, comm2, output, group_size, comm_quant_mode};
  if (a.comm_quant_mode != 0 && a.comm_quant_mode != 1) {
    return Fail(fn, kErrParamInvalid,
                "commQuantMode must be 0 or 1, got " + std::to_string(a.comm_quant_mode));
  }
  Tensor x1t, x2t;
  CD_RETURN_IF_ERROR(Required(fn, "x1", a.x1, &x1t));
  CD_RETURN_IF_ERROR(Required(fn, "x2", a.x2, &x2t));
  std::shared_ptr<MatmulAllReducePlan> plan;
  if (x1t.dtype() == kInt8) {
    auto p = std::make_shared<Int8Plan>();
    p->fn = fn;
    CD_RETURN_IF_ERROR(CheckV4Int8(fn, a, p.get()));
    plan = p;
  } else {
    auto p = std::make_shared<LowpPlan>();
    p->fn = fn;
    p->x1 = x1t;
    CD_RETURN_IF_ERROR(CheckLowpCall(fn, a, x2t, p.get()));
    plan = p;
  }
  int world = 0;
  CD_RETURN_IF_ERROR(
      CheckAllReduceArgs(fn, group, reduce_op, comm_turn, stream_mode, kV4WorldSizes, &world));
  plan->group = group;
  return FinishPlan(plan, workspace_size, executor);
}

}  // namespace

}  // namespace ops
}  // namespace cann_double

// ---------------------------------------------------------------------------
// Exported entry points

using cann_double::ops::Injected;

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnMatmulAllReduceGetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const char* group,
    const char* reduceOp, int64_t commTurn, int64_t streamMode, const aclTensor* output,
    uint64_t* workspaceSize, aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnMatmulAllReduceGetWorkspaceSize")) return s;
  return cann_double::ops::MatmulAllReduceCommon("aclnnMatmulAllReduce", x1, x2, bias, nullptr,
                                                 group, reduceOp, commTurn, streamMode, output,
                                                 workspaceSize, executor);
}
CD_PHASE2(aclnnMatmulAllReduce)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnMatmulAllReduceV2GetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* x3,
    const char* group, const char* reduceOp, int64_t commTurn, int64_t streamMode,
    const aclTensor* output, uint64_t* workspaceSize, aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnMatmulAllReduceV2GetWorkspaceSize")) return s;
  return cann_double::ops::MatmulAllReduceCommon("aclnnMatmulAllReduceV2", x1, x2, bias, x3, group,
                                                 reduceOp, commTurn, streamMode, output,
                                                 workspaceSize, executor);
}
CD_PHASE2(aclnnMatmulAllReduceV2)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnMatmulAllReduceV3GetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* x3,
    const char* group, const char* reduceOp, const char* commMode, int64_t commTurn,
    int64_t streamMode, const aclTensor* output, uint64_t* workspaceSize,
    aclOpExecutor** executor) {
  const char* fn = "aclnnMatmulAllReduceV3";
  if (aclnnStatus s = Injected("aclnnMatmulAllReduceV3GetWorkspaceSize")) return s;
  if (aclnnStatus s = cann_double::ops::CheckCommMode(fn, commMode)) return s;
  return cann_double::ops::MatmulAllReduceCommon(fn, x1, x2, bias, x3, group, reduceOp, commTurn,
                                                 streamMode, output, workspaceSize, executor);
}
CD_PHASE2(aclnnMatmulAllReduceV3)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnWeightQuantMatmulAllReduceGetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias,
    const aclTensor* antiquantScale, const aclTensor* antiquantOffset, const aclTensor* x3,
    const char* group, const char* reduceOp, int64_t commTurn, int64_t streamMode,
    int64_t antiquantGroupSize, const aclTensor* output, uint64_t* workspaceSize,
    aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnWeightQuantMatmulAllReduceGetWorkspaceSize")) return s;
  return cann_double::ops::WeightQuantCommon(
      "aclnnWeightQuantMatmulAllReduce", x1, x2, bias, antiquantScale, antiquantOffset, x3, group,
      reduceOp, commTurn, streamMode, antiquantGroupSize, output, workspaceSize, executor);
}
CD_PHASE2(aclnnWeightQuantMatmulAllReduce)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnWeightQuantMatmulAllReduceV2GetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias,
    const aclTensor* antiquantScale, const aclTensor* antiquantOffset, const aclTensor* x3,
    const char* group, const char* reduceOp, const char* commMode, int64_t commTurn,
    int64_t streamMode, int64_t antiquantGroupSize, const aclTensor* output,
    uint64_t* workspaceSize, aclOpExecutor** executor) {
  const char* fn = "aclnnWeightQuantMatmulAllReduceV2";
  if (aclnnStatus s = Injected("aclnnWeightQuantMatmulAllReduceV2GetWorkspaceSize")) return s;
  if (aclnnStatus s = cann_double::ops::CheckCommMode(fn, commMode)) return s;
  return cann_double::ops::WeightQuantCommon(fn, x1, x2, bias, antiquantScale, antiquantOffset, x3,
                                             group, reduceOp, commTurn, streamMode,
                                             antiquantGroupSize, output, workspaceSize, executor);
}
CD_PHASE2(aclnnWeightQuantMatmulAllReduceV2)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnQuantMatmulAllReduceGetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* x3,
    const aclTensor* dequantScale, const char* group, const char* reduceOp, int64_t commTurn,
    int64_t streamMode, const aclTensor* output, uint64_t* workspaceSize,
    aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnQuantMatmulAllReduceGetWorkspaceSize")) return s;
  return cann_double::ops::QuantCommon("aclnnQuantMatmulAllReduce", x1, x2, bias, x3, dequantScale,
                                       nullptr, nullptr, nullptr, group, reduceOp, commTurn,
                                       streamMode, output, workspaceSize, executor);
}
CD_PHASE2(aclnnQuantMatmulAllReduce)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnQuantMatmulAllReduceV2GetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* x3,
    const aclTensor* dequantScale, const aclTensor* pertokenScale, const char* group,
    const char* reduceOp, int64_t commTurn, int64_t streamMode, const aclTensor* output,
    uint64_t* workspaceSize, aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnQuantMatmulAllReduceV2GetWorkspaceSize")) return s;
  return cann_double::ops::QuantCommon(
      "aclnnQuantMatmulAllReduceV2", x1, x2, bias, x3, dequantScale, pertokenScale, nullptr,
      nullptr, group, reduceOp, commTurn, streamMode, output, workspaceSize, executor);
}
CD_PHASE2(aclnnQuantMatmulAllReduceV2)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnQuantMatmulAllReduceV3GetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* x3,
    const aclTensor* dequantScale, const aclTensor* pertokenScale, const aclTensor* commQuantScale1,
    const aclTensor* commQuantScale2, const char* group, const char* reduceOp, int64_t commTurn,
    int64_t streamMode, const aclTensor* output, uint64_t* workspaceSize,
    aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnQuantMatmulAllReduceV3GetWorkspaceSize")) return s;
  return cann_double::ops::QuantCommon(
      "aclnnQuantMatmulAllReduceV3", x1, x2, bias, x3, dequantScale, pertokenScale, commQuantScale1,
      commQuantScale2, group, reduceOp, commTurn, streamMode, output, workspaceSize, executor);
}
CD_PHASE2(aclnnQuantMatmulAllReduceV3)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnQuantMatmulAllReduceV4GetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* x3,
    const aclTensor* x1Scale, const aclTensor* x2Scale, const aclTensor* commQuantScale1,
    const aclTensor* commQuantScale2, const char* group, const char* reduceOp, int64_t commTurn,
    int64_t streamMode, int64_t groupSize, int64_t commQuantMode, const aclTensor* output,
    uint64_t* workspaceSize, aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnQuantMatmulAllReduceV4GetWorkspaceSize")) return s;
  return cann_double::ops::QuantV4Common("aclnnQuantMatmulAllReduceV4", x1, x2, bias, x3, x1Scale,
                                         x2Scale, commQuantScale1, commQuantScale2, group, reduceOp,
                                         commTurn, streamMode, groupSize, commQuantMode, output,
                                         workspaceSize, executor);
}
CD_PHASE2(aclnnQuantMatmulAllReduceV4)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnQuantMatmulAllReduceV5GetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias, const aclTensor* x3,
    const aclTensor* x1Scale, const aclTensor* x2Scale, const aclTensor* commQuantScale1,
    const aclTensor* commQuantScale2, const char* group, const char* reduceOp, const char* commMode,
    int64_t commTurn, int64_t streamMode, int64_t groupSize, int64_t commQuantMode,
    const aclTensor* output, uint64_t* workspaceSize, aclOpExecutor** executor) {
  const char* fn = "aclnnQuantMatmulAllReduceV5";
  if (aclnnStatus s = Injected("aclnnQuantMatmulAllReduceV5GetWorkspaceSize")) return s;
  if (aclnnStatus s = cann_double::ops::CheckCommMode(fn, commMode)) return s;
  return cann_double::ops::QuantV4Common(fn, x1, x2, bias, x3, x1Scale, x2Scale, commQuantScale1,
                                         commQuantScale2, group, reduceOp, commTurn, streamMode,
                                         groupSize, commQuantMode, output, workspaceSize, executor);
}
CD_PHASE2(aclnnQuantMatmulAllReduceV5)
