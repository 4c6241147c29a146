// The decoders of the quantized storages (kernels.hpp, QuantPanels) with AVX-512 F/BW/VL/BF16:
// a 64-byte bf16 pair-row per step from 32 (8-bit) or 16 (4-bit, on average) bytes of codes, scaled in fp32
// and rounded by VCVTNE2PS2BF16. Bitwise equal to decode.hpp. Included only by files built with
// AVX-512 flags; internal linkage.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kernels.hpp"
#include "prefetch.hpp"
#include "transpose_avx512.hpp"

// GCC 12 reports the _mm512_undefined_* operand inside some intrinsics (vpermps, vpmovsxbd, vcvtph2ps,
// the extracts of _mm512_reduce_add_ps) as (maybe) uninitialized (a known false positive of its headers).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
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
  RowScales() = default;
};

inline void store_row(bf16* out, __m512 lo, __m512 hi, const RowScales& s) {
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s.hi), _mm512_mul_ps(lo, s.lo)));
}

// An 8-bit format's scales sit after a panel's codes, a stream of their own too small for the hardware
// prefetcher to pick up: a scale load missed on every group until each group also asks for the one
// kScaleGroupsAhead further.
constexpr int64_t kScaleGroupsAhead = 4;
inline void prefetch_scales(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

inline __m512i bytes16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// A pair-row of 32 e4m3fn codes as `factor` * 2^-120 times their values, elements 0..15 in lo and
// 16..31 in hi. Sign-extended to 32 bits, a code shifted left by 20 and masked is an fp32 with the
// code's exponent and mantissa bits in place and its sign in bit 31: the value times 2^-120
// (subnormal codes land on fp32 subnormals, also exact), so one exact multiply by a power of two
// rescales it (2^112: the decoders' value * 2^-8; 2^120: the value).
inline __m512 fp8_scaled(__m512i sign_extended, __m512 factor) {
  const __m512i bits = _mm512_and_si512(_mm512_slli_epi32(sign_extended, 20), _mm512_set1_epi32(int32_t(0x87f00000u)));
  return _mm512_mul_ps(_mm512_castsi512_ps(bits), factor);
}
inline void fp8_row(const uint8_t* p, float factor, __m512& lo, __m512& hi) {
  const __m128i* c = reinterpret_cast<const __m128i*>(p);
  lo = fp8_scaled(_mm512_cvtepi8_epi32(_mm_loadu_si128(c)), _mm512_set1_ps(factor));
  hi = fp8_scaled(_mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1)), _mm512_set1_ps(factor));
}

// The formats: bytes per pair-row, pair-rows per scale group (a panel's scales change at multiples
// of it), the 16 column scales of a group, and the values (before scaling) of a panel's pair-row q as
// fp32 halves (the decoders) or, kStep pair-rows from q on, exactly as bf16 VNNI rows (gemm_codes:
// every code's value is a bf16; the scales multiply the fp32 sums of a group instead).
// What the 8-bit formats share: a byte per code, a pair-row's 32 in a row, the scales after the codes.
struct ByteCodes {
  static constexpr int64_t kRowBytes = 32;
  // 4 panels in lock-step: T=16 forward of the bench layer, same process, 2 threads, against 6: int8 and
  // fp8_block 8-11% faster in seven runs of a slower host phase, within 2% in three of a fast one; 3 panels
  // 9-12% slower in the fast phase, 5 panels 4-6% slower than 4.
  static constexpr int kStep = 1, kPanels = 4;
  static constexpr bool kScalesInStream = false;
  int64_t scale_offset;
  const uint8_t* line(const uint8_t* panel, int64_t q) const { return panel + q * kRowBytes; }
};

struct Int8Format : ByteCodes {
  static constexpr int64_t kGroupPairs = int64_t(1) << 40;  // one scale per column
  __m512 column_scales(const uint8_t* panel, int64_t) const {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(panel + scale_offset));
  }
  RowScales scales(const uint8_t* panel, int64_t group) const { return RowScales(column_scales(panel, group)); }
  const uint8_t* scale_line(const uint8_t* panel, int64_t) const { return panel + scale_offset; }
  void values(const uint8_t* panel, int64_t q, __m512& lo, __m512& hi) const {
    const __m128i* c = reinterpret_cast<const __m128i*>(line(panel, q));
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c + 1)));
  }
  void codes(const uint8_t* panel, int64_t q, __m512bh* row) const {
    __m512 lo, hi;
    values(panel, q, lo, hi);
    row[0] = _mm512_cvtne2ps_pbh(hi, lo);  // |q| <= 128: exact
  }
};

struct Fp8BlockFormat : ByteCodes {
  static constexpr int64_t kGroupPairs = 64;  // one scale per 128 rows, for all 16 columns: 4 bytes per 2 KiB
  float scale(const uint8_t* panel, int64_t group) const {
    return reinterpret_cast<const float*>(panel + scale_offset)[group];
  }
  // codes() gives 2^8 times the values: the scales carry the 2^-8 back (exact).
  __m512 column_scales(const uint8_t* panel, int64_t group) const {
    return _mm512_set1_ps(scale(panel, group) * 0x1p-8f);
  }
  RowScales scales(const uint8_t* panel, int64_t group) const { return RowScales(scale(panel, group) * 256.0f); }
  const uint8_t* scale_line(const uint8_t* panel, int64_t group) const { return panel + scale_offset + group * 4; }
  void values(const uint8_t* panel, int64_t q, __m512& lo, __m512& hi) const {
    fp8_row(line(panel, q), 0x1p112f, lo, hi);
  }
  // The bf16 bits of 2^8 times an e4m3 value (4 significant bits, exponents -9..8: all exact) straight
  // from its code: sign and exponent | mantissa fields moved into place and the exponent rebiased by
  // +128 (+120 would be the value itself), which sets one bit instead of adding; a code with a zero
  // exponent field (zero, subnormals) takes its magnitude from a table instead.
  __m512i subnormals = (__m512i)_mm512_cvtne2ps_pbh(
      _mm512_setzero_ps(), _mm512_set_ps(0, 0, 0, 0, 0, 0, 0, 0, 3.5f, 3.0f, 2.5f, 2.0f, 1.5f, 1.0f, 0.5f, 0.0f));
  void codes(const uint8_t* panel, int64_t q, __m512bh* row) const {
    const __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(line(panel, q))));
    const __m512i moved = _mm512_slli_epi16(x, 4);  // sign (extended) in bit 15, exponent | mantissa in bits 10..4
    const __m512i normal =  // (moved & 0x87f0) | 128 << 7
        _mm512_ternarylogic_epi32(moved, _mm512_set1_epi16(int16_t(0x87f0)), _mm512_set1_epi16(0x4000), 0xea);
    const __mmask32 zero_exponent = _mm512_testn_epi16_mask(x, _mm512_set1_epi16(0x78));
    const __m512i magnitude = _mm512_mask_permutexvar_epi16(normal, zero_exponent, x, subnormals);  // index: mantissa
    row[0] = (__m512bh)_mm512_ternarylogic_epi32(magnitude, moved, _mm512_set1_epi16(int16_t(0x8000)), 0xf8);  // | sign
  }
};

// int4_group and mxfp4: a code's value from a 16-entry table (vpermps reads an index's low 4 bits;
// vpermw, for the bf16 values, an index's low 5: the table twice). Codes come 4 pair-rows to a 64-byte
// block whose 16-bit word i holds element i of pair-row 4b + j in bits 4j..4j+3, a group's scales before
// its chunk of blocks (kernels.hpp, FourBitChunks).
struct FourBitFormat {
  static constexpr int64_t kRowBytes = 16, kGroupPairs = 16;  // one scale per (32 rows, column)
  // 3 panels in lock-step: T=16 forward of the bench layer, same process, 2 threads, against 6: 11-19%
  // faster in six runs, 4 panels alike (one thread: 6 panels 9% faster).
  static constexpr int kStep = 4, kPanels = 3;
  Storage storage;
  ScaleType type;
  FourBitChunks chunks;
  __m512 table;
  __m512i table_bf16;
  FourBitFormat(Storage storage, ScaleType type, __m512 table)
      : storage(storage), type(type), chunks(four_bit_scale_bytes(storage, type)), table(table),
        table_bf16((__m512i)_mm512_cvtne2ps_pbh(table, table)) {}
  const uint8_t* line(const uint8_t* panel, int64_t q) const { return panel + chunks.block(q); }
  static constexpr bool kScalesInStream = true;  // the codes' prefetch brings them
  const uint8_t* scale_line(const uint8_t* panel, int64_t group) const { return panel + chunks.scales(group); }
  __m512 column_scales(const uint8_t* panel, int64_t group) const {
    const uint8_t* s = scale_line(panel, group);
    if (storage == Storage::mxfp4) {  // E8M0: 2^(e - 127), e = 0 is the fp32 denormal 2^-127
      const __m512i e = bytes16(s);
      const __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(e, 23), _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()),
                                                 _mm512_set1_epi32(0x00400000));
      return _mm512_castsi512_ps(bits);
    }
    if (type == ScaleType::f32) return _mm512_loadu_ps(reinterpret_cast<const float*>(s));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  }
  RowScales scales(const uint8_t* panel, int64_t group) const { return RowScales(column_scales(panel, group)); }
  void values(const uint8_t* panel, int64_t q, __m512& lo, __m512& hi) const {
    const __m512i words = _mm512_srli_epi16(_mm512_loadu_si512(line(panel, q)), unsigned(4 * (q & 3)));
    lo = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)), table);
    hi = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)), table);
  }
  void codes(const uint8_t* panel, int64_t q, __m512bh* row) const {  // q: a multiple of 4
    const __m512i words = _mm512_loadu_si512(line(panel, q));
    row[0] = (__m512bh)_mm512_permutexvar_epi16(words, table_bf16);
    row[1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table_bf16);
    row[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 8), table_bf16);
    row[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 12), table_bf16);
  }
};

// The scales of group `group` of a panel, kScaleGroupsAhead groups ahead where they are not in the codes'
// stream.
template <class Format>
inline void prefetch_group_scales(const Format& f, const uint8_t* panel, int64_t group) {
  if constexpr (!Format::kScalesInStream) prefetch_scales(f.scale_line(panel, group + kScaleGroupsAhead));
}

// Pair-rows [q0, q0 + nq) of N panels in lock-step (row q of every panel, then q + 1), like the
// micro-kernel's reads of B: several sequential streams at once keep more of memory's bandwidth than
// one, each also prefetched ahead. Scales are set per group, outside the inner loop.
// Everything the loop reads is copied into locals first: the stores (may_alias) would otherwise make
// the compiler reload the table and the pointers from memory at every row.
template <int N, class Format>
void decode_streams(const Format& format, const uint8_t* const* panel_codes, int64_t q0, int64_t nq,
                    bf16* const* panel_out) {
  constexpr int kRow = 2 * kPanelCols;
  constexpr int64_t kRowsPerLine = 64 / Format::kRowBytes;
  const Format f = format;
  const uint8_t* panels[N];
  bf16* out[N];
  for (int j = 0; j < N; ++j) panels[j] = panel_codes[j], out[j] = panel_out[j];
  RowScales s[N] = {};
  for (int64_t q = q0; q < q0 + nq;) {
    const int64_t group = q / Format::kGroupPairs;
    const int64_t end = std::min(q0 + nq, (group + 1) * Format::kGroupPairs);
    for (int j = 0; j < N; ++j) {
      s[j] = f.scales(panels[j], group);
      prefetch_group_scales(f, panels[j], group);
    }
    for (; q < end; ++q) {
      for (int j = 0; j < N; ++j) {
        if (q % kRowsPerLine == 0) prefetch_stream(f.line(panels[j], q));
        __m512 lo, hi;
        f.values(panels[j], q, lo, hi);
        store_row(out[j] + (q - q0) * kRow, lo, hi, s[j]);
      }
    }
  }
}


inline FourBitFormat four_bit_format(const QuantPanels& src) {
  if (src.storage == Storage::int4_group)  // two's complement
    return {src.storage, src.scale_type, _mm512_set_ps(-1, -2, -3, -4, -5, -6, -7, -8, 7, 6, 5, 4, 3, 2, 1, 0)};
  return {src.storage, src.scale_type,
          _mm512_set_ps(-6.0f, -4.0f, -3.0f, -2.0f, -1.5f, -1.0f, -0.5f, -0.0f, 6.0f, 4.0f, 3.0f, 2.0f, 1.5f, 1.0f,
                        0.5f, 0.0f)};
}

// np panels, kStreams = sizeof...(N) at a time.
template <class Format, size_t... N>
void decode_format(const Format& f, const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np,
                   int64_t q0, int64_t nq, bf16* dst, int64_t dst_panel_stride, std::index_sequence<N...>) {
  using StreamsFn = void (*)(const Format&, const uint8_t* const*, int64_t, int64_t, bf16* const*);
  static constexpr StreamsFn streams[] = {decode_streams<int(N) + 1, Format>...};  // 1 .. kStreams panels
  constexpr int kStreams = sizeof...(N);
  for (int64_t j0 = 0; j0 < np; j0 += kStreams) {
    const int n = int(std::min<int64_t>(kStreams, np - j0));
    const uint8_t* panels[kStreams];
    bf16* out[kStreams];
    for (int j = 0; j < n; ++j) {
      panels[j] = src.data + (first_panel + (j0 + j) * panel_step) * src.panel_bytes;
      out[j] = dst + (j0 + j) * dst_panel_stride;
    }
    streams[n - 1](f, panels, q0, nq, out);
  }
}

template <class Format>
void decode_format(const Format& f, const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np,
                   int64_t q0, int64_t nq, bf16* dst, int64_t dst_panel_stride) {
  decode_format(f, src, first_panel, panel_step, np, q0, nq, dst, dst_panel_stride,
                std::make_index_sequence<Format::kPanels>());
}

// fn(the format functor of src's storage).
template <class F>
void with_format(const QuantPanels& src, F&& fn) {
  switch (src.storage) {
    case Storage::int8:
      return fn(Int8Format{{src.scale_offset}});
    case Storage::fp8_block:
      return fn(Fp8BlockFormat{{src.scale_offset}});
    case Storage::int4_group:
    case Storage::mxfp4:
      return fn(four_bit_format(src));
    default:
      return;
  }
}

void decode_panels_avx512(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                          int64_t nq, bf16* dst, int64_t dst_panel_stride) {
  with_format(src, [&](const auto& format) {
    decode_format(format, src, first_panel, panel_step, np, q0, nq, dst, dst_panel_stride);
  });
}


// gemm_codes (kernels.hpp): MR rows x NP panels, the panels' codes read once per call, panel p's results
// at C + p * c_panel_stride. Each scale group's products are summed in fp32 on `sum`, then added to
// `total` times the group's column scales.
template <int MR, int NP, class Format>
void gemm_codes_block(const Format& format, const uint8_t* const* panel_codes, const bf16* A, int64_t lda,
                      int64_t kpairs, float* C, int64_t c_panel_stride, int64_t ldc) {
  constexpr int kStep = Format::kStep;
  constexpr int64_t kRowsPerLine = 64 / Format::kRowBytes;
  const Format f = format;
  const uint8_t* panels[NP];
  for (int p = 0; p < NP; ++p) panels[p] = panel_codes[p];
  __m512 total[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < NP; ++p) total[m][p] = _mm512_setzero_ps();
  for (int64_t q = 0; q < kpairs;) {
    const int64_t group = q / Format::kGroupPairs;
    const int64_t end = std::min(kpairs, (group + 1) * Format::kGroupPairs);
    __m512 sum[MR][NP];
    for (int m = 0; m < MR; ++m)
      for (int p = 0; p < NP; ++p) sum[m][p] = _mm512_setzero_ps();
    for (; q < end; q += kStep) {
      __m512bh a[MR][kStep];
      for (int m = 0; m < MR; ++m)
        for (int i = 0; i < kStep; ++i)
          a[m][i] = (__m512bh)_mm512_set1_epi32(
              __builtin_bit_cast(int32_t, *reinterpret_cast<const uint32_t*>(A + m * lda + 2 * (q + i))));
      for (int p = 0; p < NP; ++p) {
        if (q % kRowsPerLine == 0) prefetch_stream(f.line(panels[p], q));
        __m512bh b[kStep];
        f.codes(panels[p], q, b);
        for (int i = 0; i < kStep; ++i)
          for (int m = 0; m < MR; ++m) sum[m][p] = _mm512_dpbf16_ps(sum[m][p], a[m][i], b[i]);
      }
    }
    for (int p = 0; p < NP; ++p) {
      const __m512 s = f.column_scales(panels[p], group);
      prefetch_group_scales(f, panels[p], group);
      for (int m = 0; m < MR; ++m) total[m][p] = _mm512_fmadd_ps(sum[m][p], s, total[m][p]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(C + m * ldc + p * c_panel_stride, total[m][p]);
}

// Panels per block of MR rows: 2 MR NP accumulators, the broadcast pairs and the decoded rows fit the 32 zmm,
// and at most the format's Format::kPanels.
template <class Format>
constexpr int codes_panels(int mr) { return std::min(mr <= 2 ? 6 : mr == 3 ? 4 : 3, Format::kPanels); }
constexpr int kCodesRows = 4;

// The np panels as kPanels streams of consecutive panels (stream s: panels [s L, (s + 1) L), L = ceil(np /
// kPanels)), each block one panel further on every stream: a stream reads on where its previous panel
// ended, so the prefetchers stay on it (the forward's long tasks, moe.cpp kCodesTaskPanels).
template <int MR, class Format, size_t... NP>
void gemm_codes_rows(const Format& f, const QuantPanels& src, int64_t first_panel, int np, int64_t kpairs,
                     const bf16* A, int64_t lda, float* C, int64_t ldc, std::index_sequence<NP...>) {
  constexpr int kPanels = codes_panels<Format>(MR);
  using BlockFn =
      void (*)(const Format&, const uint8_t* const*, const bf16*, int64_t, int64_t, float*, int64_t, int64_t);
  static constexpr BlockFn blocks[] = {gemm_codes_block<MR, int(NP) + 1, Format>...};  // 1 .. kPanels panels
  const int length = (np + kPanels - 1) / kPanels;
  for (int i = 0; i < length; ++i) {
    const uint8_t* panels[kPanels];
    int n = 0;  // the streams with a panel at step i: a prefix of them
    for (; n < kPanels && n * length + i < np; ++n)
      panels[n] = src.data + (first_panel + n * length + i) * src.panel_bytes;
    blocks[n - 1](f, panels, A, lda, kpairs, C + i * kPanelCols, length * kPanelCols, ldc);
  }
}

template <int MR, class Format>
void gemm_codes_rows(const Format& f, const QuantPanels& src, int64_t first_panel, int np, int64_t kpairs,
                     const bf16* A, int64_t lda, float* C, int64_t ldc) {
  gemm_codes_rows<MR>(f, src, first_panel, np, kpairs, A, lda, C, ldc,
                      std::make_index_sequence<codes_panels<Format>(MR)>());
}

template <class Format>
void gemm_codes_format(const Format& f, const QuantPanels& src, int64_t first_panel, int np, int64_t kpairs,
                       const bf16* A, int64_t lda, int64_t rows, float* C, int64_t ldc) {
  for (int64_t m = 0; m < rows; m += kCodesRows) {
    const bf16* a = A + m * lda;
    float* c = C + m * ldc;
    switch (std::min<int64_t>(kCodesRows, rows - m)) {
      case 1: gemm_codes_rows<1>(f, src, first_panel, np, kpairs, a, lda, c, ldc); break;
      case 2: gemm_codes_rows<2>(f, src, first_panel, np, kpairs, a, lda, c, ldc); break;
      case 3: gemm_codes_rows<3>(f, src, first_panel, np, kpairs, a, lda, c, ldc); break;
      default: gemm_codes_rows<4>(f, src, first_panel, np, kpairs, a, lda, c, ldc); break;
    }
  }
}

void gemm_codes_avx512(const QuantPanels& src, int64_t first_panel, int np, int64_t kpairs, const bf16* A,
                       int64_t lda, int64_t rows, float* C, int64_t ldc) {
  with_format(src, [&](const auto& format) { gemm_codes_format(format, src, first_panel, np, kpairs, A, lda, rows, C, ldc); });
}

// A panel's codes of the pair-rows [q0, q0 + QB) and of its scale group ahead of their use, into L2: the
// panels of a gemm_codes_t call are far apart, too many streams for the hardware prefetcher.
template <int QB, class Format>
inline void prefetch_codes_t(const Format& f, const uint8_t* panel, int64_t q0) {
  constexpr int64_t kRowsPerLine = 64 / Format::kRowBytes;
  for (int64_t q = q0; q < q0 + QB; q += kRowsPerLine)
    _mm_prefetch(reinterpret_cast<const char*>(f.line(panel, q)), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(f.scale_line(panel, q0 / Format::kGroupPairs)), _MM_HINT_T1);
}

// gemm_codes_t (kernels.hpp): gemm_t_block (transpose_avx512.hpp) with each B row decoded as decode_streams
// stores it (store_row's rounding), from the codes of QB pair-rows in one scale group.
template <int MR, int QB, class Format>
void gemm_codes_t_block(const Format& format, const uint8_t* panel0, int64_t panel_distance, int64_t np, int64_t q0,
                        const bf16* A, int64_t lda, float* C, int64_t ldc, bool accumulate) {
  const Format f = format;
  const int64_t group = q0 / Format::kGroupPairs;
  transposed_block<MR, QB>(A, lda, np, C, ldc, accumulate, [&](int64_t p, const PanelPairs<MR>& a, auto& even,
                                                               auto& odd) {
    const uint8_t* panel = panel0 + p * panel_distance;
    prefetch_codes_t<QB>(f, panel, q0 + QB);  // this panel's pair-rows of the next block
    const RowScales s = f.scales(panel, group);
    for (int q = 0; q < QB; ++q) {
      __m512 vlo, vhi;
      f.values(panel, q0 + q, vlo, vhi);
      const __m512bh w = _mm512_cvtne2ps_pbh(_mm512_mul_ps(vhi, s.hi), _mm512_mul_ps(vlo, s.lo));
      for (int m = 0; m < MR; ++m) {
        even[m][q] = _mm512_dpbf16_ps(even[m][q], a.lo[m], w);
        odd[m][q] = _mm512_dpbf16_ps(odd[m][q], a.hi[m], w);
      }
    }
  });
}

// gemm_codes_t with `exact`: per panel, the products of A and the codes' values (exact in bf16, as in
// gemm_codes) in fresh sums, then times the panel's column scales into the totals (one fp32 FMA). The codes
// of kStep pair-rows come at once: 1 or 2 rows (sums for QB pair-rows and the decoded rows fit the 32 zmm).
template <int MR, int QB, class Format>
void gemm_codes_t_exact_block(const Format& format, const uint8_t* panel0, int64_t panel_distance, int64_t np,
                              int64_t q0, const bf16* A, int64_t lda, float* C, int64_t ldc, bool accumulate) {
  constexpr int kStep = Format::kStep;
  static_assert(QB % kStep == 0, "whole steps of the format's codes");
  const Format f = format;
  const int64_t group = q0 / Format::kGroupPairs;
  transposed_block<MR, QB>(A, lda, np, C, ldc, accumulate, [&](int64_t p, const PanelPairs<MR>& a, auto& even,
                                                               auto& odd) {
    const uint8_t* panel = panel0 + p * panel_distance;
    prefetch_codes_t<QB>(f, panel, q0 + QB);
    const __m512 s = f.column_scales(panel, group);
    const __m512 zero = _mm512_setzero_ps();
    for (int q = 0; q < QB; q += kStep) {
      __m512bh w[kStep];
      f.codes(panel, q0 + q, w);
      for (int i = 0; i < kStep; ++i)
        for (int m = 0; m < MR; ++m) {
          even[m][q + i] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, a.lo[m], w[i]), s, even[m][q + i]);
          odd[m][q + i] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, a.hi[m], w[i]), s, odd[m][q + i]);
        }
    }
  });
}

template <int MR, bool kExact, class Format>
void gemm_codes_t_rows(const Format& f, const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np,
                       int64_t q0, int64_t nq, const bf16* A, int64_t lda, float* C, int64_t ldc, bool accumulate) {
  // 2 MR QB sums, A's and the decoding fit the 32 zmm (the exact blocks run 1 or 2 rows)
  constexpr int QB = MR == 1 ? 8 : MR == 2 || kExact ? 4 : 2;
  const uint8_t* panel0 = src.data + first_panel * src.panel_bytes;
  const int64_t distance = panel_step * src.panel_bytes;
  for (int64_t q = 0; q < nq; q += QB) {
    if constexpr (kExact)
      gemm_codes_t_exact_block<MR, QB>(f, panel0, distance, np, q0 + q, A, lda, C + 2 * q, ldc,
                                       accumulate);
    else
      gemm_codes_t_block<MR, QB>(f, panel0, distance, np, q0 + q, A, lda, C + 2 * q, ldc,
                                 accumulate);
  }
}

void gemm_codes_t_avx512(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                         int64_t nq, const bf16* A, int64_t lda, int64_t rows, float* C, int64_t ldc, bool accumulate,
                         bool exact) {
  with_format(src, [&](const auto& f) {
    const int64_t step = exact ? 2 : 4;  // rows per block
    for (int64_t m = 0; m < rows; m += step) {
      const bf16* a = A + m * lda;
      float* c = C + m * ldc;
      const int64_t n = std::min(step, rows - m);
      auto run = [&](auto rows_fn) {
        rows_fn(f, src, first_panel, panel_step, np, q0, nq, a, lda, c, ldc, accumulate);
      };
      using F = std::decay_t<decltype(f)>;
      if (exact)
        n == 1 ? run(gemm_codes_t_rows<1, true, F>) : run(gemm_codes_t_rows<2, true, F>);
      else if (n == 1)
        run(gemm_codes_t_rows<1, false, F>);
      else if (n == 2)
        run(gemm_codes_t_rows<2, false, F>);
      else if (n == 3)
        run(gemm_codes_t_rows<3, false, F>);
      else
        run(gemm_codes_t_rows<4, false, F>);
    }
  });
}

}  // namespace
}  // namespace kt

#pragma GCC diagnostic pop
