// Packing: the once-per-state conversion of expert weights into VNNI panels (the B operand of
// every micro-kernel, and exactly an AMX B tile per 16 pair-rows) or into a quantized storage's
// panels (codes in the same order, scales beside: QuantPanels), and the operand makers that hand
// the macro-kernels one (expert, column block) of B: a pointer into the packed bf16 forward
// layout, or bf16 panels made into a per-worker buffer (decoded, transposed for the backward
// GEMMs, or both). One packed copy only.
#pragma once
#include <cstdint>
#include <memory>

#include "common.hpp"
#include "kernels.hpp"

namespace kt {

class Pool;

// Shape of one packed B operand of logical size K x N: ceil(N/16) panels of Kp/2 x 16 x 2.
struct PanelLayout {
  int64_t K = 0, N = 0, Kp = 0, panels = 0;
  PanelLayout() = default;
  PanelLayout(int64_t k, int64_t n) : K(k), N(n), Kp(round_up(k, kKAlign)), panels(ceil_div(n, kPanelCols)) {}
  int64_t panel_stride() const { return Kp * kPanelCols; }
  int64_t elements() const { return panels * panel_stride(); }
};

// A strided matrix handed in by the caller: element (k, n) of B is data[k*sk + n*sn].
struct MatrixView {
  const void* data;
  DType dtype;
  int64_t sk, sn;
};

// Writes the K x N matrix src into panels starting at dst, rows shifted by k_offset (even),
// panel j at dst + j * panel_step * panel_stride (panel_step 2 interleaves two matrices).
// Entries it does not write (padding) must already be zero. lo_delta (even, non-zero): each value v
// also gets its low part bf16(v - bf16(v)) written lo_delta elements after bf16(v) (the two carry an
// fp32 v to ~16 bits; zero for bf16 sources); both parts then round as VCVTNE2PS2BF16 (denormals to
// zero), so that every ISA's packer agrees bitwise.
void pack_panels(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset, int64_t panel_step,
                 bf16* dst, int64_t lo_delta = 0);

// Test hook: pack_panels of ISA path isa's kernel set on an fp32 matrix (element (k, n) at src[k*sk + n*sn]).
void pack_panels_f32(Isa isa, const float* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t Kp,
                     int64_t k_offset, int64_t panel_step, bf16* dst, int64_t lo_delta);
// Test hooks: KernelSet::gemm_t, project_f32 and expand_f32 of ISA path isa.
void gemm_t(Isa isa, const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride, int64_t np,
            int64_t nq, float* C, int64_t ldc, bool accumulate);
// project_f32 reads S and S2 in lock-step into C and C2 unless S2 is null.
void project_f32(Isa isa, const bf16* A, int64_t lda, int64_t rows, const float* S, const float* S2, int64_t sk,
                 int64_t sn, int64_t K, int64_t N, float* C, float* C2, int64_t ldc);
void expand_f32(Isa isa, const float* coef, int64_t ldcoef, int64_t rows, const float* S, int64_t sk, int64_t sn,
                int64_t K, int64_t N, float* C, int64_t ldc);

// The GEMMs of the layer, each with its B operand (MATH.md):
//   gate_up:   g|u  = x Wg^T | x Wu^T    K=H,    N=2*I16, gate and up panels interleaved
//   down:      o    = h Wd^T             K=I,    N=H
//   down_t:    dh   = gy Wd              K=H,    N=I      (down's layout transposed)
//   gate_up_t: dx   = [dg|du] [Wg; Wu]   K=2*Ip, N=H      (gate_up's layout transposed; up rows from Ip)
enum class Gemm : int { gate_up = 0, down = 1, down_t = 2, gate_up_t = 3 };

// Where the backward's B operands come from: transposed per (expert, column block) into a
// per-worker buffer (one packed copy), or kept transposed in memory (twice the memory).
enum class BackwardWeights : int { on_the_fly = 0, resident = 1 };

// One projection W [out][in] of a quantized checkpoint, stacked over experts, contiguous:
//   int8        codes int8 [E][out][in]                  scales fp32 [E][out]
//   fp8_block   codes e4m3fn [E][out][in]                scales fp32 [E][ceil(out/128)][ceil(in/128)]
//   int4_group  codes int32 [E][out][ceil(in/8)]         scales fp32 or bf16 [E][out][ceil(in/32)]
//               (compressed-tensors' pack-quantized: element i as q + 8 in bits 4 (i % 8) of word i / 8)
//   mxfp4       codes uint8 [E][out][ceil(in/32)][16]    scales E8M0 uint8 [E][out][ceil(in/32)]
//               (two e2m1 codes a byte, the lower index in the low nibble)
struct QuantSource {
  const void* codes;
  const void* scales;
};

// The frozen base weights of E experts, packed once in the forward layouts.
class PackedExperts {
 public:
  struct Tensor3 {  // an [E][rows][cols] tensor of the caller, strides in elements
    const void* data;
    DType dtype;
    int64_t strides[3];
  };
  struct Source {
    Tensor3 gate, up, down;
  };
  PackedExperts(int64_t E, int64_t H, int64_t I, const Source& src, Pool& pool,
                BackwardWeights backward = BackwardWeights::on_the_fly);
  struct QuantizedSource {
    Storage storage;
    ScaleType scale_type;  // int4_group's scales; the other formats have one scale type
    QuantSource gate, up, down;
  };
  PackedExperts(int64_t E, int64_t H, int64_t I, const QuantizedSource& src, Pool& pool);

  int64_t E, H, I, Ip;
  BackwardWeights backward;
  Storage storage = Storage::bf16;
  ScaleType scale_type = ScaleType::f32;
  const PanelLayout& layout(Gemm g) const { return layouts_[int(g)]; }

  // Panels [p0, p0 + np) of expert e's B operand for GEMM g. bf16 forward GEMMs (and resident
  // backward ones) point into the packed weights; otherwise the panels are made in `buffer`
  // (operand_buffer_elements(g, np) elements; none needed where it is 0) with the kernels'
  // decode_panels and transpose_panels.
  const bf16* operand(Gemm g, int64_t e, int64_t p0, int64_t np, const KernelSet& ks, bf16* buffer) const;
  // Pair-rows [q0, q0 + nq) of operand(g, e, p0, np) for a forward GEMM g: a view into the packed
  // bf16 weights, or (a quantized storage) decoded into `buffer` (np * nq * 32 elements) with panel
  // stride nq * 32. Lets a macro-kernel decode K a chunk at a time into L1, right before its use.
  struct OperandView {
    const bf16* data;
    int64_t panel_stride;
  };
  OperandView forward_operand(Gemm g, int64_t e, int64_t p0, int64_t np, int64_t q0, int64_t nq, const KernelSet& ks,
                              bf16* buffer) const;
  // C[rows][16*np] = A x operand(g, e, p0, np) of a forward GEMM g straight from a quantized
  // storage's codes (ks.gemm_codes); false (nothing done) for bf16, where the ISA has no such kernel,
  // or for more rows than that pays for in this storage (4-bit formats: 16, 8-bit: 4).
  bool forward_from_codes(Gemm g, int64_t e, int64_t p0, int np, const bf16* A, int64_t lda, int64_t rows, float* C,
                          int64_t ldc, const KernelSet& ks) const;
  // Whether forward_from_codes multiplies `rows` rows (it does for any np).
  bool streams_codes(int64_t rows, const KernelSet& ks) const;
  // C[rows][16*np] = A x operand(g, e, p0, np) of a backward GEMM g (down_t; gate_up_t, whose A holds
  // dg at [0, Ip) and du at [Ip, 2 Ip)) without the transposed operand: the transpose of the forward
  // panels' pair-rows that those columns are (ks.gemm_t), straight from the packed bf16 weights or decoded
  // into `buffer` (operand_buffer_elements(g, np)). False (nothing done) for resident backward weights.
  // For an expert with few rows, where making the operand costs more than using it.
  bool backward_from_forward(Gemm g, int64_t e, int64_t p0, int np, const bf16* A, int64_t lda, int64_t rows,
                             float* C, int64_t ldc, const KernelSet& ks, bf16* buffer) const;
  // What operand(g, e, p0, np) reads when it transposes bf16 panels, as a stream to prefetch while
  // the previous operand is in use; empty for the other operands.
  PrefetchStream operand_source(Gemm g, int64_t e, int64_t p0, int64_t np) const;
  int64_t operand_buffer_elements(Gemm g, int64_t np) const;

  // Expert e's weights as the kernels multiply them, fp32: gate, up [I][H], down [H][I].
  void dequantize(int64_t e, float* gate, float* up, float* down) const;
  size_t nbytes() const {
    return gate_up_.bytes() + down_.bytes() + gate_up_t_.bytes() + down_t_.bytes() + quant_[0].bytes() +
           quant_[1].bytes();
  }
  // A quantized storage's packed bytes of forward GEMM g (gate_up or down), for serialisation.
  const Buffer<uint8_t>& quantized(Gemm g) const { return quant_[int(g)]; }
  // Restores a quantized storage from those bytes (the same shapes, storage and scale type);
  // throws std::invalid_argument if their sizes do not match.
  PackedExperts(int64_t E, int64_t H, int64_t I, Storage storage, ScaleType scale_type, const uint8_t* gate_up,
                size_t gate_up_bytes, const uint8_t* down, size_t down_bytes);

 private:
  const bf16* packed(Gemm g, int64_t e) const;
  QuantPanels quant_panels(Gemm g, int64_t e) const;
  void init_quantized();
  // Rows [k0, k0 + kcount) of the source panels first, first + step, ... (n of them) of forward GEMM
  // f, transposed into rows [row0, row0 + rows) of dst's panels; quantized panels are decoded
  // into `scratch` a chunk at a time first.
  void transpose_from(Gemm f, int64_t e, int64_t first, int64_t step, int64_t n, int64_t k0, int64_t kcount,
                      TransposePanelsFn transpose, DecodePanelsFn decode, bf16* dst, int64_t dst_panel_stride,
                      int64_t row0, int64_t rows, bf16* scratch) const;
  void make_operand(Gemm g, int64_t e, int64_t p0, int64_t np, TransposePanelsFn transpose, DecodePanelsFn decode,
                    bf16* dst) const;
  PanelLayout layouts_[4];
  Buffer<bf16> gate_up_, down_;       // forward layouts (bf16)
  Buffer<bf16> gate_up_t_, down_t_;   // resident backward layouts (BackwardWeights::resident only)
  Buffer<uint8_t> quant_[2];          // forward layouts of a quantized storage (QuantPanels), by Gemm
  int64_t panel_bytes_[2] = {}, scale_offset_[2] = {};
};

}  // namespace kt
