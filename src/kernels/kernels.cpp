// The run-time choice between the per-ISA kernel tables.
#include <stdexcept>
#include <string>

#include "kernels.hpp"

namespace kt {

#if KT_BUILD_AVX2
extern const KernelSet kAvx2Kernels;
#endif
#if KT_BUILD_AVX512
extern const KernelSet kAvx512Kernels;
#endif
#if KT_BUILD_AMX
extern const KernelSet kAmxKernels;
#endif
#if KT_BUILD_AMX_EMULATED
extern const KernelSet kAmxEmulatedKernels;
#endif

namespace {
const KernelSet* table(Isa isa) {
  switch (isa) {
#if KT_BUILD_AVX2
    case Isa::avx2:
      return &kAvx2Kernels;
#endif
#if KT_BUILD_AVX512
    case Isa::avx512:
      return &kAvx512Kernels;
#endif
#if KT_BUILD_AMX
    case Isa::amx:
      return &kAmxKernels;
#endif
#if KT_BUILD_AMX_EMULATED
    case Isa::amx_emulated:
      return &kAmxEmulatedKernels;
#endif
    default:
      return nullptr;
  }
}
}  // namespace

bool kernels_built(Isa isa) { return table(isa) != nullptr; }

const KernelSet& kernels_for(Isa isa) {
  const KernelSet* k = table(isa);
  if (!k || !isa_runnable(isa)) throw std::invalid_argument(std::string("ISA path '") + isa_name(isa) + "' is not available on this CPU or build");
  return *k;
}

}  // namespace kt
