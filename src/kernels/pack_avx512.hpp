// pack_panels for fp32 sources with AVX-512 F/BW: the LoRA matrices, packed per call (hi and lo
// parts), where the portable loop was a third of a decode-time forward. Bitwise equal to
// pack_panels (pack.cpp): rounding to bf16 is the same integer arithmetic (no denormal flush).
// Whole pair-rows of fp32 sources whose k or n is contiguous run here; anything else goes to the
// portable packer. Included only by files built with AVX-512 flags; internal linkage.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "pack.hpp"

namespace kt {
namespace {

// f32_to_bf16 (common.hpp) on 16 lanes: the bf16 bits in each 32-bit lane's low half.
inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}
inline __m512 bits_value(__m512i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }

// The hi and lo parts of 16 values, bf16 bits per 32-bit lane.
inline void split_parts(__m512 v, __m512i& hi, __m512i& lo) {
  hi = bf16_bits(v);
  lo = bf16_bits(_mm512_sub_ps(v, bits_value(hi)));
}

// 32 values (a: k = 0..15, b: k = 16..31) as 16 (k, k+1) words.
inline __m512i pair_words(__m512i a, __m512i b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a)), _mm512_cvtepi32_epi16(b), 1);
}

// 16 x 16 transpose of 32-bit words: r[i] lane j <-> r[j] lane i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

void pack_panels_avx512(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset, int64_t panel_step,
                        bf16* dst, int64_t lo_delta) {
  if (src.dtype != DType::f32 || (K | k_offset) & 1 || (src.sk != 1 && src.sn != 1))
    return pack_panels(src, K, N, Kp, k_offset, panel_step, dst, lo_delta);
  const float* s = static_cast<const float*>(src.data);
  const int64_t panel_stride = Kp * kPanelCols, pairs = K / 2;
  auto store = [&](bf16* row, __m512i hi, __m512i lo) {  // one panel row (64 bytes) and its lo part
    _mm512_storeu_si512(row, hi);
    if (lo_delta) _mm512_storeu_si512(row + lo_delta, lo);
  };
  for (int64_t j = 0; j * kPanelCols < N; ++j) {
    const int cols = int(std::min<int64_t>(kPanelCols, N - j * kPanelCols));
    const float* ps = s + j * kPanelCols * src.sn;
    bf16* rows = dst + j * panel_step * panel_stride + k_offset * kPanelCols;  // pair-row k_offset / 2
    if (src.sn == 1) {  // rows k, k+1 are contiguous over n: interleave them
      const __mmask16 m = __mmask16((1u << cols) - 1);
      for (int64_t q = 0; q < pairs; ++q) {
        __m512i h0, l0, h1, l1;
        split_parts(_mm512_maskz_loadu_ps(m, ps + 2 * q * src.sk), h0, l0);
        split_parts(_mm512_maskz_loadu_ps(m, ps + (2 * q + 1) * src.sk), h1, l1);
        store(rows + q * 2 * kPanelCols, _mm512_or_si512(h0, _mm512_slli_epi32(h1, 16)),
              _mm512_or_si512(l0, _mm512_slli_epi32(l1, 16)));
      }
      continue;
    }
    // k contiguous for each column: 16 pair-rows of a column are one vector of words; transpose.
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
        __m512i ha, la, hb, lb;
        split_parts(_mm512_maskz_loadu_ps(ma, col), ha, la);
        split_parts(_mm512_maskz_loadu_ps(mb, col + 16), hb, lb);
        hi[n] = pair_words(ha, hb);
        lo[n] = pair_words(la, lb);
      }
      transpose16(hi);
      transpose16(lo);
      for (int q = 0; q < nq; ++q) store(rows + (q0 + q) * 2 * kPanelCols, hi[q], lo[q]);
    }
  }
}

}  // namespace
}  // namespace kt
