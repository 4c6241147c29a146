#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

#include "common.hpp"
#include "dlpack.hpp"

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

namespace {

struct WorkspaceCache {
  struct Mapping {
    void* p;
    size_t bytes;
  };
  std::mutex mutex;
  std::vector<Mapping> free;  // oldest first
  size_t cached = 0;
  // Mapped workspace memory in use now, and the most ever in use at once. Unless
  // KT_WORKSPACE_CACHE_MB sets a fixed limit, the cache may keep that peak: the memory one step
  // of the caller's loop needs, so that the next step faults no fresh pages (a fixed 1 GiB made a
  // T=4096 forward+backward zero ~80 MB of pages per call).
  size_t in_use = 0, peak_in_use = 0;
  bool fixed_limit = false;
  size_t fixed = 0;
  WorkspaceCache() {
    const char* mb = std::getenv("KT_WORKSPACE_CACHE_MB");
    fixed_limit = mb && *mb;
    if (fixed_limit) fixed = size_t(std::strtoull(mb, nullptr, 10)) << 20;
  }
  size_t limit() const { return fixed_limit ? fixed : peak_in_use; }
  void take(size_t bytes) {
    in_use += bytes;
    if (in_use > peak_in_use) peak_in_use = in_use;
  }
};

WorkspaceCache& workspace_cache() {
  static WorkspaceCache* cache = new WorkspaceCache;  // never destroyed: workers may free at exit
  return *cache;
}

}  // namespace

void* allocate_workspace(size_t bytes, size_t* mapped) {
  if (bytes < kMapThreshold) {
    *mapped = 0;
    return allocate_bytes(bytes);
  }
  const size_t want = size_t(round_up(int64_t(bytes), int64_t(kHugePage)));
  WorkspaceCache& c = workspace_cache();
  std::vector<WorkspaceCache::Mapping> evicted;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    size_t best = c.free.size();
    for (size_t i = 0; i < c.free.size(); ++i)  // the smallest mapping that fits, at most 2x the request
      if (c.free[i].bytes >= want && c.free[i].bytes <= 2 * want &&
          (best == c.free.size() || c.free[i].bytes < c.free[best].bytes))
        best = i;
    if (best < c.free.size()) {
      WorkspaceCache::Mapping m = c.free[best];
      c.free.erase(c.free.begin() + long(best));
      c.cached -= m.bytes;
      c.take(m.bytes);
      *mapped = m.bytes;
      return m.p;
    }
    c.take(want);
    // A miss replaces the oldest cached memory instead of adding to it, so mappings of sizes no
    // longer asked for do not pile up: resident memory stays flat when call shapes change.
    for (size_t freed = 0; freed < want && !c.free.empty();) {
      evicted.push_back(c.free.front());
      freed += c.free.front().bytes;
      c.cached -= c.free.front().bytes;
      c.free.erase(c.free.begin());
    }
  }
  for (const auto& m : evicted) munmap(m.p, m.bytes);
  *mapped = want;
  try {
    return allocate_bytes(want);
  } catch (...) {
    std::lock_guard<std::mutex> lock(c.mutex);
    c.in_use -= want;
    throw;
  }
}

size_t release_workspaces() {
  WorkspaceCache& c = workspace_cache();
  std::vector<WorkspaceCache::Mapping> all;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    all.swap(c.free);
    c.cached = 0;
  }
  size_t bytes = 0;
  for (const auto& m : all) munmap(m.p, m.bytes), bytes += m.bytes;
  return bytes;
}

void free_workspace(void* p, size_t mapped) {
  WorkspaceCache& c = workspace_cache();
  std::vector<WorkspaceCache::Mapping> evicted;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    c.in_use -= mapped;
    if (mapped <= c.limit()) {
      while (c.cached + mapped > c.limit()) {  // make room: drop the oldest
        evicted.push_back(c.free.front());
        c.cached -= c.free.front().bytes;
        c.free.erase(c.free.begin());
      }
      c.free.push_back({p, mapped});
      c.cached += mapped;
      p = nullptr;
    }
  }
  for (const auto& m : evicted) munmap(m.p, m.bytes);
  if (p) munmap(p, mapped);
}

namespace {

struct WorkspaceArray {
  DLManagedTensor managed;
  int64_t shape[8], strides[8];
  size_t bytes, mapped;
};

void delete_workspace_array(DLManagedTensor* t) {
  WorkspaceArray* a = static_cast<WorkspaceArray*>(t->manager_ctx);
  if (a->mapped)
    free_workspace(t->dl_tensor.data, a->mapped);
  else
    free_bytes(t->dl_tensor.data, a->bytes);
  delete a;
}

}  // namespace

DLManagedTensor* workspace_f32_array(const int64_t* shape, int ndim) {
  if (ndim < 0 || ndim > 8) throw std::invalid_argument("shape: expected at most 8 dimensions");
  auto a = std::make_unique<WorkspaceArray>();
  size_t n = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] < 0) throw std::invalid_argument("shape: expected sizes >= 0");
    a->shape[i] = shape[i];
    a->strides[i] = int64_t(n);
    n *= size_t(shape[i]);
  }
  a->bytes = std::max<size_t>(n, 1) * sizeof(float);
  void* data = allocate_workspace(a->bytes, &a->mapped);
  DLManagedTensor& t = a->managed;
  t.dl_tensor = DLTensor{data, DLDevice{1, 0}, ndim, DLDataType{2, 32, 1}, a->shape, a->strides, 0};
  t.manager_ctx = a.get();
  t.deleter = delete_workspace_array;
  return &a.release()->managed;
}

void delete_array(DLManagedTensor* t) { t->deleter(t); }

}  // namespace kt
