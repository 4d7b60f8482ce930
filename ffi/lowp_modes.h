// The modes of mc2_lowp_matmul_ffi: the one definition of the `mode`
// attribute's values, shared by the kernel (lowp_matmul.cc) and the Python
// side, which reads the table through _mc2_ffi.lowp_modes().
#pragma once

#include <cstdint>

namespace jax_mc2 {

enum class LowpMode : int64_t {
  kScaled = 0,    // x2_scale [1 or n] (+ x1_scale [m]): pertoken and packed
  kPerblock = 1,  // x2_scale [kb, n], x1_scale [m, kb] per block_k rows of k
  kMx = 2,        // e8m0 scales per 32 values along k
};

// The quantization modes of quant_matmul_all_reduce_v4's low-precision rows
// (the names jax_mc2/ops/lowp_quant_matmul.py classifies a call into) and
// the kernel mode each runs as.
struct LowpModeName {
  const char* name;
  LowpMode mode;
};

inline constexpr LowpModeName kLowpModeNames[] = {
    {"pertoken", LowpMode::kScaled},
    {"packed", LowpMode::kScaled},
    {"perblock", LowpMode::kPerblock},
    {"mx", LowpMode::kMx},
};

// Whether `value` is one of the LowpMode values.
inline bool IsLowpMode(int64_t value) {
  return value == static_cast<int64_t>(LowpMode::kScaled) ||
         value == static_cast<int64_t>(LowpMode::kPerblock) ||
         value == static_cast<int64_t>(LowpMode::kMx);
}

}  // namespace jax_mc2
