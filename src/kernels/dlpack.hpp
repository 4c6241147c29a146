// The DLPack ABI (dmlc/dlpack, the unversioned DLManagedTensor that torch.from_dlpack takes), as far as
// the library hands arrays to Python: fp32 CPU arrays whose memory comes from the workspace cache.
#pragma once
#include <cstdint>

namespace kt {

struct DLDevice {
  int32_t device_type;  // 1: CPU
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 2: float
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// A contiguous uninitialised fp32 array of `shape` (ndim <= 8) for the caller, in workspace memory
// (common.hpp): its deleter gives the memory back to the workspace cache, so that the next call's
// outputs of that size fault no fresh pages. Throws std::bad_alloc, std::invalid_argument.
DLManagedTensor* workspace_f32_array(const int64_t* shape, int ndim);
// Calls t's deleter (an array never handed over).
void delete_array(DLManagedTensor* t);

}  // namespace kt
