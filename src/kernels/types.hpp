// Plain type definitions shared by every file, ISA-specific ones included (no inline code:
// anything inline compiled with ISA flags must stay inside that ISA's file).
#pragma once
#include <cstdint>

namespace kt {
using bf16 = uint16_t;  // raw bfloat16 bits; the math is always done in fp32
enum class DType : int { f32 = 0, bf16 = 1 };
}  // namespace kt
