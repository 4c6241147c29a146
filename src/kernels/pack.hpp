// Packing: the once-per-state conversion of expert weights (and the per-call conversion of the
// active experts' LoRA matrices) into VNNI panels, the B-operand layout of every micro-kernel.
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
// Entries it does not write (padding) must already be zero.
void pack_panels(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset, int64_t panel_step,
                 bf16* dst);

// The frozen base weights of E experts, packed once. The forward layouts contract over the
// input dimension; the backward layouts (the same weights transposed) over the output one.
//   gate_up_fwd[e]: K=H, N=2I, panels interleaved (gate 0, up 0, gate 1, up 1, ...)
//   down_fwd[e]:    K=I, N=H
//   down_bwd[e]:    K=H, N=I             (dh_raw = gy Wd)
//   gate_up_bwd[e]: K=2*Ip, N=H, rows [0,I) gate, [Ip, Ip+I) up   (dx = [dg | du] [Wg; Wu])
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
  PackedExperts(int64_t E, int64_t H, int64_t I, const Source& src, Pool& pool);

  int64_t E, H, I, Ip;
  PanelLayout gate_up_fwd, down_fwd, down_bwd, gate_up_bwd;
  const bf16* gate_up_forward(int64_t e) const { return gate_up_fwd_.data() + e * gate_up_fwd.elements(); }
  const bf16* down_forward(int64_t e) const { return down_fwd_.data() + e * down_fwd.elements(); }
  const bf16* down_backward(int64_t e) const { return down_bwd_.data() + e * down_bwd.elements(); }
  const bf16* gate_up_backward(int64_t e) const { return gate_up_bwd_.data() + e * gate_up_bwd.elements(); }
  size_t nbytes() const { return gate_up_fwd_.bytes() + down_fwd_.bytes() + down_bwd_.bytes() + gate_up_bwd_.bytes(); }

 private:
  Buffer<bf16> gate_up_fwd_, down_fwd_, down_bwd_, gate_up_bwd_;
};

}  // namespace kt
