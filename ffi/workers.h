// jax_mc2's worker threads (workers.cc): OpenBLAS's parallel jobs and the
// handlers' row passes run on them in the calling thread's floating-point
// mode.
#pragma once

namespace jax_mc2 {

using WorkerTask = void (*)(void* context, int index);

// Runs task(context, i) for i in [0, count): i = 0 on the calling thread,
// the others each on a worker of its own, in the calling thread's
// floating-point mode; returns when all have run. `task` must not throw.
void RunOnWorkers(int count, WorkerTask task, void* context);

// The same for a callable `task(int)`.
template <typename Task>
void RunOnWorkers(int count, Task& task) {
  RunOnWorkers(
      count, [](void* context, int index) { (*static_cast<Task*>(context))(index); }, &task);
}

// Makes OpenBLAS hand its parallel jobs to the workers (RunOnWorkers). Once
// per process; called when the extension loads.
void InstallBlasWorkers();

}  // namespace jax_mc2
