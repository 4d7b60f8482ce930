// mc2_check_counts_ffi: the run-time check of an AlltoAllv grouped matmul's
// traced counts (docs/semantics.md §6.6). Returns its last operand, the
// receive counts the operator uses, unchanged (a data dependency, so XLA
// keeps the check), or an invalid-argument error naming the argument when
//   - the given recv_counts disagree with what the peers send
//     (`derived`, one all-to-all of their send_counts), or
//   - `rows` >= 0 and the rows the send_counts lay out (`total`) exceed it
//     (the operators pass rows = -1: a combine's rows past gmm_x read as
//     zero rows, docs/semantics.md §6.6).
#include <cstdint>
#include <cstring>
#include <string>

#include "ffi_common.h"
#include "mc2_ffi.h"

namespace jax_mc2 {
namespace {

constexpr const char* kOp = "mc2_check_counts_ffi";

ffi::Error CheckCountsImpl(ffi::Buffer<ffi::S32> given, ffi::Buffer<ffi::S32> derived,
                           ffi::Buffer<ffi::S32> total, ffi::Buffer<ffi::S32> used,
                           ffi::ResultBuffer<ffi::S32> out, std::string_view op, bool check_recv,
                           int64_t rows, int64_t per_rank) {
  // The messages are built in std::string: a failed allocation is an error,
  // never an exception across the C ABI.
  return CatchAtBoundary(kOp, [&]() -> ffi::Error {
    // given / derived hold every rank's counts and total every rank's row
    // count (gathered), so that every rank fails alike and none is left
    // waiting in a collective.
    const size_t n = derived.element_count();
    if (given.element_count() != n || out->element_count() != used.element_count() ||
        per_rank < 1) {
      return InvalidArgument(kOp, "given and derived must have one size, out that of used");
    }
    const int32_t* g = given.typed_data();
    const int32_t* d = derived.typed_data();
    if (check_recv) {
      for (size_t i = 0; i < n; ++i) {
        if (g[i] != d[i]) {
          return ffi::Error::InvalidArgument(
              std::string(op) +
              ": traced recv_counts disagree with the peers' send_counts: " + "rank " +
              std::to_string(i / per_rank) + " recv_counts[" + std::to_string(i % per_rank) +
              "] = " + std::to_string(g[i]) + " but its peer sends " + std::to_string(d[i]) +
              " (recv_counts[s*e + j] must equal rank s's send_counts[rank*e + j] as it sends "
              "them, a dispatch's clipped to the rows it has: jax_mc2.dispatch_counts)");
        }
      }
    }
    const int32_t* t = total.typed_data();
    for (size_t r = 0; rows >= 0 && r < total.element_count(); ++r) {
      if (t[r] > rows) {
        return ffi::Error::InvalidArgument(
            std::string(op) + ": rank " + std::to_string(r) + "'s traced send_counts lay out " +
            std::to_string(t[r]) + " rows (after the max_tokens_per_peer clipping) but gmm_x has " +
            std::to_string(rows) + " rows");
      }
    }
    if (used.element_count()) {
      std::memcpy(out->typed_data(), used.typed_data(), used.element_count() * sizeof(int32_t));
    }
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2CheckCountsHandler, CheckCountsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // given recv_counts
                                  .Arg<ffi::Buffer<ffi::S32>>()  // derived recv counts
                                  .Arg<ffi::Buffer<ffi::S32>>()  // total rows laid out
                                  .Arg<ffi::Buffer<ffi::S32>>()  // the counts used
                                  .Ret<ffi::Buffer<ffi::S32>>()  // used, unchanged
                                  .Attr<std::string_view>("op")
                                  .Attr<bool>("check_recv")
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("per_rank"));

}  // namespace jax_mc2
