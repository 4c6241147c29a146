// AMX path: C accumulated in tiles, A tiles straight from the gathered activation rows (16 rows x
// 32 bf16, stride = row pitch), B tiles straight from the packed panels (16 pair-rows of a panel
// = one 1 KiB tile). Compiled twice (meson.build): KT_AMX_NATIVE=1 with AMX flags -> path "amx";
// KT_AMX_NATIVE=0 against the tile-unit model -> path "amx_emulated", runnable anywhere.
#include "amx_tile.hpp"
#include "elementwise.hpp"
#if KT_AMX_NATIVE
#include "decode_avx512.hpp"
#include "pack_avx512.hpp"
#include "transpose_avx512.hpp"
#else
#include "decode.hpp"
#include "pack.hpp"
#endif

namespace kt {
namespace {

constexpr int kMr = 16;  // rows per A tile; blocks of 32 rows use two
// Tile registers: C 0..3 = (row tile i, column panel j) at 2i + j; A 4, 5; B 6, 7. Every tile is
// 16 rows x 64 bytes (16 fp32, or 16 bf16 pairs), so one configuration serves every call.
constexpr int kA0 = 4, kA1 = 5, kB0 = 6, kB1 = 7;
constexpr int64_t kTileBytes = 64;
constexpr int64_t kPrefetchSteps = 4;  // K steps of 32 ahead for the streamed B tiles

// The configuration is loaded once per worker thread (the pool's threads live for the process).
inline void ensure_configured() {
  thread_local bool configured = false;
  if (configured) return;
  amx::TileConfig cfg;
  cfg.palette = 1;
  for (int t = 0; t < amx::kTiles; ++t) cfg.rows[t] = amx::kMaxRows, cfg.colsb[t] = amx::kMaxColsb;
  amx::configure(cfg);
  configured = true;
}

inline void prefetch_b_tile(const bf16* p) {
#if KT_AMX_NATIVE
  for (int line = 0; line < amx::kMaxRows; ++line) _mm_prefetch(reinterpret_cast<const char*>(p) + line * 64, _MM_HINT_T0);
#else
  (void)p;
#endif
}

template <int C>
inline void init_c(const float* c, int64_t c_stride, bool accumulate) {
  if (accumulate)
    amx::load<C>(c, c_stride);
  else
    amx::zero<C>();
}

// C[16*MT rows][16*NT cols] (+)= A B, MT row tiles and NT column panels (1 or 2 each).
template <int MT, int NT>
void tile_block(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t kpairs, float* C, int64_t ldc,
                bool accumulate) {
  const int64_t a_stride = lda * 2, c_stride = ldc * 4;
  init_c<0>(C, c_stride, accumulate);
  if constexpr (NT == 2) init_c<1>(C + kPanelCols, c_stride, accumulate);
  if constexpr (MT == 2) init_c<2>(C + kMr * ldc, c_stride, accumulate);
  if constexpr (MT == 2 && NT == 2) init_c<3>(C + kMr * ldc + kPanelCols, c_stride, accumulate);
  for (int64_t q = 0; q < kpairs; q += amx::kMaxRows) {  // one K step: 32 bf16 = 16 pairs
    const bf16* b0 = B + q * 2 * kPanelCols;
    prefetch_b_tile(b0 + kPrefetchSteps * amx::kMaxRows * 2 * kPanelCols);
    amx::load<kA0>(A + 2 * q, a_stride);
    amx::load<kB0>(b0, kTileBytes);
    amx::dpbf16ps<0, kA0, kB0>();
    if constexpr (NT == 2) {
      prefetch_b_tile(b0 + panel_stride + kPrefetchSteps * amx::kMaxRows * 2 * kPanelCols);
      amx::load<kB1>(b0 + panel_stride, kTileBytes);
      amx::dpbf16ps<1, kA0, kB1>();
    }
    if constexpr (MT == 2) {
      amx::load<kA1>(A + kMr * lda + 2 * q, a_stride);
      amx::dpbf16ps<2, kA1, kB0>();
      if constexpr (NT == 2) amx::dpbf16ps<3, kA1, kB1>();
    }
  }
  amx::store<0>(C, c_stride);
  if constexpr (NT == 2) amx::store<1>(C + kPanelCols, c_stride);
  if constexpr (MT == 2) amx::store<2>(C + kMr * ldc, c_stride);
  if constexpr (MT == 2 && NT == 2) amx::store<3>(C + kMr * ldc + kPanelCols, c_stride);
}

void gemm(const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride, int64_t kpairs, int np,
          float* C, int64_t ldc, bool accumulate, PrefetchStream*) {  // the prefetch hint is not used here
  ensure_configured();
  for (int64_t m = 0; m < rows; m += 2 * kMr) {
    const bool two_rows = rows - m >= 2 * kMr;
    for (int p = 0; p < np; p += 2) {
      const bool two_cols = np - p >= 2;
      const bf16* a = A + m * lda;
      const bf16* b = B + p * panel_stride;
      float* c = C + m * ldc + p * kPanelCols;
      if (two_rows && two_cols)
        tile_block<2, 2>(a, lda, b, panel_stride, kpairs, c, ldc, accumulate);
      else if (two_rows)
        tile_block<2, 1>(a, lda, b, panel_stride, kpairs, c, ldc, accumulate);
      else if (two_cols)
        tile_block<1, 2>(a, lda, b, panel_stride, kpairs, c, ldc, accumulate);
      else
        tile_block<1, 1>(a, lda, b, panel_stride, kpairs, c, ldc, accumulate);
    }
  }
}

}  // namespace

#if KT_AMX_NATIVE
extern const KernelSet kAmxKernels = make_kernel_set(Isa::amx, kMr, kMr, gemm, transpose_panels_avx512,
                                                     decode_panels_avx512, gemm_codes_avx512, gemm_t_avx512,
                                                     gemm_codes_t_avx512, pack_panels_avx512, project_f32_avx512,
                                                     expand_f32_avx512);
#else
extern const KernelSet kAmxEmulatedKernels = make_kernel_set(Isa::amx_emulated, kMr, kMr, gemm, transpose_panels_generic,
                                                                decode_panels_portable, nullptr, gemm_t, nullptr, pack_panels,
                                                                project_f32, expand_f32);
#endif

}  // namespace kt
