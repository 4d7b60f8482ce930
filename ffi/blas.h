// The BLAS entry points jax_mc2 uses, from scipy-openblas32 (OpenBLAS with a
// `scipy_` symbol prefix and 32-bit integers).
#pragma once

#include <cstdint>
#include <mutex>

#include "cblas.h"

namespace jax_mc2 {

// C[m, n] = A[m, k] @ B (row-major). B is (k, n), or (n, k) when trans_b.
inline void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                  float beta = 0.0f) {
  scipy_cblas_sgemm(
      CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
      static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, a,
      static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

// Sets OpenBLAS's (process-wide) thread count if it differs. With one
// thread OpenBLAS runs each call on the calling thread, so the programs of
// several simulated devices multiply concurrently; with more, OpenBLAS
// serializes concurrent calls on its pool.
inline void SetBlasThreads(int threads) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (scipy_openblas_get_num_threads() != threads) scipy_openblas_set_num_threads(threads);
}

}  // namespace jax_mc2
