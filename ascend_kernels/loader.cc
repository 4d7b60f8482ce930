// dlopen/dlsym loader for CANN with the lookup order CANN's own framework
// adapters use: custom operator packages first (ASCEND_CUSTOM_OPP_PATH),
// then the split operator library holding the MC2 operators
// (libopapi_transformer.so), then the monolithic libopapi.so; the runtime
// (libascendcl.so), the aclnn meta API (libnnopbase.so) and HCCL (libhccl.so).
//
// Directory: JAX_MC2_CANN_LIBRARY_PATH (a directory; overrides everything),
// else $ASCEND_HOME_PATH/lib64 or $ASCEND_TOOLKIT_HOME/lib64 (set by CANN's
// set_env.sh), else the bare name, i.e. the dynamic linker's search
// (LD_LIBRARY_PATH).
#include "loader.h"

#include <dlfcn.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>

namespace jax_mc2::ascend {
namespace {

const char* Env(const char* name) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? v : nullptr;
}

std::string LibraryDir(std::string* origin) {
  if (const char* p = Env("JAX_MC2_CANN_LIBRARY_PATH")) {
    *origin = "JAX_MC2_CANN_LIBRARY_PATH";
    return p;
  }
  if (const char* p = Env("ASCEND_HOME_PATH")) {
    *origin = "ASCEND_HOME_PATH";
    return std::string(p) + "/lib64";
  }
  if (const char* p = Env("ASCEND_TOOLKIT_HOME")) {
    *origin = "ASCEND_TOOLKIT_HOME";
    return std::string(p) + "/lib64";
  }
  *origin = "LD_LIBRARY_PATH";
  return "";
}

std::string PathOf(const std::string& dir, const char* lib) {
  return dir.empty() ? std::string(lib) : dir + "/" + lib;
}

std::vector<std::string> CustomOpLibs() {
  std::vector<std::string> out;
  const char* p = Env("ASCEND_CUSTOM_OPP_PATH");
  if (p == nullptr) return out;
  std::stringstream ss(p);
  std::string item;
  while (std::getline(ss, item, ':')) {
    if (!item.empty()) out.push_back(item + "/op_api/lib/libcust_opapi.so");
  }
  return out;
}

void* Open(const std::string& path, std::string* err) {
  dlerror();
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (h == nullptr) {
    const char* e = dlerror();
    *err = e ? e : "dlopen failed";
  }
  return h;
}

std::mutex g_mu;
bool g_tried = false;
Cann* g_cann = nullptr;
std::string g_why;

Cann* DoLoad(std::string* why) {
  std::string origin;
  const std::string dir = LibraryDir(&origin);
  const std::string where = dir.empty()
                                ? std::string("the dynamic linker's search path (LD_LIBRARY_PATH)")
                                : dir + " (from " + origin + ")";
  const std::string hint =
      "; set JAX_MC2_CANN_LIBRARY_PATH to the directory holding CANN's libraries, or source "
      "CANN's set_env.sh (ASCEND_HOME_PATH)";
  auto cann = std::make_unique<Cann>();
  cann->where = where;
  std::string err;
  auto open_required = [&](const char* lib, void** out) -> bool {
    const std::string path = PathOf(dir, lib);
    *out = Open(path, &err);
    if (*out == nullptr) {
      *why = "CANN library " + std::string(lib) + " not found in " + where + ": " + err + hint;
      return false;
    }
    cann->loaded.push_back(path);
    return true;
  };
  void *acl = nullptr, *nnop = nullptr, *hccl = nullptr;
  if (!open_required("libascendcl.so", &acl) || !open_required("libnnopbase.so", &nnop) ||
      !open_required("libhccl.so", &hccl)) {
    return nullptr;
  }
  for (const std::string& path : CustomOpLibs()) {
    if (void* h = Open(path, &err)) {
      cann->op_libs.push_back(h);
      cann->op_lib_paths.push_back(path);
      cann->loaded.push_back(path);
    }
  }
  for (const char* lib : {"libopapi_transformer.so", "libopapi.so"}) {
    const std::string path = PathOf(dir, lib);
    if (void* h = Open(path, &err)) {
      cann->op_libs.push_back(h);
      cann->op_lib_paths.push_back(path);
      cann->loaded.push_back(path);
    }
  }
  if (cann->op_libs.empty()) {
    *why = "CANN operator library libopapi.so (or libopapi_transformer.so) not found in " + where +
           ": " + err + hint;
    return nullptr;
  }
  bool ok = true;
  auto sym = [&](void* lib, const char* libname, const char* name, bool required) -> void* {
    dlerror();
    void* p = dlsym(lib, name);
    if (p == nullptr && required && ok) {
      ok = false;
      *why = "CANN symbol " + std::string(name) + " not found in " + libname + " (" + where + ")" +
             hint;
    }
    return p;
  };
  const char *acl_name = "libascendcl.so", *nnop_name = "libnnopbase.so", *hccl_name = "libhccl.so";
#define REQ(lib, name) cann->name = reinterpret_cast<name##_t>(sym(lib, lib##_name, #name, true));
#define OPT(lib, name) cann->name = reinterpret_cast<name##_t>(sym(lib, lib##_name, #name, false));
  REQ(acl, aclInit)
  REQ(acl, aclGetRecentErrMsg)
  REQ(acl, aclrtSetDevice)
  REQ(acl, aclrtResetDevice)
  REQ(acl, aclrtGetDeviceCount)
  REQ(acl, aclrtGetCurrentContext)
  REQ(acl, aclrtSetCurrentContext)
  REQ(acl, aclrtCreateStream)
  REQ(acl, aclrtDestroyStream)
  REQ(acl, aclrtSynchronizeStreamWithTimeout)
  REQ(acl, aclrtMalloc)
  REQ(acl, aclrtFree)
  REQ(acl, aclrtMemcpy)
  REQ(acl, aclrtMemcpyAsync)
  REQ(nnop, aclCreateTensor)
  REQ(nnop, aclDestroyTensor)
  REQ(nnop, aclCreateIntArray)
  REQ(nnop, aclDestroyIntArray)
  REQ(hccl, HcclGetRootInfo)
  REQ(hccl, HcclCommInitRootInfo)
  REQ(hccl, HcclGetCommName)
  REQ(hccl, HcclCommDestroy)
  OPT(acl, aclFinalize)
  OPT(acl, aclrtCtxSetSysParamOpt)
  OPT(acl, aclrtGetSocName)
  OPT(hccl, HcclCommInitAll)
  OPT(hccl, HcclSetConfig)
  OPT(hccl, HcclGetErrorString)
  OPT(hccl, HcclAlltoAllV)
  OPT(nnop, aclDestroyAclOpExecutor)
#undef REQ
#undef OPT
  if (!ok) return nullptr;
  const aclError rc = cann->aclInit(nullptr);
  if (rc != kAclSuccess && rc != kAclRepeatInitialize) {
    const char* msg = cann->aclGetRecentErrMsg ? cann->aclGetRecentErrMsg() : nullptr;
    *why = "aclInit failed with status " + std::to_string(rc) + ": " + (msg ? msg : "");
    return nullptr;
  }
  return cann.release();
}

}  // namespace

const Cann* LoadCann(std::string* why) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_tried) {
    g_tried = true;
    g_cann = DoLoad(&g_why);
  }
  if (g_cann == nullptr && why != nullptr) *why = g_why;
  return g_cann;
}

void* AclnnSymbol(const Cann& cann, const std::string& name, std::string* why) {
  static std::mutex mu;
  static std::unordered_map<std::string, void*> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  void* p = nullptr;
  for (void* lib : cann.op_libs) {
    dlerror();
    if ((p = dlsym(lib, name.c_str())) != nullptr) break;
  }
  if (p == nullptr) {
    std::string libs;
    for (const auto& path : cann.op_lib_paths) libs += (libs.empty() ? "" : ", ") + path;
    *why = "CANN operator " + name + " not found in the operator libraries (" + libs +
           "): this CANN version lacks it; set JAX_MC2_CANN_LIBRARY_PATH to a CANN that has it";
    return nullptr;
  }
  cache.emplace(name, p);
  return p;
}

std::string MissingSymbol(const Cann& cann, const std::string& name, const std::string& library) {
  return "CANN symbol " + name + " not found in " + library + " (" + cann.where +
         "); set JAX_MC2_CANN_LIBRARY_PATH to a CANN whose " + library + " exports it";
}

std::vector<std::string> SearchDescription() {
  std::string origin;
  const std::string dir = LibraryDir(&origin);
  std::vector<std::string> out;
  for (const auto& p : CustomOpLibs()) out.push_back(p);
  for (const char* lib : {"libopapi_transformer.so", "libopapi.so", "libnnopbase.so",
                          "libascendcl.so", "libhccl.so"}) {
    out.push_back(PathOf(dir, lib));
  }
  return out;
}

}  // namespace jax_mc2::ascend
