// The MoE expert-parallel operators (E experts per rank, W = epWorldSize):
//
// aclnnAlltoAllvGroupedMatMul (communicate, then compute):
//   sendCounts[d*E + e]: rows this rank sends to local expert e of rank d;
//   gmmX rows are grouped by global expert id d*E + e. Each rank receives,
//   for its expert e from source s, recvCounts[s*E + e] rows; permuteOut is
//   expert-major, source-rank-minor; gmmY = permuteOut's group e @ gmmWeight[e].
// aclnnGroupedMatMulAlltoAllv (compute, then communicate; the inverse):
//   gmmX is expert-major / destination-minor with groups
//   g_e = sum_d sendCounts[d*E + e]; the (e, d) block of gmmX @ gmmWeight[e]
//   goes back to rank d, whose y holds the rows from (source s, expert e) at
//   offset sum_{idx < s*E + e} recvCounts[idx].
// Both: mmY = mmX @ mmWeight (the shared expert, no communication).
// Every product accumulates in fp32 and is rounded once to the dtype.
#include <cstring>

#include "ops_common.h"

namespace cann_double {
namespace ops {
namespace {

struct GmmPlan {
  const char* fn = "";
  std::string group;
  bool forward = true;  // AlltoAllv then GMM
  Tensor gmm_x, gmm_w, mm_x, mm_w, gmm_y, mm_y, permute_out;
  bool trans_gmm_w = false, trans_mm_w = false, permute_flag = false;
  int64_t experts = 0, world = 0, h1 = 0, n1 = 0, h2 = 0, n2 = 0;
  std::vector<int64_t> send, recv;
  int dtype = kFloat16;

  std::vector<const Tensor*> Tensors() const {
    return {&gmm_x, &gmm_w, &mm_x, &mm_w, &gmm_y, &mm_y, &permute_out};
  }
};

int64_t Sum(const std::vector<int64_t>& v, size_t end) {
  int64_t s = 0;
  for (size_t i = 0; i < end && i < v.size(); ++i) s += v[i];
  return s;
}

// rows (count x h) @ weight (h x n), rounded to dtype; `w` is the (h, n)
// matrix read from a weight stored (h, n), or (n, h) when transposed.
std::vector<float> MatmulRounded(const std::vector<double>& rows, int64_t count, int64_t h,
                                 const double* w, int64_t n, bool transposed, int dtype) {
  std::vector<double> b(static_cast<size_t>(h * n));
  for (int64_t t = 0; t < h; ++t) {
    for (int64_t j = 0; j < n; ++j) b[t * n + j] = transposed ? w[j * h + t] : w[t * n + j];
  }
  const std::vector<double> acc = MatmulDouble(rows, b, count, h, n);
  std::vector<float> out(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) out[i] = RoundTo(dtype, static_cast<float>(acc[i]));
  return out;
}

// The grouped matmul of expert-major rows x [sum(groups), h1]: group e times gmmWeight[e].
std::vector<float> GroupedMatmul(const GmmPlan& p, const std::vector<double>& x,
                                 const std::vector<int64_t>& groups) {
  const std::vector<double> w = ReadAll(p.gmm_w);
  std::vector<float> out;
  int64_t row = 0;
  for (int64_t e = 0; e < p.experts; ++e) {
    const std::vector<double> rows(x.begin() + row * p.h1, x.begin() + (row + groups[e]) * p.h1);
    const std::vector<float> y =
        MatmulRounded(rows, groups[e], p.h1, &w[e * p.h1 * p.n1], p.n1, p.trans_gmm_w, p.dtype);
    out.insert(out.end(), y.begin(), y.end());
    row += groups[e];
  }
  return out;
}

void SharedExpert(const GmmPlan& p) {
  if (!p.mm_x.present) return;
  const std::vector<double> x = ReadAll(p.mm_x), w = ReadAll(p.mm_w);
  WriteAll(p.mm_y, MatmulRounded(x, p.mm_x.dim(0), p.h2, w.data(), p.n2, p.trans_mm_w, p.dtype));
}

// Payload: the rank's E*W send counts, then its rows in the dtype.
std::vector<uint8_t> Pack(const std::vector<int64_t>& counts, const std::vector<float>& rows,
                          int dtype) {
  std::vector<uint8_t> out(counts.size() * 8);
  std::memcpy(out.data(), counts.data(), out.size());
  const std::vector<uint8_t> data = EncodeBuffer(dtype, rows);
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// Source s's counts and rows; checks that they are what this rank expects
// (its recvCounts) and that the payload holds `row_width`-wide rows.
aclnnStatus Unpack(const GmmPlan& p, const Collective& c, int s,
                   const std::vector<uint8_t>& payload, int64_t row_width,
                   std::vector<int64_t>* counts, std::vector<float>* rows, std::string* message) {
  const size_t n_counts = static_cast<size_t>(p.experts * p.world);
  if (payload.size() < n_counts * 8) {
    *message = std::string(p.fn) + ": rank " + std::to_string(s) + " sent a short payload";
    return kErrInner;
  }
  counts->resize(n_counts);
  std::memcpy(counts->data(), payload.data(), n_counts * 8);
  for (int64_t e = 0; e < p.experts; ++e) {
    const int64_t sent = (*counts)[c.rank * p.experts + e], want = p.recv[s * p.experts + e];
    if (sent != want) {
      *message = std::string(p.fn) + ": recvCounts[" + std::to_string(s * p.experts + e) +
                 "] = " + std::to_string(want) + " but rank " + std::to_string(s) + " sends " +
                 std::to_string(sent) + " rows to this rank's expert " + std::to_string(e);
      return kErrParamInvalid;
    }
  }
  const size_t item = DtypeBits(p.dtype) / 8;
  const size_t values = (payload.size() - n_counts * 8) / item;
  *rows = DecodeBuffer(p.dtype, payload.data() + n_counts * 8, values);
  if (static_cast<int64_t>(values) != Sum(*counts, n_counts) * row_width) {
    *message = std::string(p.fn) + ": rank " + std::to_string(s) +
               " sent rows that do not match its sendCounts";
    return kErrInner;
  }
  return kAclnnSuccess;
}

// AlltoAllv -> permute -> grouped matmul.
aclnnStatus RunForward(const GmmPlan& p, const Collective& c, aclnnStatus local,
                       std::string* message) {
  std::vector<uint8_t> payload;
  if (local == kAclnnSuccess) {
    const std::vector<double> x = ReadAll(p.gmm_x);
    payload = Pack(p.send, std::vector<float>(x.begin(), x.end()), p.dtype);
  }
  std::vector<std::vector<uint8_t>> got;
  CD_RETURN_IF_ERROR(Exchange(c, local, payload, &got, message));
  const int64_t a = Sum(p.recv, p.recv.size());
  std::vector<double> permuted(static_cast<size_t>(a * p.h1));
  std::vector<int64_t> groups(p.experts, 0);
  std::vector<std::vector<int64_t>> counts(p.world);
  std::vector<std::vector<float>> rows(p.world);
  for (int s = 0; s < p.world; ++s) {
    CD_RETURN_IF_ERROR(Unpack(p, c, s, got[s], p.h1, &counts[s], &rows[s], message));
  }
  int64_t at = 0;
  for (int64_t e = 0; e < p.experts; ++e) {
    for (int s = 0; s < p.world; ++s) {
      const int64_t first = Sum(counts[s], c.rank * p.experts + e),
                    count = p.recv[s * p.experts + e];
      std::copy(rows[s].begin() + first * p.h1, rows[s].begin() + (first + count) * p.h1,
                permuted.begin() + at * p.h1);
      at += count;
      groups[e] += count;
    }
  }
  WriteAll(p.gmm_y, GroupedMatmul(p, permuted, groups));
  if (p.permute_flag) WriteAll(p.permute_out, std::vector<float>(permuted.begin(), permuted.end()));
  SharedExpert(p);
  return kAclnnSuccess;
}

// Grouped matmul -> unpermute -> AlltoAllv.
aclnnStatus RunInverse(const GmmPlan& p, const Collective& c, aclnnStatus local,
                       std::string* message) {
  std::vector<int64_t> groups(p.experts, 0);
  for (int64_t d = 0; d < p.world; ++d) {
    for (int64_t e = 0; e < p.experts; ++e) groups[e] += p.send[d * p.experts + e];
  }
  std::vector<uint8_t> payload;
  if (local == kAclnnSuccess)
    payload = Pack(p.send, GroupedMatmul(p, ReadAll(p.gmm_x), groups), p.dtype);
  std::vector<std::vector<uint8_t>> got;
  CD_RETURN_IF_ERROR(Exchange(c, local, payload, &got, message));
  const int64_t bsk = Sum(p.recv, p.recv.size());
  std::vector<float> y(static_cast<size_t>(bsk * p.n1));
  for (int s = 0; s < p.world; ++s) {
    std::vector<int64_t> counts;
    std::vector<float> rows;
    CD_RETURN_IF_ERROR(Unpack(p, c, s, got[s], p.n1, &counts, &rows, message));
    int64_t group_start = 0;  // source s's expert e block in its expert-major output
    for (int64_t e = 0; e < p.experts; ++e) {
      int64_t first = group_start, group = 0;
      for (int64_t d = 0; d < p.world; ++d) {
        if (d < c.rank) first += counts[d * p.experts + e];
        group += counts[d * p.experts + e];
      }
      const int64_t count = p.recv[s * p.experts + e], to = Sum(p.recv, s * p.experts + e);
      if ((first + count) * p.n1 > static_cast<int64_t>(rows.size())) {
        *message = std::string(p.fn) + ": rank " + std::to_string(s) + " sent too few rows";
        return kErrInner;
      }
      std::copy(rows.begin() + first * p.n1, rows.begin() + (first + count) * p.n1,
                y.begin() + to * p.n1);
      group_start += group;
    }
  }
  WriteAll(p.gmm_y, y);
  SharedExpert(p);
  return kAclnnSuccess;
}

aclnnStatus RunGmm(const GmmPlan& p, int device, std::string* message) {
  Collective c;
  CD_RETURN_IF_ERROR(OpenCollective(p.fn, p.group, device, &c, message));
  if (c.size != p.world) {
    *message = std::string(p.fn) + ": the communicator has " + std::to_string(c.size) +
               " ranks, epWorldSize is " + std::to_string(p.world);
    return kErrInner;
  }
  const aclnnStatus local = StorageLive(p.fn, p.Tensors(), message) ? kAclnnSuccess : kErrInner;
  return p.forward ? RunForward(p, c, local, message) : RunInverse(p, c, local, message);
}

// ---------------------------------------------------------------------------
// Phase 1

aclnnStatus CheckGmmOperands(const char* fn, const aclTensor* gmm_x, const aclTensor* gmm_w,
                             GmmPlan* p) {
  CD_RETURN_IF_ERROR(Required(fn, "gmmX", gmm_x, &p->gmm_x));
  CD_RETURN_IF_ERROR(Required(fn, "gmmWeight", gmm_w, &p->gmm_w));
  CD_RETURN_IF_ERROR(CheckDtype(fn, p->gmm_x, {kFloat16, kBf16}));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, p->gmm_w, p->gmm_x));
  CD_RETURN_IF_ERROR(CheckNd(fn, p->gmm_x));
  CD_RETURN_IF_ERROR(CheckNd(fn, p->gmm_w));
  CD_RETURN_IF_ERROR(CheckRank(fn, p->gmm_x, 2, 2));
  CD_RETURN_IF_ERROR(CheckRank(fn, p->gmm_w, 3, 3));
  p->dtype = p->gmm_x.dtype();
  p->experts = p->gmm_w.dim(0);
  p->h1 = p->gmm_x.dim(1);
  const int64_t wh = p->gmm_w.dim(p->trans_gmm_w ? 2 : 1);
  p->n1 = p->gmm_w.dim(p->trans_gmm_w ? 1 : 2);
  if (wh != p->h1) {
    return Fail(fn, kErrParamInvalid,
                std::string("gmmWeight must be (e, H1, N1)") +
                    (p->trans_gmm_w ? " transposed: (e, N1, H1)" : "") + " with gmmX's H1 = " +
                    std::to_string(p->h1) + ", got " + DimsString(p->gmm_w.dims()));
  }
  if (p->h1 < 1 || p->h1 >= 65536 || p->n1 < 1 || p->n1 >= 65536) {
    return Fail(fn, kErrParamInvalid,
                "H1 and N1 must be in (0, 65536), got H1 = " + std::to_string(p->h1) +
                    ", N1 = " + std::to_string(p->n1));
  }
  if (p->experts < 1 || p->experts > 32) {
    return Fail(fn, kErrParamInvalid,
                "e (gmmWeight's dim 0) must be in [1, 32], got " + std::to_string(p->experts));
  }
  return kAclnnSuccess;
}

aclnnStatus CheckSharedExpert(const char* fn, const aclTensor* mm_x, const aclTensor* mm_w,
                              const aclTensor* mm_y, GmmPlan* p) {
  CD_RETURN_IF_ERROR(Optional(fn, "mmXOptional", mm_x, &p->mm_x));
  CD_RETURN_IF_ERROR(Optional(fn, "mmWeightOptional", mm_w, &p->mm_w));
  if (p->mm_x.present != p->mm_w.present) {
    return Fail(fn, kErrParamInvalid,
                "mmXOptional and mmWeightOptional must both be given or both be nullptr");
  }
  if (!p->mm_x.present) {
    if (p->trans_mm_w) {
      return Fail(fn, kErrParamInvalid,
                  "transMmWeight must be false when there is no shared expert (mmXOptional, "
                  "mmWeightOptional and mmYOptional are nullptr)");
    }
    return MustBeNull(fn, "mmYOptional", mm_y,
                      "there is no shared expert (mmXOptional is nullptr)");
  }
  for (const Tensor* t : {&p->mm_x, &p->mm_w}) {
    CD_RETURN_IF_ERROR(CheckNd(fn, *t));
    CD_RETURN_IF_ERROR(CheckRank(fn, *t, 2, 2));
    CD_RETURN_IF_ERROR(CheckSameDtype(fn, *t, p->gmm_x));
  }
  p->h2 = p->mm_x.dim(1);
  const int64_t wh = p->mm_w.dim(p->trans_mm_w ? 1 : 0);
  p->n2 = p->mm_w.dim(p->trans_mm_w ? 0 : 1);
  if (wh != p->h2 || p->h2 < 1 || p->h2 > 12288 || p->n2 < 1 || p->n2 >= 65536) {
    return Fail(fn, kErrParamInvalid,
                std::string("mmWeightOptional must be (H2, N2)") +
                    (p->trans_mm_w ? " transposed: (N2, H2)" : "") +
                    " with mmXOptional's H2 = " + std::to_string(p->h2) +
                    " in (0, 12288] and N2 in (0, 65536), got " + DimsString(p->mm_w.dims()));
  }
  if (mm_y == nullptr) {
    return Fail(fn, kErrParamNullptr, "mmYOptional must not be nullptr when mmXOptional is given");
  }
  CD_RETURN_IF_ERROR(Required(fn, "mmYOptional", mm_y, &p->mm_y));
  CD_RETURN_IF_ERROR(CheckNd(fn, p->mm_y));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, p->mm_y, p->gmm_x));
  return CheckShape(fn, p->mm_y, {p->mm_x.dim(0), p->n2}, "(BS, N2)");
}

aclnnStatus CheckCounts(const char* fn, const char* name, const aclIntArray* array,
                        const GmmPlan& p, std::vector<int64_t>* out) {
  if (array == nullptr)
    return Fail(fn, kErrParamNullptr, std::string(name) + " must not be nullptr");
  bool ok = false;
  *out = IntArrayValues(array, &ok);
  if (!ok) return Fail(fn, kErrParamInvalid, std::string(name) + " is not a live aclIntArray");
  if (static_cast<int64_t>(out->size()) != p.experts * p.world) {
    return Fail(fn, kErrParamInvalid,
                std::string(name) +
                    " must hold e * epWorldSize = " + std::to_string(p.experts * p.world) +
                    " counts, got " + std::to_string(out->size()));
  }
  for (int64_t v : *out) {
    if (v < 0)
      return Fail(fn, kErrParamInvalid, std::string(name) + " must not hold negative counts");
  }
  return kAclnnSuccess;
}

aclnnStatus CheckCommunication(const char* fn, const char* group, int64_t ep_world_size,
                               const aclIntArray* send, const aclIntArray* recv, GmmPlan* p) {
  int world = 0;
  CD_RETURN_IF_ERROR(CheckGroup(fn, group, &world));
  if (ep_world_size != world || ep_world_size < 1 || ep_world_size > 64) {
    return Fail(fn, kErrParamInvalid,
                "epWorldSize must be the communicator's size " + std::to_string(world) +
                    " (at most 64), got " + std::to_string(ep_world_size));
  }
  p->group = group;
  p->world = ep_world_size;
  if (p->experts * p->world > 256) {
    return Fail(
        fn, kErrParamInvalid,
        "e * epWorldSize must be at most 256, got " + std::to_string(p->experts * p->world));
  }
  CD_RETURN_IF_ERROR(CheckCounts(fn, "sendCounts", send, *p, &p->send));
  return CheckCounts(fn, "recvCounts", recv, *p, &p->recv);
}

// Rows: gmmX holds sum(sendCounts) rows; the output (A, N1) or (BSK, N1) sum(recvCounts).
aclnnStatus CheckRows(const char* fn, const aclTensor* out, const char* out_name, GmmPlan* p) {
  const int64_t sent = Sum(p->send, p->send.size()), received = Sum(p->recv, p->recv.size());
  if (p->gmm_x.dim(0) != sent) {
    return Fail(fn, kErrParamInvalid,
                "gmmX must have sum(sendCounts) = " + std::to_string(sent) + " rows, got " +
                    DimsString(p->gmm_x.dims()));
  }
  if (sent < 1 || sent >= 52428800) {
    return Fail(fn, kErrParamInvalid,
                "sum(sendCounts) must be in (0, 52428800), got " + std::to_string(sent));
  }
  CD_RETURN_IF_ERROR(Required(fn, out_name, out, &p->gmm_y));
  CD_RETURN_IF_ERROR(CheckNd(fn, p->gmm_y));
  CD_RETURN_IF_ERROR(CheckSameDtype(fn, p->gmm_y, p->gmm_x));
  return CheckShape(fn, p->gmm_y, {received, p->n1}, "(sum(recvCounts), N1)");
}

struct GmmArgs {
  const aclTensor *gmm_x, *gmm_w, *send_t, *recv_t, *mm_x, *mm_w;
  const char* group;
  int64_t ep_world_size;
  const aclIntArray *send, *recv;
  bool trans_gmm_w, trans_mm_w;
};

aclnnStatus CheckGmmCall(const char* fn, const GmmArgs& a, GmmPlan* p) {
  p->fn = fn;
  p->trans_gmm_w = a.trans_gmm_w;
  p->trans_mm_w = a.trans_mm_w;
  CD_RETURN_IF_ERROR(CheckGmmOperands(fn, a.gmm_x, a.gmm_w, p));
  CD_RETURN_IF_ERROR(
      MustBeNull(fn, "sendCountsTensorOptional", a.send_t, "not supported, pass sendCounts"));
  CD_RETURN_IF_ERROR(
      MustBeNull(fn, "recvCountsTensorOptional", a.recv_t, "not supported, pass recvCounts"));
  return CheckCommunication(fn, a.group, a.ep_world_size, a.send, a.recv, p);
}

aclnnStatus FinishGmm(std::shared_ptr<GmmPlan> p, uint64_t* workspace_size,
                      aclOpExecutor** executor) {
  KernelBody body = [p](int device, std::string* message) { return RunGmm(*p, device, message); };
  const uint64_t bytes = static_cast<uint64_t>(p->gmm_y.numel() + p->gmm_x.numel()) * 4;
  return Finish(p->fn, WorkspaceFor(bytes), body, workspace_size, executor);
}

// Phase 1 of both directions: forward (AlltoAllv then GMM) writes the routed
// rows to gmmY and may write the permuted tokens to permuteOut; backward
// (GMM then AlltoAllv) writes y and has no permuteOut.
aclnnStatus GmmCommon(const char* fn, bool forward, const aclTensor* gmm_x, const aclTensor* gmm_w,
                      const aclTensor* send_t, const aclTensor* recv_t, const aclTensor* mm_x,
                      const aclTensor* mm_w, const char* group, int64_t ep_world_size,
                      const aclIntArray* send, const aclIntArray* recv, bool trans_gmm_w,
                      bool trans_mm_w, const aclTensor* rows, const char* rows_name,
                      const aclTensor* mm_y, bool permute_flag, const aclTensor* permute_out,
                      uint64_t* workspace_size, aclOpExecutor** executor) {
  const GmmArgs a{gmm_x, gmm_w,         send_t, recv_t, mm_x,        mm_w,
                  group, ep_world_size, send,   recv,   trans_gmm_w, trans_mm_w};
  auto p = std::make_shared<GmmPlan>();
  p->forward = forward;
  CD_RETURN_IF_ERROR(CheckGmmCall(fn, a, p.get()));
  CD_RETURN_IF_ERROR(CheckRows(fn, rows, rows_name, p.get()));
  CD_RETURN_IF_ERROR(CheckSharedExpert(fn, mm_x, mm_w, mm_y, p.get()));
  p->permute_flag = permute_flag;
  if (permute_flag) {
    CD_RETURN_IF_ERROR(Required(fn, "permuteOutOptional", permute_out, &p->permute_out));
    CD_RETURN_IF_ERROR(CheckNd(fn, p->permute_out));
    CD_RETURN_IF_ERROR(CheckSameDtype(fn, p->permute_out, p->gmm_x));
    CD_RETURN_IF_ERROR(CheckShape(fn, p->permute_out, {p->gmm_y.dim(0), p->h1}, "(A, H1)"));
  }
  return FinishGmm(p, workspace_size, executor);
}

}  // namespace
}  // namespace ops
}  // namespace cann_double

using cann_double::ops::GmmCommon;
using cann_double::ops::Injected;

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnAlltoAllvGroupedMatMulGetWorkspaceSize(
    const aclTensor* gmmX, const aclTensor* gmmWeight, const aclTensor* sendCountsTensorOptional,
    const aclTensor* recvCountsTensorOptional, const aclTensor* mmXOptional,
    const aclTensor* mmWeightOptional, const char* group, int64_t epWorldSize,
    const aclIntArray* sendCounts, const aclIntArray* recvCounts, bool transGmmWeight,
    bool transMmWeight, bool permuteOutFlag, aclTensor* gmmY, aclTensor* mmYOptional,
    aclTensor* permuteOutOptional, uint64_t* workspaceSize, aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnAlltoAllvGroupedMatMulGetWorkspaceSize")) return s;
  return GmmCommon("aclnnAlltoAllvGroupedMatMul", true, gmmX, gmmWeight, sendCountsTensorOptional,
                   recvCountsTensorOptional, mmXOptional, mmWeightOptional, group, epWorldSize,
                   sendCounts, recvCounts, transGmmWeight, transMmWeight, gmmY, "gmmY", mmYOptional,
                   permuteOutFlag, permuteOutOptional, workspaceSize, executor);
}
CD_PHASE2(aclnnAlltoAllvGroupedMatMul)

extern "C" CANN_DOUBLE_EXPORT aclnnStatus aclnnGroupedMatMulAlltoAllvGetWorkspaceSize(
    const aclTensor* gmmX, const aclTensor* gmmWeight, const aclTensor* sendCountsTensorOptional,
    const aclTensor* recvCountsTensorOptional, const aclTensor* mmXOptional,
    const aclTensor* mmWeightOptional, const char* group, int64_t epWorldSize,
    const aclIntArray* sendCounts, const aclIntArray* recvCounts, bool transGmmWeight,
    bool transMmWeight, aclTensor* y, aclTensor* mmYOptional, uint64_t* workspaceSize,
    aclOpExecutor** executor) {
  if (aclnnStatus s = Injected("aclnnGroupedMatMulAlltoAllvGetWorkspaceSize")) return s;
  return GmmCommon("aclnnGroupedMatMulAlltoAllv", false, gmmX, gmmWeight, sendCountsTensorOptional,
                   recvCountsTensorOptional, mmXOptional, mmWeightOptional, group, epWorldSize,
                   sendCounts, recvCounts, transGmmWeight, transMmWeight, y, "y", mmYOptional,
                   false, nullptr, workspaceSize, executor);
}
CD_PHASE2(aclnnGroupedMatMulAlltoAllv)
