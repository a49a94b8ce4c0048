// Element types the streaming kernels read and write.
#pragma once
#include <cstddef>

namespace loramix {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline std::size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType d) {
  return d == DType::F32 ? "F32" : d == DType::F16 ? "F16" : "BF16";
}

}  // namespace loramix
