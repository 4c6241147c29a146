// The portable decoders of the quantized storages (kernels.hpp, QuantPanels): plain loops,
// compiled by each file that includes them with that file's flags. Internal linkage, as in
// elementwise.hpp. The AVX-512 decoders (decode_avx512.hpp) give bitwise the same bf16 values.
#pragma once
#include <cstdint>

#include "kernels.hpp"

namespace kt {
namespace {

// Rounds to nearest even bf16 with fp32 denormals flushed to a signed zero (VCVTNE2PS2BF16
// treats denormal inputs as zero); NaN cannot occur (scales and codes are validated when packed).
inline bf16 decoded_bf16(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  u &= (0u - uint32_t((u & 0x7f800000u) != 0)) | 0x80000000u;
  return bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Branch-free helpers (both cases computed, one selected by a mask), so the loops below vectorize.
inline uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(c);
  return (a & mask) | (b & ~mask);
}

// e4m3fn code as 2^-8 times its value: the code read as fp16 bits (what VCVTPH2PS converts).
inline float fp8_times_2_pow_m8(uint8_t b) {
  const uint32_t e = (b >> 3) & 0xf, m = b & 7, sign = uint32_t(b & 0x80) << 24;
  const uint32_t subnormal = __builtin_bit_cast(uint32_t, float(m) * 0x1p-17f);
  return __builtin_bit_cast(float, select_bits(e != 0, (e + 112) << 23 | m << 20, subnormal) | sign);
}

// e2m1 code: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (exponent bits 2..1, mantissa bit 0), sign in bit 3.
inline float e2m1(uint32_t c) {
  const uint32_t e = (c >> 1) & 3, m = c & 1, sign = (c & 8) << 28;
  return __builtin_bit_cast(float, select_bits(e != 0, (e + 126) << 23 | m << 22, m * 0x3f000000u) | sign);
}

// 2^(e - 127); e = 255 (NaN) is rejected when packed.
inline float e8m0(uint32_t e) { return __builtin_bit_cast(float, select_bits(e != 0, e << 23, 0x00400000u)); }

// Rows [q0, q0 + nq) of one panel: out[i] = bf16(value(code i) * scale i) for the 32 elements of each row.
// column_scale(q, c) is column c's scale for row q, constant over a group of 16 pair-rows (32 rows);
// the codes and scales of a row are spread into arrays first so that every loop is plain and vectorizes.
// A 4-bit panel's code blocks sit where `chunks` says (kernels.hpp).
template <bool kFourBit, class Value, class ColumnScale>
inline void decode_rows(const uint8_t* codes, int64_t q0, int64_t nq, bf16* out, Value value,
                        ColumnScale column_scale, FourBitChunks chunks = FourBitChunks(4)) {
  constexpr int kRow = 2 * kPanelCols;
  float scale[kRow];
  uint32_t code[kRow];  // 4-bit codes, spread
  for (int64_t q = q0; q < q0 + nq; ++q, out += kRow) {
    if (q == q0 || q % 16 == 0)
      for (int c = 0; c < kPanelCols; ++c) scale[2 * c] = scale[2 * c + 1] = column_scale(q, c);
    if constexpr (kFourBit) {  // element i: bits 4 (q % 4) of 16-bit word i of q's 64-byte block
      const uint8_t* block = codes + chunks.block(q) + ((q >> 1) & 1);
      const int shift = 4 * (q & 1);
      for (int i = 0; i < kRow; ++i) code[i] = (block[2 * i] >> shift) & 0xf;
      for (int i = 0; i < kRow; ++i) out[i] = decoded_bf16(value(code[i]) * scale[i]);
    } else {
      const uint8_t* row = codes + q * kRow;
      for (int i = 0; i < kRow; ++i) out[i] = decoded_bf16(value(row[i]) * scale[i]);
    }
  }
}

void decode_panels_portable(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                            int64_t nq, bf16* dst, int64_t dst_panel_stride) {
  for (int64_t j = 0; j < np; ++j) {
    const uint8_t* panel = src.data + (first_panel + j * panel_step) * src.panel_bytes;
    const uint8_t* scales = panel + src.scale_offset;  // the 8-bit formats'
    const float* f32 = reinterpret_cast<const float*>(scales);
    const FourBitChunks chunks(four_bit_scale_bytes(src.storage, src.scale_type));
    bf16* out = dst + j * dst_panel_stride;
    auto int4 = [](uint32_t c) { return float(int(c ^ 8) - 8); };
    switch (src.storage) {
      case Storage::int8:
        decode_rows<false>(panel, q0, nq, out, [](uint32_t c) { return float(int8_t(c)); },
                           [&](int64_t, int c) { return f32[c]; });
        break;
      case Storage::fp8_block:  // 128 rows = 64 pair-rows share a scale
        decode_rows<false>(panel, q0, nq, out, [](uint32_t c) { return fp8_times_2_pow_m8(uint8_t(c)); },
                           [&](int64_t q, int) { return f32[q / 64] * 256.0f; });
        break;
      case Storage::int4_group:  // a group's 16 scales, one per column
        decode_rows<true>(panel, q0, nq, out, int4, [&](int64_t q, int c) {
          const uint8_t* g = panel + chunks.scales(q / 16);
          if (src.scale_type == ScaleType::f32) return reinterpret_cast<const float*>(g)[c];
          return __builtin_bit_cast(float, uint32_t(reinterpret_cast<const uint16_t*>(g)[c]) << 16);
        }, chunks);
        break;
      case Storage::mxfp4:
        decode_rows<true>(panel, q0, nq, out, e2m1,
                          [&](int64_t q, int c) { return e8m0(panel[chunks.scales(q / 16) + c]); }, chunks);
        break;
      default:
        break;
    }
  }
}

}  // namespace
}  // namespace kt
