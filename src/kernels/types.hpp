// Plain type definitions shared by every file, ISA-specific ones included (no inline code:
// anything inline compiled with ISA flags must stay inside that ISA's file).
#pragma once
#include <cstdint>

namespace kt {
using bf16 = uint16_t;  // raw bfloat16 bits; the math is always done in fp32
enum class DType : int { f32 = 0, bf16 = 1 };
// How the frozen base weights are stored (MATH.md, "Quantized base weights").
enum class Storage : int { bf16 = 0, int8 = 1, fp8_block = 2, int4_group = 3, mxfp4 = 4 };
enum class ScaleType : int { f32 = 0, bf16 = 1 };  // int4_group's scales keep the checkpoint's precision
}  // namespace kt
