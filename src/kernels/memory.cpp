#include <sys/mman.h>

#include <cstdlib>
#include <new>

#include "common.hpp"

namespace kt {
namespace {
constexpr size_t kMapThreshold = size_t(1) << 20;
constexpr size_t kHugePage = size_t(2) << 20;
}  // namespace

void* allocate_bytes(size_t bytes) {
  if (bytes >= kMapThreshold) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (bytes >= kHugePage) madvise(p, bytes, MADV_HUGEPAGE);  // fewer TLB misses when streaming
#endif
    return p;
  }
  void* p = std::aligned_alloc(64, size_t(round_up(int64_t(bytes), 64)));
  if (!p) throw std::bad_alloc();
  return p;
}

void free_bytes(void* p, size_t bytes) {
  if (bytes >= kMapThreshold)
    munmap(p, bytes);
  else
    std::free(p);
}

}  // namespace kt
