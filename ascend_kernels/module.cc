// The nanobind module jax_mc2._mc2_ascend: FFI handler capsules, the code
// tables (from acl_codes.def), availability, device binding, settings and the
// HCCL communicator registry. Builds without CANN; CANN loads at first use.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>

#include "launch.h"
#include "loader.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

namespace jax_mc2::ascend {
extern "C" XLA_FFI_Error* Mc2AscendHostBridge(XLA_FFI_CallFrame*);
extern "C" XLA_FFI_Error* Mc2AscendDevice(XLA_FFI_CallFrame*);
}  // namespace jax_mc2::ascend

namespace {
using namespace jax_mc2::ascend;

void Check(const Status& s) {
  if (!s.ok) throw std::runtime_error(s.message);
}

// The Python root-info exchange (guarded by the GIL; never freed, so that
// nothing is released after the interpreter has gone).
nb::object* g_exchange = nullptr;

Status CallExchange(const std::string& key, const std::string& generation,
                    const std::string* publish, int timeout_ms, std::string* root_info) {
  nb::gil_scoped_acquire gil;
  if (g_exchange == nullptr || !g_exchange->is_valid() || g_exchange->is_none())
    return Status::Error("the key-value store exchange was removed (interpreter exit)");
  try {
    nb::object fn = *g_exchange;
    nb::object got =
        publish ? fn(key, generation, nb::bytes(publish->data(), publish->size()), timeout_ms)
                : fn(key, generation, nb::none(), timeout_ms);
    nb::bytes bytes = nb::cast<nb::bytes>(got);
    root_info->assign(bytes.c_str(), bytes.size());
    return Status::Ok();
  } catch (nb::python_error& e) {
    std::string type = nb::cast<std::string>(nb::str(e.type().attr("__name__")));
    return Status::Error(type + ": " + nb::cast<std::string>(nb::str(e.value())));
  } catch (const std::exception& e) {
    return Status::Error(e.what());
  }
}

// The FFI registrations and the dtype / format code tables.
void DefineTables(nb::module_& m) {
  m.def("registrations", []() {
    nb::dict d;
    d["mc2_ascend_host_bridge"] = nb::capsule(reinterpret_cast<void*>(Mc2AscendHostBridge));
    return d;
  });
  m.def("device_registrations", []() {
    nb::dict d;
    d["mc2_ascend_device"] = nb::capsule(reinterpret_cast<void*>(Mc2AscendDevice));
    return d;
  });
  nb::dict dtypes, formats, hccl_dtypes;
#define ACL_DTYPE(e, name, code) dtypes[name] = code;
#define ACL_FORMAT(e, name, code) formats[name] = code;
#define HCCL_DTYPE(e, name, code, bytes) hccl_dtypes[name] = code;
#include "acl_codes.def"
#undef ACL_DTYPE
#undef ACL_FORMAT
#undef HCCL_DTYPE
  m.attr("ACL_DTYPE") = dtypes;
  m.attr("ACL_FORMAT") = formats;
  m.attr("HCCL_DTYPE") = hccl_dtypes;
}

// Loading CANN, options and devices.
void DefineLoader(nb::module_& m) {
  m.def("load", []() {
    std::string why;
    const Cann* c = LoadCann(&why);
    return nb::make_tuple(c != nullptr, c != nullptr ? std::string() : why);
  });
  m.def("loaded_libraries", []() {
    std::string why;
    const Cann* c = LoadCann(&why);
    return c ? c->loaded : std::vector<std::string>{};
  });
  m.def("has_operator", [](const std::string& name) {
    std::string why;
    const Cann* c = LoadCann(&why);
    if (c == nullptr) return nb::make_tuple(false, why);
    bool ok = AclnnSymbol(*c, name + "GetWorkspaceSize", &why) && AclnnSymbol(*c, name, &why);
    return nb::make_tuple(ok, ok ? std::string() : why);
  });
  // Whether libhccl.so exports HcclAlltoAllV (the data-movement calls need
  // it; the MC2 operators do not), and the reason when it does not.
  m.def("has_hccl_alltoallv", []() {
    std::string why;
    const Cann* c = LoadCann(&why);
    if (c == nullptr) return nb::make_tuple(false, why);
    const bool ok = c->HcclAlltoAllV != nullptr;
    return nb::make_tuple(ok,
                          ok ? std::string() : MissingSymbol(*c, "HcclAlltoAllV", "libhccl.so"));
  });
  m.def("library_search", &SearchDescription);
  m.def("set_timeout_ms", &SetTimeoutMs);
  m.def("timeout_ms", &TimeoutMs);
  m.def("set_deterministic", &SetDeterministic);
  m.def("bind_devices", &BindDevices);
  m.def("npu_of", &NpuOf);
  m.def("soc_name", []() {
    Status s;
    std::string n = SocName(&s);
    Check(s);
    return n;
  });
  m.def("device_count", []() {
    Status s;
    int n = DeviceCount(&s);
    Check(s);
    return n;
  });
}

// HCCL communicators: creation, root-info exchange, shutdown.
void DefineCommunicators(nb::module_& m) {
  m.def("comm_init_all", [](const std::string& key, const std::vector<int>& ordinals) {
    Status s;
    {
      nb::gil_scoped_release release;
      s = CommInitAll(key, ordinals);
    }
    Check(s);
  });
  m.def("get_root_info", [](int ordinal) {
    std::string bytes;
    Check(GetRootInfo(ordinal, &bytes));
    return nb::bytes(bytes.data(), bytes.size());
  });
  // exchange(key, generation, root_info_or_None, timeout_ms) -> root info
  // bytes (jax_mc2/ascend/_comms.py); None removes it. Called from XLA's
  // threads when a compiled call re-creates a group spanning processes.
  m.def(
      "set_root_info_exchange",
      [](nb::object exchange) {
        if (g_exchange == nullptr) g_exchange = new nb::object();
        *g_exchange = exchange;
        SetRootInfoExchange(exchange.is_none() ? RootInfoExchange()
                                               : RootInfoExchange(CallExchange));
      },
      nb::arg("exchange").none());
  m.def("comm_join", [](const std::string& key, int nranks,
                        const std::vector<std::pair<int, int>>& rank_ordinals, int timeout_ms) {
    Status s;
    {
      nb::gil_scoped_release release;
      s = CommJoin(key, nranks, rank_ordinals, timeout_ms);
    }
    Check(s);
  });
  m.def("comm_generation", [](const std::string& key) {
    nb::gil_scoped_release release;  // a re-creation holding the group calls into Python
    return CommGeneration(key);
  });
  m.def("has_comm", &HasComm);
  m.def("comm_count", &CommCount);
  m.def("comm_name", &CommName);
  m.def("shutdown", []() {
    nb::gil_scoped_release release;
    Shutdown();
  });
}

// The launch layer's timings and the copy benchmark (benchmarks/ascend.py).
void DefineTimings(nb::module_& m) {
  m.def("launch_count", &LaunchCount);
  m.def("reset_timings", &ResetTimings);
  m.def("timings", []() {
    Timings t = TimingTotals();
    nb::dict d;
    d["calls"] = t.calls;
    d["copy_in"] = t.copy_in;
    d["copy_out"] = t.copy_out;
    d["wait"] = t.wait;
    d["phase1"] = t.phase1;
    d["phase2"] = t.phase2;
    d["total"] = t.total;
    d["bytes_in"] = t.bytes_in;
    d["bytes_out"] = t.bytes_out;
    return d;
  });
  m.def("copy_benchmark", [](int ordinal, size_t bytes, int reps) {
    double h2d = 0, d2h = 0;
    Status s;
    {
      nb::gil_scoped_release release;
      s = CopyBenchmark(ordinal, bytes, reps, &h2d, &d2h);
    }
    Check(s);
    return nb::make_tuple(h2d, d2h);
  });
}
}  // namespace

NB_MODULE(_mc2_ascend, m) {
  DefineTables(m);
  DefineLoader(m);
  DefineCommunicators(m);
  DefineTimings(m);
}
