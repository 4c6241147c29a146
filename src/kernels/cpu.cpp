#include "cpu.hpp"

#include <cpuid.h>

#include <cstdlib>
#include <stdexcept>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.hpp"

namespace kt {
namespace {

constexpr Isa kAllIsas[] = {Isa::amx, Isa::avx512, Isa::avx2, Isa::amx_emulated};  // best first

uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux keeps AMX tile data off until a process asks for it; the first tile instruction
// would otherwise fault. The permission is per process and idempotent.
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  f.os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;
  f.os_amx = f.os_avx512 && (xcr0 & 0x60000) == 0x60000;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = b & (1u << 5);
  f.avx512f = b & (1u << 16);
  f.avx512bw = b & (1u << 30);
  f.avx512vl = b & (1u << 31);
  f.avx512_vnni = c & (1u << 11);
  f.amx_bf16 = d & (1u << 22);
  f.amx_tile = d & (1u << 24);
  f.amx_int8 = d & (1u << 25);
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512_bf16 = a & (1u << 5);
  if (f.amx_tile && f.os_amx) f.amx_granted = request_amx_permission();
  return f;
}

bool cpu_can_run(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::avx2:
      return f.os_avx && f.avx2 && f.fma;
    case Isa::avx512:
      return f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512_bf16;
    case Isa::amx:
      return f.amx_tile && f.amx_bf16 && f.amx_granted && cpu_can_run(Isa::avx512);
    case Isa::amx_emulated:
      return true;  // plain x86-64 code
  }
  return false;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::amx:
      return "amx";
    case Isa::amx_emulated:
      return "amx_emulated";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : kAllIsas)
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("unknown ISA '" + name + "': expected one of amx, avx512, avx2, amx_emulated");
}

bool isa_runnable(Isa isa) { return cpu_can_run(isa) && kernels_built(isa); }

std::vector<Isa> runnable_isas() {
  std::vector<Isa> out;
  for (Isa isa : kAllIsas)
    if (isa_runnable(isa)) out.push_back(isa);
  return out;
}

Isa default_isa() {
  const char* forced = std::getenv("KT_ISA");
  if (forced && *forced) {
    Isa isa;
    try {
      isa = parse_isa(forced);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(std::string("KT_ISA: ") + e.what());
    }
    if (!isa_runnable(isa))
      throw std::runtime_error(std::string("KT_ISA=") + forced +
                               ": this CPU (or this build) cannot run that path; runnable: " +
                               [] {
                                 std::string s;
                                 for (Isa i : runnable_isas()) s += std::string(s.empty() ? "" : ", ") + isa_name(i);
                                 return s.empty() ? std::string("none") : s;
                               }());
    return isa;
  }
  for (Isa isa : runnable_isas())
    if (isa != Isa::amx_emulated) return isa;
  throw std::runtime_error("kt-functional needs at least AVX2 and FMA; this CPU has neither path");
}

}  // namespace kt
