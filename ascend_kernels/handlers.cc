// XLA FFI handlers of the Ascend launch core: the host bridge (registered for
// the CPU platform) and the device-mode seam (for a platform named "ASCEND").
#include <exception>
#include <string>
#include <string_view>
#include <utility>

#include "launch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_mc2::ascend {
namespace {

ffi::Error Run(int ordinal, void* stream, bool host, ffi::RemainingArgs args,
               ffi::RemainingRets rets, std::string_view op, std::string_view function,
               std::string_view spec, std::string_view group) {
  try {
    CallIo io;
    io.host = host;
    io.stream = stream;
    for (size_t i = 0; i < args.size(); ++i) {
      auto b = args.get<ffi::AnyBuffer>(i);
      if (b.has_error()) return b.error();
      io.operands.push_back(Buffer{b->untyped_data(), b->size_bytes()});
    }
    for (size_t i = 0; i < rets.size(); ++i) {
      auto b = rets.get<ffi::AnyBuffer>(i);
      if (b.has_error()) return b.error();
      io.results.push_back(Buffer{(*b)->untyped_data(), (*b)->size_bytes()});
    }
    Status s = Launch(ordinal, op, function, spec, group, io);
    if (!s.ok) return ffi::Error(ffi::ErrorCode::kInternal, s.message);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string(op) + ": " + std::string(function) + ": " + e.what());
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string(op) + ": " + std::string(function) + ": unknown C++ exception");
  }
}

ffi::Error HostBridge(int32_t ordinal, ffi::RemainingArgs args, ffi::RemainingRets rets,
                      std::string_view op, std::string_view function, std::string_view spec,
                      std::string_view group) {
  return Run(ordinal, nullptr, true, args, rets, op, function, spec, group);
}

ffi::Error DeviceMode(int32_t ordinal, void* stream, ffi::RemainingArgs args,
                      ffi::RemainingRets rets, std::string_view op, std::string_view function,
                      std::string_view spec, std::string_view group) {
  return Run(ordinal, stream, false, args, rets, op, function, spec, group);
}

// Both handlers' operands, results and attributes, bound after their contexts.
template <typename Binding>
auto BindCall(Binding binding) {
  return std::move(binding)
      .RemainingArgs()
      .RemainingRets()
      .template Attr<std::string_view>("op")
      .template Attr<std::string_view>("function")
      .template Attr<std::string_view>("spec")
      .template Attr<std::string_view>("group");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mc2AscendHostBridge, HostBridge,
                              BindCall(ffi::Ffi::Bind().Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    Mc2AscendDevice, DeviceMode,
    BindCall(ffi::Ffi::Bind().Ctx<ffi::DeviceOrdinal>().Ctx<ffi::PlatformStream<void*>>()));

}  // namespace jax_mc2::ascend
