// Row-parallel loops for the memory-bound passes of a handler (the
// conversions to fp32 before a GEMM, the epilogue after it, add + RMSNorm),
// on jax_mc2's workers (workers.h), which also run OpenBLAS's jobs. Each row
// is computed by the same code whichever thread takes it, in the calling
// thread's floating-point mode, so results never depend on the split.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <vector>

#include "ffi_common.h"
#include "workers.h"

namespace jax_mc2 {

class RowParallel {
 public:
  // Below this many elements a share is not worth a thread's wake-up.
  static constexpr int64_t kMinShareElements = int64_t{1} << 15;

  // `threads`: how many threads one call may keep busy, the caller included
  // (BlasThreads: the cores shared by the programs XLA runs at once).
  explicit RowParallel(int threads) : threads_(std::max(1, threads)) {}

  // Runs body(begin, end) over [0, rows) split into equal shares of
  // consecutive rows (of `row_elements` elements each), one per thread. An
  // exception of a share is rethrown on the calling thread after all have
  // run (for the handler's CatchAtBoundary).
  template <typename Body>
  void Run(int64_t rows, int64_t row_elements, Body&& body) const {
    if (rows <= 0) return;
    const int64_t min_rows =
        std::max<int64_t>(1, kMinShareElements / std::max<int64_t>(1, row_elements));
    const int shares =
        static_cast<int>(std::min<int64_t>(threads_, (rows + min_rows - 1) / min_rows));
    if (shares <= 1) {
      body(int64_t{0}, rows);
      return;
    }
    std::vector<std::exception_ptr> errors = MakeVector<std::exception_ptr>(shares);
    auto share = [&](int i) {
      try {
        body(rows * i / shares, rows * (i + 1) / shares);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    };
    RunOnWorkers(shares, share);
    for (const std::exception_ptr& error : errors) {
      if (error) std::rethrow_exception(error);
    }
  }

 private:
  int threads_;
};

}  // namespace jax_mc2
