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

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// 64-byte aligned, uninitialised array (cache lines and AMX tile rows).
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) : n_(n) {
    if (n == 0) return;
    size_t bytes = round_up(int64_t(n * sizeof(T)), 64);
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    ptr_.reset(static_cast<T*>(p));
  }
  T* data() { return ptr_.get(); }
  const T* data() const { return ptr_.get(); }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  void zero() {
    if (n_) std::memset(ptr_.get(), 0, n_ * sizeof(T));
  }

 private:
  std::unique_ptr<T, FreeDeleter> ptr_;
  size_t n_ = 0;
};

}  // namespace kt
