// Packing: the once-per-state conversion of expert weights into VNNI panels (the B operand of
// every micro-kernel, and exactly an AMX B tile per 16 pair-rows), and the operand makers that
// hand the macro-kernels one (expert, column block) of B: a pointer into the packed forward
// layout, or that layout transposed on the fly for the backward GEMMs. One packed copy only.
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

// Which bf16 part of each value pack_panels writes: bf16(v), or for fp32 sources the remainder
// bf16(v - bf16(v)) (the two together carry v to ~16 bits).
enum class PackPart { high, low };

// Writes the K x N matrix src into panels starting at dst, rows shifted by k_offset (even),
// panel j at dst + j * panel_step * panel_stride (panel_step 2 interleaves two matrices).
// Entries it does not write (padding) must already be zero.
void pack_panels(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset, int64_t panel_step,
                 bf16* dst, PackPart part = PackPart::high);

// The GEMMs of the layer, each with its B operand (MATH.md):
//   gate_up:   g|u  = x Wg^T | x Wu^T    K=H,    N=2*I16, gate and up panels interleaved
//   down:      o    = h Wd^T             K=I,    N=H
//   down_t:    dh   = gy Wd              K=H,    N=I      (down's layout transposed)
//   gate_up_t: dx   = [dg|du] [Wg; Wu]   K=2*Ip, N=H      (gate_up's layout transposed; up rows from Ip)
enum class Gemm : int { gate_up = 0, down = 1, down_t = 2, gate_up_t = 3 };

// Where the backward's B operands come from: transposed per (expert, column block) into a
// per-worker buffer (one packed copy), or kept transposed in memory (twice the memory).
enum class BackwardWeights : int { on_the_fly = 0, resident = 1 };

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

  int64_t E, H, I, Ip;
  BackwardWeights backward;
  const PanelLayout& layout(Gemm g) const { return layouts_[int(g)]; }

  // Panels [p0, p0 + np) of expert e's B operand for GEMM g. Forward GEMMs (and resident
  // backward ones) point into the packed weights; otherwise the panels are transposed into
  // `buffer` (operand_buffer_elements(g, np) elements) with the kernels' transpose_panels.
  const bf16* operand(Gemm g, int64_t e, int64_t p0, int64_t np, const KernelSet& ks, bf16* buffer) const;
  int64_t operand_buffer_elements(Gemm g, int64_t np) const { return np * layout(g).panel_stride(); }

  // Expert e's weights as the kernels multiply them, fp32: gate, up [I][H], down [H][I].
  void dequantize(int64_t e, float* gate, float* up, float* down) const;
  size_t nbytes() const { return gate_up_.bytes() + down_.bytes() + gate_up_t_.bytes() + down_t_.bytes(); }

 private:
  const bf16* packed(Gemm g, int64_t e) const;
  void make_operand(Gemm g, int64_t e, int64_t p0, int64_t np, TransposePanelsFn transpose, bf16* dst) const;
  PanelLayout layouts_[4];
  Buffer<bf16> gate_up_, down_;       // forward layouts
  Buffer<bf16> gate_up_t_, down_t_;   // resident backward layouts (BackwardWeights::resident only)
};

}  // namespace kt
