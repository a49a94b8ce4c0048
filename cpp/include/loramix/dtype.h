// Element types, the one definition for every part of the core: the streaming kernels and
// the safetensors reader/writer use F32, F16 and BF16; the divergence kernels read histogram
// values as F32 or F64. (static inline: ISA-flagged files may include this without their
// copies ever being linked into baseline code.)
#pragma once
#include <cstddef>

namespace loramix {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

static inline std::size_t dtype_size(DType d) {
  return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2;
}
static inline const char* dtype_name(DType d) {
  return d == DType::F64 ? "F64" : d == DType::F32 ? "F32" : d == DType::F16 ? "F16" : "BF16";
}

}  // namespace loramix
