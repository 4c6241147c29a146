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

// The activations of ExpertVariant: value and derivative at z (alpha: swish's only parameter).
struct Swish {
  static float value(float z, float alpha) { return z * sigmoid(alpha * z); }
  static float derivative(float z, float alpha, float* value) {
    float s = sigmoid(alpha * z);
    *value = z * s;
    return s + alpha * z * s * (1.0f - s);
  }
};

// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), on exp_approx so the loop vectorizes.
inline float erf_approx(float x) {
  float a = x < 0.0f ? -x : x;
  float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  float r = 1.0f - p * exp_approx(-a * a);
  return x < 0.0f ? -r : r;
}

struct Gelu {
  static float cdf(float z) { return 0.5f * (1.0f + erf_approx(z * 0.70710678f)); }
  static float value(float z, float) { return z * cdf(z); }
  static float derivative(float z, float, float* value) {
    float phi_cdf = cdf(z);
    *value = z * phi_cdf;
    return phi_cdf + z * 0.39894228f * exp_approx(-0.5f * z * z);
  }
};

struct GeluTanh {
  static constexpr float kC = 0.79788456f, kK = 0.044715f;
  static float tanh_inner(float z) {  // tanh(c (z + k z^3)) = 1 - 2 / (exp(2y) + 1)
    float y = kC * (z + kK * z * z * z);
    return 1.0f - 2.0f / (exp_approx(2.0f * y) + 1.0f);
  }
  static float value(float z, float) { return 0.5f * z * (1.0f + tanh_inner(z)); }
  static float derivative(float z, float, float* value) {
    float t = tanh_inner(z);
    *value = 0.5f * z * (1.0f + t);
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kC * (1.0f + 3.0f * kK * z * z);
  }
};

struct Relu {
  static float value(float z, float) { return z > 0.0f ? z : 0.0f; }
  static float derivative(float z, float, float* value) {
    *value = z > 0.0f ? z : 0.0f;
    return z > 0.0f ? 1.0f : 0.0f;
  }
};

struct Relu2 {
  static float value(float z, float) { return z > 0.0f ? z * z : 0.0f; }
  static float derivative(float z, float, float* value) {
    float r = z > 0.0f ? z : 0.0f;
    *value = r * r;
    return 2.0f * r;
  }
};

// The clamps of gated variants (limit = inf: none): min(g, L), clamp(u, -L, L).
inline float clamp_gate(float g, float limit) { return g < limit ? g : limit; }
inline float clamp_up(float u, float limit) { return u < -limit ? -limit : (u > limit ? limit : u); }

// The cache keeps each clamp's decision, made on the fp32 pre-activation: a clamped value is cached as
// +-inf (clamp_gate / clamp_up of it give the limit back), the others rounded to bf16. Deciding again on
// the bf16 value would flip the clamp's indicator for values within a rounding step of the limit.
constexpr float kInf = __builtin_inff();
inline float cached_gate(float g, float limit) { return g > limit ? kInf : g; }
inline float cached_up(float u, float limit) { return u > limit ? kInf : (u < -limit ? -kInf : u); }

// Forward epilogue (GateForwardFn) of (Act, gated).
template <class Act, bool kGated>
void gate_forward(const ExpertVariant& v, const float* gate, const float* up, int64_t n, bf16* g, bf16* u, bf16* h) {
  const float alpha = v.alpha, limit = v.limit, offset = v.up_offset;
  for (int64_t c = 0; c < n; ++c) {
    float hv = kGated ? Act::value(clamp_gate(gate[c], limit), alpha) * (clamp_up(up[c], limit) + offset)
                      : Act::value(up[c], alpha);
    h[c] = to_bf16(hv);
  }
  if (g)
    for (int64_t c = 0; c < n; ++c) g[c] = to_bf16(kGated ? cached_gate(gate[c], limit) : gate[c]);
  if (u)
    for (int64_t c = 0; c < n; ++c) u[c] = to_bf16(kGated ? cached_up(up[c], limit) : up[c]);
}

// Dot products in kLanes independent partial sums, so the loop vectorizes without reassociation
// flags and the result does not depend on the ISA's vector width.
constexpr int kLanes = 16;

inline float reduce_lanes(const float* acc) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// One column of gate_backward: MATH.md's derivatives on the cached g, u, with the clamps' indicators;
// returns dh_raw * h, that column's share of dw.
// The variant's numbers come by value: read through the ExpertVariant reference, GCC did not
// vectorize the loops below.
struct GateParams {
  float alpha, limit, up_offset;
};

template <class Act, bool kGated, bool kKeepH>
inline float gate_backward_column(GateParams v, int64_t c, const float* dh_raw, const bf16* g, const bf16* u, float w,
                                  bf16* dg, bf16* du, bf16* h) {
  const float uf = to_f32(u[c]), dh = w * dh_raw[c];
  float hv, act;
  if constexpr (kGated) {
    const float gf = to_f32(g[c]);
    const float gc = clamp_gate(gf, v.limit), uc = clamp_up(uf, v.limit) + v.up_offset;
    const float dact = Act::derivative(gc, v.alpha, &act);
    hv = act * uc;
    dg[c] = to_bf16(gf < kInf ? dh * uc * dact : 0.0f);  // clamped entries are cached as +-inf
    du[c] = to_bf16(uf > -kInf && uf < kInf ? dh * act : 0.0f);
  } else {
    const float dact = Act::derivative(uf, v.alpha, &act);
    hv = act;
    dg[c] = 0;
    du[c] = to_bf16(dh * dact);
  }
  if constexpr (kKeepH) h[c] = to_bf16(hv);
  return dh_raw[c] * hv;
}

// Each column's dw share is computed in one plain loop over a block (the loop GCC vectorizes),
// then added to lane c % kLanes in column order: the same sum on every ISA.
template <class Act, bool kGated, bool kKeepH>
float gate_backward_columns(const ExpertVariant& variant, const float* dh_raw, const bf16* g, const bf16* u, int64_t n,
                            float w, bf16* dg, bf16* du, bf16* h) {
  const GateParams v{variant.alpha, variant.limit, variant.up_offset};
  constexpr int64_t kBlock = 16 * kLanes;
  alignas(64) float share[kBlock];
  float acc[kLanes] = {};
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t m = n - c0 < kBlock ? n - c0 : kBlock;
    for (int64_t c = 0; c < m; ++c)
      share[c] = gate_backward_column<Act, kGated, kKeepH>(v, c0 + c, dh_raw, g, u, w, dg, du, h);
    for (int64_t c = 0; c < m; ++c) acc[c % kLanes] += share[c];
  }
  return reduce_lanes(acc);
}

// Backward epilogue (GateBackwardFn) of (Act, gated).
template <class Act, bool kGated>
float gate_backward(const ExpertVariant& v, const float* dh_raw, const bf16* g, const bf16* u, int64_t n, float w,
                    bf16* dg, bf16* du, bf16* h) {
  return h ? gate_backward_columns<Act, kGated, true>(v, dh_raw, g, u, n, w, dg, du, h)
           : gate_backward_columns<Act, kGated, false>(v, dh_raw, g, u, n, w, dg, du, h);
}

// rank_update (kTransposed false: G[i][c]) and rank_update_t (true: G[c][i]); the same sums either way.
template <bool kTransposed>
void rank_update_into(float* G, int64_t ldg, int m, int64_t n, const float* coef, int64_t ldcoef, const float* pscale,
                      float scale, const bf16* rows, int64_t ldrow, const int32_t* row_index, int64_t P) {
  if constexpr (kTransposed) {
    for (int64_t c = 0; c < n; ++c)
      for (int i = 0; i < m; ++i) G[c * ldg + i] = 0.0f;
  } else {
    for (int i = 0; i < m; ++i)
      for (int64_t c = 0; c < n; ++c) G[i * ldg + c] = 0.0f;
  }
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
    if constexpr (kTransposed) {  // a row of G per column: the loop over the rank vectorizes
      for (int64_t c = 0; c < n; ++c) {
        float* gc = G + c * ldg;
        const float r0 = r[0][c], r1 = r[1][c], r2 = r[2][c], r3 = r[3][c];
        for (int i = 0; i < m; ++i) gc[i] += a[0][i] * r0 + a[1][i] * r1 + a[2][i] * r2 + a[3][i] * r3;
      }
    } else {
      for (int i = 0; i < m; ++i) {
        float* gi = G + i * ldg;
        float a0 = a[0][i], a1 = a[1][i], a2 = a[2][i], a3 = a[3][i];
        for (int64_t c = 0; c < n; ++c) gi[c] += a0 * r[0][c] + a1 * r[1][c] + a2 * r[2][c] + a3 * r[3][c];
      }
    }
  }
}

void rank_update(float* G, int64_t ldg, int m, int64_t n, const float* coef, int64_t ldcoef, const float* pscale,
                 float scale, const bf16* rows, int64_t ldrow, const int32_t* row_index, int64_t P) {
  rank_update_into<false>(G, ldg, m, n, coef, ldcoef, pscale, scale, rows, ldrow, row_index, P);
}

void rank_update_t(float* G, int64_t ldg, int m, int64_t n, const float* coef, int64_t ldcoef, const float* pscale,
                   float scale, const bf16* rows, int64_t ldrow, const int32_t* row_index, int64_t P) {
  rank_update_into<true>(G, ldg, m, n, coef, ldcoef, pscale, scale, rows, ldrow, row_index, P);
}

void project_one(const bf16* A, int64_t lda, int64_t rows, const float* S, int64_t sk, int64_t sn, int64_t K, int64_t N,
                 float* C, int64_t ldc) {
  if (sk == 1) {  // column n of S is contiguous along k: a dot product per (row, column), S's column read once
    for (int64_t n = 0; n < N; ++n) {
      const float* col = S + n * sn;
      for (int64_t m = 0; m < rows; ++m) {
        const bf16* a = A + m * lda;
        float acc[kLanes] = {};
        int64_t k = 0;
        for (; k + kLanes <= K; k += kLanes)
          for (int l = 0; l < kLanes; ++l) acc[l] += to_f32(a[k + l]) * col[k + l];
        for (int l = 0; k + l < K; ++l) acc[l] += to_f32(a[k + l]) * col[k + l];
        C[m * ldc + n] = reduce_lanes(acc);
      }
    }
    return;
  }
  for (int64_t m = 0; m < rows; ++m) {  // row k of S is contiguous along n: a row update per k
    float* c = C + m * ldc;
    for (int64_t n = 0; n < N; ++n) c[n] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = to_f32(A[m * lda + k]);
      const float* row = S + k * sk;
      for (int64_t n = 0; n < N; ++n) c[n] += a * row[n * sn];
    }
  }
}

void project_f32(const bf16* A, int64_t lda, int64_t rows, const float* const* S, int count, int64_t sk, int64_t sn,
                 int64_t K, int64_t N, float* const* C, int64_t ldc) {
  for (int i = 0; i < count; ++i) project_one(A, lda, rows, S[i], sk, sn, K, N, C[i], ldc);
}

// gemm_t (kernels.hpp): lane j of the 16 columns of a panel summed over the panels, then the lanes in order.
// (The AVX-512 kernel sets use their own, transpose_avx512.hpp.)
[[maybe_unused]] void gemm_t(const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride,
                             int64_t np, int64_t nq, float* C, int64_t ldc, bool accumulate, bool) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t q = 0; q < nq; ++q) {
      float sums[2][kPanelCols] = {};
      for (int64_t p = 0; p < np; ++p) {
        const bf16* a = A + m * lda + p * kPanelCols;
        const bf16* b = B + p * panel_stride + q * 2 * kPanelCols;
        for (int j = 0; j < kPanelCols; ++j) {
          sums[0][j] += to_f32(a[j]) * to_f32(b[2 * j]);
          sums[1][j] += to_f32(a[j]) * to_f32(b[2 * j + 1]);
        }
      }
      for (int t = 0; t < 2; ++t) {
        float s = 0.0f;
        for (int j = 0; j < kPanelCols; ++j) s += sums[t][j];
        C[m * ldc + 2 * q + t] = accumulate ? C[m * ldc + 2 * q + t] + s : s;
      }
    }
}

// (The AVX-512 kernel sets use their own, pack_avx512.hpp.)
[[maybe_unused]] void expand_f32(const float* coef, int64_t ldcoef, int64_t rows, const float* S, int64_t sk,
                                 int64_t sn, int64_t K, int64_t N, float* C, int64_t ldc) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* a = coef + m * ldcoef;
    float* c = C + m * ldc;
    if (sn == 1) {  // row k of S is contiguous along n: a row update per k
      for (int64_t k = 0; k < K; ++k) {
        const float ak = a[k];
        const float* row = S + k * sk;
        for (int64_t n = 0; n < N; ++n) c[n] += ak * row[n];
      }
      continue;
    }
    for (int64_t n = 0; n < N; ++n) {  // column n of S is contiguous along k: a dot product
      const float* col = S + n * sn;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += a[k] * col[k];
      c[n] += acc;
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
constexpr KernelSet make_kernel_set(Isa isa, int mr, int row_multiple, GemmFn gemm, TransposePanelsFn transpose_panels,
                                   DecodePanelsFn decode_panels, GemmCodesFn gemm_codes, GemmTFn gemm_t,
                                   GemmCodesTFn gemm_codes_t, PackPanelsFn pack_panels, ProjectF32Fn project,
                                   ExpandF32Fn expand) {
  return KernelSet{isa,
                   mr,
                   row_multiple,
                   gemm,
                   transpose_panels,
                   decode_panels,
                   gemm_codes,
                   gemm_t,
                   gemm_codes_t,
                   pack_panels,
                   {{gate_forward<Swish, false>, gate_forward<Gelu, false>, gate_forward<GeluTanh, false>,
                     gate_forward<Relu, false>, gate_forward<Relu2, false>},
                    {gate_forward<Swish, true>, gate_forward<Gelu, true>, gate_forward<GeluTanh, true>,
                     gate_forward<Relu, true>, gate_forward<Relu2, true>}},
                   {{gate_backward<Swish, false>, gate_backward<Gelu, false>, gate_backward<GeluTanh, false>,
                     gate_backward<Relu, false>, gate_backward<Relu2, false>},
                    {gate_backward<Swish, true>, gate_backward<Gelu, true>, gate_backward<GeluTanh, true>,
                     gate_backward<Relu, true>, gate_backward<Relu2, true>}},
                   rank_update,
                   rank_update_t,
                   project,
                   expand,
                   to_bf16_row,
                   weighted_sum};
}

}  // namespace
}  // namespace kt
