// Element types the streaming kernels read and write. (static inline: ISA-flagged files may
// include this without their copies ever being linked into baseline code.)
#pragma once
#include <cstddef>

namespace loramix {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

static inline std::size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }
static inline const char* dtype_name(DType d) {
  return d == DType::F32 ? "F32" : d == DType::F16 ? "F16" : "BF16";
}

}  // namespace loramix
