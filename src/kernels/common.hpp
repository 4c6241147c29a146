// Small shared definitions: bf16 bit conversions, rounding helpers, aligned buffers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "types.hpp"

namespace kt {

inline float bf16_to_f32(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays a (quiet) NaN. Branch-free so loops vectorize.
inline bf16 f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
constexpr int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }

inline float load_as_f32(const void* p, DType t, int64_t i) {
  return t == DType::f32 ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const bf16*>(p)[i]);
}

// Large arrays are mapped straight from the OS, so freeing them returns the memory at once
// (malloc would keep it in its heap: resident memory would not track what is alive) and the
// weights can sit on huge pages. Small ones come from malloc.
void* allocate_bytes(size_t bytes);
void free_bytes(void* p, size_t bytes);

// The per-call workspaces and forward caches of the macro-kernels are recycled instead: faulting
// in (and zeroing) hundreds of MiB of fresh pages at every call cost as much as the GEMMs. Freed
// large workspaces stay mapped for the next call, in a cache bounded by the most workspace memory
// the process has had in use at once (or by KT_WORKSPACE_CACHE_MB; 0 turns it off); *mapped returns the bytes mapped (free_workspace needs them).
void* allocate_workspace(size_t bytes, size_t* mapped);
void free_workspace(void* p, size_t mapped);
// Unmaps every cached workspace; returns the bytes given back.
size_t release_workspaces();

enum class Memory { owned, workspace };

// 64-byte aligned, uninitialised array (cache lines and AMX tile rows).
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n, Memory kind = Memory::owned) : n_(n) {
    if (!n) return;
    if (kind == Memory::workspace)
      ptr_ = static_cast<T*>(allocate_workspace(n * sizeof(T), &mapped_));
    else
      ptr_ = static_cast<T*>(allocate_bytes(n * sizeof(T)));
  }
  ~Buffer() { release(); }
  Buffer(Buffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_), mapped_(o.mapped_) { o.ptr_ = nullptr, o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = o.ptr_, n_ = o.n_, mapped_ = o.mapped_;
      o.ptr_ = nullptr, o.n_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  void release() {
    if (ptr_ && mapped_)
      free_workspace(ptr_, mapped_);
    else if (ptr_)
      free_bytes(ptr_, n_ * sizeof(T));
    ptr_ = nullptr;
  }
  T* ptr_ = nullptr;
  size_t n_ = 0;
  size_t mapped_ = 0;  // workspaces: bytes mapped (0: owned memory)
};

}  // namespace kt
