// RAII NVTX range for C++ launchers: `nvlm::NvtxRange range("nvlm.C.pixel_shuffle.fwd");` as the
// first line of every launcher, so each kernel shows up under its op in Nsight Systems / Compute.
// Domain "nvlm", like the Python ranges. NVTX v3 is header-only and a no-op unless a tool is
// attached; where its headers are absent (a CPU-only build) the range compiles to nothing.
#pragma once

#if defined(__has_include)
#if __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define NVLM_HAVE_NVTX 1
#endif
#endif

namespace nvlm {

#if defined(NVLM_HAVE_NVTX)
class NvtxRange {
 public:
  explicit NvtxRange(const char* label) {
    nvtxEventAttributes_t attributes{};
    attributes.version = NVTX_VERSION;
    attributes.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
    attributes.messageType = NVTX_MESSAGE_TYPE_ASCII;
    attributes.message.ascii = label;
    nvtxDomainRangePushEx(domain(), &attributes);
  }
  ~NvtxRange() { nvtxDomainRangePop(domain()); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;

 private:
  static nvtxDomainHandle_t domain() {
    static nvtxDomainHandle_t handle = nvtxDomainCreateA("nvlm");
    return handle;
  }
};
#else
class NvtxRange {
 public:
  explicit NvtxRange(const char*) {}
};
#endif

}  // namespace nvlm
