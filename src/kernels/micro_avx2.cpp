// AVX2 + FMA path: bf16 operands widened to fp32 in registers (a shift or a mask), fp32 FMA.
// Compiled with -mavx2 -mfma only; chosen at run time.
#include <immintrin.h>

#include <algorithm>

#include "decode.hpp"
#include "elementwise.hpp"
#include "pack.hpp"

namespace kt {
namespace {

constexpr int kMr = 4;

inline int32_t load_pair(const bf16* p) { return __builtin_bit_cast(int32_t, *reinterpret_cast<const uint32_t*>(p)); }

// One panel of 16 columns for MR rows. The (k, k+1) pair of a 32-bit lane splits into two
// fp32 values: the low half shifted up (k), the high half masked (k+1).
template <int MR>
void gemm_panel(const bf16* A, int64_t lda, const bf16* B, int64_t kpairs, float* C, int64_t ldc, bool accumulate) {
  const __m256i hi_mask = _mm256_set1_epi32(int32_t(0xffff0000u));
  __m256 c[MR][2];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) c[m][h] = accumulate ? _mm256_loadu_ps(C + m * ldc + 8 * h) : _mm256_setzero_ps();
  for (int64_t q = 0; q < kpairs; ++q) {
    __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + q * 32));
    __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(B + q * 32 + 16));
    __m256 b0e = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
    __m256 b0o = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
    __m256 b1e = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
    __m256 b1o = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
    for (int m = 0; m < MR; ++m) {
      __m256i a = _mm256_set1_epi32(load_pair(A + m * lda + 2 * q));
      __m256 ae = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
      __m256 ao = _mm256_castsi256_ps(_mm256_and_si256(a, hi_mask));
      c[m][0] = _mm256_fmadd_ps(ae, b0e, c[m][0]);
      c[m][1] = _mm256_fmadd_ps(ae, b1e, c[m][1]);
      c[m][0] = _mm256_fmadd_ps(ao, b0o, c[m][0]);
      c[m][1] = _mm256_fmadd_ps(ao, b1o, c[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(C + m * ldc + 8 * h, c[m][h]);
}

using PanelFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, float*, int64_t, bool);
constexpr PanelFn kPanelFns[kMr] = {gemm_panel<1>, gemm_panel<2>, gemm_panel<3>, gemm_panel<4>};  // by rows - 1

// Any row count: blocks of kMr rows, then one block of the rest (no padding to kMr).
void gemm(const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride, int64_t kpairs, int np,
          float* C, int64_t ldc, bool accumulate, PrefetchStream*) {  // the prefetch hint is not used here
  for (int64_t m = 0; m < rows; m += kMr) {
    const PanelFn panel = kPanelFns[std::min<int64_t>(kMr, rows - m) - 1];
    for (int p = 0; p < np; ++p)
      panel(A + m * lda, lda, B + p * panel_stride, kpairs, C + m * ldc + p * kPanelCols, ldc, accumulate);
  }
}

}  // namespace

extern const KernelSet kAvx2Kernels = make_kernel_set(Isa::avx2, kMr, 1, gemm, transpose_panels_generic,
                                                      decode_panels_portable, nullptr, gemm_t, nullptr, pack_panels,
                                                      project_f32, expand_f32);

}  // namespace kt
