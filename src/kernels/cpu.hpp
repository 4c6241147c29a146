// Run-time CPU feature detection and the choice of the ISA path.
#pragma once
#include <string>
#include <vector>

namespace kt {

// amx_emulated: the AMX micro-kernel run against a C++ model of the tile unit (amx_tile.hpp);
// runnable on any x86-64 CPU, never chosen by default.
enum class Isa : int { avx2 = 0, avx512 = 1, amx = 2, amx_emulated = 3 };

struct CpuFeatures {
  bool avx2 = false, fma = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_bf16 = false, avx512_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 says the OS saves the state
  bool amx_granted = false;  // Linux arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) succeeded
};

const CpuFeatures& cpu_features();

const char* isa_name(Isa isa);
// Parses "amx" / "avx512" / "avx2" / "amx_emulated"; throws std::invalid_argument otherwise.
Isa parse_isa(const std::string& name);
// Whether this CPU (and OS) can run the path, and this build has kernels for it.
bool isa_runnable(Isa isa);
// Runnable paths, best first (amx_emulated last).
std::vector<Isa> runnable_isas();
// Best runnable hardware path, or the one KT_ISA names; throws std::runtime_error with a clear message.
Isa default_isa();

}  // namespace kt
