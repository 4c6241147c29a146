// AVX-512 path: VDPBF16PS multiplies a broadcast (k, k+1) pair of A with the matching pairs of
// 16 columns of B and accumulates in fp32. Compiled with AVX-512 F/BW/VL/BF16 flags only.
#include <immintrin.h>

#include "decode_avx512.hpp"
#include "elementwise.hpp"
#include "transpose_avx512.hpp"

namespace kt {
namespace {

constexpr int kMr = 8;
constexpr int kMaxPanels = 3;  // 8 x 3 accumulators + 3 B registers fit the 32 zmm

inline int32_t load_pair(const bf16* p) { return __builtin_bit_cast(int32_t, *reinterpret_cast<const uint32_t*>(p)); }

template <int NP, bool kPrefetch>
void gemm_panels(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t kpairs, float* C,
                 int64_t ldc, bool accumulate, PrefetchStream* prefetch) {
  PrefetchStream ahead = kPrefetch ? *prefetch : PrefetchStream{};  // in registers during the loop
  __m512 c[kMr][NP];
  for (int m = 0; m < kMr; ++m)
    for (int p = 0; p < NP; ++p)
      c[m][p] = accumulate ? _mm512_loadu_ps(C + m * ldc + p * kPanelCols) : _mm512_setzero_ps();
  for (int64_t q = 0; q < kpairs; ++q) {
    if constexpr (kPrefetch)
      if (!ahead.done()) _mm_prefetch(ahead.advance(), _MM_HINT_T1);
    __m512bh b[NP];
    for (int p = 0; p < NP; ++p) b[p] = (__m512bh)_mm512_load_si512(B + p * panel_stride + q * 32);
    for (int m = 0; m < kMr; ++m) {
      __m512bh a = (__m512bh)_mm512_set1_epi32(load_pair(A + m * lda + 2 * q));
      for (int p = 0; p < NP; ++p) c[m][p] = _mm512_dpbf16_ps(c[m][p], a, b[p]);
    }
  }
  for (int m = 0; m < kMr; ++m)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(C + m * ldc + p * kPanelCols, c[m][p]);
  if constexpr (kPrefetch) *prefetch = ahead;
}

template <int NP>
void gemm_panels(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t kpairs, float* C,
                 int64_t ldc, bool accumulate, PrefetchStream* prefetch) {
  if (prefetch && !prefetch->done())
    gemm_panels<NP, true>(A, lda, B, panel_stride, kpairs, C, ldc, accumulate, prefetch);
  else
    gemm_panels<NP, false>(A, lda, B, panel_stride, kpairs, C, ldc, accumulate, nullptr);
}

void gemm_mr(const bf16* A, int64_t lda, const bf16* B, int64_t panel_stride, int64_t kpairs, int np, float* C,
             int64_t ldc, bool accumulate, PrefetchStream* prefetch) {
  int p = 0;
  for (; p + kMaxPanels <= np; p += kMaxPanels)
    gemm_panels<kMaxPanels>(A, lda, B + p * panel_stride, panel_stride, kpairs, C + p * kPanelCols, ldc, accumulate,
                            prefetch);
  const bf16* b = B + p * panel_stride;
  float* c = C + p * kPanelCols;
  switch (np - p) {
    case 2:
      gemm_panels<2>(A, lda, b, panel_stride, kpairs, c, ldc, accumulate, prefetch);
      break;
    case 1:
      gemm_panels<1>(A, lda, b, panel_stride, kpairs, c, ldc, accumulate, prefetch);
      break;
    default:
      break;
  }
}

void gemm(const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride, int64_t kpairs, int np,
          float* C, int64_t ldc, bool accumulate, PrefetchStream* prefetch) {
  for (int64_t m = 0; m < rows; m += kMr)
    gemm_mr(A + m * lda, lda, B, panel_stride, kpairs, np, C + m * ldc, ldc, accumulate, prefetch);
}

}  // namespace

extern const KernelSet kAvx512Kernels = make_kernel_set(Isa::avx512, kMr, gemm, transpose_panels_avx512, decode_panels_avx512);

}  // namespace kt
