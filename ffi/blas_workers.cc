// OpenBLAS's parallel jobs on workers that run in the calling thread's
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
#include "blas_workers.h"

#include <pthread.h>

#include <cfenv>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

#include "cblas.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace jax_mc2 {
namespace {

// The floating-point mode of a thread: MXCSR on x86 (where the
// flush-to-zero and denormals-are-zero bits live), the C environment
// elsewhere (on aarch64 it holds FPCR, flush-to-zero included).
struct FpMode {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int csr;
  static FpMode Current() { return {_mm_getcsr()}; }
  void Set() const { _mm_setcsr(csr); }
#else
  std::fenv_t env;
  static FpMode Current() {
    FpMode m;
    std::fegetenv(&m.env);
    return m;
  }
  void Set() const { std::fesetenv(&env); }
#endif
};

// One call's jobs: how many have yet to finish.
struct Batch {
  std::mutex mu;
  std::condition_variable done;
  int pending = 0;
};

struct Job {
  openblas_dojob_callback dojob = nullptr;
  int thread_num = 0;
  void* data = nullptr;
  int dojob_data = 0;
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
  // A worker for one job: an idle one, else a new one; if none can be made,
  // waits for one to come back (the other calls' jobs all have workers, so
  // one does).
  Worker* Take() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) return Pop();
    }
    try {
      return new Worker();
    } catch (...) {
      // No thread to be had (resource exhaustion): wait for a worker of
      // another call to come back.
    }
    std::unique_lock<std::mutex> lock(mu_);
    returned_.wait(lock, [&] { return !idle_.empty(); });
    return Pop();
  }

  void Return(Worker* w) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(w);
    returned_.notify_one();
  }

 private:
  Worker* Pop() {  // under mu_
    Worker* w = idle_.back();
    idle_.pop_back();
    return w;
  }

  std::mutex mu_;
  std::condition_variable returned_;
  std::vector<Worker*> idle_;
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
    job.dojob(job.thread_num, job.data, job.dojob_data);
    own.Set();
    g_pool->Return(this);
    std::lock_guard<std::mutex> lock(job.batch->mu);
    if (--job.batch->pending == 0) job.batch->done.notify_all();
  }
}

// OpenBLAS's callback: job 0 on the calling thread, the others on workers
// in the caller's mode; returns when all have run (OpenBLAS calls it with
// sync = 1 and expects that).
void RunJobs(int /*sync*/, openblas_dojob_callback dojob, int numjobs, size_t jobdata_elsize,
             void* jobdata, int dojob_data) {
  if (numjobs <= 0) return;
  Batch batch;
  batch.pending = numjobs - 1;
  const FpMode mode = FpMode::Current();
  char* data = static_cast<char*>(jobdata);
  for (int i = 1; i < numjobs; ++i) {
    g_pool->Take()->Give(Job{dojob, i, data + i * jobdata_elsize, dojob_data, mode, &batch});
  }
  dojob(0, data, dojob_data);
  std::unique_lock<std::mutex> lock(batch.mu);
  batch.done.wait(lock, [&] { return batch.pending == 0; });
}

// A forked child has none of the parent's threads: it starts a pool of its
// own (the parent's is left as it is, unreachable).
void AfterForkInChild() { g_pool = new Pool(); }

}  // namespace

void InstallBlasWorkers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork(nullptr, nullptr, AfterForkInChild);
    scipy_openblas_set_threads_callback_function(RunJobs);
  });
}

}  // namespace jax_mc2
