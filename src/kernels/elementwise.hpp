// Element-wise epilogues and the LoRA-gradient rank update, written once as plain loops and
// compiled by each ISA file with that file's flags (GCC vectorizes them). Everything here has
// internal linkage: a copy built with AVX-512 flags must never be linked into the AVX2 path.
#pragma once
#include <cstdint>

#include "kernels.hpp"

namespace kt {
namespace {

inline float to_f32(bf16 v) { return __builtin_bit_cast(float, uint32_t(v) << 16); }

inline bf16 to_bf16(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// exp with ~2 ulp error on the clamped range; a NaN input gives a non-NaN garbage value,
// which is fine for its one use below (sigmoid's result is multiplied by the NaN argument).
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.3f ? 88.3f : x;
  // Round to nearest by the 1.5 * 2^23 trick: floorf would be a library call that keeps the
  // epilogue loops from vectorizing.
  constexpr float kRound = 12582912.0f;
  float n = (x * 1.44269504f + kRound) - kRound;
  float r = x - n * 0.693145752f - n * 1.42860677e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * __builtin_bit_cast(float, uint32_t(int32_t(n) + 127) << 23);
}

inline float sigmoid(float z) { return 1.0f / (1.0f + exp_approx(-z)); }

void swiglu_forward(const float* gate, const float* up, int64_t n, bf16* g, bf16* u, bf16* h) {
  for (int64_t c = 0; c < n; ++c) {
    h[c] = to_bf16(gate[c] * sigmoid(gate[c]) * up[c]);
    if (g) g[c] = to_bf16(gate[c]);
    if (u) u[c] = to_bf16(up[c]);
  }
}

// Dot products in kLanes independent partial sums, so the loop vectorizes without reassociation
// flags and the result does not depend on the ISA's vector width.
constexpr int kLanes = 16;

inline float reduce_lanes(const float* acc) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// One column of swiglu_backward; returns dh_raw * h, that column's share of dw.
template <bool kKeepH>
inline float swiglu_backward_column(int64_t c, const float* dh_raw, const bf16* g, const bf16* u, float w, bf16* dg,
                                    bf16* du, bf16* h) {
  float gf = to_f32(g[c]), uf = to_f32(u[c]);
  float s = sigmoid(gf);
  float silu = gf * s;
  float hv = silu * uf;
  float dh = w * dh_raw[c];
  dg[c] = to_bf16(dh * uf * s * (1.0f + gf * (1.0f - s)));
  du[c] = to_bf16(dh * silu);
  if constexpr (kKeepH) h[c] = to_bf16(hv);
  return dh_raw[c] * hv;
}

// Whole kLanes-wide chunks in a fixed-trip inner loop (that is what vectorizes), then the tail.
template <bool kKeepH>
float swiglu_backward_columns(const float* dh_raw, const bf16* g, const bf16* u, int64_t n, float w, bf16* dg,
                              bf16* du, bf16* h) {
  float acc[kLanes] = {};
  int64_t c0 = 0;
  for (; c0 + kLanes <= n; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += swiglu_backward_column<kKeepH>(c0 + l, dh_raw, g, u, w, dg, du, h);
  for (int l = 0; c0 + l < n; ++l) acc[l] += swiglu_backward_column<kKeepH>(c0 + l, dh_raw, g, u, w, dg, du, h);
  return reduce_lanes(acc);
}

float swiglu_backward(const float* dh_raw, const bf16* g, const bf16* u, int64_t n, float w, bf16* dg, bf16* du,
                      bf16* h) {
  return h ? swiglu_backward_columns<true>(dh_raw, g, u, n, w, dg, du, h)
           : swiglu_backward_columns<false>(dh_raw, g, u, n, w, dg, du, h);
}

void rank_update(float* G, int64_t ldg, int m, int64_t n, const float* coef, int64_t ldcoef, const float* pscale,
                 float scale, const bf16* rows, int64_t ldrow, const int32_t* row_index, int64_t P) {
  for (int i = 0; i < m; ++i)
    for (int64_t c = 0; c < n; ++c) G[i * ldg + c] = 0.0f;
  // Four routes at a time: G is loaded and stored once per four rank-1 updates.
  alignas(64) float r[4][kRankUpdateMaxCols];
  for (int64_t p0 = 0; p0 < P; p0 += 4) {
    int cnt = int(P - p0 < 4 ? P - p0 : 4);
    float a[4][kMaxRank];
    for (int q = 0; q < 4; ++q) {
      int64_t p = p0 + (q < cnt ? q : 0);
      const bf16* row = rows + (row_index ? row_index[p] : p) * ldrow;
      float ps = q < cnt ? scale * (pscale ? pscale[p] : 1.0f) : 0.0f;
      for (int64_t c = 0; c < n; ++c) r[q][c] = q < cnt ? to_f32(row[c]) : 0.0f;
      for (int i = 0; i < m; ++i) a[q][i] = q < cnt ? coef[p * ldcoef + i] * ps : 0.0f;
    }
    for (int i = 0; i < m; ++i) {
      float* gi = G + i * ldg;
      float a0 = a[0][i], a1 = a[1][i], a2 = a[2][i], a3 = a[3][i];
      for (int64_t c = 0; c < n; ++c) gi[c] += a0 * r[0][c] + a1 * r[1][c] + a2 * r[2][c] + a3 * r[3][c];
    }
  }
}

void to_bf16_row(const float* src, int64_t n, bf16* dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = to_bf16(src[c]);
}

void weighted_sum(float* out, const float* const* rows, const float* weights, int count, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = 0.0f;
  for (int j = 0; j < count; ++j) {
    const float* row = rows[j];
    float wj = weights ? weights[j] : 1.0f;
    for (int64_t c = 0; c < n; ++c) out[c] += wj * row[c];
  }
}

// The table every ISA file exports: its micro-kernel plus the loops above built for it.
constexpr KernelSet make_kernel_set(Isa isa, int mr, GemmFn gemm, TransposePanelsFn transpose_panels) {
  return KernelSet{isa,         mr,          gemm,        transpose_panels, swiglu_forward,
                   swiglu_backward, rank_update, to_bf16_row, weighted_sum};
}

}  // namespace
}  // namespace kt
