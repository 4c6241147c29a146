#include <algorithm>
#include <atomic>
#include <chrono>

#include "common.hpp"
#include "kernels.hpp"
#include "pool.hpp"

namespace kt {

double kernel_peak_gflops(Isa isa, int threads, double seconds) {
  const KernelSet& ks = kernels_for(isa);
  // A: 2 mr x 128, B: 6 panels x 128 (2 or 3 register/tile blocks per ISA): both stay in L1.
  constexpr int64_t K = 128, np = 6;
  const int64_t rows = 2 * ks.mr, lda = K;
  const int64_t panel = K * kPanelCols;
  std::atomic<int64_t> calls{0};
  auto pool = Pool::shared(threads);
  using clock = std::chrono::steady_clock;
  // Operands are shared read-only (each core keeps its own L1 copy); C is per worker.
  Buffer<bf16> A(size_t(rows * lda)), B(size_t(np * panel));
  std::fill(A.data(), A.data() + A.size(), bf16(0x3f80));  // 1.0
  std::fill(B.data(), B.data() + B.size(), bf16(0x3c00));  // 2^-7: sums stay finite
  const int64_t c_size = rows * np * kPanelCols;
  Buffer<float> C(size_t(c_size * pool->threads()));
  auto job = std::make_shared<Job>([&](Worker& w) {
    float* c = C.data() + w.tid() * c_size;
    int64_t n = 0;
    const auto end = clock::now() + std::chrono::duration<double>(seconds);
    while (clock::now() < end) {
      for (int i = 0; i < 64; ++i) ks.gemm(A.data(), lda, rows, B.data(), panel, K / 2, np, c, np * kPanelCols, i > 0, nullptr);
      n += 64;
    }
    calls += n;
  });
  auto t0 = clock::now();
  pool->run(job);
  double elapsed = std::chrono::duration<double>(clock::now() - t0).count();
  double flops = double(calls.load()) * 2.0 * rows * np * kPanelCols * K;
  return flops / elapsed * 1e-9;
}

}  // namespace kt
