// AVX-512 path: VDPBF16PS multiplies a broadcast (k, k+1) pair of A with the matching pairs of
// 16 columns of B and accumulates in fp32. Compiled with AVX-512 F/BW/VL/BF16 flags only.
#include <immintrin.h>

#include <array>
#include <utility>

#include "decode_avx512.hpp"
#include "elementwise.hpp"
#include "pack_avx512.hpp"
#include "transpose_avx512.hpp"

namespace kt {
namespace {

constexpr int kMr = 8;
// Panels per register block of MR rows: MR x NP accumulators + NP B registers fit the 32 zmm. Up
// to 4 rows (a decode-time expert gets one or two routes) take 6 panels, one task's column block.
constexpr int max_panels(int mr) { return mr <= 4 ? 6 : 3; }

inline int32_t load_pair(const bf16* p) { return __builtin_bit_cast(int32_t, *reinterpret_cast<const uint32_t*>(p)); }

template <int MR, int NP, bool kPrefetch>
void gemm_panels(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t kpairs, float* C,
                 int64_t ldc, bool accumulate, PrefetchStream* prefetch) {
  PrefetchStream ahead = kPrefetch ? *prefetch : PrefetchStream{};  // in registers during the loop
  __m512 c[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < NP; ++p)
      c[m][p] = accumulate ? _mm512_loadu_ps(C + m * ldc + p * kPanelCols) : _mm512_setzero_ps();
  for (int64_t q = 0; q < kpairs; ++q) {
    if constexpr (kPrefetch)
      if (!ahead.done()) _mm_prefetch(ahead.advance(), _MM_HINT_T1);
    __m512bh b[NP];
    for (int p = 0; p < NP; ++p) b[p] = (__m512bh)_mm512_load_si512(B + p * panel_stride + q * 32);
    for (int m = 0; m < MR; ++m) {
      __m512bh a = (__m512bh)_mm512_set1_epi32(load_pair(A + m * lda + 2 * q));
      for (int p = 0; p < NP; ++p) c[m][p] = _mm512_dpbf16_ps(c[m][p], a, b[p]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(C + m * ldc + p * kPanelCols, c[m][p]);
  if constexpr (kPrefetch) *prefetch = ahead;
}

template <int MR, int NP>
void gemm_panels(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t kpairs, float* C,
                 int64_t ldc, bool accumulate, PrefetchStream* prefetch) {
  if (prefetch && !prefetch->done())
    gemm_panels<MR, NP, true>(A, lda, B, panel_stride, kpairs, C, ldc, accumulate, prefetch);
  else
    gemm_panels<MR, NP, false>(A, lda, B, panel_stride, kpairs, C, ldc, accumulate, nullptr);
}

using BlockFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, int64_t, float*, int64_t, bool, PrefetchStream*);

// MR rows x np panels: whole register blocks, then the remaining panels in one narrower block.
template <int MR, size_t... NP>
void gemm_rows(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t kpairs, int np, float* C,
               int64_t ldc, bool accumulate, PrefetchStream* prefetch, std::index_sequence<NP...>) {
  constexpr int kPanels = max_panels(MR);
  static constexpr BlockFn narrower[] = {gemm_panels<MR, int(NP) + 1>...};  // 1 .. kPanels - 1 panels
  int p = 0;
  for (; p + kPanels <= np; p += kPanels)
    gemm_panels<MR, kPanels>(A, lda, B + p * panel_stride, panel_stride, kpairs, C + p * kPanelCols, ldc, accumulate,
                             prefetch);
  if (p < np)
    narrower[np - p - 1](A, lda, B + p * panel_stride, panel_stride, kpairs, C + p * kPanelCols, ldc, accumulate,
                         prefetch);
}

template <int MR>
void gemm_rows(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t kpairs, int np, float* C,
               int64_t ldc, bool accumulate, PrefetchStream* prefetch) {
  gemm_rows<MR>(A, lda, B, panel_stride, kpairs, np, C, ldc, accumulate, prefetch,
                std::make_index_sequence<max_panels(MR) - 1>());
}

using RowsFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, int64_t, int, float*, int64_t, bool,
                        PrefetchStream*);
template <size_t... MR>
constexpr std::array<RowsFn, sizeof...(MR)> rows_table(std::index_sequence<MR...>) {
  return {gemm_rows<int(MR) + 1>...};
}
constexpr auto kRowsFns = rows_table(std::make_index_sequence<kMr>());  // 1 .. kMr rows

// Any row count: blocks of kMr rows, then one block of the remaining rows (no padding to kMr,
// so an expert with one route costs one row of work).
void gemm(const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride, int64_t kpairs, int np,
          float* C, int64_t ldc, bool accumulate, PrefetchStream* prefetch) {
  for (int64_t m = 0; m < rows; m += kMr)
    kRowsFns[std::min<int64_t>(kMr, rows - m) - 1](A + m * lda, lda, B, panel_stride, kpairs, np, C + m * ldc, ldc,
                                                   accumulate, prefetch);
}

}  // namespace

extern const KernelSet kAvx512Kernels =
    make_kernel_set(Isa::avx512, kMr, 1, gemm, transpose_panels_avx512, decode_panels_avx512, gemm_codes_avx512,
                    gemm_t_avx512, gemm_codes_t_avx512, pack_panels_avx512, project_f32_avx512,
                    expand_f32_avx512);

}  // namespace kt
