// What the emulated AMX tile unit (amx_emulator.cpp) tells the rest of the library: execution
// counts (the performance proxies any machine can measure) and a test hook. No ISA code here.
#pragma once
#include <cstdint>

namespace kt::amx {

constexpr int kTiles = 8;
constexpr int kMaxRows = 16;
constexpr int kMaxColsb = 64;

// Execution counts of the emulated tile unit, summed over all threads.
struct TileCounters {
  uint64_t configs = 0, zeros = 0, dot_products = 0;
  uint64_t loads[kTiles] = {}, stores[kTiles] = {};
};
TileCounters emulator_counters();
void reset_emulator_counters();
// With math off the emulator counts and checks but skips the arithmetic (bench proxies at full size).
void set_emulator_math(bool on);

// Test hook, on the calling thread: configures tiles 0 (C), 1 (A), 2 (B) with shape[] = {C rows,
// C bytes per row, A rows, A bytes, B rows, B bytes} (unless configure is false), loads them from
// C, A, B (row pitch = bytes per row), runs TDPBF16PS C += A B, stores C and releases the tiles.
// Throws std::logic_error on anything the hardware would fault on or mis-shape.
void emulated_tile_dot(float* C, const uint16_t* A, const uint16_t* B, const int shape[6], bool configure);

}  // namespace kt::amx
