// The AMX tile operations the micro-kernel uses, behind one small interface with two
// implementations chosen at compile time:
//   KT_AMX_NATIVE=1  the hardware instructions (only in files built with -mamx-tile -mamx-bf16);
//   KT_AMX_NATIVE=0  a C++ model of the tile unit (amx_emulator.cpp), runnable on any x86-64 CPU,
//                    which also counts what it executes.
// Tile registers are template arguments, as the instructions need them as immediates.
#pragma once
#include <cstdint>

#include "amx_emulator.hpp"
#include "types.hpp"

#ifndef KT_AMX_NATIVE
#error "define KT_AMX_NATIVE to 0 (emulated) or 1 (native) before including amx_tile.hpp"
#endif

namespace kt::amx {

// Palette-1 tile configuration: the 64-byte memory operand of LDTILECFG.
struct alignas(64) TileConfig {
  uint8_t palette = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads exactly 64 bytes");

#if KT_AMX_NATIVE
// Inline asm rather than the intrinsics: GCC's are macros that stringify the tile number (no
// template arguments), and GCC 12's _tile_loadconfig tells the compiler it reads 8 of the 64
// configuration bytes, so the zeroing of the rest can be dropped at -O2. "%c" prints an immediate
// bare; AT&T operand order (sources first).
inline void configure(const TileConfig& cfg) { asm volatile("ldtilecfg %0" ::"m"(cfg)); }
inline void release() { asm volatile("tilerelease" ::); }
template <int T>
inline void zero() {
  asm volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int T>
inline void load(const void* p, int64_t stride_bytes) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride_bytes), "i"(T) : "memory");
}
template <int T>
inline void store(void* p, int64_t stride_bytes) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride_bytes), "i"(T) : "memory");
}
template <int C, int A, int B>
inline void dpbf16ps() {
  asm volatile("tdpbf16ps %%tmm%c0, %%tmm%c1, %%tmm%c2" ::"i"(B), "i"(A), "i"(C));
}

#else  // the emulator: every use the hardware would fault on or mis-shape throws std::logic_error

namespace emu {
void configure(const TileConfig& cfg);
void release();
void zero(int t);
void load(int t, const void* p, int64_t stride_bytes);
void store(int t, void* p, int64_t stride_bytes);
void dpbf16ps(int c, int a, int b);
}  // namespace emu

inline void configure(const TileConfig& cfg) { emu::configure(cfg); }
inline void release() { emu::release(); }
template <int T>
inline void zero() {
  emu::zero(T);
}
template <int T>
inline void load(const void* p, int64_t stride_bytes) {
  emu::load(T, p, stride_bytes);
}
template <int T>
inline void store(void* p, int64_t stride_bytes) {
  emu::store(T, p, stride_bytes);
}
template <int C, int A, int B>
inline void dpbf16ps() {
  emu::dpbf16ps(C, A, B);
}

#endif

}  // namespace kt::amx
