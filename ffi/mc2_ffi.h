// Every XLA FFI handler the jax_mc2 extension exports.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_mc2 {

XLA_FFI_DECLARE_HANDLER_SYMBOL(Mc2MatmulHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Mc2AddRmsNormHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Mc2Int8MatmulHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Mc2GroupedMatmulHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Mc2GroupedMatmulWgradHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Mc2LowpMatmulHandler);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Mc2CheckCountsHandler);

// Whether the kernels take their AVX2/F16C paths (ffi_common.h).
bool HasAvx2F16c();

}  // namespace jax_mc2
