// The floating-point mode of a thread, captured on one thread and set on
// another, so that work a handler hands to the workers (workers.cc) computes
// the bits the calling thread would (docs/semantics.md §10.4: under XLA the
// calling thread flushes subnormals to zero).
#pragma once

#include <cfenv>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace jax_mc2 {

// MXCSR on x86 (where the flush-to-zero and denormals-are-zero bits live),
// the C environment elsewhere (on aarch64 it holds FPCR, flush-to-zero
// included).
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

}  // namespace jax_mc2
