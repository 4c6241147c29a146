// The fp32 LoRA matrices with AVX-512 F/BW/BF16. pack_panels for fp32 sources with their lo parts (packed
// per call), where the portable loop was a third of a decode-time forward: bitwise equal to pack_panels
// (pack.cpp), whose hi and lo parts round as VCVTNE2PS2BF16; whole pair-rows of sources whose k or n is
// contiguous run here, anything else goes to the portable packer. project_f32 and expand_f32 (kernels.hpp),
// the direct projects and expands of experts with few rows. Included only by files built with AVX-512
// flags; internal linkage.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "elementwise.hpp"
#include "pack.hpp"
#include "prefetch.hpp"
#include "transpose_avx512.hpp"

// GCC 12 reports the _mm512_undefined_* operand inside some intrinsics (vpmovzxwd, casts) as maybe
// uninitialized (a known false positive of its headers, as in decode_avx512.hpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace kt {
namespace {

// bf16 values (the low or high 16 of a vector) as fp32.
inline __m512 widen(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

// The hi and lo parts of 32 values (a: the first 16, b: the next), each 32 bf16 in that order: VCVTNE2PS2BF16
// rounds as pack.cpp's part_bf16.
inline void split_parts(__m512 a, __m512 b, __m512i& hi, __m512i& lo) {
  hi = (__m512i)_mm512_cvtne2ps_pbh(b, a);
  const __m512 ha = widen(_mm512_castsi512_si256(hi)), hb = widen(_mm512_extracti64x4_epi64(hi, 1));
  lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
}

void pack_panels_avx512(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset, int64_t panel_step,
                        bf16* dst, int64_t lo_delta) {
  if (src.dtype != DType::f32 || !lo_delta || (K | k_offset) & 1 || (src.sk != 1 && src.sn != 1))
    return pack_panels(src, K, N, Kp, k_offset, panel_step, dst, lo_delta);
  const float* s = static_cast<const float*>(src.data);
  const int64_t panel_stride = Kp * kPanelCols, pairs = K / 2;
  auto store = [&](bf16* row, __m512i hi, __m512i lo) {  // one panel row (64 bytes) and its lo part
    _mm512_storeu_si512(row, hi);
    _mm512_storeu_si512(row + lo_delta, lo);
  };
  // Rows k, k+1 as (k, k+1) words: element j of the pair's 32 bf16 from 16 * (j % 2) + j / 2.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j * kPanelCols < N; ++j) {
    const int cols = int(std::min<int64_t>(kPanelCols, N - j * kPanelCols));
    const float* ps = s + j * kPanelCols * src.sn;
    bf16* rows = dst + j * panel_step * panel_stride + k_offset * kPanelCols;  // pair-row k_offset / 2
    if (src.sn == 1) {  // rows k, k+1 are contiguous over n: interleave them
      const __mmask16 m = __mmask16((1u << cols) - 1);
      for (int64_t q = 0; q < pairs; ++q) {
        __m512i hi, lo;
        split_parts(_mm512_maskz_loadu_ps(m, ps + 2 * q * src.sk), _mm512_maskz_loadu_ps(m, ps + (2 * q + 1) * src.sk),
                    hi, lo);
        store(rows + q * 2 * kPanelCols, _mm512_permutexvar_epi16(interleave, hi),
              _mm512_permutexvar_epi16(interleave, lo));
      }
      continue;
    }
    // k contiguous for each column: 16 pair-rows of a column are one vector of words; transpose.
    if (pairs <= 8) {  // K <= 16 (an expand's rank): a vector holds column n of this panel and of the next
      const bool next = (j + 1) * kPanelCols < N;
      const int next_cols = next ? int(std::min<int64_t>(kPanelCols, N - (j + 1) * kPanelCols)) : 0;
      const __mmask16 mk = __mmask16((1u << (2 * pairs)) - 1);
      __m512i hi[16], lo[16];
      for (int n = 0; n < 16; ++n) {
        // The columns of the panels after these two, ahead (the hardware prefetcher follows a task's few
        // KiB too late).
        _mm_prefetch(reinterpret_cast<const char*>(ps + (2 * kPanelCols + n) * src.sn), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ps + (3 * kPanelCols + n) * src.sn), _MM_HINT_T0);
        const __m512 a = n < cols ? _mm512_maskz_loadu_ps(mk, ps + n * src.sn) : _mm512_setzero_ps();
        const __m512 b = n < next_cols ? _mm512_maskz_loadu_ps(mk, ps + (kPanelCols + n) * src.sn) : _mm512_setzero_ps();
        split_parts(a, b, hi[n], lo[n]);
      }
      transpose_16x16_epi32(hi);  // words 0..7: this panel's pair-rows, 8..15: the next panel's
      transpose_16x16_epi32(lo);
      bf16* next_rows = rows + panel_step * panel_stride;
      for (int q = 0; q < pairs; ++q) {
        store(rows + q * 2 * kPanelCols, hi[q], lo[q]);
        if (next) store(next_rows + q * 2 * kPanelCols, hi[8 + q], lo[8 + q]);
      }
      ++j;  // the next panel is done too
      continue;
    }
    for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
      const int nq = int(std::min<int64_t>(16, pairs - q0));
      const __mmask16 ma = __mmask16(nq >= 8 ? 0xffff : (1u << (2 * nq)) - 1);
      const __mmask16 mb = __mmask16(nq <= 8 ? 0 : (1u << (2 * (nq - 8))) - 1);
      __m512i hi[16], lo[16];
      for (int n = 0; n < 16; ++n) {
        if (n >= cols) {
          hi[n] = lo[n] = _mm512_setzero_si512();
          continue;
        }
        const float* col = ps + n * src.sn + 2 * q0;
        // 16 strided streams are more than the hardware prefetcher follows: ask for the block 8 ahead
        // into L2 (more misses in flight than L1 takes) and the next one into L1.
        _mm_prefetch(reinterpret_cast<const char*>(col + 256), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(col + 272), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(col + 32), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(col + 48), _MM_HINT_T0);
        split_parts(_mm512_maskz_loadu_ps(ma, col), _mm512_maskz_loadu_ps(mb, col + 16), hi[n], lo[n]);
      }
      transpose_16x16_epi32(hi);
      transpose_16x16_epi32(lo);
      for (int q = 0; q < nq; ++q) store(rows + (q0 + q) * 2 * kPanelCols, hi[q], lo[q]);
    }
  }
}

// project_f32 (kernels.hpp) where each column of S is contiguous along k (the forward's LoRA A read as
// [rank][in]): the columns of each of the NS matrices are one sequential stream (prefetch_stream), the
// matrices read in lock-step, each column once for up to 4 rows; the same lanes and order as the portable
// loop (elementwise.hpp). T=16 forward of the bench layer, same process, against the portable loop: the
// LoRA phases of a direct expert (both projects, with their expands) 7-9% faster on 2 threads, 7-15% on 1;
// without the prefetch, 1.8x slower than the portable loop.
template <int MR, int NS>
void project_columns(const bf16* A, int64_t lda, const float* const* S, int64_t sn, int64_t K, int64_t N,
                     float* const* C, int64_t ldc) {
  for (int64_t n = 0; n < N; ++n) {
    __m512 acc[NS][MR];
    for (int i = 0; i < NS; ++i)
      for (int m = 0; m < MR; ++m) acc[i][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
      __m512 a[MR];
      for (int m = 0; m < MR; ++m) a[m] = widen(_mm256_maskz_loadu_epi16(mk, A + m * lda + k));
      for (int i = 0; i < NS; ++i) {
        const float* col = S[i] + n * sn;
        prefetch_stream(col + k);
        const __m512 s = _mm512_maskz_loadu_ps(mk, col + k);
        for (int m = 0; m < MR; ++m) acc[i][m] = _mm512_fmadd_ps(a[m], s, acc[i][m]);
      }
    }
    for (int i = 0; i < NS; ++i)
      for (int m = 0; m < MR; ++m) {
        float lanes[16];
        _mm512_storeu_ps(lanes, acc[i][m]);
        C[i][m * ldc + n] = reduce_lanes(lanes);
      }
  }
}

template <int NS>
void project_rows(const bf16* A, int64_t lda, int64_t rows, const float* const* S, int64_t sn, int64_t K, int64_t N,
                  float* const* C, int64_t ldc) {
  for (int64_t m = 0; m < rows; m += 4) {
    const bf16* a = A + m * lda;
    float* c[NS];
    for (int i = 0; i < NS; ++i) c[i] = C[i] + m * ldc;
    switch (std::min<int64_t>(4, rows - m)) {
      case 1: project_columns<1, NS>(a, lda, S, sn, K, N, c, ldc); break;
      case 2: project_columns<2, NS>(a, lda, S, sn, K, N, c, ldc); break;
      case 3: project_columns<3, NS>(a, lda, S, sn, K, N, c, ldc); break;
      default: project_columns<4, NS>(a, lda, S, sn, K, N, c, ldc); break;
    }
  }
}

void project_f32_avx512(const bf16* A, int64_t lda, int64_t rows, const float* const* S, int count, int64_t sk,
                        int64_t sn, int64_t K, int64_t N, float* const* C, int64_t ldc) {
  if (sk != 1) return project_f32(A, lda, rows, S, count, sk, sn, K, N, C, ldc);
  if (count == 2) return project_rows<2>(A, lda, rows, S, sn, K, N, C, ldc);
  project_rows<1>(A, lda, rows, S, sn, K, N, C, ldc);
}

// 16 columns at a time: t[k] = S(k, n0 .. n0 + 15) in registers, then one broadcast FMA per (row, k).
// Where k is contiguous per column (a LoRA B read as [out][rank]), 16 columns' k values are loaded as
// rows of 16 and transposed.
void expand_f32_avx512(const float* coef, int64_t ldcoef, int64_t rows, const float* S, int64_t sk, int64_t sn,
                       int64_t K, int64_t N, float* C, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int cols = int(std::min<int64_t>(16, N - n0));
    const __mmask16 mn = __mmask16((1u << cols) - 1);
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int kk = int(std::min<int64_t>(16, K - k0));
      __m512i t[16];
      if (sn == 1) {
        for (int k = 0; k < kk; ++k) t[k] = _mm512_castps_si512(_mm512_maskz_loadu_ps(mn, S + (k0 + k) * sk + n0));
      } else {  // sk == 1
        const __mmask16 mk = __mmask16((1u << kk) - 1);
        for (int n = 0; n < 16; ++n) {
          // The columns 8 panels on (a call may run one panel: the next calls' columns): the loads of a
          // panel all precede its transpose, so the hardware prefetcher alone leaves this latency-bound.
          _mm_prefetch(reinterpret_cast<const char*>(S + (n0 + 128 + n) * sn + k0), _MM_HINT_T0);
          t[n] = n < cols ? _mm512_castps_si512(_mm512_maskz_loadu_ps(mk, S + (n0 + n) * sn + k0)) : _mm512_setzero_si512();
        }
        transpose_16x16_epi32(t);
      }
      for (int64_t m = 0; m < rows; ++m) {
        const float* a = coef + m * ldcoef + k0;
        float* c = C + m * ldc + n0;
        __m512 acc = _mm512_maskz_loadu_ps(mn, c);
        for (int k = 0; k < kk; ++k) acc = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_castsi512_ps(t[k]), acc);
        _mm512_mask_storeu_ps(c, mn, acc);
      }
    }
  }
}

}  // namespace
}  // namespace kt

#pragma GCC diagnostic pop
