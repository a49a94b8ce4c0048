// CPU feature detection and run-time ISA selection.
//
// Contract:
//  - Detection runs once (first call), checks CPUID *and* the OS-enabled state in XCR0
//    (AVX needs XMM|YMM state, AVX-512 also needs opmask|ZMM_Hi256|Hi16_ZMM state).
//  - The active ISA is the best supported one unless LORAMIX_ISA=scalar|avx2|avx512 is set,
//    in which case it is exactly that one, or set_active_isa() fails with a message naming
//    what the CPU/OS lacks. Kernels read active_isa() once per call, outside their loops.
//  - Nothing here depends on Python.
#pragma once
#include <string>
#include <vector>

namespace loramix {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA + F16C, OS saves YMM
  bool avx512 = false;      // AVX-512 F/BW/VL/DQ, OS saves ZMM + opmask
  bool avx512_bf16 = false; // AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
};

const CpuFeatures& cpu_features();

const char* isa_name(Isa isa);
// Parses "scalar" | "avx2" | "avx512"; throws std::invalid_argument otherwise.
Isa parse_isa(const std::string& name);

// ISAs compiled into this build (scalar always; avx2/avx512 on x86-64 builds).
std::vector<Isa> compiled_isas();
// ISAs that are compiled in and supported by this CPU and OS.
std::vector<Isa> available_isas();
bool isa_available(Isa isa);

// Currently active ISA. Initialized from LORAMIX_ISA (throws std::runtime_error when that
// names an unsupported ISA) or the best available one.
Isa active_isa();
// Throws std::runtime_error naming the missing feature if `isa` is not available.
void set_active_isa(Isa isa);

// Default thread count: LORAMIX_NUM_THREADS if set (>0), else hardware_concurrency().
int default_threads();
// Resolve a user request: <=0 means default_threads().
int resolve_threads(int requested);

}  // namespace loramix
