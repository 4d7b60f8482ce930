// The BLAS entry points jax_mc2 uses, from scipy-openblas32 (OpenBLAS with a
// `scipy_` symbol prefix and 32-bit integers).
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include "cblas.h"

namespace jax_mc2 {

// Threads for the BLAS calls of one handler call: the cores shared by the
// `parallelism` programs that XLA runs at once (one per simulated device in
// the mesh). With one thread OpenBLAS runs each call on the calling thread,
// so the programs of several simulated devices multiply concurrently; with
// more, OpenBLAS serializes concurrent calls on its pool. The count matters
// for speed (all cores for a lone program) and for the bits of the result:
// OpenBLAS's sgemm rounds differently with one thread than with several.
inline int BlasThreads(int64_t parallelism) {
  int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return static_cast<int>(std::max<int64_t>(1, cores / std::max<int64_t>(1, parallelism)));
}

// Holds OpenBLAS's process-wide thread count at `threads` for the scope's
// lifetime: the BLAS calls of one handler call run inside one scope. Scopes
// asking for the same count run concurrently; a scope asking for another
// count waits until no scope is open, so the count is never changed while
// any thread is inside sgemm. It is set only when it differs: once per
// process for a workload of one mesh size.
class BlasThreadsScope {
 public:
  explicit BlasThreadsScope(int threads) {
    Gate& g = TheGate();
    std::unique_lock<std::mutex> lock(g.mu);
    g.cv.wait(lock, [&] { return g.active == 0 || g.threads == threads; });
    if (g.threads != threads) {
      if (scipy_openblas_get_num_threads() != threads) scipy_openblas_set_num_threads(threads);
      g.threads = threads;
    }
    ++g.active;
  }
  ~BlasThreadsScope() {
    Gate& g = TheGate();
    std::lock_guard<std::mutex> lock(g.mu);
    if (--g.active == 0) g.cv.notify_all();
  }
  BlasThreadsScope(const BlasThreadsScope&) = delete;
  BlasThreadsScope& operator=(const BlasThreadsScope&) = delete;

 private:
  struct Gate {
    std::mutex mu;
    std::condition_variable cv;
    int threads = 0;  // the count set by this gate (0: not yet)
    int active = 0;   // open scopes
  };
  static Gate& TheGate() {
    static Gate gate;
    return gate;
  }
};

// C[m, n] = A[m, k] @ B (row-major). B is (k, n), or (n, k) when trans_b.
// The caller checks that every size fits blasint (CheckBlasDims) and holds
// a BlasThreadsScope.
inline void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                  float beta = 0.0f) {
  scipy_cblas_sgemm(
      CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
      static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, a,
      static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

}  // namespace jax_mc2
