// OpenBLAS's parallel jobs run with the calling thread's floating-point mode
// (blas_workers.cc).
#pragma once

namespace jax_mc2 {

// Makes OpenBLAS hand its parallel jobs to jax_mc2's workers, which run each
// job in the mode of the thread that called the BLAS function. Once per
// process; called when the extension loads.
void InstallBlasWorkers();

}  // namespace jax_mc2
