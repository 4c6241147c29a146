// A C++ model of the AMX tile unit (palette 1: 8 tiles of up to 16 rows x 64 bytes), so the AMX
// micro-kernel runs, and is tested, on any x86-64 CPU (the "amx_emulated" path). TDPBF16PS follows
// the Intel SDM: for every row m and column n, over the K pairs in order, fp32 += bf16 x bf16 for
// element 2k, then for element 2k+1, round to nearest even, denormal inputs and results flushed to
// zero. Every use the hardware would fault on or compute mis-shaped throws std::logic_error.
#define KT_AMX_NATIVE 0
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "amx_tile.hpp"

namespace kt::amx {
namespace {

struct TileUnit {
  bool configured = false;
  TileConfig cfg;
  alignas(64) uint8_t data[kTiles][kMaxRows][kMaxColsb] = {};
};
thread_local TileUnit unit;

struct Counters {
  std::atomic<uint64_t> configs{0}, zeros{0}, dot_products{0};
  std::atomic<uint64_t> loads[kTiles] = {}, stores[kTiles] = {};
};
Counters counters;
std::atomic<bool> math_on{true};

[[noreturn]] void fault(const std::string& what) { throw std::logic_error("AMX emulator: " + what); }

void check_tile(int t, const char* op) {
  if (!unit.configured) fault(std::string(op) + " before the tile configuration was loaded (LDTILECFG)");
  if (t < 0 || t >= kTiles) fault(std::string(op) + " of tile register " + std::to_string(t) + " (palette 1 has 8)");
  if (unit.cfg.rows[t] == 0) fault(std::string(op) + " of tile " + std::to_string(t) + ", which is not configured");
}

inline float flush(float v) { return std::fabs(v) < FLT_MIN ? std::copysign(0.0f, v) : v; }
inline float bf16_value(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return flush(f);
}

}  // namespace

TileCounters emulator_counters() {
  TileCounters c;
  c.configs = counters.configs.load();
  c.zeros = counters.zeros.load();
  c.dot_products = counters.dot_products.load();
  for (int t = 0; t < kTiles; ++t) c.loads[t] = counters.loads[t].load(), c.stores[t] = counters.stores[t].load();
  return c;
}

void reset_emulator_counters() {
  counters.configs = 0, counters.zeros = 0, counters.dot_products = 0;
  for (int t = 0; t < kTiles; ++t) counters.loads[t] = 0, counters.stores[t] = 0;
}

void set_emulator_math(bool on) { math_on = on; }

namespace emu {

void configure(const TileConfig& cfg) {
  if (cfg.palette != 1) fault("LDTILECFG with palette " + std::to_string(cfg.palette) + " (only palette 1 is modelled)");
  if (cfg.start_row != 0) fault("LDTILECFG with start_row != 0");
  for (uint8_t r : cfg.reserved)
    if (r) fault("LDTILECFG with non-zero reserved bytes");
  for (int t = 0; t < 16; ++t) {
    const int rows = cfg.rows[t], colsb = cfg.colsb[t];
    if (t >= kTiles && (rows || colsb)) fault("LDTILECFG configures tile " + std::to_string(t) + " (palette 1 has 8)");
    if (rows > kMaxRows) fault("LDTILECFG: tile " + std::to_string(t) + " has " + std::to_string(rows) + " rows (max 16)");
    if (colsb > kMaxColsb)
      fault("LDTILECFG: tile " + std::to_string(t) + " has " + std::to_string(colsb) + " bytes per row (max 64)");
    if ((rows == 0) != (colsb == 0)) fault("LDTILECFG: tile " + std::to_string(t) + " has rows or bytes per row zero, not both");
  }
  unit.cfg = cfg;
  unit.configured = true;
  std::memset(unit.data, 0, sizeof(unit.data));  // LDTILECFG zeroes the tiles
  ++counters.configs;
}

void release() {
  unit.configured = false;
  unit.cfg = TileConfig();
  std::memset(unit.data, 0, sizeof(unit.data));
}

void zero(int t) {
  check_tile(t, "TILEZERO");
  std::memset(unit.data[t], 0, sizeof(unit.data[t]));
  ++counters.zeros;
}

void load(int t, const void* p, int64_t stride) {
  check_tile(t, "TILELOADD");
  const int rows = unit.cfg.rows[t], colsb = unit.cfg.colsb[t];
  if (math_on) {
    std::memset(unit.data[t], 0, sizeof(unit.data[t]));  // bytes past colsb read as zero
    for (int r = 0; r < rows; ++r) std::memcpy(unit.data[t][r], static_cast<const uint8_t*>(p) + r * stride, colsb);
  }
  ++counters.loads[t];
}

void store(int t, void* p, int64_t stride) {
  check_tile(t, "TILESTORED");
  const int rows = unit.cfg.rows[t], colsb = unit.cfg.colsb[t];
  for (int r = 0; r < rows; ++r) std::memcpy(static_cast<uint8_t*>(p) + r * stride, unit.data[t][r], colsb);
  ++counters.stores[t];
}

void dpbf16ps(int c, int a, int b) {
  check_tile(c, "TDPBF16PS");
  check_tile(a, "TDPBF16PS");
  check_tile(b, "TDPBF16PS");
  if (c == a || c == b || a == b) fault("TDPBF16PS with repeated tile registers (#UD)");
  const TileConfig& cfg = unit.cfg;
  const int M = cfg.rows[c], N = cfg.colsb[c] / 4, K = cfg.colsb[a] / 4;
  if (cfg.colsb[c] % 4 || cfg.colsb[a] % 4)
    fault("TDPBF16PS: bytes per row of C and A must be multiples of 4");
  if (cfg.rows[a] != M || cfg.rows[b] != K || cfg.colsb[b] != cfg.colsb[c])
    fault("TDPBF16PS: mismatched tile shapes: C " + std::to_string(M) + "x" + std::to_string(cfg.colsb[c]) + "B, A " +
          std::to_string(cfg.rows[a]) + "x" + std::to_string(cfg.colsb[a]) + "B, B " + std::to_string(cfg.rows[b]) +
          "x" + std::to_string(cfg.colsb[b]) + "B");
  ++counters.dot_products;
  if (!math_on) return;
  for (int m = 0; m < M; ++m) {
    float acc[kMaxColsb / 4];
    std::memcpy(acc, unit.data[c][m], sizeof(acc));
    for (int n = 0; n < N; ++n) acc[n] = flush(acc[n]);
    const uint16_t* arow = reinterpret_cast<const uint16_t*>(unit.data[a][m]);
    for (int k = 0; k < K; ++k) {
      const float a0 = bf16_value(arow[2 * k]), a1 = bf16_value(arow[2 * k + 1]);
      const uint16_t* brow = reinterpret_cast<const uint16_t*>(unit.data[b][k]);
      for (int n = 0; n < N; ++n) {
        float v = flush(acc[n] + flush(a0 * bf16_value(brow[2 * n])));
        acc[n] = flush(v + flush(a1 * bf16_value(brow[2 * n + 1])));
      }
    }
    std::memcpy(unit.data[c][m], acc, sizeof(acc));
  }
}

}  // namespace emu

void emulated_tile_dot(float* C, const uint16_t* A, const uint16_t* B, const int shape[6], bool configure) {
  struct Release {  // leave the calling thread's tile unit as it was found: unconfigured
    ~Release() { emu::release(); }
  } release;
  if (configure) {
    TileConfig cfg;
    cfg.palette = 1;
    for (int t = 0; t < 3; ++t) {
      if (shape[2 * t] < 0 || shape[2 * t] > 255 || shape[2 * t + 1] < 0 || shape[2 * t + 1] > 65535)
        fault("tile shape out of the configuration's field range");
      cfg.rows[t] = uint8_t(shape[2 * t]), cfg.colsb[t] = uint16_t(shape[2 * t + 1]);
    }
    emu::configure(cfg);
  }
  emu::load(0, C, shape[1]);
  emu::load(1, A, shape[3]);
  emu::load(2, B, shape[5]);
  emu::dpbf16ps(0, 1, 2);
  emu::store(0, C, shape[1]);
}

}  // namespace kt::amx
