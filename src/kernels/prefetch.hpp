// Software prefetch of a sequential stream that a loop reads at memory's speed (the few-row GEMMs
// straight from quantized codes, the LoRA projects of experts with few rows): the hardware prefetcher
// alone leaves such a loop latency-bound. Internal linkage.
#pragma once
#include <immintrin.h>

namespace kt {
namespace {

// At each new line p of the stream, ask for the line kPrefetchBytes ahead into L1 and the one
// kPrefetchL2Bytes ahead into L2, which keeps more lines in flight than L1 prefetches alone (T0 2 KiB
// ahead instead of 1: 2% slower). T=16 forward of the bench layer, same process, against the L1 prefetch
// alone: gemm_codes int4_group 4-12% and mxfp4 6-18% faster in six runs, int8 and fp8_block 0-6%; the
// L2 prefetch 2 to 4 KiB ahead within 3%, 6 to 12 KiB no better.
constexpr int kPrefetchBytes = 1024, kPrefetchL2Bytes = 2048;
inline void prefetch_stream(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchL2Bytes, _MM_HINT_T1);
}

}  // namespace
}  // namespace kt
