// Plain-old-data types of 1, 2, 4, 8 and 16 bytes for kernels that only move data: such a kernel
// needs the element size, not the dtype, so it is compiled five times instead of once per dtype.
// The 16-byte type is 16-byte aligned, so a copy of one compiles to a single 128-bit load/store.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/Exception.h>

namespace nvlm {

struct alignas(16) Bytes16 {
  uint32_t words[4];
};

template <int kBytes>
using CopyUnit = std::conditional_t<
    kBytes == 16, Bytes16,
    std::conditional_t<kBytes == 8, uint64_t,
                       std::conditional_t<kBytes == 4, uint32_t, std::conditional_t<kBytes == 2, uint16_t, uint8_t>>>>;

template <int kBytes>
struct UnitTag {
  using type = CopyUnit<kBytes>;
  static constexpr int bytes = kBytes;
};

// Calls fn(UnitTag<bytes>{}) for bytes in {1, 2, 4, 8, 16}.
template <typename Fn>
void dispatch_copy_unit(int bytes, Fn&& fn) {
  switch (bytes) {
    case 16:
      fn(UnitTag<16>{});
      break;
    case 8:
      fn(UnitTag<8>{});
      break;
    case 4:
      fn(UnitTag<4>{});
      break;
    case 2:
      fn(UnitTag<2>{});
      break;
    case 1:
      fn(UnitTag<1>{});
      break;
    default:
      TORCH_CHECK(false, "nvlm: internal error: unsupported copy unit of ", bytes, " bytes");
  }
}

}  // namespace nvlm
