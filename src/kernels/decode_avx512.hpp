// The decoders of the quantized storages (kernels.hpp, QuantPanels) with AVX-512 F/BW/VL/BF16:
// a 64-byte bf16 pair-row per step from 32 (8-bit) or 16 (4-bit) bytes of codes, scaled in fp32
// and rounded by VCVTNE2PS2BF16. Bitwise equal to decode.hpp. Included only by files built with
// AVX-512 flags; internal linkage.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels.hpp"

// GCC 12 reports the _mm512_undefined_* operand inside some intrinsics (vpermps, vpmovsxbd, vcvtph2ps)
// as maybe uninitialized (a known false positive of its headers).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

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

// The hardware prefetcher alone leaves the decoder latency-bound: each stream also asks for the line
// kPrefetchBytes ahead.
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

// Rows of several panels in turn: like the micro-kernel's reads of B, a few sequential streams at once
// keep more of memory's bandwidth than one (each also prefetched ahead).
constexpr int kStreams = 3;

// Decodes pair-rows [q0, q0 + nq) of up to kStreams panels in turn. row(j, q, out) writes panel j's row q;
// scales(j, q) is called where panel j's scales change (the first row and every group of 16 pair-rows).
template <class Scales, class Row>
inline void decode_streams(const uint8_t* const* panels, int n, int64_t q0, int64_t nq, int64_t row_bytes,
                           bf16* const* out, Scales&& scales, Row&& row) {
  constexpr int kRow = 2 * kPanelCols;
  for (int64_t q = q0; q < q0 + nq; ++q) {
    for (int j = 0; j < n; ++j) {
      if (q == q0 || q % 16 == 0) scales(j, q);
      if ((q * row_bytes) % 64 == 0) prefetch_ahead(panels[j] + q * row_bytes);
      row(j, q, out[j] + (q - q0) * kRow);
    }
  }
}

void decode_panels_avx512(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                          int64_t nq, bf16* dst, int64_t dst_panel_stride) {
  constexpr int kRow = 2 * kPanelCols;
  const __m512 e2m1 = _mm512_set_ps(-6.0f, -4.0f, -3.0f, -2.0f, -1.5f, -1.0f, -0.5f, -0.0f, 6.0f, 4.0f, 3.0f, 2.0f,
                                    1.5f, 1.0f, 0.5f, 0.0f);
  const __m512 int4 = _mm512_set_ps(-1, -2, -3, -4, -5, -6, -7, -8, 7, 6, 5, 4, 3, 2, 1, 0);  // two's complement
  for (int64_t j0 = 0; j0 < np; j0 += kStreams) {
    const int n = int(std::min<int64_t>(kStreams, np - j0));
    const uint8_t* panels[kStreams];
    bf16* out[kStreams];
    RowScales s[kStreams] = {RowScales(0.0f), RowScales(0.0f), RowScales(0.0f)};
    for (int j = 0; j < n; ++j) {
      panels[j] = src.data + (first_panel + (j0 + j) * panel_step) * src.panel_bytes;
      out[j] = dst + (j0 + j) * dst_panel_stride;
    }
    auto scales_of = [&](int j) { return panels[j] + src.scale_offset; };
    switch (src.storage) {
      case Storage::int8:
        decode_streams(
            panels, n, q0, nq, kRow, out,
            [&](int j, int64_t q) {
              if (q == q0) s[j] = RowScales(_mm512_loadu_ps(reinterpret_cast<const float*>(scales_of(j))));
            },
            [&](int j, int64_t q, bf16* o) {
              const __m128i* c = reinterpret_cast<const __m128i*>(panels[j] + q * kRow);
              store_row(o, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c))),
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1))), s[j]);
            });
        break;
      case Storage::fp8_block:
        decode_streams(
            panels, n, q0, nq, kRow, out,
            [&](int j, int64_t q) { s[j] = RowScales(reinterpret_cast<const float*>(scales_of(j))[q / 64] * 256.0f); },
            [&](int j, int64_t q, bf16* o) {
              __m512 lo, hi;
              fp8_row(panels[j] + q * kRow, lo, hi);
              store_row(o, lo, hi, s[j]);
            });
        break;
      case Storage::int4_group:
      case Storage::mxfp4: {  // the code's value from a 16-entry table (vpermps reads an index's low 4 bits)
        const __m512 values = src.storage == Storage::mxfp4 ? e2m1 : int4;
        decode_streams(
            panels, n, q0, nq, kPanelCols, out,
            [&](int j, int64_t q) { s[j] = RowScales(group_scales(scales_of(j), src.storage, src.scale_type, q / 16)); },
            [&](int j, int64_t q, bf16* o) {
              const __m512i x = bytes16(panels[j] + q * kPanelCols);
              store_row(o, _mm512_permutexvar_ps(x, values), _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), values),
                        s[j]);
            });
        break;
      }
      default:
        break;
    }
  }
}

}  // namespace
}  // namespace kt

#pragma GCC diagnostic pop
