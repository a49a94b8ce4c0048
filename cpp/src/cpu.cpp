#include "loramix/cpu.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <thread>

#if defined(LORAMIX_HAVE_X86)
#include <cpuid.h>
#endif

namespace loramix {
namespace {

#if defined(LORAMIX_HAVE_X86)
unsigned long long read_xcr0() {
  unsigned int eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned int a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;            // XMM and YMM state
  const bool os_zmm = os_ymm && (xcr0 & 0xE0) == 0xE0; // opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1;
  const bool avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
             avx512vl = (b >> 31) & 1;
  f.avx2 = os_ymm && avx2 && fma && f16c;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  unsigned int a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  f.avx512_bf16 = f.avx512 && ((a1 >> 5) & 1);
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

Isa best_available() {
  const auto& f = cpu_features();
  if (f.avx512) return Isa::avx512;
  if (f.avx2) return Isa::avx2;
  return Isa::scalar;
}

std::once_flag g_init_once;
std::atomic<int> g_active{-1};

void init_active() {
  std::call_once(g_init_once, [] {
    const char* env = std::getenv("LORAMIX_ISA");
    if (env && *env) {
      Isa want = parse_isa(env);
      if (!isa_available(want))
        throw std::runtime_error(std::string("LORAMIX_ISA=") + env +
                                 " is not supported by this CPU/OS or build (available: " +
                                 [] {
                                   std::string s;
                                   for (Isa i : available_isas()) s += std::string(s.empty() ? "" : ", ") + isa_name(i);
                                   return s;
                                 }() + ")");
      g_active.store(static_cast<int>(want));
    } else {
      g_active.store(static_cast<int>(best_available()));
    }
  });
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::scalar;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw std::invalid_argument("unknown ISA '" + name + "' (expected scalar, avx2 or avx512)");
}

std::vector<Isa> compiled_isas() {
#if defined(LORAMIX_HAVE_X86)
  return {Isa::scalar, Isa::avx2, Isa::avx512};
#else
  return {Isa::scalar};
#endif
}

bool isa_available(Isa isa) {
  bool compiled = false;
  for (Isa i : compiled_isas()) compiled |= (i == isa);
  if (!compiled) return false;
  const auto& f = cpu_features();
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return f.avx2;
    case Isa::avx512: return f.avx512;
  }
  return false;
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa i : compiled_isas())
    if (isa_available(i)) out.push_back(i);
  return out;
}

Isa active_isa() {
  init_active();
  return static_cast<Isa>(g_active.load(std::memory_order_relaxed));
}

void set_active_isa(Isa isa) {
  init_active();
  if (!isa_available(isa))
    throw std::runtime_error(std::string("ISA '") + isa_name(isa) +
                             "' is not supported by this CPU/OS or was not compiled in");
  g_active.store(static_cast<int>(isa));
}

int default_threads() {
  if (const char* env = std::getenv("LORAMIX_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

int resolve_threads(int requested) { return requested > 0 ? requested : default_threads(); }

}  // namespace loramix
