// The backward GEMMs' transposes with AVX-512 F/BW/BF16: transpose_panels (kernels.hpp), the operand maker
// of the backward GEMMs, and gemm_t, which multiplies by the forward panels' transpose without making
// it (experts with few rows). Included only by files built with AVX-512 flags; internal linkage.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels.hpp"

// GCC 12 reports the _mm512_undefined_* operand inside the unpack intrinsics as uninitialized (a known
// false positive of its headers, as in decode_avx512.hpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace kt {
namespace {

// In-register transpose of a 16 x 16 matrix of 32-bit words.
inline void transpose_16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // lane l of r[i + j]: column 4l + j of rows i..i+3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_i32x4(r[j], r[j + 4], 0x88);
    t[j + 4] = _mm512_shuffle_i32x4(r[j], r[j + 4], 0xdd);
    t[j + 8] = _mm512_shuffle_i32x4(r[j + 8], r[j + 12], 0x88);
    t[j + 12] = _mm512_shuffle_i32x4(r[j + 8], r[j + 12], 0xdd);
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// One unit: 16 source columns x 32 source rows (16 pair-rows of a panel, 1 KiB) -> 8 pair-rows
// in each of two destination panels (one when `half`: 16 source rows only).
// A 32-bit word of a panel row holds a (k, k+1) pair, so after the word transpose register n is
// source column n over the 32 rows in order; the destination pairs two columns, a 16-bit interleave.
inline void transpose_unit(const bf16* src, bf16* dst_lo, bf16* dst_hi, bool half) {
  __m512i r[16];
  for (int q = 0; q < 16; ++q)
    r[q] = half && q >= 8 ? _mm512_setzero_si512() : _mm512_load_si512(src + q * 2 * kPanelCols);
  transpose_16x16_epi32(r);
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int p = 0; p < 8; ++p) {
    _mm512_store_si512(dst_lo + p * 2 * kPanelCols, _mm512_permutex2var_epi16(r[2 * p], lo, r[2 * p + 1]));
    if (!half) _mm512_store_si512(dst_hi + p * 2 * kPanelCols, _mm512_permutex2var_epi16(r[2 * p], hi, r[2 * p + 1]));
  }
}

void transpose_panels_avx512(const bf16* src, int64_t src_panel_distance, int64_t src_panels, int64_t k0,
                             int64_t kcount, bf16* dst, int64_t dst_panel_stride, int64_t dst_row0, int64_t dst_rows) {
  const int64_t src_cols = src_panels * kPanelCols;
  for (int64_t j = 0; j * kPanelCols < kcount; j += 2) {  // destination panels j, j+1 = source rows k0 + 16j ..
    const bool half = (j + 1) * kPanelCols >= kcount;
    bf16* lo = dst + j * dst_panel_stride;
    bf16* hi = lo + dst_panel_stride;
    const int64_t q0 = (k0 + j * kPanelCols) / 2;
    for (int64_t n = 0; n < src_cols && n < dst_rows; n += kPanelCols) {
      const int64_t prow = (dst_row0 + n) / 2;
      const bf16* unit = src + (n / kPanelCols) * src_panel_distance + q0 * 2 * kPanelCols;
      // The units are 1 KiB pieces of panels far apart: fetch the next one while this one is shuffled.
      for (int line = 0; line < 16; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(unit + 2 * src_panel_distance) + 64 * line, _MM_HINT_T0);
      transpose_unit(unit, lo + prow * 2 * kPanelCols, hi + prow * 2 * kPanelCols, half);
    }
    for (int64_t p = (dst_row0 + src_cols) / 2; p < (dst_row0 + dst_rows) / 2; ++p) {
      _mm512_store_si512(lo + p * 2 * kPanelCols, _mm512_setzero_si512());
      if (!half) _mm512_store_si512(hi + p * 2 * kPanelCols, _mm512_setzero_si512());
    }
  }
}

// A's 16 values of panel p in each of MR rows as (a, 0) and (0, a) pairs, so that VDPBF16PS with a B row
// takes the even and the odd element of each B pair apart.
template <int MR>
struct PanelPairs {
  __m512bh lo[MR], hi[MR];
  PanelPairs(const bf16* A, int64_t lda, int64_t p) {
    for (int m = 0; m < MR; ++m) {
      const bf16* row = A + m * lda + p * kPanelCols;
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
      lo[m] = (__m512bh)a;
      hi[m] = (__m512bh)_mm512_slli_epi32(a, 16);
    }
  }
};

// The product with the forward panels' transpose of MR rows and QB pair-rows of C, over np panels (gemm_t,
// gemm_codes_t): panel(p, a, even, odd) adds panel p's products to the sums, lane j of which collects
// column j of every panel; the lanes are added at the end. (Inlined: the sums stay in registers.)
template <int MR, int QB, class PanelFn>
[[gnu::always_inline]] inline void transposed_block(const bf16* A, int64_t lda, int64_t np, float* C, int64_t ldc,
                                                    bool accumulate, PanelFn&& panel) {
  __m512 even[MR][QB], odd[MR][QB];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < QB; ++q) even[m][q] = odd[m][q] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) panel(p, PanelPairs<MR>(A, lda, p), even, odd);
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < QB; ++q) {
      float* c = C + m * ldc + 2 * q;
      const float e = _mm512_reduce_add_ps(even[m][q]), o = _mm512_reduce_add_ps(odd[m][q]);
      c[0] = accumulate ? c[0] + e : e;
      c[1] = accumulate ? c[1] + o : o;
    }
}

// gemm_t (kernels.hpp) on bf16 panels.
template <int MR, int QB>
void gemm_t_block(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t np, float* C, int64_t ldc,
                  bool accumulate, bool stream) {
  transposed_block<MR, QB>(A, lda, np, C, ldc, accumulate, [&](int64_t p, const PanelPairs<MR>& a, auto& even,
                                                               auto& odd) {
    const bf16* b = B + p * panel_stride;
    if (stream) {  // the panel's pair-rows of the next block, into L2 (a T=16 bf16 backward 10% faster)
      const char* next = reinterpret_cast<const char*>(b + QB * 2 * kPanelCols);
      for (int q = 0; q < QB; ++q) _mm_prefetch(next + 64 * q, _MM_HINT_T1);
    }
    for (int q = 0; q < QB; ++q) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(b + q * 2 * kPanelCols);
      for (int m = 0; m < MR; ++m) {
        even[m][q] = _mm512_dpbf16_ps(even[m][q], a.lo[m], w);
        odd[m][q] = _mm512_dpbf16_ps(odd[m][q], a.hi[m], w);
      }
    }
  });
}

// Pair-rows per block of MR rows: 2 MR QB sums, 2 MR A registers and the B row fit the 32 zmm.
template <int MR>
constexpr int gemm_t_pairs() { return MR == 1 ? 8 : MR <= 3 ? 4 : 2; }

template <int MR>
void gemm_t_rows(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t np, int64_t nq, float* C,
                 int64_t ldc, bool accumulate, bool stream) {
  constexpr int QB = gemm_t_pairs<MR>();
  for (int64_t q = 0; q < nq; q += QB)  // (the last block's prefetches reach past nq: harmless)
    gemm_t_block<MR, QB>(A, lda, B + q * 2 * kPanelCols, panel_stride, np, C + 2 * q, ldc, accumulate, stream);
}

void gemm_t_avx512(const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride, int64_t np,
                   int64_t nq, float* C, int64_t ldc, bool accumulate, bool stream) {
  for (int64_t m = 0; m < rows; m += 4) {
    const bf16* a = A + m * lda;
    float* c = C + m * ldc;
    switch (std::min<int64_t>(4, rows - m)) {
      case 1: gemm_t_rows<1>(a, lda, B, panel_stride, np, nq, c, ldc, accumulate, stream); break;
      case 2: gemm_t_rows<2>(a, lda, B, panel_stride, np, nq, c, ldc, accumulate, stream); break;
      case 3: gemm_t_rows<3>(a, lda, B, panel_stride, np, nq, c, ldc, accumulate, stream); break;
      default: gemm_t_rows<4>(a, lda, B, panel_stride, np, nq, c, ldc, accumulate, stream); break;
    }
  }
}

}  // namespace
}  // namespace kt

#pragma GCC diagnostic pop
