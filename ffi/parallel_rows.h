// Row-parallel loops on XLA's own intra-op thread pool, taken through the
// FFI execution context (ffi::ThreadPool), for the memory-bound passes a
// handler runs after a GEMM that XLA did (the int8 dequantization epilogue).
// Each row is computed by the same code whichever thread takes it, so the
// results never depend on the split.
#ifndef JAX_MC2_FFI_PARALLEL_ROWS_H_
#define JAX_MC2_FFI_PARALLEL_ROWS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jax_mc2 {

namespace ffi = xla::ffi;

// Runs body(begin, end) over the row ranges of [0, rows), in chunks of at
// least `min_chunk_rows` rows, on the calling thread and on up to
// pool.num_threads() pool threads.
//
// Work sharing: every participant, the caller included, takes the next chunk
// from an atomic counter until none is left, so the caller never waits for a
// chunk that nobody has started. A pool that is busy (the other devices'
// programs of a shard_map run on it too) only means that the caller does more
// of the chunks itself; it cannot deadlock. The caller returns after every
// chunk has finished; a pool task that starts later finds no chunk and
// touches only the shared counter, which it co-owns. An exception of a chunk
// is rethrown on the calling thread (for the handler's CatchAtBoundary).
template <typename Body>
void ParallelRows(ffi::ThreadPool& pool, int64_t rows, int64_t min_chunk_rows, Body&& body) {
  if (rows <= 0) return;
  const int64_t threads = std::max<int64_t>(0, pool.num_threads());
  // About four chunks per participant, for balance when threads are busy.
  const int64_t chunk_rows =
      std::max<int64_t>({1, min_chunk_rows, (rows + 4 * (threads + 1) - 1) / (4 * (threads + 1))});
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  if (threads == 0 || chunks == 1) {
    body(int64_t{0}, rows);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable finished;
    int64_t done = 0;  // chunks finished, under mu
    std::exception_ptr error;
  };
  auto shared = std::make_shared<Shared>();
  // Runs chunks until none is left. `body` lives on the caller's stack; it is
  // only called for a chunk index below `chunks`, and the caller waits for
  // all of those.
  auto work = [shared, chunks, chunk_rows, rows, &body]() {
    for (int64_t c = shared->next.fetch_add(1); c < chunks; c = shared->next.fetch_add(1)) {
      std::exception_ptr error;
      try {
        body(c * chunk_rows, std::min(rows, (c + 1) * chunk_rows));
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(shared->mu);
      if (error && !shared->error) shared->error = error;
      if (++shared->done == chunks) shared->finished.notify_all();
    }
  };
  const int64_t helpers = std::min(threads, chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    try {
      pool.Schedule([work]() { work(); });
    } catch (...) {
      break;  // could not allocate the task: the caller does its chunks
    }
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->finished.wait(lock, [&] { return shared->done == chunks; });
  if (shared->error) std::rethrow_exception(shared->error);
}

}  // namespace jax_mc2

#endif  // JAX_MC2_FFI_PARALLEL_ROWS_H_
