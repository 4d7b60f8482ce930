// The nanobind module: exposes the FFI handlers as capsules by target name.
#include <nanobind/nanobind.h>

#include "lowp_modes.h"
#include "mc2_ffi.h"
#include "workers.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule EncapsulateFfiHandler(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_mc2_ffi, m) {
  jax_mc2::InstallBlasWorkers();
  m.def("registrations", []() {
    nb::dict d;
    d["mc2_matmul_ffi"] = EncapsulateFfiHandler(jax_mc2::Mc2MatmulHandler);
    d["mc2_add_rms_norm_ffi"] = EncapsulateFfiHandler(jax_mc2::Mc2AddRmsNormHandler);
    d["mc2_int8_matmul_ffi"] = EncapsulateFfiHandler(jax_mc2::Mc2Int8MatmulHandler);
    d["mc2_grouped_matmul_ffi"] = EncapsulateFfiHandler(jax_mc2::Mc2GroupedMatmulHandler);
    d["mc2_grouped_matmul_wgrad_ffi"] =
        EncapsulateFfiHandler(jax_mc2::Mc2GroupedMatmulWgradHandler);
    d["mc2_lowp_matmul_ffi"] = EncapsulateFfiHandler(jax_mc2::Mc2LowpMatmulHandler);
    d["mc2_check_counts_ffi"] = EncapsulateFfiHandler(jax_mc2::Mc2CheckCountsHandler);
    return d;
  });
  // The `mode` attribute of mc2_lowp_matmul_ffi for each quantization mode
  // of the low-precision rows: {name: int}.
  m.def("lowp_modes", []() {
    nb::dict d;
    for (const jax_mc2::LowpModeName& entry : jax_mc2::kLowpModeNames) {
      d[entry.name] = static_cast<int64_t>(entry.mode);
    }
    return d;
  });
  // Whether the kernels take their vectorized (AVX2/F16C) paths in this
  // process: false on CPUs without them and under JAX_MC2_FFI_PORTABLE=1.
  m.def("vectorized", []() { return jax_mc2::HasAvx2F16c(); });
}
