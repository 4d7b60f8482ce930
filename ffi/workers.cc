// jax_mc2's worker threads: they run OpenBLAS's parallel jobs and the row
// passes of the handlers (parallel_rows.h), each in the calling thread's
// floating-point mode.
//
// OpenBLAS splits a large GEMM into jobs, one per thread, and runs them on
// its own worker threads. Those threads keep the floating-point mode they
// started with, while the caller's share runs in the caller's: under XLA,
// subnormals flushed to zero (docs/semantics.md §10.4). The results then
// depended on which thread computed a block: with a subnormal times an
// infinity in x1 @ x2, half the rows came out NaN and half infinite on two
// threads. scipy-openblas32's OpenBLAS does not pass the mode on (measured),
// but it lets the caller run the jobs
// (openblas_set_threads_callback_function): here every job runs with the
// calling thread's mode, so a GEMM's bits never depend on the split.
#include "workers.h"

#include <pthread.h>

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

#include "cblas.h"
#include "fp_mode.h"

namespace jax_mc2 {
namespace {

// One call's jobs: how many have yet to finish.
struct Batch {
  std::mutex mu;
  std::condition_variable done;
  int pending = 0;
};

struct Job {
  WorkerTask task = nullptr;
  void* context = nullptr;
  int index = 0;
  FpMode mode{};
  Batch* batch = nullptr;
};

// A thread that runs one job at a time. Jobs of one call wait on each
// other's packed panels, so every job of a call gets a worker of its own.
class Worker {
 public:
  // Detached: it lives as long as the process (see Pool).
  Worker() {
    std::thread([this] { Loop(); }).detach();
  }

  void Give(const Job& job) {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = job;
    has_job_ = true;
    wake_.notify_one();
  }

 private:
  void Loop();

  std::mutex mu_;
  std::condition_variable wake_;
  Job job_;
  bool has_job_ = false;
};

// The idle workers, shared by every call. Never destroyed: detached workers
// may still be waiting when static destructors run at exit.
class Pool {
 public:
  // Makes idle workers until there are `count` (fewer if no thread can be
  // made).
  void Reserve(int count) {
    std::lock_guard<std::mutex> lock(mu_);
    while (static_cast<int>(idle_.size()) < count && Make()) {
    }
  }

  // Calls give(worker, i) for i in [1, count) with `count - 1` workers
  // taken together: idle ones, then new ones. A call never holds some
  // workers while it waits for more, so calls cannot wait on each other's
  // partial sets: where no thread can be made, a call waits, holding none,
  // until other calls' workers come back. Reserve, at load, makes as many
  // as one call can use (a core each, the caller's aside).
  template <typename Give>
  void TakeAll(int count, Give&& give) {
    std::unique_lock<std::mutex> lock(mu_);
    while (static_cast<int>(idle_.size()) < count - 1) {
      if (!Make()) returned_.wait(lock);
    }
    for (int i = 1; i < count; ++i) {
      Worker* w = idle_.back();
      idle_.pop_back();
      give(w, i);
    }
  }

  void Return(Worker* w) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(w);  // never reallocates: capacity covers every worker made
    returned_.notify_all();
  }

 private:
  // One new idle worker (under mu_); false if no thread could be made.
  bool Make() {
    try {
      idle_.reserve(++made_);
      idle_.push_back(new Worker());
      return true;
    } catch (...) {
      --made_;
      return false;
    }
  }

  std::mutex mu_;
  std::condition_variable returned_;
  std::vector<Worker*> idle_;
  size_t made_ = 0;  // workers made: idle_'s capacity is kept at least this
};

Pool* g_pool = new Pool();

void Worker::Loop() {
  const FpMode own = FpMode::Current();
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return has_job_; });
      job = job_;
      has_job_ = false;
    }
    job.mode.Set();
    job.task(job.context, job.index);
    own.Set();
    g_pool->Return(this);
    std::lock_guard<std::mutex> lock(job.batch->mu);
    if (--job.batch->pending == 0) job.batch->done.notify_all();
  }
}

// OpenBLAS's callback: its jobs through RunOnWorkers (OpenBLAS calls it
// with sync = 1 and expects it to return when all have run).
void RunJobs(int /*sync*/, openblas_dojob_callback dojob, int numjobs, size_t jobdata_elsize,
             void* jobdata, int dojob_data) {
  char* data = static_cast<char*>(jobdata);
  auto job = [&](int i) { dojob(i, data + i * jobdata_elsize, dojob_data); };
  RunOnWorkers(numjobs, job);
}

// A forked child has none of the parent's threads: it starts a pool of its
// own (the parent's is left as it is, unreachable).
void AfterForkInChild() { g_pool = new Pool(); }

}  // namespace

void RunOnWorkers(int count, WorkerTask task, void* context) {
  if (count <= 0) return;
  Batch batch;
  batch.pending = count - 1;
  const FpMode mode = FpMode::Current();
  g_pool->TakeAll(count, [&](Worker* w, int i) { w->Give(Job{task, context, i, mode, &batch}); });
  task(context, 0);
  std::unique_lock<std::mutex> lock(batch.mu);
  batch.done.wait(lock, [&] { return batch.pending == 0; });
}

void InstallBlasWorkers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork(nullptr, nullptr, AfterForkInChild);
    g_pool->Reserve(static_cast<int>(std::thread::hardware_concurrency()) - 1);
    scipy_openblas_set_threads_callback_function(RunJobs);
  });
}

}  // namespace jax_mc2
