// The decoders of the quantized storages (kernels.hpp, QuantPanels) with AVX-512 F/BW/VL/BF16:
// a 64-byte bf16 pair-row per step from 32 (8-bit) or 16 (4-bit) bytes of codes, scaled in fp32
// and rounded by VCVTNE2PS2BF16. Bitwise equal to decode.hpp. Included only by files built with
// AVX-512 flags; internal linkage.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "kernels.hpp"

namespace kt {
namespace {

// The 16 per-column scales of a pair-row as the scales of its two halves (elements 0..15 are
// columns 0..7, each twice; 16..31 columns 8..15).
struct RowScales {
  __m512 lo, hi;
  explicit RowScales(__m512 columns) {
    const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    lo = _mm512_permutexvar_ps(first, columns);
    hi = _mm512_permutexvar_ps(_mm512_add_epi32(first, _mm512_set1_epi32(8)), columns);
  }
  explicit RowScales(float all) : lo(_mm512_set1_ps(all)), hi(lo) {}
};

inline void store_row(bf16* out, __m512 lo, __m512 hi, const RowScales& s) {
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s.hi), _mm512_mul_ps(lo, s.lo)));
}

// One stream per decoder call: the hardware prefetcher alone leaves it latency-bound, so each
// step asks for the line kPrefetchBytes ahead (panels of one call are contiguous in the forward).
constexpr int64_t kPrefetchBytes = 1024;
inline void prefetch_ahead(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0); }

inline __m512i bytes16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// A pair-row of 32 e4m3fn codes as 2^-8 times their values, elements 0..15 in lo and 16..31 in hi:
// each code's bits moved into fp16 layout (magnitude to bits 7..13, sign to 15), then VCVTPH2PS.
inline void fp8_row(const uint8_t* p, __m512& lo, __m512& hi) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i magnitude = _mm512_and_si512(_mm512_slli_epi16(w, 7), _mm512_set1_epi16(0x3f80));
  // magnitude | (w << 8) & 0x8000
  const __m512i h = _mm512_ternarylogic_epi32(magnitude, _mm512_slli_epi16(w, 8), _mm512_set1_epi16(int16_t(0x8000)), 0xf8);
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

inline __m512 group_scales(const uint8_t* scales, Storage storage, ScaleType type, int64_t group) {
  if (storage == Storage::mxfp4) {  // E8M0: 2^(e - 127), e = 0 is the fp32 denormal 2^-127
    const __m512i e = bytes16(scales + group * kPanelCols);
    const __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(e, 23), _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()),
                                               _mm512_set1_epi32(0x00400000));
    return _mm512_castsi512_ps(bits);
  }
  if (type == ScaleType::f32) return _mm512_loadu_ps(reinterpret_cast<const float*>(scales) + group * kPanelCols);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + group * kPanelCols * 2));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

void decode_panels_avx512(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                          int64_t nq, bf16* dst, int64_t dst_panel_stride) {
  constexpr int kRow = 2 * kPanelCols;
  const __m512 e2m1 = _mm512_set_ps(-6.0f, -4.0f, -3.0f, -2.0f, -1.5f, -1.0f, -0.5f, -0.0f, 6.0f, 4.0f, 3.0f, 2.0f,
                                    1.5f, 1.0f, 0.5f, 0.0f);
  for (int64_t j = 0; j < np; ++j) {
    const uint8_t* panel = src.data + (first_panel + j * panel_step) * src.panel_bytes;
    const uint8_t* scales = panel + src.scale_offset;
    bf16* out = dst + j * dst_panel_stride;
    switch (src.storage) {
      case Storage::int8: {
        const RowScales s(_mm512_loadu_ps(reinterpret_cast<const float*>(scales)));
        for (int64_t q = q0; q < q0 + nq; ++q, out += kRow) {
          const int8_t* c = reinterpret_cast<const int8_t*>(panel) + q * kRow;
          prefetch_ahead(panel + q * kRow);
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
          const __m512 hi =
              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16))));
          store_row(out, lo, hi, s);
        }
        break;
      }
      case Storage::fp8_block:
        for (int64_t q = q0; q < q0 + nq; ++q, out += kRow) {
          const RowScales s(reinterpret_cast<const float*>(scales)[q / 64] * 256.0f);
          prefetch_ahead(panel + q * kRow);
          __m512 lo, hi;
          fp8_row(panel + q * kRow, lo, hi);
          store_row(out, lo, hi, s);
        }
        break;
      case Storage::int4_group:
      case Storage::mxfp4: {
        const bool fp4 = src.storage == Storage::mxfp4;
        RowScales s(0.0f);
        for (int64_t q = q0; q < q0 + nq; ++q, out += kRow) {
          if (q == q0 || q % 16 == 0) s = RowScales(group_scales(scales, src.storage, src.scale_type, q / 16));
          if (q % 4 == 0) prefetch_ahead(panel + q * kPanelCols);
          const __m512i x = bytes16(panel + q * kPanelCols);
          __m512 lo, hi;
          if (fp4) {  // the permute reads the low 4 bits of each index
            lo = _mm512_permutexvar_ps(x, e2m1);
            hi = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), e2m1);
          } else {  // sign-extended nibbles
            lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(x, 28), 28));
            hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(x, 24), 28));
          }
          store_row(out, lo, hi, s);
        }
        break;
      }
      default:
        break;
    }
  }
}

}  // namespace
}  // namespace kt
