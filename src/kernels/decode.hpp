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
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  return bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// e4m3fn code as 2^-8 times its value: the code read as fp16 bits (what VCVTPH2PS converts).
inline float fp8_times_2_pow_m8(uint8_t b) {
  const uint32_t e = (b >> 3) & 0xf, m = b & 7, sign = uint32_t(b & 0x80) << 24;
  const float mag = e ? __builtin_bit_cast(float, (e + 112) << 23 | m << 20) : float(m) * 0x1p-17f;
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, mag) | sign);
}

constexpr float kE2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// 2^(e - 127); e = 255 (NaN) is rejected when packed.
inline float e8m0(uint8_t e) { return e ? __builtin_bit_cast(float, uint32_t(e) << 23) : 0x1p-127f; }

// Element i of a 4-bit pair-row (QuantPanels): low nibbles are elements 0..15, high ones 16..31.
inline uint8_t nibble(const uint8_t* row, int i) { return i < 16 ? row[i] & 0xf : row[i - 16] >> 4; }

inline float group_scale(const uint8_t* scales, ScaleType type, int64_t i) {
  if (type == ScaleType::f32) return reinterpret_cast<const float*>(scales)[i];
  return __builtin_bit_cast(float, uint32_t(reinterpret_cast<const uint16_t*>(scales)[i]) << 16);
}

void decode_panels_portable(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                            int64_t nq, bf16* dst, int64_t dst_panel_stride) {
  constexpr int kRow = 2 * kPanelCols;  // elements of a pair-row
  for (int64_t j = 0; j < np; ++j) {
    const uint8_t* panel = src.data + (first_panel + j * panel_step) * src.panel_bytes;
    const uint8_t* scales = panel + src.scale_offset;
    for (int64_t q = q0; q < q0 + nq; ++q) {
      bf16* out = dst + j * dst_panel_stride + (q - q0) * kRow;
      const int64_t group = q / 16;  // 32 rows = 16 pair-rows
      switch (src.storage) {
        case Storage::int8: {
          const int8_t* codes = reinterpret_cast<const int8_t*>(panel) + q * kRow;
          const float* s = reinterpret_cast<const float*>(scales);
          for (int i = 0; i < kRow; ++i) out[i] = decoded_bf16(float(codes[i]) * s[i / 2]);
          break;
        }
        case Storage::fp8_block: {
          const uint8_t* codes = panel + q * kRow;
          const float s = reinterpret_cast<const float*>(scales)[q / 64] * 256.0f;  // 128 rows = 64 pair-rows
          for (int i = 0; i < kRow; ++i) out[i] = decoded_bf16(fp8_times_2_pow_m8(codes[i]) * s);
          break;
        }
        case Storage::int4_group: {
          const uint8_t* codes = panel + q * kPanelCols;
          for (int i = 0; i < kRow; ++i) {
            const int q4 = int(nibble(codes, i) ^ 8) - 8;
            out[i] = decoded_bf16(float(q4) * group_scale(scales, src.scale_type, group * kPanelCols + i / 2));
          }
          break;
        }
        case Storage::mxfp4: {
          const uint8_t* codes = panel + q * kPanelCols;
          for (int i = 0; i < kRow; ++i)
            out[i] = decoded_bf16(kE2M1[nibble(codes, i)] * e8m0(scales[group * kPanelCols + i / 2]));
          break;
        }
        default:
          break;
      }
    }
  }
}

}  // namespace
}  // namespace kt
